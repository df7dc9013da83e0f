"""The training loop: plain, readable top to bottom, seeded, with early stopping.

A progress bar (epoch, loss, ETA) when stderr is a terminal; one log line per epoch otherwise, so
systemd journals and CI logs stay readable.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional as F

from anomon.model import ConvAutoencoder
from anomon.synth import add_defects

log = logging.getLogger("anomon.train")


def pick_device(requested: str = "auto") -> torch.device:
    """CUDA when present (or asked for), CPU otherwise; asking for CUDA without one is a user error."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but no CUDA device is available")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    # Same seed + same data = same model on CPU; the warn_only keeps CUDA usable where a kernel
    # has no deterministic variant.
    torch.use_deterministic_algorithms(True, warn_only=True)


@dataclass
class TrainResult:
    epochs_run: int
    best_epoch: int
    train_loss: float
    val_loss: float
    seconds: float
    stopped_early: bool
    steps_run: int = 0
    steps_planned: int = 0
    # True when the time budget, not the plan or early stopping, ended training: the model is
    # then weaker than asked for, and every place that shows the model says so.
    stopped_by_budget: bool = False
    history: list[tuple[float, float]] = field(default_factory=list)


MIN_STEPS_PER_EPOCH = 16
CROP = 64
CROP_BATCH = 16


