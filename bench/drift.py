"""Drift: how soon does the drift test (anomon/drift.py) see a slow change, and does it stay quiet
on unchanged images? On real photos and on synthetic scores.

Real photos (one anomon model per set, `anomon train` defaults on 70% of the normals, calibrated
at 5% on 10%, as bench/real_photos.py; the model is cached under --models and reused): the
held-out normals (the other 20%) are fed, in a fresh random order each pass, after a healthy
stretch of --healthy images, with a change that grows linearly over --ramp images and then holds:

- "lamp dims": brightness x (1 - 0.3 t), PIL ImageEnhance.Brightness;
- "lens blurs": Gaussian blur of radius 2 t px on the working-size image's scale (PIL
  GaussianBlur on the photo, radius scaled by photo size / working size), t from 0 to 1.

Every image goes the daemon's way (anomon.images.decode_image, Detector.preprocess through
anomon.scoring.prepare, Detector.assess) into the daemon's DriftTest, in batches of 16 like the
daemon's. Reported: the images until the alarm (1/alpha = 100), the change reached by then, and
what the threshold saw of it (the share of drifted images judged anomalous, and over the last 100,
which is what AnomonAnomalyRateHigh looks at). Unchanged: --runs runs of 20,000 images resampled
from the held-out normals' scores; alarms should be at most 1 run in 100, and the same bet over
the verdicts' own p-values (fixed calibration set) is run beside it to show why the test ranks
each image among all the images before it instead.

Synthetic (Gaussian scores, 50 calibration scores, threshold at 5%): the same two questions with
many more runs, and Vovk's Simple Jumper (2021; J = 0.01) on the same p-values as the alternative
that anomon/drift.py's docstring compares with.

    python bench/drift.py /work/data/Mahdi-Kriaa+Casting_Defect_Detection \\
        /work/data/stoy95536+KolektorSDD_Yolov8_Datasets         # -> bench/results/drift.{md,json}
    python bench/drift.py --synthetic-only                         # ~3 min
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package
from real_photo_sets import PhotoSet, Sample, discover, split  # noqa: E402

from anomon.calibrate import p_values  # noqa: E402
from anomon.drift import DriftTest, martingale_path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "drift.md"
TARGET_FPR = 0.05
ALPHA = 0.01
BATCH = 16  # the daemon's default batch_size


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def spread(values: list[float | int | None]) -> str:
    """median [min-max] of the runs that got there, and how many did not."""
    got = [v for v in values if v is not None]
    missed = len(values) - len(got)
    if not got:
        return f"none of {len(values)}"
    text = f"{np.median(got):.0f} [{min(got):.0f}-{max(got):.0f}]"
    return text + (f", {missed} of {len(values)} never" if missed else "")


# ------------------------------------------------------------------------------ synthetic


def simple_jumper_path(p_values: np.ndarray, jump: float = 0.01) -> np.ndarray:
    """log10 of Vovk's Simple Jumper (Statistical Science 2021, Algorithm 1: bets
    f(p) = 1 + eps (p - 1/2), eps in {-1, 0, 1}, jumping rate J): the alternative anomon/drift.py
    compares with."""
    eps = np.array([-1.0, 0.0, 1.0])
    shares, log10, out = np.full(3, 1 / 3), 0.0, np.empty(len(p_values))
    for t, p in enumerate(p_values):
        shares = (1 - jump) * shares + jump / 3
        shares = shares * (1 + eps * (p - 0.5))
        s = shares.sum()
        log10 += math.log10(s)
        shares /= s
        out[t] = log10
    return out


def gaussian_case(seed: int, n_cal: int = 50) -> tuple[np.ndarray, float, np.random.Generator]:
    rng = np.random.default_rng(seed)
    cal = rng.normal(size=n_cal)
    return cal, float(np.sort(cal)[math.ceil((n_cal + 1) * (1 - TARGET_FPR)) - 1]), rng


def online_p_values(test: DriftTest, scores: np.ndarray) -> np.ndarray:
    """The drift test's p-values for `scores` fed in daemon-sized batches (NaN: not tested)."""
    return np.concatenate([test.update(scores[i:i + BATCH]).p_values for i in range(0, len(scores), BATCH)])


