"""A U-Net that takes the state dict of the spec example ``unet2d_nuclei_broad``, written for bioadapt's tests
from the layer names and shapes of that package's TorchScript weights (its own architecture file is not part of
the corpus at ../shared/data/zoo).

Three levels of 16, 32, 64 features and a base of 128; each stage is two 3 x 3 convolutions followed by one ReLU,
max pooling down, bilinear upsampling plus a 1 x 1 convolution up, skip connections concatenated before the
decoder stage, and a 1 x 1 output convolution (the sigmoid is the description's post-processing).
"""

from __future__ import annotations

import torch
from torch import nn


def _stage(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1),
                         nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True))


class UNet2d(nn.Module):
    def __init__(self, input_channels: int = 1, output_channels: int = 1, features: tuple[int, ...] = (16, 32, 64),
                 expand_z: bool = False):
        super().__init__()
        self.expand_z = expand_z  # the output gets a z axis of size 1 (the spec's expand_output_shape variant)
        widths = [input_channels, *features]
        self.encoders = nn.ModuleList(_stage(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.downsamplers = nn.ModuleList(nn.MaxPool2d(2) for _ in features)
        self.base = _stage(features[-1], 2 * features[-1])
        up_widths = [2 * features[-1], *reversed(features)]
        self.upsamplers = nn.ModuleList(
            nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), nn.Conv2d(a, b, 1))
            for a, b in zip(up_widths[:-1], up_widths[1:]))
        self.decoders = nn.ModuleList(_stage(2 * b, b) for b in reversed(features))
        self.output = nn.Conv2d(features[0], output_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        for encoder, down in zip(self.encoders, self.downsamplers):
            x = encoder(x)
            skips.append(x)
            x = down(x)
        x = self.base(x)
        deepest = len(skips) - 1  # indices, not reversed(): exports script this module (TorchScript)
        for i, (up, decoder) in enumerate(zip(self.upsamplers, self.decoders)):
            x = decoder(torch.cat([skips[deepest - i], up(x)], 1))
        out = self.output(x)
        return out[:, :, None] if self.expand_z else out


def UNet2dExpandOutputShape(input_channels: int = 1, output_channels: int = 1) -> UNet2d:  # noqa: N802
    """The network of the spec's ``expand_output_shape`` variant (the description's callable name), whose output
    has a z axis of size 1."""
    return UNet2d(input_channels, output_channels, expand_z=True)
