"""Safe image decoding and the preprocessing shared by training and serving.

Every way an image file can fail is mapped to one short *reason* (a bounded set, so it can be a
Prometheus label) plus a human message. Training, `anomon score` and the daemon all decode through
`load_image`, so a file that one of them rejects is rejected by all of them for the same reason.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import struct
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from anomon.config import watch_default
from anomon.errors import ImageError

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
)

DEFAULT_MAX_PIXELS: int = watch_default("max_pixels")
DEFAULT_MAX_BYTES: int = watch_default("max_bytes")

# Leading bytes of the formats we accept: a file that starts like one but cannot be identified
# was cut short, which is a different story (and a different metric) from "not an image".
_MAGIC: tuple[bytes, ...] = (b"\x89PNG", b"\xff\xd8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF", b"GIF8")
# How many bytes each format's header takes at most: a file that starts like the format but cannot
# be identified although it is longer than this is not cut short, it is corrupt. (PNG: signature +
# IHDR; BMP: file + info header; GIF: header + screen descriptor; the others have headers of
# variable length, up to the EXIF and ICC segments of a JPEG.)
_HEADER_BYTES: dict[bytes, int] = {b"\x89PNG": 33, b"BM": 54, b"GIF8": 13}
_LONG_HEADER_BYTES = 256 * 1024

# Never let Pillow silently pad a truncated file with grey: that would score a half image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


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


def read_file(
    path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES, follow_symlinks: bool = True,
    beneath: str | None = None,
) -> tuple[os.stat_result, bytes]:
    """Read a whole regular file: the one safe read behind training, `anomon score` and the daemon.

    The file is opened non-blocking (a FIFO dropped into a folder must not hang the reader), only
    regular files are read, the size limit is checked before and while reading, and the stat is
    the opened file's own, so it describes exactly the bytes returned. The daemon passes
    `follow_symlinks=False`: a watched file that is (or became) a symlink could lead outside the
    watched folder. A path a user names on the command line may be a link they made on purpose.
    With `beneath` (a watched folder, symlinks already resolved), every folder from there down is
    opened without following links, one component at a time (openat): a folder swapped for a
    symlink after the file was found cannot lead the read outside.
    Raises ImageError (vanished, unreadable, too_large, refused).
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags) if beneath is None else _open_beneath(beneath, os.fspath(path), flags)
    except FileNotFoundError:
        raise ImageError("vanished", f"{path}: file no longer exists") from None
    except OSError as e:
        if e.errno == errno.ELOOP and not follow_symlinks:
            raise ImageError("refused", f"{path}: is a symlink; not followed") from None
        if e.errno in (errno.EACCES, errno.EPERM):
            raise ImageError("unreadable", f"{path}: permission denied", errno=e.errno) from None
        raise ImageError("unreadable", f"{path}: {e.strerror or e}", errno=e.errno) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ImageError("unreadable", f"{path}: is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise ImageError("unreadable", f"{path}: not a regular file")
        if st.st_size > max_bytes:
            raise ImageError("too_large", f"{path}: {st.st_size} bytes is over the {max_bytes}-byte limit")
        chunks, total = [], 0
        while True:
            try:
                chunk = os.read(fd, 1 << 20)
            except OSError as e:
                raise ImageError("unreadable", f"{path}: {e.strerror or e}", errno=e.errno) from None
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise ImageError("too_large", f"{path}: over the {max_bytes}-byte limit")
        return st, b"".join(chunks)
    finally:
        os.close(fd)


def _open_beneath(root: str, path: str, flags: int) -> int:
    """os.open(path) walking from `root` with O_NOFOLLOW on every component (ELOOP/ENOTDIR if one is
    a symlink); "refused" for a path that is not under root at all."""
    rel = os.path.relpath(path, root)
    if rel == "." or rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
        raise ImageError("refused", f"{path}: outside the watched folder {root}")
    *folders, name = rel.split(os.sep)
    dfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for folder in folders:
            try:
                nfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise ImageError("refused", f"{path}: folder {folder!r} on the way became a symlink; "
                                                "not followed") from None
                raise
            os.close(dfd)
            dfd = nfd
        return os.open(name, flags | os.O_NOFOLLOW, dir_fd=dfd)
    finally:
        os.close(dfd)


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
        magic = next((m for m in _MAGIC if data.startswith(m)), None)
        if magic is not None and len(data) < _HEADER_BYTES.get(magic, _LONG_HEADER_BYTES):
            raise ImageError("truncated", f"{name}: image header is incomplete") from None
        if magic is not None:
            raise ImageError("corrupt", f"{name}: starts like an image but its header is not valid") from None
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
    return decode_image(read_file(path, max_bytes=max_bytes)[1], name=str(path), max_pixels=max_pixels)


# The longest side of what is kept of a photo for drawing heat maps on. Blending an overlay costs
# ~30 bytes per pixel (the colour map works in float64): at a 7000x7000 photo's own size one heat
# map took 6.5 GB. A screen shows no more than this.
DISPLAY_MAX_SIDE = 1024


def display_copy(img: Image.Image) -> Image.Image:
    """The image at most DISPLAY_MAX_SIDE pixels on its longest side; smaller ones as they are."""
    if max(img.size) <= DISPLAY_MAX_SIDE:
        return img
    small = img.convert("RGB") if img.mode not in ("L", "RGB") else img.copy()
    small.thumbnail((DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE), Image.Resampling.BILINEAR)
    return small


def shape_of(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """(height, width) of a working size given as one number (a square) or as (height, width)."""
    if isinstance(image_size, (tuple, list)):
        return int(image_size[0]), int(image_size[1])
    return int(image_size), int(image_size)


def to_array(
    img: Image.Image, *, image_size: int | tuple[int, int], channels: int, name: str = "image"
) -> np.ndarray:
    """The model's input: float32 (C, H, W) in [0, 1]; ImageError("corrupt") if it will not convert.

    Every image is resized to the working size (a square, or (height, width) chosen from the
    training images' aspect ratio), so training and serving see the same geometry; the heat map
    is resized back to the original size for display.
    """
    try:
        return _to_array(img, shape_of(image_size), channels)
    except ImageError:
        raise
    except Exception as e:  # decodes, but will not convert (odd mode, broken palette or metadata):
        # one file must fail alone, with a reason, in training, `anomon score` and the daemon alike
        raise ImageError("corrupt", f"{name}: cannot convert ({type(e).__name__}: {e})") from None


def _to_array(img: Image.Image, shape: tuple[int, int], channels: int) -> np.ndarray:
    height, width = shape
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
            arrays.append(to_array(img, image_size=image_size, channels=channels, name=str(p)))
            ok.append(p)
        except ImageError as e:
            failed.append((p, e))
    if arrays:
        X = np.stack(arrays)
    else:
        X = np.zeros((0, channels, *shape_of(image_size)), dtype=np.float32)
    return X, ok, failed