def verdict_p_values(det: Any, scores: np.ndarray) -> np.ndarray:
    """The verdicts' kind of p-value, (1 + #{calibration >= s}) / (n + 1), for images judged normal
    against the calibration scores below the threshold: the same images and reference as the
    drift test's, so the one difference is the fixed reference."""
    cal = np.asarray(det.calibration_scores_, dtype=np.float64)
    return p_values(np.sort(cal[cal < det.threshold_]), scores)


def first_at(path: np.ndarray, level: float) -> int | None:
    hit = np.flatnonzero(path >= level)
    return int(hit[0]) if hit.size else None


def synthetic(runs: int, seeds: int, healthy: list[int]) -> dict[str, Any]:
    level = -math.log10(ALPHA)
    out: dict[str, Any] = {"null": {}, "delay": []}
    ours_max, naive_max = [], []
    for seed in range(runs):
        cal, thr, rng = gaussian_case(seed)
        x = rng.normal(size=20_000)
        test = DriftTest(cal, thr, model_id="synthetic", rng=rng)
        p = online_p_values(test, x)
        ours_max.append(float(martingale_path(p[~np.isnan(p)]).max()))
        naive = p_values(np.sort(cal[cal < thr]), x[x <= thr])
        naive_max.append(float(martingale_path(naive).max()))
    out["null"] = {
        "runs": runs, "images": 20_000,
        "ours_alarms": sum(v >= level for v in ours_max), "ours_max_log10": ours_max,
        "verdict_p_alarms": sum(v >= level for v in naive_max), "verdict_p_max_log10": naive_max,
    }
    log(f"synthetic null: ours {out['null']['ours_alarms']}/{runs} alarms, "
        f"verdict p-values {out['null']['verdict_p_alarms']}/{runs}")
    for kind in ("ramp", "step"):
        for h in healthy:
            ours, jumper = [], []
            for seed in range(seeds):
                cal, thr, rng = gaussian_case(1000 + seed)
                n = h + 3000
                t = np.arange(n) - h
                mu = np.clip(t / 1000, 0, 1) * 1.5 if kind == "ramp" else np.where(t >= 0, 0.5, 0.0)
                x = rng.normal(size=n) + mu
                p = online_p_values(DriftTest(cal, thr, model_id="synthetic", rng=rng), x)
                idx = np.flatnonzero(~np.isnan(p))
                for paths, f in ((ours, martingale_path), (jumper, simple_jumper_path)):
                    at = first_at(f(p[idx]), level)
                    paths.append(None if at is None else int(idx[at]) - h + 1)
            row = {"change": kind, "healthy": h, "ours": ours, "simple_jumper": jumper}
            out["delay"].append(row)
            log(f"synthetic {kind} after {h}: ours {spread(ours)}, jumper {spread(jumper)}")
    return out


# ------------------------------------------------------------------------------ real photos


def model_for(ps: PhotoSet, train: list[Sample], models: Path, seed: int, device: str) -> Path:
    """The cached bundle for this set and split, trained with `anomon train` defaults if absent."""
    from real_photos import train_anomon

    cached = models / f"{ps.name.replace('/', '_')}-seed{seed}.safetensors"
    if cached.is_file():
        log(f"  reusing {cached}")
        return cached
    models.mkdir(parents=True, exist_ok=True)
    folder = models / f"{ps.name.replace('/', '_')}-seed{seed}-train"
    folder.mkdir(exist_ok=True)
    model, wall = train_anomon(train, folder, None, device)
    model.replace(cached)
    for link in folder.iterdir():
        link.unlink()
    folder.rmdir()
    log(f"  trained in {wall:.0f} s -> {cached}")
    return cached


def photos(samples: list[Sample]) -> list[Image.Image]:
    from anomon.images import decode_image, read_file

    return [decode_image(read_file(s.path)[1], name=str(s.path)) for s in samples]


def assess(det: Any, images: list[Image.Image]) -> Any:
    from anomon.scoring import prepare

    return det.assess(np.stack([prepare(det, im).x for im in images]))


def dim(im: Image.Image, t: float, scale: float) -> Image.Image:
    return ImageEnhance.Brightness(im).enhance(1.0 - 0.3 * t)


