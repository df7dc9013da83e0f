"""Scratch: train the autoencoder once per real-photo set, then read many candidate views at once.

Usage: python real_views.py SET [--area 256] [--steps 800] [--denoise 0] [--tag NAME]
SET: kolektor | casting | bsdata | piped:<TYPE>. Appends one JSON line per run to real_views.jsonl.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import roc_auc_score

from anomon.model import ConvAutoencoder
from anomon.train import fit_autoencoder, seed_everything

D = Path("/work/data")
torch.set_num_threads(2)


def files(name: str) -> tuple[list[str], list[str]]:
    if name == "kolektor":
        root = D / "stoy95536+KolektorSDD_Yolov8_Datasets/Datasets"
        n, a = [], []
        for p in sorted(glob.glob(str(root / "images/*/*.jpg"))):
            lab = p.replace("/images/", "/labels/").rsplit(".", 1)[0] + ".txt"
            (a if os.path.exists(lab) and os.path.getsize(lab) > 0 else n).append(p)
        return n, a
    if name == "casting":
        root = D / "Mahdi-Kriaa+Casting_Defect_Detection/data"
        return sorted(glob.glob(str(root / "*/ok_front/*"))), sorted(glob.glob(str(root / "*/def_front/*")))
    if name == "bsdata":
        root = D / "2Obe+BSData"
        n, a = [], []
        for p in sorted(glob.glob(str(root / "data/*crop_2.jpg"))):
            if Image.open(p).size != (1130, 460):
                continue
            lab = root / "label" / (Path(p).stem + ".json")
            pit = lab.exists() and any(s["label"] == "Pitting" for s in json.load(open(lab))["shapes"])
            (a if pit else n).append(p)
        return n, a
    if name.startswith("piped:"):
        root = D / "bianconif+PIPED/data" / name.split(":")[1]
        return sorted(glob.glob(str(root / "NoDefects/*.bmp"))), sorted(glob.glob(str(root / "Defects/*.bmp")))
    raise SystemExit(name)


def work_shape(w: int, h: int, area: int, mult: int = 16) -> tuple[int, int]:
    s = min(1.0, math.sqrt(area * area / (w * h)))
    return max(mult, round(h * s / mult) * mult), max(mult, round(w * s / mult) * mult)


def load(paths: list[str], shape: tuple[int, int], ch: int) -> np.ndarray:
    out = []
    for p in paths:
        im = Image.open(p).convert("L" if ch == 1 else "RGB").resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
        a = np.asarray(im, np.float32) / 255.0
        out.append(a[None] if ch == 1 else a.transpose(2, 0, 1))
    return np.stack(out)


def box(x: torch.Tensor, k: int) -> torch.Tensor:
    r = F.avg_pool2d(x, (k, 1), 1, (k // 2, 0), count_include_pad=False)
    return F.avg_pool2d(r, (1, k), 1, (0, k // 2), count_include_pad=False)


def grad_mag(x: torch.Tensor) -> torch.Tensor:
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]) / 4
    k = torch.stack([kx, kx.T])[:, None]
    x = x.mean(1, keepdim=True)
    g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k)
    return g.pow(2).sum(1, keepdim=True).add(1e-6).sqrt()


@torch.no_grad()
def feats(model: ConvAutoencoder, x: torch.Tensor, stage: int) -> torch.Tensor:
    h = x.contiguous(memory_format=torch.channels_last)
    for i, blk in enumerate(model.encoder):
        h = blk(h)
        if i + 1 == stage:
            break
    return F.avg_pool2d(h, 3, 1, 1, count_include_pad=False).contiguous()


def nn_dist(q: torch.Tensor, bank: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    out = []
    bn = (bank * bank).sum(1)
    for i in range(0, len(q), chunk):
        qq = q[i : i + chunk]
        d = (qq * qq).sum(1, keepdim=True) - 2 * qq @ bank.T + bn[None]
        out.append(d.amin(1).clamp(min=0).sqrt())
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("set")
    ap.add_argument("--area", type=int, default=256)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--denoise", type=float, default=0.0)
    ap.add_argument("--bank", type=int, default=8192)
    ap.add_argument("--tag", default="")
    ap.add_argument("--max-defects", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    normal, anom = files(a.set)
    rng = random.Random(a.seed)
    anom = sorted(random.Random(1).sample(anom, min(len(anom), a.max_defects)))
    normal = normal[:]
    rng.shuffle(normal)
    n_tr, n_cal = int(0.7 * len(normal)), int(0.1 * len(normal))
    tr, cal, te_n = normal[:n_tr], normal[n_tr : n_tr + n_cal], normal[n_tr + n_cal :]
    w, h = Image.open(tr[0]).size
    ch = 1 if all(Image.open(p).mode == "L" for p in tr[:20]) else 3
    shape = work_shape(w, h, a.area)
    t0 = time.time()
    Xtr, Xcal, Xn, Xa = (load(p, shape, ch) for p in (tr, cal, te_n, anom))
    print(f"{a.set}: shape {shape} ch {ch} train {len(Xtr)} cal {len(Xcal)} test {len(Xn)}+{len(Xa)} load {time.time()-t0:.1f}s", file=sys.stderr)
    seed_everything(a.seed)
    model = ConvAutoencoder(min(shape), ch)
    t0 = time.time()
    res = fit_autoencoder(model, Xtr, Xcal, epochs=60, max_steps=a.steps, batch_size=64, learning_rate=2e-3,
                          patience=8, seed=a.seed, device=torch.device("cpu"), progress=False, denoise=a.denoise)
    fit_s = time.time() - t0
    model.eval()
    k = max(3, min(shape) // 8) | 1

    def run(X: np.ndarray) -> dict[str, torch.Tensor]:
        outs: dict[str, list[torch.Tensor]] = {}
        with torch.no_grad():
            for i in range(0, len(X), 16):
                x = torch.from_numpy(X[i : i + 16])
                r = model(x)
                e = ((r - x) ** 2).mean(1, keepdim=True)
                ge = (grad_mag(r) - grad_mag(x)).abs()
                d = {"err": e, "gerr": ge, "code": model.encode(x)}
                d["f2"] = feats(model, x, 2)[:, :, ::2, ::2]
                d["f3"] = feats(model, x, 3)
                for kk, v in d.items():
                    outs.setdefault(kk, []).append(v)
        return {kk: torch.cat(v) for kk, v in outs.items()}

    t0 = time.time()
    R = {n: run(X) for n, X in (("tr", Xtr), ("cal", Xcal), ("n", Xn), ("a", Xa))}
    views: dict[str, dict[str, np.ndarray]] = {}

    def add(name: str, fn) -> None:
        views[name] = {s: fn(R[s], s).numpy() for s in ("cal", "n", "a")}

    em = R["tr"]["err"].mean(0, keepdim=True)
    es = R["tr"]["err"].std(0, keepdim=True).clamp(min=float(R["tr"]["err"].std(0).mean()) * 0.1 + 1e-8)
    gl = float(R["tr"]["err"].mean())
    add("mean_pix", lambda r, s: ((r["err"] - em) / es).mean((1, 2, 3)))
    add("local_pix", lambda r, s: box((r["err"] - em) / es, k).amax((1, 2, 3)))
    add("mean_glob", lambda r, s: r["err"].mean((1, 2, 3)))
    add("local_glob", lambda r, s: box(r["err"] / gl, k).amax((1, 2, 3)))
    add("local_glob_k5", lambda r, s: box(r["err"] / gl, 5).amax((1, 2, 3)))
    add("gerr_local", lambda r, s: box(r["gerr"], k).amax((1, 2, 3)))
    add("gerr_local_k5", lambda r, s: box(r["gerr"], 5).amax((1, 2, 3)))
    # latent code: global NN on a pooled code (aligned parts) and per-cell NN (textures)
    def code_nn(r, s, pool):
        c = F.adaptive_avg_pool2d(r["code"], pool).flatten(1)
        bank = F.adaptive_avg_pool2d(R["tr"]["code"], pool).flatten(1)
        return nn_dist(c, bank)
    add("code_nn4", lambda r, s: code_nn(r, s, 4))
    add("code_nn2", lambda r, s: code_nn(r, s, 2))
    trc = R["tr"]["code"]
    cbank = trc.permute(0, 2, 3, 1).reshape(-1, trc.shape[1])
    cbank = cbank[torch.randperm(len(cbank), generator=torch.Generator().manual_seed(0))[:32768]]
    def code_cell(r, s):
        c = r["code"]; N, C, hh, ww = c.shape
        return nn_dist(c.permute(0, 2, 3, 1).reshape(-1, C), cbank).view(N, hh * ww).amax(1)
    add("code_cell_max", code_cell)
    def code_pos(r, s):
        c = r["code"]
        d = torch.stack([((trc - ci[None]) ** 2).sum(1).amin(0) for ci in c])  # (N, h, w)
        return d.flatten(1).amax(1)
    add("code_pos_max", code_pos)
    add("code_nn8", lambda r, s: code_nn(r, s, 8))
    g = torch.Generator().manual_seed(0)
    for st in (2, 3):
        ftr = R["tr"][f"f{st}"]
        C = ftr.shape[1]
        allf = ftr.permute(0, 2, 3, 1).reshape(-1, C)
        idx = torch.randperm(len(allf), generator=g)[: a.bank]
        bank = allf[idx]

        def fk(r, s, st=st, bank=bank, C=C):
            f = r[f"f{st}"]
            N, _, hh, ww = f.shape
            d = nn_dist(f.permute(0, 2, 3, 1).reshape(-1, C), bank).view(N, 1, hh, ww)
            return d.amax((1, 2, 3))

        add(f"feat{st}_max", fk)
    # raw pixel 1-NN at 64 (reference)
    def raw(X):
        return torch.from_numpy(np.stack([np.asarray(Image.fromarray((x.mean(0) * 255).astype(np.uint8)).resize((64, 64), Image.Resampling.BILINEAR), np.float32).ravel() / 255 for x in X]))
    rb = raw(Xtr)
    RX = {"cal": raw(Xcal), "n": raw(Xn), "a": raw(Xa)}
    views["raw1nn"] = {s: nn_dist(RX[s], rb).numpy() for s in RX}
    score_s = time.time() - t0
    out = {"set": a.set, "tag": a.tag, "shape": shape, "steps": a.steps, "fit_s": round(fit_s, 1), "epochs": res.epochs_run,
           "val": res.val_loss, "score_s": round(score_s, 1)}
    y = np.r_[np.zeros(len(Xn)), np.ones(len(Xa))]
    for name, v in views.items():
        out[name] = round(float(roc_auc_score(y, np.r_[v["n"], v["a"]])), 4)
    # z-combos
    def z(name):
        mu, sd = views[name]["cal"].mean(), views[name]["cal"].std() + 1e-12
        return np.r_[(views[name]["n"] - mu) / sd, (views[name]["a"] - mu) / sd]
    for combo in (("local_glob", "feat3_max"), ("local_glob", "feat2_max", "code_nn4"), ("mean_pix", "local_pix", "feat3_max", "code_nn4")):
        out["+".join(combo)] = round(float(roc_auc_score(y, sum(z(c) for c in combo))), 4)
    np.savez(f"/tmp/views_{a.set.replace(':', '_')}_{a.tag}.npz", **{f"{k}__{s}": v[s] for k, v in views.items() for s in v})
    print(json.dumps(out))
    with open(Path(__file__).with_name("real_views.jsonl"), "a") as f:
        f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
