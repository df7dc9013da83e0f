"""Synthetic defects: local, visible, reproducible, and only where asked for."""

from __future__ import annotations

import torch

from anomon.synth import add_defects


def test_defects_are_local_and_change_the_image() -> None:
    x = torch.full((32, 1, 96, 160), 0.5)
    y, masks = add_defects(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and masks.shape == (32, 1, 96, 160)
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    area = (masks > 0.5).float().mean((1, 2, 3))
    assert bool((area > 0).all()), "every image got a defect"
    assert float(area.max()) < 0.1, "a defect is small: at most a few percent of the image"
    changed = ((y - x).abs() > 0.02).float()
    assert float((changed * (masks == 0)).sum()) == 0.0, "nothing changes outside the mask"
    assert float((changed * (masks > 0.5)).sum() / (masks > 0.5).sum()) > 0.5, "the defect is visible"


def test_same_generator_state_same_defects() -> None:
    x = torch.rand(8, 3, 64, 64)
    a, ma = add_defects(x, torch.Generator().manual_seed(3))
    b, mb = add_defects(x, torch.Generator().manual_seed(3))
    c, _ = add_defects(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and torch.equal(ma, mb)
    assert not torch.equal(a, c)


def test_share_leaves_the_rest_clean() -> None:
    x = torch.rand(200, 1, 32, 32)
    y, masks = add_defects(x, torch.Generator().manual_seed(0), share=0.25)
    damaged = masks.flatten(1).amax(1) > 0
    assert 25 <= int(damaged.sum()) <= 75
    assert torch.equal(y[~damaged], x[~damaged])
