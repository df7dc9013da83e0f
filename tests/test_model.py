"""The autoencoder must compress, whatever the input size."""

from __future__ import annotations

import pytest
import torch

from anomon.model import ConvAutoencoder, stage_sizes


def test_stage_sizes_follow_input() -> None:
    assert stage_sizes(28) == [28, 14, 7, 4]
    assert stage_sizes(256)[-1] == 4 and len(stage_sizes(256)) == 7


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3), (50, 1), (160, 1)])
def test_shape_round_trip_and_bottleneck(size: int, channels: int) -> None:
    m = ConvAutoencoder(size, channels, latent_dim=16).eval()
    x = torch.rand(2, channels, size, size)
    with torch.no_grad():
        y = m(x)
        z = m.encode(x)
    assert y.shape == x.shape
    assert 0.0 <= float(y.min()) and float(y.max()) <= 1.0
    assert z.shape == (2, 16)
    assert z[0].numel() < x[0].numel() / 40  # a real bottleneck, far smaller than the image
