"""The convolutional autoencoder.

It must *compress*: an autoencoder whose code is as large as its input learns to copy, and then
reconstructs defects as well as it reconstructs normal texture (the seed design scored AUROC 0.74 on
Fashion-MNIST for that reason). So the encoder halves the resolution until about 4x4, whatever the
input size, and squeezes everything through a dense latent vector of `latent_dim` numbers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


def stage_sizes(image_size: int, floor: int = 4) -> list[int]:
    """Spatial sizes of the encoder stages: 28 -> [28, 14, 7, 4]; 256 -> [256, ..., 8, 4]."""
    sizes = [image_size]
    while sizes[-1] > floor:
        sizes.append(math.ceil(sizes[-1] / 2))
    return sizes


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    # GroupNorm, not BatchNorm: it behaves the same in training and evaluation, so validation
    # loss (early stopping) and serving scores do not depend on running statistics that lag
    # behind on small data sets, and a batch of one is fine.
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1),
        nn.GroupNorm(min(8, cout // 4) or 1, cout),
        nn.LeakyReLU(0.2, inplace=True),
    )


class ConvAutoencoder(nn.Module):
    """Stride-2 conv encoder -> dense latent -> upsample+conv decoder -> sigmoid.

    Upsample-then-convolve (not transposed convolution) avoids checkerboard artefacts, which would
    otherwise show up in every error map as a regular grid of false "defects".
    """

    def __init__(
        self,
        image_size: int,
        channels: int,
        latent_dim: int = 32,
        width: int = 32,
        max_width: int = 256,
    ) -> None:
        super().__init__()
        self.config: dict[str, Any] = dict(
            image_size=image_size,
            channels=channels,
            latent_dim=latent_dim,
            width=width,
            max_width=max_width,
        )
        self.sizes = stage_sizes(image_size)
        depth = len(self.sizes) - 1
        widths = [min(width * 2**i, max_width) for i in range(depth)]

        enc: list[nn.Module] = []
        cin = channels
        for w in widths:
            enc.append(_block(cin, w, stride=2))
            cin = w
        self.encoder = nn.Sequential(*enc)
        bottom = self.sizes[-1]
        self._bottom_shape = (widths[-1], bottom, bottom)
        flat = widths[-1] * bottom * bottom
        self.to_latent = nn.Linear(flat, latent_dim)
        self.from_latent = nn.Sequential(nn.Linear(latent_dim, flat), nn.LeakyReLU(0.2, inplace=True))

        # The decoder runs stride-1 convolutions at every resolution up to the full image, so it
        # costs most of the compute; half the encoder's width at each resolution keeps training
        # on 2 CPU cores practical at a few hundred pixels (about 4x fewer operations).
        dec: list[nn.Module] = []
        enc_width_at = {self.sizes[i + 1]: widths[i] for i in range(depth)}  # resolution -> width
        cin = widths[-1]
        for size in reversed(self.sizes[:-1]):
            cout = max(enc_width_at.get(size, widths[0] // 2) // 2, 8)
            dec.append(_block(cin, cout, stride=1))
            cin = cout
        self.decoder = nn.ModuleList(dec)
        self.head = nn.Conv2d(cin, channels, 3, padding=1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_latent(self.encoder(x).flatten(1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.from_latent(z).view(-1, *self._bottom_shape)
        for size, block in zip(reversed(self.sizes[:-1]), self.decoder):
            h = block(F.interpolate(h, size=(size, size), mode="nearest"))
        return torch.sigmoid(self.head(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
