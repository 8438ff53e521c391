"""Architecture shipped in bioimage.io packages of Cellpose 3 models exported by bioadapt.

A CPnet whose forward returns only the (B, 3, H, W) map (flow_y, flow_x, cell-probability logit), not the
style vector: one output tensor, and the state-dict keys of Cellpose's own CPnet, so Cellpose weights load as is.
"""

import torch
from cellpose.resnet_torch import CPnet


class CellposeFlows(CPnet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]
