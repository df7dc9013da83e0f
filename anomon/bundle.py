"""The model bundle file format: one safetensors file (tensors + a JSON metadata string, no pickle).

Knows bytes, tensors and a metadata dict, nothing about the detector that fills them
(detector.py maps its state to and from them), so the format can be read, checked and versioned
on its own. `model_id` is a hash of everything that decides a verdict; loading recomputes it, so a
modified or truncated file is refused, and no code in the file ever runs (weights only).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from anomon import __version__
from anomon.errors import BundleError

BUNDLE_FORMAT = 1
MAX_BUNDLE_BYTES = 2 * 1024**3


def content_id(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    """Hash of everything that decides a verdict: weights, statistics, preprocessing, score,
    threshold. Timestamps and timings are left out, so the same seed on the same data gives
    the same id, and recalibrating to a new threshold gives a new one."""
    decisive = {k: v for k, v in meta.items() if k != "training"}
    decisive["calibration"] = {k: v for k, v in meta["calibration"].items() if k != "calibrated_at"}
    h = hashlib.sha256(json.dumps(decisive, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def dumps(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[bytes, str]:
    """The file's bytes and its model_id."""
    model_id = content_id(meta, tensors)
    return st_save(tensors, metadata={"anomon": json.dumps(meta, sort_keys=True), "model_id": model_id}), model_id


def read(path: str | os.PathLike[str]) -> bytes:
    """A bundle file's bytes, with one-line errors for the ways a path can be wrong."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_BUNDLE_BYTES:
            raise BundleError(f"{path}: {size} bytes is too large for a model bundle")
        return path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"model file not found: {path}") from None
    except IsADirectoryError:
        raise BundleError(f"model path is a directory, not a file: {path}") from None
    except OSError as e:
        raise BundleError(f"cannot read model file {path}: {e.strerror or e}") from None


def loads(data: bytes, name: str = "<bytes>") -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """(metadata, tensors, model_id) of a bundle that passed every check; BundleError otherwise."""
    header = _safetensors_metadata(data, name)
    if "anomon" not in header or "model_id" not in header:
        raise BundleError(f"{name}: not an anomon model bundle (no anomon metadata)")
    try:
        meta = json.loads(header["anomon"])
        fmt = int(meta["format"])
    except (ValueError, KeyError, TypeError):
        raise BundleError(f"{name}: not an anomon model bundle (unreadable metadata)") from None
    if fmt > BUNDLE_FORMAT:
        raise BundleError(
            f"{name}: bundle format {fmt} is newer than this anomon {__version__} supports "
            f"(format {BUNDLE_FORMAT}); upgrade anomon to load it"
        )
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error types on corrupt data
        raise BundleError(f"{name}: corrupt model bundle ({e})") from None
    if content_id(meta, tensors) != header["model_id"]:
        raise BundleError(f"{name}: model bundle failed its integrity check (modified or corrupted)")
    return meta, tensors, header["model_id"]


def _safetensors_metadata(data: bytes, name: str) -> dict[str, str]:
    """Read the safetensors header's metadata without loading tensors (8-byte length + JSON)."""
    if len(data) < 8:
        raise BundleError(f"{name}: not an anomon model bundle (file too short)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or n > 100 * 1024 * 1024:
        raise BundleError(f"{name}: not an anomon model bundle (bad header)")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, ValueError):
        raise BundleError(f"{name}: not an anomon model bundle (bad header)") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise BundleError(f"{name}: not an anomon model bundle (no metadata)")
    return meta
