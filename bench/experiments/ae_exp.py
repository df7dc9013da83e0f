"""Scratch: conv AE with a dense bottleneck on Fashion-MNIST, many score forms at once.

Usage: python ae_exp.py --classes 0,2,6,1 --tag NAME [--latent 32 --width 32 --epochs 20 ...]
Appends one JSON line per class to bench/experiments/results.jsonl.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fashion_mnist import load_fashion_mnist, split_class  # noqa: E402

torch.set_num_threads(2)


class AE(nn.Module):
    def __init__(self, width=32, latent=32, act="relu", bn=False, dec_width=None):
        super().__init__()
        w = width
        A = (lambda: nn.LeakyReLU(0.2)) if act == "lrelu" else (lambda: nn.ReLU())
        def block(i, o, s):
            layers = [nn.Conv2d(i, o, 3, s, 1)]
            if bn:
                layers.append(nn.BatchNorm2d(o))
            layers.append(A())
            return layers
        self.enc = nn.Sequential(*block(1, w, 2), *block(w, 2 * w, 2), *block(2 * w, 4 * w, 2))  # 14,7,4
        self.fc_e = nn.Linear(4 * w * 16, latent)
        dw = dec_width or w
        self.dw = dw
        self.fc_d = nn.Linear(latent, 4 * dw * 16)
        self.d1 = nn.Sequential(*block(4 * dw, 2 * dw, 1))
        self.d2 = nn.Sequential(*block(2 * dw, dw, 1))
        self.d3 = nn.Sequential(*block(dw, dw, 1))
        self.out = nn.Conv2d(dw, 1, 3, 1, 1)

    def encode(self, x):
        return self.fc_e(self.enc(x).flatten(1))

    def decode(self, z):
        h = F.relu(self.fc_d(z)).view(-1, 4 * self.dw, 4, 4)
        h = self.d1(F.interpolate(h, size=7, mode="nearest"))
        h = self.d2(F.interpolate(h, size=14, mode="nearest"))
        h = self.d3(F.interpolate(h, size=28, mode="nearest"))
        return torch.sigmoid(self.out(h))

    def forward(self, x):
        return self.decode(self.encode(x))


def gaussian_window(size=7, sigma=1.5):
    g = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(g**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim_map(x, y, win):
    pad = win.shape[-1] // 2
    c1, c2 = 0.01**2, 0.03**2
    f = lambda t: F.conv2d(F.pad(t, (pad,) * 4, mode="reflect"), win)
    mx, my = f(x), f(y)
    sxx = f(x * x) - mx * mx
    syy = f(y * y) - my * my
    sxy = f(x * y) - mx * my
    return ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))


def train(model, X, cfg, seed, callback=None):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.wd)
    n = len(X)
    steps = cfg.epochs * math.ceil(n / cfg.bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps) if cfg.sched == "onecycle" else (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if cfg.sched == "cos" else None)
    win = gaussian_window(7, 1.5)
    t0 = time.perf_counter()
    for ep in range(cfg.epochs):
        perm = torch.randperm(n, generator=g)
        tot = 0.0
        for i in range(0, n, cfg.bs):
            xb = X[perm[i : i + cfg.bs]]
            xin = xb
            if cfg.noise > 0:
                xin = (xb + cfg.noise * torch.randn(xb.shape, generator=g)).clamp(0, 1)
            if cfg.aug_shift > 0:
                pass
            rec = model(xin)
            if cfg.loss == "mse":
                loss = F.mse_loss(rec, xb)
            elif cfg.loss == "l1":
                loss = F.l1_loss(rec, xb)
            elif cfg.loss == "ssim":
                loss = (1 - ssim_map(rec, xb, win)).mean() + F.mse_loss(rec, xb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched:
                sched.step()
            tot += loss.item() * len(xb)
        if callback and (ep + 1) in cfg.eval_at:
            el = time.perf_counter() - t0
            callback(ep + 1, el, tot / n)
            t0 += time.perf_counter() - t0 - el
        if cfg.budget and time.perf_counter() - t0 > cfg.budget:
            print(f"  budget hit after epoch {ep+1}", flush=True)
            break
    return time.perf_counter() - t0, tot / n


@torch.no_grad()
def outputs(model, X, bs=500):
    recs, zs = [], []
    for i in range(0, len(X), bs):
        z = model.encode(X[i : i + bs])
        recs.append(model.decode(z))
        zs.append(z)
    return torch.cat(recs), torch.cat(zs)


def conformal_fpr(cal, test_normal, alpha=0.05):
    n = len(cal)
    k = math.ceil((n + 1) * (1 - alpha))
    thr = np.sort(cal)[min(k, n) - 1]
    return float((test_normal > thr).mean())


def score_forms(X, R, Z, fitsl, win7, win11):
    """dict name -> scores for all images X (fit + cal + test stacked)."""
    e2 = (X - R) ** 2
    ea = (X - R).abs()
    S = {}
    S["mse"] = e2.mean((1, 2, 3))
    S["l1"] = ea.mean((1, 2, 3))
    # per-pixel standardisation from fit images
    for nm, e in (("e2", e2), ("ea", ea)):
        mu = e[fitsl].mean(0, keepdim=True)
        sd = e[fitsl].std(0, keepdim=True) + 1e-3
        z = (e - mu) / sd
        S[f"z_{nm}_mean"] = z.mean((1, 2, 3))
        S[f"z_{nm}_pos"] = z.clamp(min=0).mean((1, 2, 3))
        S[f"z_{nm}_sq"] = (z**2).mean((1, 2, 3))
        S[f"div_{nm}"] = (e / (mu + 1e-3)).mean((1, 2, 3))
        for k in (3, 5, 7):
            p = F.avg_pool2d(z, k, 1)
            S[f"z_{nm}_pool{k}max"] = p.flatten(1).max(1).values
        for k in (5,):
            p = F.avg_pool2d(e, k, 1)
            S[f"{nm}_pool{k}max"] = p.flatten(1).max(1).values
    for k in (2, 4):
        d = F.avg_pool2d(X - R, k)
        S[f"lf{k}"] = (d**2).mean((1, 2, 3))
        mu = (d**2)[fitsl].mean(0, keepdim=True); sd = (d**2)[fitsl].std(0, keepdim=True) + 1e-4
        S[f"z_lf{k}"] = (((d**2) - mu) / sd).mean((1, 2, 3))
    pad = win7.shape[-1] // 2
    db = F.conv2d(F.pad(X - R, (pad,) * 4, mode="reflect"), win7)
    S["blur7"] = (db**2).mean((1, 2, 3))
    for nm, w in (("ssim7", win7), ("ssim11", win11)):
        m = 1 - ssim_map(X, R, w)
        S[nm] = m.mean((1, 2, 3))
        mu = m[fitsl].mean(0, keepdim=True); sd = m[fitsl].std(0, keepdim=True) + 1e-3
        S[f"z_{nm}_mean"] = ((m - mu) / sd).mean((1, 2, 3))
    # latent references (NOT reconstruction based)
    Zf = Z[fitsl]
    mu = Zf.mean(0); C = torch.cov(Zf.T) + 1e-3 * torch.eye(Z.shape[1])
    Ci = torch.linalg.inv(C)
    d = Z - mu
    S["lat_maha"] = ((d @ Ci) * d).sum(1)
    # 1-NN in latent (excluding self for fit images handled roughly: use 2nd NN for fit rows)
    D = torch.cdist(Z, Zf)
    srt = D.topk(2, largest=False).values
    lat = srt[:, 0].clone()
    lat[fitsl] = srt[fitsl, 1]
    S["lat_1nn"] = lat
    return {k: v.double().numpy() for k, v in S.items()}


COMBOS = (("mse", "ssim7"), ("z_e2_mean", "ssim7"), ("z_ea_mean", "z_ssim7_mean"), ("mse", "lat_maha"),
          ("z_ea_mean", "lat_1nn"), ("z_e2_mean", "z_e2_pool5max"), ("lf2", "ssim7"), ("z_lf2", "z_ssim7_mean"),
          ("z_e2_mean", "lat_maha"), ("lf4", "ssim11"))


def zcombo(S, a, b, fitsl):
    out = 0
    for k in (a, b):
        s = S[k]
        out = out + (s - s[fitsl].mean()) / (s[fitsl].std() + 1e-12)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", default="0,2,6,1")
    ap.add_argument("--tag", default="run")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--dec-width", type=int, default=None)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--bs", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--wd", type=float, default=0.0)
    ap.add_argument("--loss", default="mse")
    ap.add_argument("--noise", type=float, default=0.0)
    ap.add_argument("--aug-shift", type=int, default=0)
    ap.add_argument("--act", default="relu")
    ap.add_argument("--bn", action="store_true")
    ap.add_argument("--sched", default="none")
    ap.add_argument("--budget", type=float, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--show", default="mse,z_e2_mean,ssim7,lf2,lf4,blur7,z_lf2,lat_maha,lat_1nn")
    ap.add_argument("--eval-at", default="")
    ap.add_argument("--arch", default="mine")
    ap.add_argument("--save", action="store_true")
    cfg = ap.parse_args()
    cfg.eval_at = [int(e) for e in cfg.eval_at.split(",") if e]

    tx, ty = load_fashion_mnist("train")
    vx, vy = load_fashion_mnist("t10k")
    Vt = torch.from_numpy(vx.copy()).float().div(255).unsqueeze(1)
    win7, win11 = gaussian_window(7, 1.5), gaussian_window(11, 1.5)
    out_path = Path(__file__).with_name("results.jsonl")
    for c in [int(s) for s in cfg.classes.split(",")]:
        torch.manual_seed(cfg.seed)
        fit, cal = split_class(tx, ty, c)
        Ft = torch.from_numpy(fit).float().div(255).unsqueeze(1)
        Ct = torch.from_numpy(cal).float().div(255).unsqueeze(1)
        if cfg.arch == "lead":
            from anomon.model import ConvAutoencoder
            model = ConvAutoencoder(28, 1, cfg.latent, cfg.width)
        else:
            model = AE(cfg.width, cfg.latent, cfg.act, cfg.bn, cfg.dec_width)
        X = torch.cat([Ft, Ct, Vt])
        nf, nc = len(Ft), len(Ct)
        lab = (vy != c).astype(int)

        def evaluate(ep, tt, loss):
            model.eval()
            t0 = time.perf_counter()
            R, Z = outputs(model, X)
            t_inf = time.perf_counter() - t0
            model.train()
            fitsl = slice(0, nf)
            S = score_forms(X, R, Z, fitsl, win7, win11)
            for a, b in COMBOS:
                S[f"{a}+{b}"] = zcombo(S, a, b, fitsl)
            auc, fpr = {}, {}
            for k, s in S.items():
                st = s[nf + nc :]
                auc[k] = round(float(roc_auc_score(lab, st)), 4)
                fpr[k] = round(conformal_fpr(s[nf : nf + nc], st[lab == 0]), 4)
            tag = f"{cfg.tag}@{ep}"
            if cfg.save and ep == cfg.epochs:
                np.savez_compressed(Path(__file__).with_name("dumps") / f"{cfg.tag}_c{c}.npz",
                                    R=R.numpy().astype(np.float16), Z=Z.numpy().astype(np.float32), nf=nf, nc=nc)
                torch.save(model.state_dict(), Path(__file__).with_name("dumps") / f"{cfg.tag}_c{c}.pt")
            rec = dict(tag=tag, cls=c, cfg=vars(cfg), ep=ep, train_s=round(tt, 1), loss=loss,
                       infer_ips=round(len(X) / t_inf), auc=auc, fpr=fpr)
            with open(out_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            show = cfg.show.split(",")
            print(f"[{tag}] cls {c} train {tt:.1f}s loss {loss:.5f} ips {len(X)/t_inf:.0f} | "
                  + " ".join(f"{k}={auc[k]:.4f}" for k in show), flush=True)
            best = sorted(auc.items(), key=lambda kv: -kv[1])[:6]
            print("   best:", best, flush=True)

        tt, loss = train(model, Ft, cfg, cfg.seed, evaluate)
        if cfg.epochs not in cfg.eval_at:
            evaluate(cfg.epochs, tt, loss)

if __name__ == "__main__":
    main()
