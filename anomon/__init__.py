"""anomon: anomaly-detection monitoring for visual inspection lines.

The Python API, for notebooks and other services:

    import anomon
    det = anomon.load("model.anomon")
    for r in det.score_images(["part.png", pil_image, numpy_array]):
        print(r.score, r.threshold, r.anomalous, r.p_value, r.model_id)

and `anomon.Detector` to train from arrays (fit, score_samples, decision_function, predict, save).
torch is imported on first use, not by `import anomon`: the CLI's light commands start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from anomon.detector import Detector
    from anomon.scoring import ScoreRecord

_LAZY = {"Detector": "anomon.detector", "BundleError": "anomon.detector", "ScoreRecord": "anomon.scoring",
         "ImageError": "anomon.images"}


def load(path: str, device: str = "auto") -> Detector:
    """A trained bundle, ready to score (weights-only safetensors: no code runs on load)."""
    from anomon.detector import Detector

    return Detector.load(path, device=device)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'anomon' has no attribute {name!r}")


__all__ = ["BundleError", "Detector", "ImageError", "ScoreRecord", "__version__", "load"]