def blur(im: Image.Image, t: float, scale: float) -> Image.Image:
    return im.filter(ImageFilter.GaussianBlur(2.0 * t * scale)) if t > 0 else im


CHANGES: dict[str, tuple[Callable[[Image.Image, float, float], Image.Image], str]] = {
    "lamp dims": (dim, "x{:.3f}"),  # brightness factor
    "lens blurs": (blur, "{:.2f} px"),  # blur radius at the working size
}


def drift_run(det: Any, held: list[Image.Image], held_scores: np.ndarray, change: str, seed: int,
              args: argparse.Namespace) -> dict[str, Any]:
    fn, what = CHANGES[change]
    rng = np.random.default_rng(seed)
    test = DriftTest.for_detector(det, alpha=ALPHA, rng=rng)
    for i in range(0, args.healthy, BATCH):  # the healthy stretch: unchanged held-out normals
        test.update(rng.choice(held_scores, size=min(BATCH, args.healthy - i)))
    assert not test.alarmed, "alarm during the healthy stretch"
    scale = max(held[0].size) / max(det.input_shape)  # photo pixels per working-size pixel
    order: list[int] = []
    anomalous: list[bool] = []
    fed = 0
    t0 = time.perf_counter()
    while fed < args.max_drift:
        if len(order) < BATCH:
            order.extend(rng.permutation(len(held)).tolist())
        take, order = order[:BATCH], order[BATCH:]
        ts = [min(1.0, (fed + k + 1) / args.ramp) for k in range(len(take))]
        a = assess(det, [fn(held[j], t, scale) for j, t in zip(take, ts)])
        step = test.update(a.scores)
        anomalous.extend(bool(x) for x in a.anomalous)
        if step.alarm is not None:
            n = fed + step.alarm.index + 1
            t = min(1.0, n / args.ramp)
            return {"change": change, "seed": seed, "alarm_after": n, "strength": t,
                    "direction": step.alarm.direction,
                    "at": what.format(1.0 - 0.3 * t if change == "lamp dims" else 2.0 * t),
                    "anomalous_share": float(np.mean(anomalous[:n])),
                    "anomalous_share_last100": float(np.mean(anomalous[max(0, n - 100):n])),
                    "log10": step.alarm.log10, "seconds": time.perf_counter() - t0}
        fed += len(take)
    return {"change": change, "seed": seed, "alarm_after": None, "strength": 1.0,
            "anomalous_share": float(np.mean(anomalous)),
            "anomalous_share_last100": float(np.mean(anomalous[-100:])), "seconds": time.perf_counter() - t0}


def real_set(ps: PhotoSet, args: argparse.Namespace) -> dict[str, Any]:
    from anomon.detector import Detector

    train, cal, test = split(ps, seed=args.seed)
    held_samples = [s for s in test if not s.defective]
    log(f"{ps.name}: {len(train)} train / {len(cal)} calibration / {len(held_samples)} held-out normals")
    det = Detector.load(model_for(ps, train, args.models, args.seed, args.device), device=args.device)
    cal_scores = assess(det, photos(cal)).scores
    det.calibrate(cal_scores, target_fpr=TARGET_FPR)
    held = photos(held_samples)
    a = assess(det, held)
    held_scores = np.asarray(a.scores, dtype=np.float64)
    row: dict[str, Any] = {
        "set": ps.name, "n_train": len(train), "n_cal": len(cal), "n_held": len(held),
        "cal_below_threshold": DriftTest.for_detector(det).reference_size,
        "held_anomalous_share": float(np.mean(a.anomalous)), "working_size": str(det.size_label),
    }
    # unchanged: 20,000 images resampled from the held-out normals' scores
    level = -math.log10(ALPHA)
    ours, naive = [], []
    for r in range(args.runs):
        rng = np.random.default_rng(10_000 + r)
        x = rng.choice(held_scores, size=20_000)
        test_r = DriftTest.for_detector(det, alpha=ALPHA, rng=rng)
        p = online_p_values(test_r, x)
        ours.append(float(martingale_path(p[~np.isnan(p)]).max()))
        kept = x[~det.is_anomalous(x)]
        naive.append(float(martingale_path(verdict_p_values(det, kept)).max()))
    row["null"] = {"runs": args.runs, "ours_alarms": sum(v >= level for v in ours), "ours_max_log10": ours,
                   "verdict_p_alarms": sum(v >= level for v in naive), "verdict_p_max_log10": naive}
    log(f"  unchanged, {args.runs} x 20,000: ours {row['null']['ours_alarms']} alarms (max log10 "
        f"{max(ours):.2f}), verdict p-values {row['null']['verdict_p_alarms']} (max {max(naive):.1f})")
    row["drift"] = []
    for change in CHANGES:
        for s in range(args.seeds):
            r = drift_run(det, held, held_scores, change, args.seed * 100 + s, args)
            row["drift"].append(r)
            log(f"  {change} (seed {s}): alarm after {r['alarm_after']} images"
                + (f" ({r['at']}; scores {r['direction']}), {r['anomalous_share']:.0%} of them anomalous, "
                   f"{r['anomalous_share_last100']:.0%} of the last 100" if r["alarm_after"] else "")
                + f" [{r['seconds']:.0f} s]")
    return row


