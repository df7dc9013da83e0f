"""The one path from an image to a verdict: `anomon score`, `anomon evaluate`, the report, the
Python API (`Detector.score_images`) and the daemon all go through it.

    read (images.read_file) -> decode (images.decode_image) -> preprocess (Detector.preprocess)
    -> score, map, p-value, verdict (Detector.assess, whose rule is Detector.predict's)

Every failure on the way is an ImageError with a reason from errors.REASONS, so a file one caller
rejects is rejected by all of them, for the same reason. The daemon wraps this path in batching
across files, de-duplication, the ledger and its sinks; it has no copy of it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

import numpy as np
from PIL import Image

from anomon.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageError, decode_image, display_copy, read_file

if TYPE_CHECKING:
    from anomon.detector import Detector

Item = Union[str, os.PathLike, Image.Image, np.ndarray]  # noqa: UP007 (a runtime alias)
BATCH_SIZE = 32


@dataclass
class Prepared:
    """One decoded image and the model's input for it."""

    name: str
    image: Image.Image
    x: np.ndarray


@dataclass
class ScoreRecord:
    """The outcome for one item. `error` (a reason from errors.REASONS) and `message` are set
    instead of the score when the item could not be scored; `heatmap` (the anomaly map at the
    model's working size, on the detector's heat scale) and `image` only when asked for."""

    source: str
    model_id: str
    threshold: float
    score: float | None = None
    anomalous: bool | None = None
    p_value: float | None = None
    error: str | None = None
    message: str | None = None
    heatmap: np.ndarray | None = field(default=None, repr=False)
    image: Image.Image | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready fields (what `anomon score` prints), without the arrays."""
        if self.error is not None:
            return {"source": self.source, "error": self.error, "message": self.message, "model_id": self.model_id}
        return {"source": self.source, "score": self.score, "threshold": self.threshold,
                "anomalous": self.anomalous, "p_value": self.p_value, "model_id": self.model_id}


def as_image(item: Image.Image | np.ndarray) -> Image.Image:
    """A PIL image from an in-memory item: PIL as is; a numpy array of shape (H, W), (H, W, 1),
    (H, W, 3) or (H, W, 4), uint8 (0-255) or float (0-1), as a photo would be held."""
    if isinstance(item, Image.Image):
        return item
    a = np.asarray(item)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or a.size == 0:
        raise ImageError("not_image", f"array of shape {a.shape} is not an image (expected H x W, or H x W x 1, 3 or 4)")
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.floating) and not np.issubdtype(a.dtype, np.integer):
            raise ImageError("not_image", f"array of dtype {a.dtype} is not an image")
        f = a.astype(np.float32)
        if not np.all(np.isfinite(f)):
            raise ImageError("corrupt", "array holds NaN or infinity")
        a = np.clip(f * 255.0 if np.issubdtype(a.dtype, np.floating) else f, 0, 255).round().astype(np.uint8)
    return Image.fromarray(a)


def decode(det: Detector, data: bytes, name: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Prepared:
    """File bytes -> decoded image -> the model's input. Anything that goes wrong is an ImageError:
    one bad file must never fail the batch it is in (nor, in the daemon, every rescan after)."""
    img = decode_image(data, name=name, max_pixels=max_pixels)
    x = _preprocess(det, img, name)
    # Only a display-size copy lives on (for the heat map): a batch of 49-megapixel photos must
    # not hold every full decode until the batch is scored.
    return Prepared(name, display_copy(img), x)


def _preprocess(det: Detector, img: Image.Image, name: str) -> np.ndarray:
    try:
        return det.preprocess(img, name=name)
    except ImageError:
        raise
    except Exception as e:  # a bug's symptom, but on this one file only
        raise ImageError("corrupt", f"{name}: cannot convert ({type(e).__name__}: {e})") from None


def prepare(det: Detector, item: Item, *, max_bytes: int = DEFAULT_MAX_BYTES,
            max_pixels: int = DEFAULT_MAX_PIXELS) -> Prepared:
    """Read and decode one item (a path, a PIL image or a numpy array) into the model's input."""
    if isinstance(item, (str, os.PathLike)):
        return decode(det, read_file(item, max_bytes=max_bytes)[1], str(item), max_pixels=max_pixels)
    name = f"<{type(item).__name__}>"
    img = as_image(item)
    return Prepared(name, img, _preprocess(det, img, name))


def records(det: Detector, prepared: list[Prepared], *, heatmaps: bool = False) -> list[ScoreRecord]:
    """Score decoded images in one forward pass; one record each, in order."""
    if not prepared:
        return []
    a = det.assess(np.stack([p.x for p in prepared]))
    return [
        ScoreRecord(
            source=p.name, model_id=det.model_id, threshold=float(det.threshold_), score=float(s),
            anomalous=bool(flag), p_value=float(pv), heatmap=m if heatmaps else None,
            image=p.image if heatmaps else None,
        )
        for p, s, m, pv, flag in zip(prepared, a.scores, a.maps, a.p_values, a.anomalous)
    ]


def error_record(det: Detector, source: str, err: ImageError) -> ScoreRecord:
    return ScoreRecord(source=source, model_id=det.model_id, threshold=float(det.threshold_),
                       error=err.reason, message=str(err))


def score_items(det: Detector, items: Iterable[Item], *, heatmaps: bool = False,
                batch_size: int = BATCH_SIZE) -> Iterator[ScoreRecord]:
    """One record per item, in input order, in batches of `batch_size`; an item that cannot be
    read or decoded yields an error record and never fails the others."""
    chunk: list[Item] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == batch_size:
            yield from _score_chunk(det, chunk, heatmaps)
            chunk = []
    if chunk:
        yield from _score_chunk(det, chunk, heatmaps)


def _score_chunk(det: Detector, chunk: list[Item], heatmaps: bool) -> list[ScoreRecord]:
    out: list[ScoreRecord | None] = [None] * len(chunk)
    ok: list[tuple[int, Prepared]] = []
    for i, item in enumerate(chunk):
        try:
            ok.append((i, prepare(det, item)))
        except ImageError as e:
            source = str(item) if isinstance(item, (str, os.PathLike)) else f"<{type(item).__name__}>"
            out[i] = error_record(det, source, e)
    for (i, _), rec in zip(ok, records(det, [p for _, p in ok], heatmaps=heatmaps)):
        out[i] = rec
    return [r for r in out if r is not None]


__all__ = ["Item", "Prepared", "ScoreRecord", "as_image", "decode", "error_record", "prepare", "records", "score_items"]
