"""A small, scriptable U-Net (2D or 3D): the architecture of bioadapt's demo and test models.

This file is also shipped inside bioimage.io packages as the architecture source, so it imports torch only.
It outputs logits; the package declares the activation (sigmoid or softmax) as post-processing.
"""

from __future__ import annotations

import torch
from torch import nn


def _block(dims: int, c_in: int, c_out: int, batchnorm: bool, dropout: float) -> nn.Sequential:
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
    drop = nn.Dropout2d if dims == 2 else nn.Dropout3d
    layers: list[nn.Module] = []
    for c in (c_in, c_out):
        layers.append(conv(c, c_out, 3, padding=1))
        if batchnorm:
            layers.append(norm(c_out))
        layers.append(nn.ReLU())
    if dropout > 0:
        layers.append(drop(dropout))
    return nn.Sequential(*layers)


class _Up(nn.Module):
    def __init__(self, dims: int, width: int, batchnorm: bool, dropout: float):
        super().__init__()
        self.upsample = (nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d)(width * 2, width, 2, stride=2)
        self.block = _block(dims, width * 2, width, batchnorm, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([self.upsample(x), skip], dim=1))


class UNet(nn.Module):
    """U-Net with ``depth`` poolings by 2 (inputs must be multiples of 2**depth); 3D pools in Z too."""

    def __init__(self, in_channels: int = 1, out_channels: int = 2, dims: int = 2, features: int = 8,
                 depth: int = 2, batchnorm: bool = False, dropout: float = 0.0):
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        widths = [features * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        c = in_channels
        for w in widths:
            self.down.append(_block(dims, c, w, batchnorm, dropout))
            c = w
        self.up = nn.ModuleList([_Up(dims, w, batchnorm, dropout) for w in reversed(widths[:-1])])
        self.pool = nn.MaxPool2d(2) if dims == 2 else nn.MaxPool3d(2)
        self.head = (nn.Conv2d if dims == 2 else nn.Conv3d)(widths[0], out_channels, 1)
        self.depth = depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < self.depth:
                skips.append(x)
                x = self.pool(x)
        for i, up in enumerate(self.up):
            x = up(x, skips[self.depth - 1 - i])
        return self.head(x)
