"""The four real-photo inspection sets of bench/real_photos.py: discovery, defect masks, splits.

Each set is read where it was extracted; nothing is downloaded or copied. `discover(root)` tells
the set by its folder layout, so the benchmark takes plain folders on its command line:

- KolektorSDD (YOLO export): `Datasets/images/{train,val}/*.jpg`; an image is defective iff its
  `Datasets/labels/<split>/<stem>.txt` is non-empty. Lines are `class x1 y1 x2 y2 ...` (normalised
  polygon) or `class cx cy w h` (box). The export's own train/val split is pooled.
- Casting: `data/{train_data,test_data}/{ok_front,def_front}/*.jpeg`; ok = normal. No masks.
- BSData: `data/*crop_2.jpg` of size 1130x460 only (the other crops come in dozens of sizes);
  defective iff `label/<stem>.json` (labelme) has a "Pitting" shape, whose polygons are the mask.
- PIPED: `data/<TYPE>/{NoDefects,Defects}/*.bmp`, one PhotoSet per paper type, because a model is
  trained per type; masks in `Defects/GroundThruth/` (sic; three types spell it `GroundTruth`),
  named `..._S_GT_<group>_<n>.bmp` for image `..._S_D_<group>_<n>.bmp` (one type drops the zero
  padding of <group>, so names are matched on the numbers). Defects are black on white there.

Byte-identical files are dropped (the first by sorted path is kept): KolektorSDD's export repeats
16 files and PIPED repeats normals, and a copy on both sides of the split would hand the nearest-
neighbour baseline, and the autoencoder, the answer.

Masks are loaded lazily (`Sample.mask()`), as bool arrays (H, W) at the image's original size,
because only the test defects' masks are ever needed.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

BSDATA_SIZE = (1130, 460)  # (width, height) of the crop_2 images kept
TRAIN_SHARE, CAL_SHARE = 0.7, 0.1  # of the normals; the rest of the normals and every defect: test


def _no_mask() -> None:
    return None


@dataclass(frozen=True)
class Sample:
    """One image file. `mask()` gives its defect mask, or None where the set has none."""

    path: Path
    defective: bool
    mask: Callable[[], np.ndarray | None] = field(default=_no_mask, repr=False, compare=False)


@dataclass
class PhotoSet:
    """The images of one model's worth of data. `has_masks`: defects come with masks (normals'
    masks are all false, so the benchmark builds those itself). `notes`: what discovery dropped."""

    name: str
    samples: list[Sample]
    has_masks: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def n_normal(self) -> int:
        return sum(not s.defective for s in self.samples)

    @property
    def n_defective(self) -> int:
        return sum(s.defective for s in self.samples)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the header; PIL opens lazily, so no pixels are decoded."""
    with Image.open(path) as im:
        return im.size


# --- masks -----------------------------------------------------------------------------------------


def _polygon_mask(size: tuple[int, int], polygons: list[list[tuple[float, float]]]) -> np.ndarray:
    """Rasterise pixel-coordinate polygons (filled, outline included) at `size` = (W, H)."""
    canvas = Image.new("L", size, 0)
    draw = ImageDraw.Draw(canvas)
    for poly in polygons:
        if len(poly) >= 2:  # a 2-point "polygon" still marks its segment
            draw.polygon(poly, fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)


def yolo_polygons(label_file: Path, size: tuple[int, int]) -> list[list[tuple[float, float]]]:
    """YOLO label lines in pixels: `c cx cy w h` is a box, more numbers a normalised polygon."""
    w, h = size
    polys = []
    for line in label_file.read_text().splitlines():
        nums = [float(v) for v in line.split()[1:]]
        if len(nums) == 4:
            cx, cy, bw, bh = nums
            x0, x1, y0, y1 = (cx - bw / 2) * w, (cx + bw / 2) * w, (cy - bh / 2) * h, (cy + bh / 2) * h
            polys.append([(x0, y0), (x1, y0), (x1, y1), (x0, y1)])
        elif len(nums) >= 4:
            polys.append([(x * w, y * h) for x, y in zip(nums[0::2], nums[1::2])])
    return polys


