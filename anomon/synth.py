"""Synthetic defects: small, local, random changes painted onto normal images.

Two jobs, both because real defects are not available at training time:
  - the denoising objective (train.py): the autoencoder learns to map a damaged image back to the
    normal one, so at scoring time it *repairs* a real defect instead of copying it through, and the
    repair shows up as reconstruction error (the seed's "denoising" use of an autoencoder; DRAEM,
    Zavrtanik et al., ICCV 2021, and RIAD, Zavrtanik et al., Pattern Recognition 2021, train the
    same way);
  - weighing the score's views (detector.py): a view that cannot tell held-out normal images from
    the same images with a synthetic defect gets no weight.

The shapes imitate what inspection lines see: blobs (pits, spots, stains, chips) and thin
strokes (scratches, cracks); the fills imitate what a defect does to the surface: darker or
brighter, texture from elsewhere pasted in, or noise. Sizes are relative to the image, so the same
rules serve a 28-px garment and a 400-px casting.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def _rotated_coordinates(h: int, w: int, r: torch.Tensor, turn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, h, w) pixel coordinates along and across a random direction through a random centre.

    r: (n, k) uniform draws; r[:, 0], r[:, 1] place the centre and r[:, turn] turns the direction.
    """
    yy = torch.arange(h, dtype=torch.float32)[:, None]
    xx = torch.arange(w, dtype=torch.float32)[None, :]
    cy, cx = r[:, 0] * (h - 1), r[:, 1] * (w - 1)
    th = r[:, turn] * math.pi
    dy, dx = yy[None] - cy[:, None, None], xx[None] - cx[:, None, None]
    c, s = torch.cos(th)[:, None, None], torch.sin(th)[:, None, None]
    return dx * c + dy * s, -dx * s + dy * c


def _blob_masks(n: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """(n, 1, h, w) soft masks: one ellipse per image, 3-12% of the shorter side across, rotated."""
    side = min(h, w)
    r = torch.rand(n, 6, generator=gen)
    a = (0.015 + 0.045 * r[:, 2]) * side + 1.0  # semi-axes
    b = a * (0.3 + 0.7 * r[:, 3])
    along, across = _rotated_coordinates(h, w, r, turn=4)
    u, v = along / a[:, None, None], across / b[:, None, None]
    return torch.clamp(1.5 - (u * u + v * v), 0.0, 1.0)[:, None]


def _stroke_masks(n: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """(n, 1, h, w) thin lines 10-40% of the shorter side long, 1-3 px wide: scratches, cracks."""
    side = min(h, w)
    r = torch.rand(n, 5, generator=gen)
    half = (0.05 + 0.15 * r[:, 2]) * side + 2.0
    width = 0.5 + 1.0 * r[:, 4] * max(1.0, side / 128)
    along, across = _rotated_coordinates(h, w, r, turn=3)
    inside = (along.abs() <= half[:, None, None]).float()
    return (torch.clamp(width[:, None, None] + 0.5 - across.abs(), 0.0, 1.0) * inside)[:, None]


def add_defects(x: torch.Tensor, gen: torch.Generator, share: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Paint one random defect on a `share` of the images x (N, C, H, W) in [0, 1].

    Returns the damaged images and the (N, 1, H, W) masks (all zero where nothing was painted).
    Deterministic for a given generator state, so training runs repeat.
    """
    n, ch, h, w = x.shape
    r = torch.rand(n, 4, generator=gen)
    masks = torch.where((r[:, 0] < 0.6)[:, None, None, None], _blob_masks(n, h, w, gen), _stroke_masks(n, h, w, gen))
    masks = masks * (r[:, 1] < share).float()[:, None, None, None]
    # Fills: darker/brighter (pits, stains), texture moved from elsewhere (misplaced pattern), noise.
    shift = (0.15 + 0.35 * torch.rand(n, 1, 1, 1, generator=gen)) * torch.where(
        torch.rand(n, 1, 1, 1, generator=gen) < 0.5, -1.0, 1.0
    )
    shifted = (x + shift).clamp(0, 1)
    dy = int(torch.randint(h // 4, max(h // 4 + 1, 3 * h // 4), (1,), generator=gen))
    dx = int(torch.randint(w // 4, max(w // 4 + 1, 3 * w // 4), (1,), generator=gen))
    moved = torch.roll(x.flip(0), shifts=(dy, dx), dims=(2, 3))
    noise = torch.rand(x.shape, generator=gen)
    noise = F.avg_pool2d(noise, 3, 1, 1)
    kind = r[:, 2]
    fill = torch.where((kind < 0.5)[:, None, None, None], shifted,
                       torch.where((kind < 0.8)[:, None, None, None], moved, noise))
    alpha = (0.6 + 0.4 * r[:, 3])[:, None, None, None] * masks
    return x * (1 - alpha) + fill * alpha, masks
