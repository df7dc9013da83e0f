"""The shipped sample set: what the demo, docs and heat-map tests rely on.

The checks on the shipped files need no scikit-image; regenerating them (to prove the script still
makes the same bytes) runs only where scikit-image is installed.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from anomon.images import iter_image_files, load_image

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
SCRIPT = SAMPLE / "make_sample_data.py"
IMAGE_SIZE = 160
TEXTURES = {"brick"}  # the shipped set is one product (see make_sample_data.SHIPPED_TEXTURES)
KINDS = {"scratch", "spot", "crack", "missing"}


def _pngs(folder: str) -> list[Path]:
    return sorted((SAMPLE / folder).glob("*.png"))


def _defects() -> dict:
    return json.loads((SAMPLE / "anomalous" / "defects.json").read_text())


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_sample_data", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_counts_in_range_and_textures_balanced() -> None:
    normal, anomalous = _pngs("normal"), _pngs("anomalous")
    assert 120 <= len(normal) <= 180
    assert 20 <= len(anomalous) <= 40
    per_texture = {t: sum(p.name.startswith(t + "_") for p in normal) for t in TEXTURES}
    assert len(set(per_texture.values())) == 1, per_texture
    assert sum(per_texture.values()) == len(normal)
    # Nothing else an image loader would pick up by walking the folder.
    assert len(list(iter_image_files(SAMPLE))) == len(normal) + len(anomalous)


def test_every_image_decodes_as_documented_greyscale_square() -> None:
    for path in _pngs("normal") + _pngs("anomalous"):
        img = load_image(path)
        assert img.format == "PNG", path
        assert img.mode == "L", path
        assert img.size == (IMAGE_SIZE, IMAGE_SIZE), path


def test_normal_images_are_not_flat_or_duplicated() -> None:
    arrays = [np.asarray(load_image(p)) for p in _pngs("normal")]
    assert all(a.std() > 10 for a in arrays)
    assert len({a.tobytes() for a in arrays}) == len(arrays)


def test_total_size_under_five_megabytes() -> None:
    total = sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file())
    assert total < 5_000_000, total


def test_every_anomalous_image_has_an_exact_box_inside_the_image() -> None:
    manifest = _defects()
    assert manifest["image_size"] == [IMAGE_SIZE, IMAGE_SIZE]
    records = manifest["images"]
    assert set(records) == {p.name for p in _pngs("anomalous")}
    for name, rec in records.items():
        assert rec["kind"] in KINDS and rec["texture"] in TEXTURES, name
        assert re.fullmatch(rf"{rec['texture']}_{rec['kind']}_\d{{3}}\.png", name), name
        x0, y0, x1, y1 = rec["box"]
        assert all(isinstance(v, int) for v in rec["box"]), name
        assert 0 <= x0 < x1 <= IMAGE_SIZE and 0 <= y0 < y1 <= IMAGE_SIZE, (name, rec["box"])
        box_area = (x1 - x0) * (y1 - y0)
        assert 0 < rec["defect_pixels"] <= box_area, name
        # Local defects: never most of the picture.
        assert box_area <= 0.4 * IMAGE_SIZE**2, (name, rec["box"])
    assert {r["kind"] for r in records.values()} == KINDS
    assert {r["texture"] for r in records.values()} == TEXTURES


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("own", ["brick", "gravel"])
def test_drawn_defect_changes_exactly_the_pixels_in_its_box(kind: str, own: str) -> None:
    """The promise defects.json makes, checked on the drawing code itself (no scikit-image needed)."""
    mod = _script()
    size = mod.IMAGE_SIZE
    textures = {"brick": np.full((512, 512), 40, np.uint8), "grass": np.full((512, 512), 220, np.uint8)}
    textures["gravel"] = textures["grass"]
    drawn_any = False
    for seed in range(8):
        rng = np.random.default_rng(seed)
        clean = np.full((size, size), 128.0, dtype=np.float32)
        drawn = mod.DEFECTS[kind](clean, rng, textures, own)
        if drawn is None:  # this draw left the margin; the generator retries
            continue
        drawn_any = True
        img, mask, _ = drawn
        changed = img != clean
        assert np.array_equal(changed, mask > 0)
        ys, xs = np.nonzero(changed)
        x0, y0, x1, y1 = mod._box(mask)
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert mod.MARGIN // 2 <= x0 and x1 <= size - mod.MARGIN // 2
        assert mod.MARGIN // 2 <= y0 and y1 <= size - mod.MARGIN // 2
        assert np.abs(img - clean)[mask > 0.5].mean() > 20  # visible, not a faint smudge
    assert drawn_any


def test_regenerating_gives_identical_bytes(tmp_path: Path) -> None:
    pytest.importorskip("skimage")
    out = tmp_path / "sample_data"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    made = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    shipped = [p.relative_to(SAMPLE) for p in _pngs("normal") + _pngs("anomalous")]
    assert made == sorted(shipped + [Path("anomalous/defects.json")])
    differing = [str(rel) for rel in made if (out / rel).read_bytes() != (SAMPLE / rel).read_bytes()]
    assert not differing, f"{len(differing)} files differ, e.g. {differing[:3]}"
