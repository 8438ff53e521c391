"""Cellpose-SAM (CPSAM, Cellpose 4) networks of any encoder size, built by Cellpose's own classes.

Cellpose builds ``cellpose.vit.CPSAM`` around segment_anything's ViT-L image encoder. ``build_cpsam`` builds the
same class with the encoder size as arguments (ViT-L by default; tests use small encoders), and ``encoder_size``
reads the size back from a state dict, so weights of any size load into the network they came from (the keys are
CPSAM's). ``CellposeSAMFlows`` is that network with a forward that returns only the (B, 3, 256, 256) map
(flow_y, flow_x, cell-probability logit), for bioimage.io packages.

This file also ships inside bioimage.io packages as the architecture source, so it imports only torch, cellpose
and segment_anything (both come with Cellpose 4).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any
from unittest import mock

import torch
from cellpose import vit
from segment_anything.build_sam import _build_sam

# segment_anything's ViT-L, the encoder of every CPSAM Cellpose distributes (build_sam.build_sam_vit_l)
VIT_L: dict[str, Any] = {"embed_dim": 1024, "depth": 24, "num_heads": 16, "global_attn_indexes": [5, 11, 17, 23]}
_GLOBAL_REL_POS = 2 * (1024 // 16) - 1  # relative positions of a global-attention block of SAM (64 x 64 tokens)


@contextmanager
def _sized_encoder(embed_dim: int, depth: int, num_heads: int, global_attn_indexes: Sequence[int]) -> Iterator[None]:
    """Inside: CPSAM's constructor builds its encoder with this size (segment_anything's own builder)."""
    size = {"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads,
            "global_attn_indexes": list(global_attn_indexes)}
    if size == VIT_L:  # exactly Cellpose's constructor
        yield
        return

    def builder(checkpoint: str | None = None) -> Any:  # the registry's signature: CPSAM passes None
        return _build_sam(encoder_embed_dim=embed_dim, encoder_depth=depth, encoder_num_heads=num_heads,
                          encoder_global_attn_indexes=list(global_attn_indexes), checkpoint=checkpoint)

    with mock.patch.dict(vit.sam_model_registry, {"vit_l": builder}):
        yield


def build_cpsam(embed_dim: int = 1024, depth: int = 24, num_heads: int = 16,
                global_attn_indexes: Sequence[int] = (5, 11, 17, 23), dtype: torch.dtype = torch.float32) -> vit.CPSAM:
    """Cellpose's CPSAM (random weights) with an encoder of ``depth`` blocks of width ``embed_dim``."""
    with _sized_encoder(embed_dim, depth, num_heads, global_attn_indexes):
        return vit.CPSAM(dtype=dtype)


class CellposeSAMFlows(vit.CPSAM):
    """``build_cpsam``'s network whose forward returns only the (B, 3, 256, 256) map, not the style stand-in."""

    def __init__(self, embed_dim: int = 1024, depth: int = 24, num_heads: int = 16,
                 global_attn_indexes: Sequence[int] = (5, 11, 17, 23)):
        with _sized_encoder(embed_dim, depth, num_heads, global_attn_indexes):
            super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


def encoder_size(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The ``build_cpsam`` arguments that rebuild the network ``state`` came from."""
    embed_dim = int(state["encoder.patch_embed.proj.weight"].shape[0])
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.blocks."))
    head_dim = int(state["encoder.blocks.0.attn.rel_pos_h"].shape[1])
    global_blocks = [i for i in range(depth)
                     if state[f"encoder.blocks.{i}.attn.rel_pos_h"].shape[0] == _GLOBAL_REL_POS]
    return {"embed_dim": embed_dim, "depth": depth, "num_heads": embed_dim // head_dim,
            "global_attn_indexes": global_blocks}


def upsample(net: vit.CPSAM, readout: torch.Tensor) -> torch.Tensor:
    """CPSAM's last step: the readout's (B, 3 * ps * ps, h, w) token features to (B, 3, h * ps, w * ps) pixels
    through the fixed weights W2 (a reshape written as a transposed convolution, as CPSAM.forward does)."""
    return torch.nn.functional.conv_transpose2d(readout, net.W2, stride=net.ps, padding=0)
