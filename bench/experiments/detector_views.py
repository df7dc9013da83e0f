"""Scratch: train anomon's Detector with the CLI's defaults on one real-photo set, then read each view.

Usage: python detector_views.py SET [--tag NAME]   (SET as in real_views.py)
Prints per-view AUROC, the fitted weights and several combinations; saves the z-scored views.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_views import files  # noqa: E402

from anomon.detector import Detector, auto_image_size  # noqa: E402
from anomon.images import load_arrays  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("set")
    ap.add_argument("--tag", default="")
    ap.add_argument("--denoise", type=float, default=0.0)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--max-defects", type=int, default=150)
    a = ap.parse_args()
    normal, anom = files(a.set)
    rng = random.Random(0)
    rng.shuffle(normal)
    anom = sorted(random.Random(1).sample(anom, min(len(anom), a.max_defects)))
    n_tr, n_cal = int(0.7 * len(normal)), int(0.1 * len(normal))
    tr, cal, te_n = normal[:n_tr], normal[n_tr : n_tr + n_cal], normal[n_tr + n_cal :]
    sizes = [Image.open(p).size for p in tr]
    grey = all(Image.open(p).mode == "L" for p in tr)
    size = auto_image_size(sizes, 256)
    ch = 1 if grey else 3
    Xtr, Xcal, Xn, Xa = (load_arrays(p, image_size=size, channels=ch)[0] for p in (tr, cal, te_n, anom))
    t0 = time.time()
    det = Detector(image_size=size, channels=ch, device="cpu", denoise=a.denoise, max_steps=a.steps).fit(Xtr, progress=False)
    fit_s = time.time() - t0
    Z = {}
    for k, X in (("cal", Xcal), ("n", Xn), ("a", Xa)):
        Z[k] = torch.cat([det._view_z(x)[0] for x in det._batches(X)]).numpy()
    y = np.r_[np.zeros(len(Xn)), np.ones(len(Xa))]
    mu, sd = Z["cal"].mean(0), Z["cal"].std(0) + 1e-9
    zt = (np.r_[Z["n"], Z["a"]] - mu) / sd
    out = {"set": a.set, "tag": a.tag, "size": size, "fit_s": round(fit_s, 1), "views": det.views_,
           "weights": [round(float(w), 3) for w in det.view_weights_] if det.view_weights_ is not None else None,
           "sep": det.metadata.get("view_separation")}
    for i, v in enumerate(det.views_):
        out[v] = round(float(roc_auc_score(y, zt[:, i])), 4)
    out["shipped"] = round(float(roc_auc_score(y, det.score_samples(np.r_[Xn, Xa]))), 4)
    out["equal_sum"] = round(float(roc_auc_score(y, zt.sum(1))), 4)
    out["max"] = round(float(roc_auc_score(y, zt.max(1))), 4)
    if det.view_weights_ is not None:
        w = det.view_weights_.numpy()
        out["weighted"] = round(float(roc_auc_score(y, zt @ w)), 4)
        out["weighted_sqrt"] = round(float(roc_auc_score(y, zt @ np.sqrt(w))), 4)
    print(json.dumps(out))
    np.savez(f"/tmp/dviews_{a.set.replace(':', '_')}_{a.tag}.npz", zt=zt, y=y, views=np.array(det.views_))
    with open(Path(__file__).with_name("detector_views.jsonl"), "a") as f:
        f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
