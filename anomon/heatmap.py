"""Heat-map overlays: where the model thinks the defect is, on the original image, at its size
(bounded: at most images.DISPLAY_MAX_SIDE pixels on the longest side).

The map is drawn with a fixed scale fitted on normal images (the detector's heat_vmin/heat_vmax),
not stretched per image: a normal image then shows almost nothing, and the same colour means the
same abnormality on every image, so operators can compare overlays at a glance.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image

from anomon.images import display_copy

_CMAP = colormaps["inferno"]


def overlay(img: Image.Image, amap: np.ndarray, *, vmax: float, vmin: float = 0.0) -> Image.Image:
    """RGB image at the photo's size (at most DISPLAY_MAX_SIDE px on its longest side): the photo in grey,
    heat blended in where amap > vmin."""
    base = display_copy(img).convert("L").convert("RGB")
    level = np.clip((np.asarray(amap, dtype=np.float32) - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    level_img = Image.fromarray((level * 255).astype(np.uint8), mode="L").resize(base.size, Image.Resampling.BILINEAR)
    level = np.asarray(level_img, dtype=np.float32) / 255.0
    # Start the colour map a third of the way in: its darkest end would hide the photo.
    colours = _CMAP(0.35 + 0.65 * level)[..., :3]
    alpha = np.clip(level * 1.6, 0.0, 0.85)[..., None]
    photo = np.asarray(base, dtype=np.float32) / 255.0
    out = photo * (1 - alpha) + colours * alpha
    return Image.fromarray((out * 255).round().astype(np.uint8), mode="RGB")


def save_overlay(
    path: str | os.PathLike[str], img: Image.Image, amap: np.ndarray, vmax: float, vmin: float = 0.0
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    overlay(img, amap, vmax=vmax, vmin=vmin).save(path, format="PNG")
    return path