def _yolo_mask(image: Path, label_file: Path) -> np.ndarray:
    size = image_size(image)
    return _polygon_mask(size, yolo_polygons(label_file, size))


def labelme_polygons(label_file: Path, label: str) -> list[list[tuple[float, float]]]:
    """The shapes called `label` as pixel polygons (a labelme rectangle is its two corners)."""
    polys = []
    for shape in json.loads(label_file.read_text()).get("shapes", []):
        if shape.get("label") != label:
            continue
        pts = [(float(x), float(y)) for x, y in shape.get("points", [])]
        if shape.get("shape_type") == "rectangle" and len(pts) == 2:
            (x0, y0), (x1, y1) = pts
            pts = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
        polys.append(pts)
    return polys


def _labelme_mask(image: Path, label_file: Path, label: str) -> np.ndarray:
    return _polygon_mask(image_size(image), labelme_polygons(label_file, label))


def _dark_mask(mask_file: Path) -> np.ndarray:
    """PIPED ground truth: 1-bit images, impurity black on white."""
    with Image.open(mask_file) as im:
        return np.asarray(im.convert("L")) < 128


# --- discovery -------------------------------------------------------------------------------------


def _dedupe(samples: list[Sample], notes: list[str]) -> list[Sample]:
    """Drop byte-identical files, keeping the first by path; a note says how many went."""
    seen: dict[str, Sample] = {}
    kept, dropped, conflicts = [], 0, 0
    for s in sorted(samples, key=lambda s: str(s.path)):
        digest = hashlib.sha1(s.path.read_bytes()).hexdigest()
        if digest in seen:
            dropped += 1
            conflicts += seen[digest].defective != s.defective
            continue
        seen[digest] = s
        kept.append(s)
    if dropped:
        notes.append(
            f"dropped {dropped} byte-identical duplicate file(s)"
            + (f", {conflicts} of them labelled differently from the copy kept" if conflicts else "")
        )
    return kept


def _kolektor(root: Path) -> PhotoSet:
    base = root / "Datasets" if (root / "Datasets" / "images").is_dir() else root
    samples = []
    for image in sorted((base / "images").glob("*/*.jpg")):
        label = base / "labels" / image.parent.name / f"{image.stem}.txt"
        defective = label.is_file() and label.read_text().strip() != ""
        mask = partial(_yolo_mask, image, label) if defective else _no_mask
        samples.append(Sample(image, defective, mask))
    notes: list[str] = []
    return PhotoSet("KolektorSDD", _dedupe(samples, notes), has_masks=True, notes=notes)


def _casting(root: Path) -> PhotoSet:
    samples = []
    for image in sorted((root / "data").glob("*/*_front/*")):
        if image.suffix.lower() in (".jpeg", ".jpg", ".png") and image.parent.name in ("ok_front", "def_front"):
            samples.append(Sample(image, image.parent.name == "def_front"))
    notes: list[str] = []
    return PhotoSet("casting", _dedupe(samples, notes), has_masks=False, notes=notes)


def _bsdata(root: Path) -> PhotoSet:
    samples, other_size, unlabelled_json = [], 0, 0
    for image in sorted((root / "data").glob("*crop_2.jpg")):
        if image_size(image) != BSDATA_SIZE:
            other_size += 1
            continue
        label = root / "label" / f"{image.stem}.json"
        pitting = label.is_file() and bool(labelme_polygons(label, "Pitting"))
        unlabelled_json += label.is_file() and not pitting
        mask = partial(_labelme_mask, image, label, "Pitting") if pitting else _no_mask
        samples.append(Sample(image, pitting, mask))
    notes = [f"skipped {other_size} crop_2 image(s) not {BSDATA_SIZE[0]}x{BSDATA_SIZE[1]}"] if other_size else []
    if unlabelled_json:
        notes.append(f"{unlabelled_json} image(s) with a label file but no Pitting shape counted normal")
    return PhotoSet("BSData-1130", _dedupe(samples, notes), has_masks=True, notes=notes)


_PIPED_KEY = re.compile(r"_S_(?:D|GT)_(\d+)_(\d+)$")


