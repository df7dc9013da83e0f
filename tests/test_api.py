"""The Python API as the README shows it: `import anomon`, `anomon.load`, `score_images`,
`anomon.Detector`; and `import anomon` stays light (no torch until a model is used)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def _readme_example() -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- api-example[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert m, "README has no api-example block"
    return m.group(1)


def test_readme_example_runs(tiny_bundle: Path, tmp_path: Path) -> None:
    """The README's block, run as written in a folder with its model and the sample images."""
    (tmp_path / "model.safetensors").write_bytes(tiny_bundle.read_bytes())
    (tmp_path / "sample_data").symlink_to(REPO / "sample_data")
    r = subprocess.run([sys.executable, "-c", _readme_example()], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("sample_data/normal/brick_001.png ")
    assert lines[1].startswith("<PngImageFile> ") or lines[1].startswith("<Image> "), lines[1]
    assert lines[1].split()[1:3] == lines[2].split()[1:3]  # the PIL image and its array: one verdict, one score
    assert lines[3] == "no/such/file.png not scored: vanished"
    assert (tmp_path / "mine.safetensors").is_file()


def test_import_anomon_does_not_load_torch() -> None:
    code = ("import sys, anomon; assert anomon.__version__; "
            "print(sorted(m for m in ('torch', 'sklearn', 'matplotlib') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_lazy_names_resolve_and_unknown_names_fail() -> None:
    import pytest

    import anomon
    from anomon.detector import Detector
    from anomon.scoring import ScoreRecord

    assert anomon.Detector is Detector and anomon.ScoreRecord is ScoreRecord
    with pytest.raises(AttributeError):
        anomon.no_such_thing  # noqa: B018
