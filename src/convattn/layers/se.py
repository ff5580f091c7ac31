"""Squeeze-and-Excitation Networks, Hu et al., CVPR 2018 / TPAMI 2019.
https://arxiv.org/abs/1709.01507

SE: squeeze by global average pooling, excite with a bottleneck of two fully connected
layers (``W1: C -> C/r``, ReLU ``delta``, ``W2: C/r -> C``, both with bias), gate with a sigmoid
``sigma``, and rescale each channel: ``x_c * sigma(W2 delta(W1 z))_c``.
"""

from __future__ import annotations

from convattn.layers._helpers import ActLayer
from convattn.layers.channel import ChannelAttention
from convattn.registry import register

__all__ = ["SEModule"]


@register(
    "se",
    kind="channel",
    paper="Squeeze-and-Excitation Networks",
    year=2018,
    arxiv="1709.01507",
    placement="ResNet bottleneck/basic block: after the last BN (bn3), before the residual add",
    summary="GAP -> FC(C/r) -> ReLU -> FC(C) -> sigmoid -> multiply",
    differences=(
        "The official Caffe models use InnerProduct (fully connected) layers; convattn uses "
        "nn.Linear, which has the same weights and parameter count.",
        "Reduction width is floor(C * rd_ratio) as in the official models (C/16); pass "
        "rd_divisor=8 for timm's rounding.",
    ),
)
class SEModule(ChannelAttention):
    """Squeeze-and-Excitation: ``y = x * sigma(W2 delta(W1 GAP(x)))`` (eqs. 2-4).

    Args:
        channels: C.
        rd_ratio: 1/r, the reduction ratio (r = 16 in the paper).
        rd_channels: bottleneck width, overriding ``rd_ratio``.
        rd_divisor: round the bottleneck width to a multiple of this (None: floor).
        act_layer: ``delta``, the activation between ``W1`` and ``W2`` (ReLU).
        bias: biases in ``W1`` and ``W2`` (the official models have them).
        gate_layer: ``sigma``: ``"sigmoid"`` or ``"hard_sigmoid"``.
        spatial_dims: 1, 2 or 3.

    Shape:
        - Input: ``(N, C, *spatial)``; output: same shape and dtype.
    """

    def __init__(
        self,
        channels: int,
        *,
        rd_ratio: float = 1 / 16,
        rd_channels: int | None = None,
        rd_divisor: int | None = None,
        act_layer: ActLayer = "relu",
        bias: bool = True,
        gate_layer: str = "sigmoid",
        spatial_dims: int = 2,
    ) -> None:
        super().__init__(
            channels,
            pool="avg",
            excitation="mlp",
            rd_ratio=rd_ratio,
            rd_channels=rd_channels,
            rd_divisor=rd_divisor,
            act_layer=act_layer,
            bias=bias,
            gate_layer=gate_layer,
            spatial_dims=spatial_dims,
        )
