"""The autoencoder must compress, whatever the input size."""

from __future__ import annotations

import pytest
import torch

from anomon.model import ConvAutoencoder, stage_sizes


def test_stage_sizes_follow_input() -> None:
    assert stage_sizes(28) == [28, 14, 7, 4]
    assert stage_sizes(64) == [64, 32, 16, 8, 4]
    assert stage_sizes(256) == [256, 128, 64, 32, 16]  # at most 4 halvings: a 16-px cell


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3), (50, 1), (160, 1)])
def test_shape_round_trip_and_bottleneck(size: int, channels: int) -> None:
    m = ConvAutoencoder(size, channels, latent_dim=16).eval()
    x = torch.rand(2, channels, size, size)
    with torch.no_grad():
        y = m(x)
        z = m.encode(x)
    assert y.shape == x.shape
    assert 0.0 <= float(y.min()) and float(y.max()) <= 1.0
    if size <= 64:
        assert z.shape == (2, 16)  # one dense code for a small, aligned image
    else:
        assert z.shape == (2, 8, size // 16, size // 16)  # 8 numbers per 16x16 cell
    assert z[0].numel() <= x[0].numel() / 32  # a real bottleneck, far smaller than the image