# ------------------------------------------------------------------------------ report


def render(meta: dict[str, Any], real: list[dict[str, Any]], syn: dict[str, Any] | None) -> str:
    lines = [
        "# Drift: the drift test on slow changes and on unchanged images", "",
        f"`{meta['command']}`", "",
        f"{meta['date_utc']} UTC, {platform.machine()}, nproc {meta['nproc']}, torch threads "
        f"{meta['torch_threads']}, load average {meta['load_before']} before, {meta['load_after']} after "
        f"({meta['minutes']:.1f} min; a shared machine)", "",
        f"alpha = {ALPHA} (an alarm at 10^2); batches of {BATCH} as the daemon's; anomon/drift.py explains the "
        "test.", "",
    ]
    if real:
        lines += [
            "## Real photos", "",
            f"One model per set (`anomon train` defaults on 70% of the normals, calibrated at 5% on 10%), "
            f"then {meta['healthy']:,} unchanged held-out normals (resampled), then held-out normals in random "
            f"order with a change growing linearly over {meta['ramp']:,} images and then holding; "
            f"{meta['seeds']} run(s) per change, at most {meta['max_drift']:,} changed images.", "",
            "| set | change | runs | alarm after (images) | change at the alarm (brightness factor; blur radius "
            "at working size) | scores | judged anomalous up to the alarm | ... in the last 100 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in real:
            for change in CHANGES:
                rs = [r for r in row["drift"] if r["change"] == change]
                hits = [r for r in rs if r["alarm_after"] is not None]
                lines.append(
                    f"| {row['set']} | {change} | {len(rs)} | {spread([r['alarm_after'] for r in rs])} | "
                    + (", ".join(r["at"] for r in hits) or "—") + " | "
                    + (", ".join(sorted({r.get("direction", "?") for r in hits})) or "—") + " | "
                    + (", ".join(f"{r['anomalous_share']:.0%}" for r in hits) or "—") + " | "
                    + (", ".join(f"{r['anomalous_share_last100']:.0%}" for r in hits) or "—") + " |")
        lines += [
            "", "Unchanged images: 20,000 a run, resampled from the held-out normals' scores.", "",
            "| set | calibration (below threshold) | held-out normals (anomalous at 5%) | runs | drift test: "
            "alarms, max log10 median [max] | same bet on the verdicts' p-values: alarms, max log10 median [max] |",
            "|---|---|---|---|---|---|",
        ]
        for row in real:
            n = row["null"]
            lines.append(
                f"| {row['set']} | {row['n_cal']} ({row['cal_below_threshold']}) | {row['n_held']} "
                f"({row['held_anomalous_share']:.0%}) | {n['runs']} | {n['ours_alarms']}, "
                f"{np.median(n['ours_max_log10']):.2f} [{max(n['ours_max_log10']):.2f}] | "
                f"{n['verdict_p_alarms']}, "
                f"{np.median(n['verdict_p_max_log10']):.2f} [{max(n['verdict_p_max_log10']):.1f}] |")
        lines += [
            "", "- scores: the way the drift alarm said the images moved (the bet that won). A lower score is "
            "no relief: the images look less like anything the model flags, and defects can hide in them; a "
            "test betting on small p-values (higher scores) only would not have seen those changes.",
            "- \"judged anomalous ... in the last 100\": what the threshold, and AnomonAnomalyRateHigh (20% "
            "over 10 minutes), saw of the change by the time of the drift alarm; 5% is the threshold's "
            "target false-alarm rate on unchanged images.",
            "- The verdicts' p-values compare every image with the same calibration scores, so given them "
            "the p-values are not uniform, and a bet on them grows without bound in runs where they lean one "
            "way. Each set here has one calibration set (one model), so these runs say little about how "
            "often that happens; the synthetic runs below draw a new calibration set each. The drift test "
            "ranks each image among the calibration scores and all images before it (exactly uniform under "
            "exchangeability).", ""]
    if syn:
        n = syn["null"]
        lines += [
            "## Synthetic scores", "",
            f"Gaussian scores, 50 calibration scores, threshold at 5%. Unchanged: {n['runs']} runs of 20,000 "
            f"images: drift test {n['ours_alarms']} alarm(s) (max log10 median "
            f"{np.median(n['ours_max_log10']):.2f}, "
            f"max {max(n['ours_max_log10']):.2f}); the same bet on the verdicts' p-values "
            f"{n['verdict_p_alarms']} (median {np.median(n['verdict_p_max_log10']):.2f}, max "
            f"{max(n['verdict_p_max_log10']):.1f}).", "",
            "Images until the alarm, median [min-max] over runs: ramp = the mean rises by 1.5 sd over 1,000 "
            "images, step = +0.5 sd at once; after a healthy stretch. Same p-values for both strategies.", "",
            "| change | healthy images before | drift test (anomon) | Simple Jumper J = 0.01 |",
            "|---|---|---|---|",
        ]
        for r in syn["delay"]:
            lines.append(f"| {r['change']} | {r['healthy']:,} | {spread(r['ours'])} "
                         f"| {spread(r['simple_jumper'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="*", type=Path, help="extracted real-photo set folders")
    ap.add_argument("--models", type=Path, default=Path("/tmp/anomon-drift-models"),
                    help="where trained bundles are cached and reused (default /tmp/anomon-drift-models)")
    ap.add_argument("--seed", type=int, default=0, help="split seed (as bench/real_photos.py)")
    ap.add_argument("--seeds", type=int, default=2, help="runs per change and set")
    ap.add_argument("--runs", type=int, default=20, help="unchanged runs of 20,000 images per set")
    ap.add_argument("--healthy", type=int, default=2000, help="unchanged images before the change")
    ap.add_argument("--ramp", type=int, default=2000, help="images over which the change grows")
    ap.add_argument("--max-drift", type=int, default=2500, help="changed images at most")
    ap.add_argument("--synthetic-only", action="store_true")
    ap.add_argument("--no-synthetic", action="store_true")
    ap.add_argument("--syn-runs", type=int, default=100)
    ap.add_argument("--syn-seeds", type=int, default=6)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--render", type=Path, metavar="JSON", help="only write the report again from a results JSON")
    args = ap.parse_args(argv)
    if args.render:
        saved = json.loads(args.render.read_text())
        for row in saved["real"]:  # the change reached at the alarm, in this version's words
            for r in row["drift"]:
                if r["alarm_after"] is not None:
                    t = r["strength"]
                    r["at"] = CHANGES[r["change"]][1].format(
                        1.0 - 0.3 * t if r["change"] == "lamp dims" else 2.0 * t)
        args.out.write_text(render(saved["meta"], saved["real"], saved["synthetic"]))
        return 0
    import torch

    t0 = time.time()
    meta: dict[str, Any] = {
        "command": shlex.join(["python", "bench/drift.py", *(argv if argv is not None else sys.argv[1:])]),
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "healthy": args.healthy, "ramp": args.ramp, "seeds": args.seeds, "max_drift": args.max_drift,
    }
    real = [] if args.synthetic_only else [real_set(ps, args) for root in args.data for ps in discover(root)]
    syn = None if args.no_synthetic else synthetic(args.syn_runs, args.syn_seeds, [0, 20_000])
    meta["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    meta["minutes"] = (time.time() - t0) / 60
    text = render(meta, real, syn)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "real": real, "synthetic": syn},
                                                        indent=1, default=float) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
