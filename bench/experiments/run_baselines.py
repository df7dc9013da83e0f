"""Scratch: baselines once, all 10 classes."""
from __future__ import annotations
import sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np
from sklearn.metrics import roc_auc_score
from fashion_mnist import load_fashion_mnist, split_class, BASELINES, pca_scores

tx, ty = load_fashion_mnist("train"); vx, vy = load_fashion_mnist("t10k")
print(tx.shape, vx.shape, np.bincount(ty))
res = {}
for c in range(10):
    fit, cal = split_class(tx, ty, c)
    lab = (vy != c).astype(int)
    row = {}
    for name, fn in BASELINES.items():
        t = time.perf_counter(); s = fn(fit, vx); row[name] = (roc_auc_score(lab, s), time.perf_counter() - t)
    for v in (0.8, 0.95):
        row[f"PCA{v}"] = (roc_auc_score(lab, pca_scores(fit, vx, v)), 0)
    res[c] = row
    print(c, {k: f"{a:.4f} ({t:.1f}s)" for k, (a, t) in row.items()}, flush=True)
for k in res[0]:
    print(k, f"{np.mean([res[c][k][0] for c in res]):.4f}")
