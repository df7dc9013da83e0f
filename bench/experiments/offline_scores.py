"""Scratch: evaluate many score forms on saved reconstructions (no retraining).

Usage: python offline_scores.py TAG [classes]
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fashion_mnist import load_fashion_mnist, split_class  # noqa: E402
from ae_exp import gaussian_window, ssim_map, conformal_fpr  # noqa: E402

torch.set_num_threads(2)


def blur(t, sigma):
    size = int(2 * math.ceil(2 * sigma) + 1)
    w = gaussian_window(size, sigma)
    return F.conv2d(F.pad(t, (size // 2,) * 4, mode="reflect"), w)


def zstd(m, fitsl, floor_frac=0.1):
    mu = m[fitsl].mean(0, keepdim=True)
    sd = m[fitsl].std(0, keepdim=True)
    sd = torch.clamp(sd, min=float(sd.mean()) * floor_frac + 1e-8)
    return (m - mu) / sd


def forms(X, R, Z, fitsl):
    S = {}
    d = X - R
    e2 = d**2
    S["mse"] = e2.mean((1, 2, 3))
    z = zstd(e2, fitsl)
    S["z_mean"] = z.mean((1, 2, 3))
    p = F.avg_pool2d(z, 3, 1, padding=1, count_include_pad=False)
    S["z_local3"] = p.amax((1, 2, 3))
    for s in (1.0, 1.5, 2.0, 3.0):
        b = blur(d, s) ** 2
        S[f"blur{s}"] = b.mean((1, 2, 3))
        S[f"z_blur{s}"] = zstd(b, fitsl).mean((1, 2, 3))
    for k in (2, 4):
        b = F.avg_pool2d(d, k) ** 2
        S[f"lf{k}"] = b.mean((1, 2, 3))
        S[f"z_lf{k}"] = zstd(b, fitsl).mean((1, 2, 3))
    for nm, w in (("ssim7", gaussian_window(7, 1.5)), ("ssim11", gaussian_window(11, 1.5))):
        m = 1 - ssim_map(X, R, w)
        S[nm] = m.mean((1, 2, 3))
        S["z_" + nm] = zstd(m, fitsl).mean((1, 2, 3))
    # multi-scale: sum of z-scored (over fit set) mse at scales 1,2,4
    Zf = Z[fitsl]
    mu = Zf.mean(0)
    C = torch.cov(Zf.T) + 1e-3 * torch.eye(Z.shape[1])
    dz = Z - mu
    S["lat_maha"] = ((dz @ torch.linalg.inv(C)) * dz).sum(1)
    D = torch.cdist(Z, Zf)
    srt = D.topk(2, largest=False).values
    lat = srt[:, 0].clone()
    lat[fitsl] = srt[fitsl, 1]
    S["lat_1nn"] = lat
    return {k: v.double().numpy() for k, v in S.items()}


def zc(S, keys, nf, nc):
    """Sum of views, each standardised on the calibration rows (as the lead's detector does)."""
    out = 0
    for k in keys:
        s = S[k]
        ref = s[nf : nf + nc]
        out = out + (s - ref.mean()) / (ref.std() + 1e-12)
    return out


COMBOS = [
    ("z_mean", "z_local3"), ("mse", "ssim7"), ("z_mean", "ssim7"), ("blur1.5", "ssim7"), ("z_blur1.5", "z_ssim7"),
    ("lf4", "ssim11"), ("z_mean", "z_blur2.0"), ("mse", "blur2.0"), ("z_mean", "lat_maha"), ("z_mean", "lat_1nn"),
    ("blur2.0", "lat_maha"), ("z_blur2.0", "lat_1nn"), ("z_mean", "z_blur2.0", "ssim7"),
    ("mse", "lf2", "lf4"), ("z_mean", "z_lf2", "z_lf4"),
]


def main():
    tag = sys.argv[1]
    classes = [int(c) for c in (sys.argv[2] if len(sys.argv) > 2 else "0,1,2,3,4,5,6,7,8,9").split(",")]
    tx, ty = load_fashion_mnist("train")
    vx, vy = load_fashion_mnist("t10k")
    Vt = torch.from_numpy(vx.copy()).float().div(255).unsqueeze(1)
    table = {}
    fprs = {}
    for c in classes:
        f = Path(__file__).with_name("dumps") / f"{tag}_c{c}.npz"
        if not f.exists():
            continue
        D = np.load(f)
        fit, cal = split_class(tx, ty, c)
        X = torch.cat([torch.from_numpy(a).float().div(255).unsqueeze(1) for a in (fit, cal)] + [Vt])
        R = torch.from_numpy(D["R"].astype(np.float32))
        Z = torch.from_numpy(D["Z"])
        nf, nc = int(D["nf"]), int(D["nc"])
        S = forms(X, R, Z, slice(0, nf))
        for combo in COMBOS:
            S["+".join(combo)] = zc(S, combo, nf, nc)
        lab = (vy != c).astype(int)
        for k, s in S.items():
            st = s[nf + nc :]
            table.setdefault(k, {})[c] = roc_auc_score(lab, st)
            fprs.setdefault(k, {})[c] = conformal_fpr(s[nf : nf + nc], st[lab == 0])
    cls = sorted(next(iter(table.values())).keys())
    print(f"{'form':34s} " + " ".join(f"{c:>6d}" for c in cls) + "   mean  fpr[min,max]")
    for k in sorted(table, key=lambda k: -np.mean(list(table[k].values()))):
        v = table[k]
        fp = list(fprs[k].values())
        print(f"{k:34s} " + " ".join(f"{v[c]:.4f}" for c in cls) + f" {np.mean(list(v.values())):.4f}"
              + f" [{min(fp):.3f},{max(fp):.3f}]")


if __name__ == "__main__":
    main()
