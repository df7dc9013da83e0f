"""`anomon evaluate --report`: the pictures an ML engineer checks before trusting a threshold.

ROC curve (ranking quality), score histogram with the threshold drawn (where the operating point
sits between the two populations), and heat maps of the highest-scoring images (whether the model
looks at the defect or at something else). Plus summary.json for scripts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import numpy as np
from matplotlib import pyplot as plt

from anomon.heatmap import save_overlay
from anomon.scoring import score_items

if TYPE_CHECKING:
    from anomon.calibrate import Evaluation
    from anomon.detector import Detector

TOP_HEATMAPS = 12
# The names this module gives heat maps ("03_anomalous_part_17.png"): only these are cleared from an
# earlier report in the same folder, whose ranks would otherwise mix with the new ones.
RANKED_NAME = re.compile(r"\d{2}_(normal|anomalous)_.+\.png")


def write_report(
    out: Path,
    det: Detector,
    ev: Evaluation,
    normal_scores: np.ndarray,
    anomalous_scores: np.ndarray,
    normal_paths: list[Path],
    anomalous_paths: list[Path],
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for old in (out / "heatmaps").glob("*.png"):
        if RANKED_NAME.fullmatch(old.name):
            old.unlink()
    _roc(out / "roc.png", ev)
    _histogram(out / "histogram.png", normal_scores, anomalous_scores, det.threshold_)

    everything = [(float(s), p, "normal") for s, p in zip(normal_scores, normal_paths)]
    everything += [(float(s), p, "anomalous") for s, p in zip(anomalous_scores, anomalous_paths)]
    everything.sort(key=lambda t: -t[0])
    top = []
    ranked = everything[:TOP_HEATMAPS]
    for rank, ((score, path, label), rec) in enumerate(
        zip(ranked, score_items(det, [p for _, p, _ in ranked], heatmaps=True)), start=1
    ):
        if rec.error is not None:  # changed on disk since it was scored
            continue
        png = save_overlay(
            out / "heatmaps" / f"{rank:02d}_{label}_{path.stem}.png", rec.image, rec.heatmap,
            vmax=det.heat_vmax, vmin=det.heat_vmin,
        )
        top.append({"rank": rank, "path": str(path), "label": label, "score": score, "heatmap": str(png)})

    summary = {
        "model_id": det.model_id,
        "threshold": det.threshold_,
        "auroc": ev.auroc,
        "average_precision": ev.average_precision,
        "false_alarm_rate": ev.false_alarm_rate,
        "detection_rate": ev.detection_rate,
        "n_normal": ev.n_normal,
        "n_anomalous": ev.n_anomalous,
        "warnings": det.warnings(),
        "top_scoring": top,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out


def _roc(path: Path, ev: Evaluation) -> None:
    fpr, tpr = ev.roc
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.plot(fpr, tpr, lw=2, label=f"anomon (AUROC {ev.auroc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="chance")
    ax.scatter([ev.false_alarm_rate], [ev.detection_rate], c="red", zorder=3, label="calibrated threshold")
    ax.set(xlabel="false-alarm rate", ylabel="detection rate", title="ROC curve", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _histogram(path: Path, normal: np.ndarray, anomalous: np.ndarray, threshold: float) -> None:
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    both = np.r_[normal, anomalous]
    bins = np.linspace(float(both.min()), float(both.max()), 40)
    ax.hist(normal, bins=bins, alpha=0.6, label=f"normal ({len(normal)})", color="tab:blue")
    ax.hist(anomalous, bins=bins, alpha=0.6, label=f"anomalous ({len(anomalous)})", color="tab:red")
    ax.axvline(threshold, c="black", ls="--", label=f"threshold {threshold:.3g}")
    ax.set(xlabel="anomaly score (higher = more anomalous)", ylabel="images", title="Score distribution")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