def crop_size(model: ConvAutoencoder) -> int:
    """Training crop for spatial-latent models on images larger than CROP; 0 = whole images."""
    if not model.spatial or model.config["image_size"] <= CROP:
        return 0
    return max(model.crop_multiple, CROP // model.crop_multiple * model.crop_multiple)


def _random_crops(x: torch.Tensor, crop: int, gen: torch.Generator) -> torch.Tensor:
    """One random crop per image (positions drawn from `gen`, so runs repeat)."""
    h, w = x.shape[-2:]
    ys = torch.randint(0, h - crop + 1, (len(x),), generator=gen).tolist()
    xs = torch.randint(0, w - crop + 1, (len(x),), generator=gen).tolist()
    return torch.stack([img[:, y : y + crop, x0 : x0 + crop] for img, y, x0 in zip(x, ys, xs)])


def effective_batch_size(batch_size: int, n_train: int) -> int:
    """Smaller batches on small data sets, so an epoch is at least MIN_STEPS_PER_EPOCH steps.

    With 135 images and batches of 64 an epoch is 3 optimiser steps, and 20 epochs leave the
    model where it started (measured on sample_data: the loss never moved). Per-image cost is
    the same either way; only the number of updates changes.
    """
    return max(4, min(batch_size, n_train // MIN_STEPS_PER_EPOCH))


def _loss(model: ConvAutoencoder, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    return F.mse_loss(model(x), x if target is None else target)


@torch.no_grad()
def _mean_loss(model: ConvAutoencoder, X: np.ndarray, batch_size: int, device: torch.device) -> float:
    model.eval()
    total = 0.0
    for i in range(0, len(X), batch_size):
        x = torch.from_numpy(X[i : i + batch_size]).to(device)
        total += float(_loss(model, x)) * len(x)
    return total / max(len(X), 1)


def fit_autoencoder(
    model: ConvAutoencoder,
    X_train: np.ndarray,
    X_val: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    max_steps: int | None = None,
    learning_rate: float,
    patience: int,
    seed: int,
    device: torch.device,
    time_budget_s: float | None = None,
    progress: bool | None = None,
    denoise: float = 0.0,
) -> TrainResult:
    """Adam on MSE; keeps the weights of the best validation epoch.

    `denoise`: the share of training images that get a synthetic defect (anomon.synth) while the
    target stays the clean image, so the network learns to repair defects rather than copy them.
    Validation stays plain reconstruction of clean held-out images.
    """
    if progress is None:
        progress = sys.stderr.isatty()
    crop = crop_size(model)
    if crop:
        # A fully convolutional model learns texture from random crops: many cheap, varied
        # samples instead of few whole images (sample_data, 400 steps: whole-image holdout loss
        # 0.0158 -> 0.0102, below the 0.0144 of a 17-px blur). An epoch still covers about the
        # data's area once.
        area = (X_train.shape[-1] * X_train.shape[-2]) / crop**2
        batch_size = CROP_BATCH
        steps = max(MIN_STEPS_PER_EPOCH, math.ceil(len(X_train) * area / batch_size))
    else:
        batch_size = effective_batch_size(batch_size, len(X_train))
        steps = math.ceil(len(X_train) / batch_size)
    if max_steps is not None:
        epochs = max(1, min(epochs, math.ceil(max_steps / steps)))
    gen = torch.Generator().manual_seed(seed)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=learning_rate)
    # Cosine decay to a tenth: the last epochs refine instead of bouncing around.
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=learning_rate / 10)
    Xt = torch.from_numpy(X_train)
    best = (float("inf"), 0, copy.deepcopy(model.state_dict()))
    history: list[tuple[float, float]] = []
    start = time.monotonic()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=epochs, desc="training", unit="epoch", file=sys.stderr, dynamic_ncols=True)
    stopped_early = stopped_by_budget = False
    steps_run = 0
    epoch = 0
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(Xt), generator=gen)
        running, seen = 0.0, 0
        for step in range(steps):
            # The budget is checked before every step, not between epochs: one epoch of a large
            # data set can outlast the whole budget (the demo's "at most 90 s" once took 119 s).
            if time_budget_s is not None and steps_run:
                elapsed = time.monotonic() - start
                if elapsed + elapsed / steps_run > time_budget_s:
                    stopped_by_budget = True
                    break
            if crop:
                idx = torch.randint(0, len(Xt), (batch_size,), generator=gen)
                x = _random_crops(Xt[idx], crop, gen)
            else:
                idx = order[step * batch_size : (step + 1) * batch_size]
                x = Xt[idx]
            if denoise > 0:  # painted on the CPU: the generator (and so the run) stays reproducible
                damaged, _ = add_defects(x, gen, share=denoise)
                loss = _loss(model, damaged.to(device), x.to(device))
            else:
                loss = _loss(model, x.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.item() * len(idx)
            seen += len(idx)
            steps_run += 1
        if seen == 0:  # the budget ran out before this epoch's first step
            epoch -= 1
            break
        sched.step()
        train_loss = running / max(seen, 1)
        val_loss = _mean_loss(model, X_val, batch_size, device) if len(X_val) else train_loss
        history.append((train_loss, val_loss))
        if val_loss < best[0]:
            best = (val_loss, epoch, copy.deepcopy(model.state_dict()))
        elapsed = time.monotonic() - start
        if bar is not None:
            bar.set_postfix(loss=f"{train_loss:.5f}", val=f"{val_loss:.5f}")
            bar.update(1)
        else:
            log.info(
                "epoch %d/%d loss %.5f val %.5f (%.1fs, eta %.0fs)",
                epoch, epochs, train_loss, val_loss, elapsed, elapsed / epoch * (epochs - epoch),
            )
        # Early epochs are noisy; stopping is only considered once the cosine schedule has run
        # a quarter of its course.
        if epoch - best[1] >= patience and epoch >= epochs // 4:
            stopped_early = True
            break
        if stopped_by_budget:
            break
    if bar is not None:
        bar.close()
    model.load_state_dict(best[2])
    model.eval()
    return TrainResult(
        epochs_run=epoch,
        best_epoch=best[1],
        train_loss=history[best[1] - 1][0] if history else float("nan"),
        val_loss=best[0],
        seconds=time.monotonic() - start,
        stopped_early=stopped_early or stopped_by_budget,
        steps_run=steps_run,
        steps_planned=epochs * steps,
        stopped_by_budget=stopped_by_budget,
        history=history,
    )
