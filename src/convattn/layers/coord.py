"""Coordinate Attention for Efficient Mobile Network Design, Hou et al., CVPR 2021.
https://arxiv.org/abs/2103.02907

Pool along each spatial direction separately (``z^h`` averages each row over the width,
``z^w`` each column over the height), concatenate, transform with a shared 1x1 conv + BN +
h-swish (``F1``, eq. 4), split, and turn each half into direction-aware gates with a 1x1
conv and a sigmoid (``g^h``, ``g^w``, eq. 5): ``y = x * g^h * g^w`` (eq. 6).
"""

from __future__ import annotations

import torch
from torch import nn

from convattn.layers._helpers import ActLayer, AttentionModule, check_positive_int, create_act
from convattn.registry import register

__all__ = ["CoordAttention"]


@register(
    "coord",
    kind="hybrid",
    paper="Coordinate Attention for Efficient Mobile Network Design",
    year=2021,
    arxiv="2103.02907",
    placement="MobileNetV2 inverted residual: after the depthwise conv + BN + ReLU6, before the pointwise-linear conv (blocks with expansion != 1)",
    spatial_dims=(2,),
    summary="pool along H and along W -> shared 1x1 conv + BN + h-swish -> two 1x1 convs -> sigmoids -> multiply",
    differences=(
        "Directional pooling is written as means over one axis instead of AdaptiveAvgPool2d "
        "with None sizes, so it exports to ONNX/TensorRT; the numbers are the same.",
        "Defined for 2-D maps only (the two directions are H and W).",
    ),
)
class CoordAttention(AttentionModule):
    """Coordinate attention ``y_c(i, j) = x_c(i, j) * g^h_c(i) * g^w_c(j)``.

    Args:
        channels: C.
        rd_ratio: 1/r of the shared transform's width (r = 32).
        min_rd_channels: lower bound of that width (8): ``mip = max(8, C // 32)``.
        rd_channels: the width, overriding the two above.
        act_layer: ``delta`` of eq. 4 (h-swish).
        spatial_dims: 2 only.

    Shape:
        - Input: ``(N, C, H, W)``; output: same shape and dtype.
    """

    def __init__(
        self,
        channels: int,
        *,
        rd_ratio: float = 1 / 32,
        min_rd_channels: int = 8,
        rd_channels: int | None = None,
        act_layer: ActLayer = "hard_swish",
        spatial_dims: int = 2,
    ) -> None:
        super().__init__(channels, spatial_dims, supported_dims=(2,))
        owner = type(self).__name__
        if rd_channels is None:
            check_positive_int(owner, "min_rd_channels", min_rd_channels)
            if not isinstance(rd_ratio, (int, float)) or rd_ratio <= 0:
                raise ValueError(f"{owner}: rd_ratio must be a positive number, got {rd_ratio!r}")
            rd_channels = max(min_rd_channels, int(channels * rd_ratio))
        self.rd_channels = check_positive_int(owner, "rd_channels", rd_channels)
        self.conv1 = nn.Conv2d(channels, rd_channels, 1, bias=True)
        self.bn1 = nn.BatchNorm2d(rd_channels)
        self.act = create_act(act_layer, owner=owner)
        self.conv_h = nn.Conv2d(rd_channels, channels, 1, bias=True)
        self.conv_w = nn.Conv2d(rd_channels, channels, 1, bias=True)
        self.gate_h = nn.Sigmoid()
        self.gate_w = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        height, width = x.shape[2], x.shape[3]
        pooled_h = x.mean(3, keepdim=True)  # z^h: (N, C, H, 1)
        pooled_w = x.mean(2, keepdim=True).transpose(2, 3)  # z^w: (N, C, W, 1)
        y = self.act(self.bn1(self.conv1(torch.cat([pooled_h, pooled_w], dim=2))))
        y_h, y_w = torch.split(y, [height, width], dim=2)
        gate_h = self.gate_h(self.conv_h(y_h))  # (N, C, H, 1)
        gate_w = self.gate_w(self.conv_w(y_w.transpose(2, 3)))  # (N, C, 1, W)
        return x * gate_w * gate_h
