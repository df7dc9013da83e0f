"""Regenerate anomon's shipped sample images: clean texture crops and crops with drawn defects.

Why this exists: the demo, the docs and the end-to-end tests need an inspection-like image set that
ships in the repository (no download, no licence doubt) and that a reviewer can rebuild and diff. Real
inspection photos are a few hundred pixels wide, show one kind of surface, and the defects are small
and local; this set imitates that with the three greyscale textures bundled inside scikit-image
(brick, grass, gravel):

* ``normal/<texture>_NNN.png`` -- random crops, flips (and quarter turns for the isotropic textures),
  with mild brightness/contrast jitter and sensor noise, an equal share per texture.
* ``anomalous/<texture>_<kind>_NNN.png`` -- crops made the same way, with one drawn defect each:
  ``scratch`` (thin, slightly curved bright or dark line), ``spot`` (a soft-edged stain or deposit),
  ``crack`` (dark jagged polyline, sometimes branched) or ``missing`` (a chipped-out region, flat or
  showing a different texture).
* ``anomalous/defects.json`` -- per anomalous file: texture, kind and the exact bounding box of every
  pixel the defect touched, ``[x0, y0, x1, y1]`` with x1/y1 exclusive (a PIL crop box; the numpy slice
  ``img[y0:y1, x0:x1]``). Outside that box the defect changed nothing, so a heat-map test can demand
  that the hottest spot falls inside it.

Every image draws from its own ``numpy`` Generator seeded by (SEED, class, index), so the bytes are the
same on every run (Pillow's PNG encoder writes no timestamps) and changing one image never reshuffles
the others. Only numpy and Pillow do the work; scikit-image is needed only for the source textures
(``pip install 'anomon[data]'``).

Usage: ``python sample_data/make_sample_data.py [--out sample_data]``
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SEED = 20_250_611
IMAGE_SIZE = 160  # 192 px would not fit the 5 MB budget; 160 px lands near 3.3 MB
TEXTURES: tuple[str, ...] = ("brick", "grass", "gravel")
# The shipped set is ONE product, as an inspection line is: a model is trained per product and
# camera. Brick is the most inspection-like surface (a regular pattern with fine detail). A model
# trained on three unrelated surfaces at once scored AUROC 0.69 where the same model reached 0.95
# within brick (0.80 grass, 0.72 gravel): `--textures brick,grass,gravel` makes that harder set.
SHIPPED_TEXTURES: tuple[str, ...] = ("brick",)
DEFECT_KINDS: tuple[str, ...] = ("scratch", "spot", "crack", "missing")
N_NORMAL = 150
N_ANOMALOUS = 30
PNG_COMPRESS_LEVEL = 9

# Brick rows have a direction a real camera would keep; a quarter turn would invent a new part.
ROTATABLE: frozenset[str] = frozenset({"grass", "gravel"})

SUPERSAMPLE = 4  # defects are drawn 4x larger and box-filtered down, which anti-aliases their edges
MASK_FLOOR = 0.06  # mask values below this are dropped so the recorded box is tight and exact
MARGIN = 6  # defects keep this far from the border so no box touches the edge
MIN_CONTRAST = 22.0  # mean grey-level change inside the defect core; weaker draws are redrawn
MAX_TRIES = 50

_CLASS_NORMAL = 0
_CLASS_ANOMALOUS = 1

FloatImage = np.ndarray  # (S, S) float32 grey levels, 0..255
Mask = np.ndarray  # (S, S) float32 in [0, 1]


def load_textures() -> dict[str, np.ndarray]:
    """The three 512x512 uint8 textures bundled with scikit-image (no network access needed)."""
    try:
        from skimage import data
    except ImportError:
        sys.exit("make_sample_data: error: scikit-image is needed: pip install 'anomon[data]'")
    textures = {name: np.asarray(getattr(data, name)(), dtype=np.uint8) for name in TEXTURES}
    for name, tex in textures.items():
        if tex.ndim != 2 or min(tex.shape) < 2 * IMAGE_SIZE:
            sys.exit(f"make_sample_data: error: skimage.data.{name}() has unexpected shape {tex.shape}")
    return textures


def _rng(class_id: int, index: int) -> np.random.Generator:
    return np.random.default_rng([SEED, class_id, index])


def _crop(tex: np.ndarray, rng: np.random.Generator, size: int, rotate: bool) -> np.ndarray:
    h, w = tex.shape
    y = int(rng.integers(0, h - size + 1))
    x = int(rng.integers(0, w - size + 1))
    out = tex[y : y + size, x : x + size]
    if rotate:
        out = np.rot90(out, int(rng.integers(4)))
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if rng.random() < 0.5:
        out = out[::-1, :]
    return np.ascontiguousarray(out)


def _clean_view(tex: np.ndarray, name: str, rng: np.random.Generator) -> FloatImage:
    """One camera view of a good part: a crop with lighting drift (sensor noise comes last)."""
    img = _crop(tex, rng, IMAGE_SIZE, name in ROTATABLE).astype(np.float32)
    contrast = rng.uniform(0.9, 1.1)
    brightness = rng.uniform(-10.0, 10.0)
    mean = float(img.mean())
    return (img - mean) * contrast + mean + brightness


def _finish(img: FloatImage, rng: np.random.Generator) -> np.ndarray:
    """Sensor noise, applied after any defect because the camera sees the defect too."""
    noisy = img + rng.normal(0.0, rng.uniform(1.0, 2.5), img.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


# ---------------------------------------------------------------- mask drawing


def _render(draw_fn: Callable[[ImageDraw.ImageDraw, float], None], blur: float = 0.0) -> Mask:
    """Draw at SUPERSAMPLE x scale (coordinates passed in image pixels), filter down to a soft mask."""
    big = Image.new("L", (IMAGE_SIZE * SUPERSAMPLE,) * 2, 0)
    draw_fn(ImageDraw.Draw(big), float(SUPERSAMPLE))
    if blur > 0:
        big = big.filter(ImageFilter.GaussianBlur(blur * SUPERSAMPLE))
    small = big.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    mask = np.asarray(small, dtype=np.float32) / 255.0
    mask[mask < MASK_FLOOR] = 0.0
    return mask


def _inside(points: np.ndarray) -> bool:
    return bool(np.all(points >= MARGIN) and np.all(points <= IMAGE_SIZE - 1 - MARGIN))


def _polyline(points: np.ndarray, width: float) -> Callable[[ImageDraw.ImageDraw, float], None]:
    def draw(d: ImageDraw.ImageDraw, k: float) -> None:
        pts = [(float(x) * k, float(y) * k) for x, y in points]
        d.line(pts, fill=255, width=max(1, round(width * k)), joint="curve")

    return draw


def _polygon(points: np.ndarray) -> Callable[[ImageDraw.ImageDraw, float], None]:
    def draw(d: ImageDraw.ImageDraw, k: float) -> None:
        d.polygon([(float(x) * k, float(y) * k) for x, y in points], fill=255)

    return draw


def _blend(img: FloatImage, mask: Mask, target: FloatImage | float) -> FloatImage:
    return img * (1.0 - mask) + np.asarray(target, dtype=np.float32) * mask


def _local_mean(img: FloatImage, mask: Mask) -> float:
    return float((img * mask).sum() / max(mask.sum(), 1e-6))


# ---------------------------------------------------------------- defects
# Each returns (defected image, mask of what it touched, short detail for defects.json), or None
# when this draw fell outside the margin and must be redrawn.

Defect = tuple[FloatImage, Mask, str]


def _scratch(img: FloatImage, rng: np.random.Generator, textures: dict[str, np.ndarray], own: str) -> Defect | None:
    s = IMAGE_SIZE
    length = rng.uniform(0.45, 0.8) * s
    angle = rng.uniform(0, math.pi)
    p0 = rng.uniform(MARGIN, s - MARGIN, 2)
    p2 = p0 + length * np.array([math.cos(angle), math.sin(angle)])
    normal = np.array([-math.sin(angle), math.cos(angle)])
    p1 = (p0 + p2) / 2 + normal * rng.uniform(-0.12, 0.12) * length  # a gentle bow
    t = np.linspace(0.0, 1.0, 48)[:, None]
    curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    if not _inside(curve):
        return None
    mask = _render(_polyline(curve, rng.uniform(2.0, 3.0))) * rng.uniform(0.9, 1.0)
    bright = bool(rng.random() < 0.6)  # a fresh scratch on a surface mostly catches the light
    target = rng.uniform(235, 255) if bright else rng.uniform(5, 25)
    return _blend(img, mask, target), mask, "bright" if bright else "dark"


def _spot(img: FloatImage, rng: np.random.Generator, textures: dict[str, np.ndarray], own: str) -> Defect | None:
    s = IMAGE_SIZE
    radius = rng.uniform(0.07, 0.13) * s
    centre = rng.uniform(MARGIN + radius * 1.4, s - MARGIN - radius * 1.4, 2)
    theta = np.linspace(0, 2 * math.pi, 72, endpoint=False)
    r = np.ones_like(theta)
    for k in (2, 3, 5):  # a lumpy outline, not a compass circle
        r += rng.uniform(0.0, 0.14) * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
    outline = centre + radius * r[:, None] * np.stack([np.cos(theta), np.sin(theta)], axis=1)
    if not _inside(outline):
        return None
    mask = _render(_polygon(outline), blur=radius * 0.18)
    if not _inside(np.argwhere(mask > 0).astype(np.float64)):
        return None
    if rng.random() < 0.65:  # oil or rust stain: darkens, the surface still shows through
        keep = rng.uniform(0.3, 0.5)
        return img * (1.0 - mask * (1.0 - keep)), mask, "dark stain"
    level = rng.uniform(205, 235)  # paint or dust deposit
    return _blend(img, mask * rng.uniform(0.8, 0.95), level), mask, "light deposit"


def _crack(img: FloatImage, rng: np.random.Generator, textures: dict[str, np.ndarray], own: str) -> Defect | None:
    s = IMAGE_SIZE

    def walk(start: np.ndarray, heading: float, steps: int) -> np.ndarray:
        pts = [start]
        course = heading
        for _ in range(steps):
            course += rng.normal(0.0, 0.12)  # the overall course drifts slowly...
            step = course + rng.normal(0.0, 0.5)  # ...while each segment zigzags sharply about it
            pts.append(pts[-1] + rng.uniform(3.0, 7.0) * np.array([math.cos(step), math.sin(step)]))
        return np.array(pts)

    heading = rng.uniform(0, 2 * math.pi)
    main = walk(rng.uniform(MARGIN, s - MARGIN, 2), heading, int(rng.integers(11, 17)))
    if not _inside(main):
        return None
    lines = [(main, rng.uniform(2.2, 3.0))]
    for _ in range(int(rng.integers(0, 3))):
        at = main[int(rng.integers(2, len(main) - 1))]
        branch = walk(at, heading + rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.1), int(rng.integers(3, 6)))
        if not _inside(branch):
            return None
        lines.append((branch, rng.uniform(1.3, 1.8)))

    def draw(d: ImageDraw.ImageDraw, k: float) -> None:
        for pts, width in lines:
            _polyline(pts, width)(d, k)

    # The broken edges shade a narrow band either side, which is what makes a crack read as one.
    mask = np.maximum(_render(draw), 0.45 * _render(draw, blur=1.5))
    return _blend(img, mask, rng.uniform(0, 12)), mask, f"{len(lines) - 1} branch(es)"


def _missing(img: FloatImage, rng: np.random.Generator, textures: dict[str, np.ndarray], own: str) -> Defect | None:
    s = IMAGE_SIZE
    w, h = rng.uniform(0.2, 0.34, 2) * s
    centre = rng.uniform(MARGIN + max(w, h) * 0.6, s - MARGIN - max(w, h) * 0.6, 2)
    # A chipped-out region: a rectangle whose corners and edge midpoints are knocked about.
    unit = np.array([[-1, -1], [0, -1], [1, -1], [1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0]], dtype=np.float64)
    corners = centre + unit * np.array([w, h]) / 2 + rng.normal(0.0, 0.1, unit.shape) * np.array([w, h])
    if not _inside(corners):
        return None
    mask = _render(_polygon(corners))
    if rng.random() < 0.5:
        level = _local_mean(img, mask) + rng.choice([-1.0, 1.0]) * rng.uniform(35, 60)
        return _blend(img, mask, float(np.clip(level, 15, 240))), mask, "flat fill"
    # Grass inside gravel (or the reverse) hides too well; busy surfaces get the smooth brick.
    other = "brick" if own != "brick" else str(rng.choice(["grass", "gravel"]))
    patch = _clean_view(textures[other], other, rng)
    return _blend(img, mask, patch), mask, f"{other} texture"


DEFECTS: dict[str, Callable[..., Defect | None]] = {
    "scratch": _scratch,
    "spot": _spot,
    "crack": _crack,
    "missing": _missing,
}


def _box(mask: Mask) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


# ---------------------------------------------------------------- the set


def generate(
    textures: dict[str, np.ndarray], products: tuple[str, ...] = SHIPPED_TEXTURES
) -> Iterator[tuple[str, bytes]]:
    """Every file of the set as (path relative to the output folder, bytes), in a fixed order."""
    for name in products:
        t_index = TEXTURES.index(name)
        for i in range(N_NORMAL // len(products)):
            rng = _rng(_CLASS_NORMAL, t_index * 1000 + i)
            yield f"normal/{name}_{i:03d}.png", _png(_finish(_clean_view(textures[name], name, rng), rng))

    records: dict[str, dict[str, object]] = {}
    for i in range(N_ANOMALOUS):
        name = products[i % len(products)]
        kind = DEFECT_KINDS[i % len(DEFECT_KINDS)]  # 3 and 4 are coprime: every pairing occurs
        rng = _rng(_CLASS_ANOMALOUS, i)
        clean = _clean_view(textures[name], name, rng)
        for _ in range(MAX_TRIES):
            drawn = DEFECTS[kind](clean, rng, textures, name)
            if drawn is None:
                continue
            img, mask, detail = drawn
            core = mask > 0.5
            if core.any() and float(np.abs(img - clean)[core].mean()) >= MIN_CONTRAST:
                break
        else:
            raise RuntimeError(f"could not draw a visible {kind} on {name} #{i} in {MAX_TRIES} tries")
        file = f"{name}_{kind}_{i:03d}.png"
        records[file] = {
            "texture": name,
            "kind": kind,
            "detail": detail,
            "box": _box(mask),
            "defect_pixels": int(np.count_nonzero(mask)),
        }
        yield f"anomalous/{file}", _png(_finish(img, rng))

    manifest = {
        "image_size": [IMAGE_SIZE, IMAGE_SIZE],
        "box_format": "[x0, y0, x1, y1] in pixels, x1 and y1 exclusive (PIL crop box, numpy img[y0:y1, x0:x1])",
        "box_meaning": "every pixel the defect changed lies inside the box; outside it only sensor noise",
        "generator": f"sample_data/make_sample_data.py (seed {SEED})",
        "images": records,
    }
    yield "anomalous/defects.json", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def write(out: Path, files: Iterator[tuple[str, bytes]]) -> dict[str, int]:
    """Write the set under `out`, removing stale PNGs the generator no longer makes."""
    written: set[Path] = set()
    counts: dict[str, int] = {}
    total = 0
    for rel, data in files:
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.add(path)
        counts[path.parent.name] = counts.get(path.parent.name, 0) + int(rel.endswith(".png"))
        total += len(data)
    for folder in ("normal", "anomalous"):
        for stale in sorted((out / folder).glob("*.png")):
            if stale not in written:
                stale.unlink()
    counts["bytes"] = total
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent, help="output folder (default: this folder)"
    )
    parser.add_argument(
        "--textures",
        default=",".join(SHIPPED_TEXTURES),
        help=f"comma-separated products among {', '.join(TEXTURES)} (default: the shipped set)",
    )
    args = parser.parse_args(argv)
    products = tuple(t for t in args.textures.split(",") if t)
    if not products or set(products) - set(TEXTURES):
        parser.error(f"--textures must name some of {', '.join(TEXTURES)}")
    counts = write(args.out, generate(load_textures(), products))
    print(
        f"wrote {counts['normal']} normal and {counts['anomalous']} anomalous images "
        f"({counts['bytes'] / 1e6:.2f} MB) to {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
