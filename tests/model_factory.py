"""Tiny U-Nets exported as real bioimage.io packages, random Cellpose networks of the installed generation, and
synthetic patches to feed and train them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bioadapt.adapters.unet import UNet
from bioadapt.data.synthetic import synthetic_cells
from bioadapt.exporters.fresh import package_new_model


def unet_package(out: Path, *, dims: int = 2, out_channels: int = 2, dropout: float = 0.0,
                 batchnorm: bool = False, output_activation: str | None = "sigmoid",
                 weights: tuple[str, ...] = ("pytorch_state_dict", "torchscript"), features: int = 4,
                 seed: int = 0, as_folder: bool = False, format_version: str = "0.5",
                 module: torch.nn.Module | None = None, in_channels: int = 1) -> Path:
    kwargs = dict(in_channels=in_channels, out_channels=out_channels, dims=dims, features=features, depth=2,
                  batchnorm=batchnorm, dropout=dropout)
    if module is None:
        torch.manual_seed(seed)
        module = UNet(**kwargs).eval()
        if batchnorm:  # non-trivial running statistics, so eval-mode batch-norm is visible in outputs
            for m in module.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
    names = {("sigmoid", 2): ("foreground", "boundaries"), ("sigmoid", 1): ("foreground",)}.get(
        (output_activation, out_channels))
    return package_new_model(
        module, out, name=f"tiny {dims}D U-Net", architecture_kwargs=kwargs,
        axes="cyx" if dims == 2 else "czyx", output_activation=output_activation, output_names=names,
        weights=weights, as_folder=as_folder, format_version=format_version)


def threshold_unet(level: float = 0.5, gain: float = 20.0) -> UNet:
    """A 2D U-Net (features 4, depth 2) whose foreground is where the normalised image exceeds ``level``: the
    signal takes the first skip connection with centre-tap convolutions, every other weight is zero, and the
    boundary channel stays off. Touching bright cells come out merged, as a real model's merges do."""
    module = UNet(in_channels=1, out_channels=2, dims=2, features=4, depth=2).eval()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.zero_()
        first, last = module.down[0], module.up[-1].block
        first[0].weight[0, 0, 1, 1] = first[2].weight[0, 0, 1, 1] = 1.0  # relu(x), kept as skip channel 0
        last[0].weight[0, 4, 1, 1] = last[2].weight[0, 0, 1, 1] = 1.0  # the skip's channel 0 follows the upsampled 4
        module.head.weight[0, 0] = gain
        module.head.bias[:] = torch.tensor([-gain * level, -gain])
    return module


def cell_patches(style: str, n: int, size: int = 64, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """n (image (1, size, size) float32, instance labels) pairs cut from one synthetic image of ``style``."""
    side = int(np.ceil(np.sqrt(n)))
    cells = synthetic_cells((side * size, side * size), style, seed=seed)
    pairs = []
    for i in range(n):
        y, x = divmod(i, side)
        window = (slice(y * size, (y + 1) * size), slice(x * size, (x + 1) * size))
        pairs.append((cells.image[(slice(None), *window)].astype(np.float32), cells.labels[window]))
    return pairs


# a reduced Cellpose-SAM: Cellpose's own CPSAM class with a 2-block encoder, 32 wide (ViT-L: 24 blocks, 1024)
SMALL_CPSAM = {"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": [1]}


def cellpose_weights(path: Path, seed: int = 0) -> Path:
    """Random weights of the installed Cellpose generation's network, saved as Cellpose saves them: a CPnet with
    cyto3's architecture (Cellpose 3) or a reduced CPSAM (Cellpose 4)."""
    from bioadapt.adapters.cellpose import GENERATION

    torch.manual_seed(seed)
    if GENERATION >= 4:
        from bioadapt.adapters.cpsam import build_cpsam

        build_cpsam(**SMALL_CPSAM).save_model(str(path))
    else:
        from cellpose import resnet_torch

        resnet_torch.CPnet([2, 32, 64, 128, 256], 3, sz=3, mkldnn=False).save_model(str(path))
    return path
