"""Safe image decoding and the preprocessing shared by training and serving.

Every way an image file can fail is mapped to one short *reason* (a bounded set, so it can be a
Prometheus label) plus a human message. Training, `anomon score` and the daemon all decode through
`load_image`, so a file that one of them rejects is rejected by all of them for the same reason.
"""

from __future__ import annotations

import errno
import io
import os
import struct
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
)

# Every reason an image can be refused. Kept small and fixed: it is a metric label.
REASONS: tuple[str, ...] = (
    "empty",  # zero bytes
    "truncated",  # a valid header but the data stops early
    "corrupt",  # recognised format, undecodable data
    "not_image",  # not an image format Pillow knows
    "too_large",  # over the pixel or byte limit (decompression bombs included)
    "unreadable",  # permission denied, I/O error, a directory
    "vanished",  # deleted between the event and the read
    "refused",  # outside the watched folders, or a symlink leading out
)

DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MAX_BYTES = 256 * 1024 * 1024

# Leading bytes of the formats we accept: a file that starts like one but cannot be identified
# was cut short, which is a different story (and a different metric) from "not an image".
_MAGIC: tuple[bytes, ...] = (b"\x89PNG", b"\xff\xd8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")

# Never let Pillow silently pad a truncated file with grey: that would score a half image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageError(Exception):
    """An image that cannot be scored; `reason` is one of REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason = reason


def is_image_path(path: str | os.PathLike[str]) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def iter_image_files(root: str | os.PathLike[str]) -> Iterator[Path]:
    """Image files under `root` (recursive), in a stable sorted order so runs are reproducible."""
    root = Path(root)
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and is_image_path(name):
                yield Path(dirpath) / name


def read_bytes(path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Read a whole file, mapping OS failures to reasons."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise ImageError("too_large", f"{path}: {size} bytes is over the {max_bytes}-byte limit")
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise ImageError("vanished", f"{path}: file no longer exists") from None
    except IsADirectoryError:
        raise ImageError("unreadable", f"{path}: is a directory") from None
    except PermissionError:
        raise ImageError("unreadable", f"{path}: permission denied") from None
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise ImageError("vanished", f"{path}: file no longer exists") from None
        raise ImageError("unreadable", f"{path}: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise ImageError("too_large", f"{path}: over the {max_bytes}-byte limit")
    return data


def decode_image(data: bytes, *, name: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Fully decode image bytes; the pixel limit is checked from the header, before decoding."""
    if not data:
        raise ImageError("empty", f"{name}: file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(
                    "too_large", f"{name}: {w}x{h} pixels is over the {max_pixels}-pixel limit"
                )
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError("too_large", f"{name}: image is over the decompression-bomb limit") from None
    except UnidentifiedImageError:
        if data.startswith(_MAGIC):
            raise ImageError("truncated", f"{name}: image header is incomplete") from None
        raise ImageError("not_image", f"{name}: not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as e:
        text = str(e)
        if "truncated" in text.lower() or isinstance(e, EOFError):
            raise ImageError("truncated", f"{name}: image data is truncated") from None
        raise ImageError("corrupt", f"{name}: cannot decode image ({text or type(e).__name__})") from None
    return img


def load_image(
    path: str | os.PathLike[str],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Image.Image:
    """Read and fully decode one image file, or raise ImageError with a reason."""
    return decode_image(read_bytes(path, max_bytes=max_bytes), name=str(path), max_pixels=max_pixels)


def shape_of(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """(height, width) of a working size given as one number (a square) or as (height, width)."""
    if isinstance(image_size, (tuple, list)):
        return int(image_size[0]), int(image_size[1])
    return int(image_size), int(image_size)


def to_array(img: Image.Image, *, image_size: int | tuple[int, int], channels: int) -> np.ndarray:
    """The model's input: float32 (C, H, W) in [0, 1].

    Every image is resized to the working size (a square, or (height, width) chosen from the
    training images' aspect ratio), so training and serving see the same geometry; the heat map
    is resized back to the original size for display.
    """
    height, width = shape_of(image_size)
    mode = "L" if channels == 1 else "RGB"
    if img.mode not in (mode,):
        if img.mode in ("I;16", "I;16B", "I;16L", "I") and mode == "L":
            arr = np.asarray(img, dtype=np.float32)
            hi = float(arr.max()) or 1.0
            img = Image.fromarray((arr / hi * 255.0).astype(np.uint8), mode="L")
        else:
            img = img.convert(mode)
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    if channels == 1:
        arr = arr[None, :, :]
    else:
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)


def load_arrays(
    paths: Iterable[str | os.PathLike[str]],
    *,
    image_size: int | tuple[int, int],
    channels: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, list[Path], list[tuple[Path, ImageError]]]:
    """Decode many files into one (N, C, H, W) array; failures are returned, not raised."""
    arrays: list[np.ndarray] = []
    ok: list[Path] = []
    failed: list[tuple[Path, ImageError]] = []
    for p in paths:
        p = Path(p)
        try:
            img = load_image(p, max_pixels=max_pixels)
            arrays.append(to_array(img, image_size=image_size, channels=channels))
            ok.append(p)
        except ImageError as e:
            failed.append((p, e))
    if arrays:
        X = np.stack(arrays)
    else:
        X = np.zeros((0, channels, *shape_of(image_size)), dtype=np.float32)
    return X, ok, failed
