"""Every way an image file fails maps to one reason, the same for training, scoring and the daemon."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomon.images import ImageError, iter_image_files, load_image, to_array


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def good_png() -> bytes:
    return _png((np.random.default_rng(0).random((24, 24)) * 255).astype(np.uint8))


def _reason(path: Path, **kw) -> str:
    with pytest.raises(ImageError) as e:
        load_image(path, **kw)
    assert str(path) in str(e.value)
    return e.value.reason


def test_good_image_decodes(tmp_path: Path, good_png: bytes) -> None:
    p = tmp_path / "a.png"
    p.write_bytes(good_png)
    assert load_image(p).size == (24, 24)


def test_each_failure_has_its_reason(tmp_path: Path, good_png: bytes) -> None:
    cases = {
        "empty.png": (b"", "empty"),
        "half.png": (good_png[: len(good_png) // 2], "truncated"),
        "header.png": (good_png[:12], "truncated"),
        "text.png": (b"this is not an image at all\n" * 20, "not_image"),
    }
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        assert _reason(tmp_path / name) == reason, name
    # valid signature and header, garbage pixel data
    broken = bytearray(good_png)
    idat = broken.find(b"IDAT")
    broken[idat + 8 : idat + 40] = b"\x00" * 32
    (tmp_path / "corrupt.png").write_bytes(bytes(broken))
    assert _reason(tmp_path / "corrupt.png") in ("corrupt", "truncated")
    assert _reason(tmp_path / "missing.png") == "vanished"
    (tmp_path / "dir.png").mkdir()
    assert _reason(tmp_path / "dir.png") == "unreadable"


def test_pixel_and_byte_limits_checked_before_decoding(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    Image.new("1", (9000, 9000)).save(big)  # 81 Mpx, a few kB on disk
    assert big.stat().st_size < 200_000
    assert _reason(big) == "too_large"
    small = tmp_path / "small.png"
    small.write_bytes(_png(np.zeros((40, 40), np.uint8)))
    assert _reason(small, max_pixels=1000) == "too_large"
    assert _reason(small, max_bytes=10) == "too_large"


@pytest.mark.parametrize("mode,channels", [("L", 1), ("RGB", 3), ("L", 3), ("RGB", 1), ("I;16", 1)])
def test_to_array_shape_and_range(mode: str, channels: int) -> None:
    if mode == "I;16":
        img = Image.fromarray((np.arange(30 * 20).reshape(20, 30) * 50).astype(np.uint16))
    else:
        img = Image.new(mode, (30, 20), color=128 if mode == "L" else (10, 200, 30))
    arr = to_array(img, image_size=16, channels=channels)
    assert arr.shape == (channels, 16, 16) and arr.dtype == np.float32
    assert 0.0 <= arr.min() and arr.max() <= 1.0
    if mode == "I;16":
        assert arr.max() > 0.9  # 16-bit range rescaled, not clipped to black/white


def test_iter_image_files_recursive_sorted_skips_hidden(tmp_path: Path, good_png: bytes) -> None:
    for rel in ["b.png", "a.JPG", "sub/c.tif", ".hidden.png", ".cache/d.png", "notes.txt"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(good_png)
    names = [str(p.relative_to(tmp_path)) for p in iter_image_files(tmp_path)]
    assert names == ["a.JPG", "b.png", "sub/c.tif"]


def test_read_file_rules(tmp_path: Path, good_png: bytes) -> None:
    """The one safe read: regular files only, a FIFO never blocks, a final symlink only when asked."""
    import os

    from anomon.images import read_file

    p = tmp_path / "a.png"
    p.write_bytes(good_png)
    st, data = read_file(p)
    assert data == good_png and st.st_size == len(good_png)
    link = tmp_path / "link.png"
    link.symlink_to(p)
    assert read_file(link)[1] == good_png  # a path a user names may be a link they made
    with pytest.raises(ImageError) as e:
        read_file(link, follow_symlinks=False)  # the daemon's rule
    assert e.value.reason == "refused"
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageError) as e:
        read_file(fifo)  # returns at once: nobody is writing
    assert e.value.reason == "unreadable"
    with pytest.raises(ImageError) as e:
        read_file(p, max_bytes=10)
    assert e.value.reason == "too_large"


def test_a_mode_that_will_not_convert_is_corrupt_not_a_crash() -> None:
    """Training, `anomon score` and the daemon all get a reason, not a traceback."""
    img = Image.new("P", (8, 8))

    def fail(*a: object, **k: object) -> Image.Image:
        raise ValueError("conversion not supported")  # what Pillow says for some odd modes

    img.convert = fail  # type: ignore[method-assign]
    with pytest.raises(ImageError) as e:
        to_array(img, image_size=8, channels=1, name="odd.png")
    assert e.value.reason == "corrupt" and "odd.png" in str(e.value)


def test_read_beneath_a_root_follows_no_link_on_the_way(tmp_path: Path, good_png: bytes) -> None:
    from anomon.images import read_file

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a" / "b").mkdir(parents=True)
    outside.mkdir()
    (root / "a" / "b" / "x.png").write_bytes(good_png)
    (outside / "y.png").write_bytes(good_png)
    assert read_file(root / "a" / "b" / "x.png", beneath=str(root))[1] == good_png
    (root / "a" / "link").symlink_to(outside, target_is_directory=True)
    for path in (root / "a" / "link" / "y.png", outside / "y.png", root / ".." / "outside" / "y.png"):
        with pytest.raises(ImageError) as e:
            read_file(path, beneath=str(root))
        assert e.value.reason == "refused", path