def _piped(root: Path) -> list[PhotoSet]:
    sets = []
    for type_dir in sorted(p for p in (root / "data").iterdir() if p.is_dir()):
        normal_dir, defect_dir = type_dir / "NoDefects", type_dir / "Defects"
        if not (normal_dir.is_dir() and defect_dir.is_dir()):
            continue  # e.g. PU_PNG01_TL: a different layout, no defect images
        gt_dirs = [d for d in defect_dir.iterdir() if d.is_dir() and d.name.lower().startswith("ground")]
        masks: dict[tuple[int, int], Path] = {}
        for gt_dir in gt_dirs:
            for f in gt_dir.glob("*.bmp"):
                if m := _PIPED_KEY.search(f.stem):
                    masks[(int(m[1]), int(m[2]))] = f
        samples = [Sample(p, False) for p in sorted(normal_dir.glob("*.bmp"))]
        unmatched = 0
        for image in sorted(defect_dir.glob("*.bmp")):
            m = _PIPED_KEY.search(image.stem)
            gt = masks.get((int(m[1]), int(m[2]))) if m else None
            unmatched += gt is None
            samples.append(Sample(image, True, partial(_dark_mask, gt) if gt else _no_mask))
        notes = [f"{unmatched} defect image(s) without a ground-truth mask"] if unmatched else []
        sets.append(PhotoSet(f"PIPED/{type_dir.name}", _dedupe(samples, notes), has_masks=bool(masks), notes=notes))
    return sets


def detect_kind(root: Path) -> str:
    """Which of the four sets `root` holds, judged by its layout."""
    if (root / "Datasets" / "images").is_dir() or ((root / "images").is_dir() and (root / "labels").is_dir()):
        return "KolektorSDD"
    data = root / "data"
    if any(data.glob("*/ok_front")) or any(data.glob("*/def_front")):
        return "casting"
    if (root / "label").is_dir() and any(data.glob("*crop_2.jpg")):
        return "BSData"
    if any(data.glob("*/NoDefects")):
        return "PIPED"
    raise ValueError(f"{root}: not a layout this benchmark knows (KolektorSDD, casting, BSData, PIPED)")


def discover(root: Path) -> list[PhotoSet]:
    """The PhotoSet(s) under `root`: one, or one per paper type for PIPED ("PIPED/<TYPE>")."""
    root = Path(root)
    kind = detect_kind(root)
    if kind == "PIPED":
        return _piped(root)
    return [{"KolektorSDD": _kolektor, "casting": _casting, "BSData": _bsdata}[kind](root)]


# --- splits ----------------------------------------------------------------------------------------


def subsample(ps: PhotoSet, max_normal: int, max_defective: int, seed: int = 0) -> PhotoSet:
    """A seeded subset (for smoke tests): at most this many normals and defects."""
    rng = np.random.default_rng(seed)
    out = []
    for defective, cap in ((False, max_normal), (True, max_defective)):
        group = sorted((s for s in ps.samples if s.defective == defective), key=lambda s: str(s.path))
        if len(group) > cap:
            group = [group[i] for i in sorted(rng.choice(len(group), cap, replace=False))]
        out.extend(group)
    return PhotoSet(ps.name, out, ps.has_masks, [*ps.notes, f"subsampled to {max_normal}/{max_defective}"])


def split(ps: PhotoSet, seed: int = 0) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """(train, calibration, test): normals shuffled 70/10/20, every defect in test.

    Sorting by path first makes the split independent of the file system's listing order; the
    defects never reach training or calibration, as in a line where no defect has been seen yet.
    """
    samples = sorted(ps.samples, key=lambda s: str(s.path))
    normals = [s for s in samples if not s.defective]
    defects = [s for s in samples if s.defective]
    perm = np.random.default_rng(seed).permutation(len(normals))
    n_train = int(round(TRAIN_SHARE * len(normals)))
    n_cal = int(round(CAL_SHARE * len(normals)))
    train = [normals[i] for i in sorted(perm[:n_train])]
    cal = [normals[i] for i in sorted(perm[n_train : n_train + n_cal])]
    test = [normals[i] for i in sorted(perm[n_train + n_cal :])] + defects
    return train, cal, test


__all__ = ["PhotoSet", "Sample", "detect_kind", "discover", "image_size", "split", "subsample"]
