"""The training loop keeps its promises: a time budget is checked at every step and reported."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from anomon import train
from anomon.model import ConvAutoencoder


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every reading of the clock is one second later: a step costs about 1-2 s of 'time'."""
    ticks = itertools.count()
    monkeypatch.setattr(train.time, "monotonic", lambda: float(next(ticks)))


def _fit(X: np.ndarray, **kw) -> train.TrainResult:
    model = ConvAutoencoder(16, 1, latent_dim=4, width=8)
    return train.fit_autoencoder(
        model, X[:-4], X[-4:], epochs=3, batch_size=4, learning_rate=1e-3, patience=10, seed=0,
        device=torch.device("cpu"), progress=False, **kw,
    )


def test_budget_is_checked_within_an_epoch(fake_clock: None) -> None:
    X = np.random.default_rng(0).random((260, 1, 16, 16), dtype=np.float32)  # 64 steps per epoch
    r = _fit(X, time_budget_s=20)
    assert r.stopped_by_budget and r.stopped_early
    assert r.steps_planned == 3 * 64
    assert 1 <= r.steps_run < 64, "stopped inside the first epoch, not after it"
    assert r.epochs_run == 1 and r.best_epoch == 1  # the partial epoch was validated and kept


def test_no_budget_runs_the_plan() -> None:
    X = np.random.default_rng(0).random((36, 1, 16, 16), dtype=np.float32)
    r = _fit(X)
    assert not r.stopped_by_budget
    assert r.steps_run == r.steps_planned == 3 * 8


def test_denoising_objective_trains() -> None:
    X = np.random.default_rng(0).random((36, 1, 16, 16), dtype=np.float32)
    r = _fit(X, denoise=0.5)
    assert np.isfinite(r.val_loss) and r.steps_run == r.steps_planned
