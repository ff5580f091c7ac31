"""Concurrent Spatial and Channel Squeeze & Excitation in Fully Convolutional Networks,
Roy et al., MICCAI 2018 (and "Recalibrating Fully Convolutional Networks with Spatial and
Channel 'Squeeze & Excitation' Blocks", TMI 2019). https://arxiv.org/abs/1803.02579

cSE: SE with reduction 2 (``x * sigma(W2 delta(W1 GAP(x)))``). sSE: a 1x1 convolution squeezes
the channels to one map, ``x * sigma(W_sq * x)``. scSE: both in parallel, fused by an
element-wise max in the official code (the paper also studies the sum).
"""

from __future__ import annotations

import torch

from convattn.layers._helpers import ActLayer, AttentionModule, check_choice, conv_nd
from convattn.layers.se import SEModule
from convattn.registry import register

__all__ = ["ChannelSE", "ChannelSpatialSE", "SpatialSE"]

_PAPER = "Concurrent Spatial and Channel Squeeze & Excitation in Fully Convolutional Networks"
_PLACEMENT = "after each encoder and decoder conv block of an FCN / U-Net"
FUSIONS = ("max", "sum")


@register(
    "cse",
    kind="channel",
    paper=_PAPER,
    year=2018,
    arxiv="1803.02579",
    placement=_PLACEMENT,
    summary="SE with reduction 2: GAP -> FC(C/2) -> ReLU -> FC(C) -> sigmoid -> multiply",
)
class ChannelSE(SEModule):
    """Spatial squeeze and channel excitation (cSE): SE with ``rd_ratio = 1/2`` by default.

    Takes the options of :class:`~convattn.layers.se.SEModule`.
    """

    def __init__(
        self,
        channels: int,
        *,
        rd_ratio: float = 1 / 2,
        rd_channels: int | None = None,
        rd_divisor: int | None = None,
        act_layer: ActLayer = "relu",
        bias: bool = True,
        gate_layer: str = "sigmoid",
        spatial_dims: int = 2,
    ) -> None:
        super().__init__(
            channels,
            rd_ratio=rd_ratio,
            rd_channels=rd_channels,
            rd_divisor=rd_divisor,
            act_layer=act_layer,
            bias=bias,
            gate_layer=gate_layer,
            spatial_dims=spatial_dims,
        )


@register(
    "sse",
    kind="spatial",
    paper=_PAPER,
    year=2018,
    arxiv="1803.02579",
    placement=_PLACEMENT,
    summary="1x1 conv C -> 1 (with bias) -> sigmoid -> multiply",
)
class SpatialSE(AttentionModule):
    """Channel squeeze and spatial excitation (sSE): ``y = x * sigma(W_sq * x)``.

    Args:
        channels: C.
        spatial_dims: 1, 2 or 3.

    Shape:
        - Input: ``(N, C, *spatial)``; output: same shape and dtype.
    """

    def __init__(self, channels: int, *, spatial_dims: int = 2) -> None:
        super().__init__(channels, spatial_dims)
        self.conv = conv_nd(spatial_dims)(channels, 1, 1, bias=True)
        self.gate = torch.nn.Sigmoid()

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Spatial weights, (N, 1, *spatial)."""
        return self.gate(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return x * self.attention(x)


@register(
    "scse",
    kind="hybrid",
    paper=_PAPER,
    year=2018,
    arxiv="1803.02579",
    placement=_PLACEMENT,
    summary="cSE and sSE in parallel, fused by element-wise max (or sum)",
    differences=(
        "Fusion is the element-wise max of the two recalibrated maps, as in the official "
        "code; fusion='sum' gives the paper's addition (and segmentation_models_pytorch's "
        "version, which also uses rd_ratio=1/16).",
    ),
)
class ChannelSpatialSE(AttentionModule):
    """Concurrent spatial and channel SE: ``max(cSE(x), sSE(x))`` or their sum.

    Args:
        channels: C.
        rd_ratio, rd_channels, rd_divisor, act_layer: cSE's bottleneck (reduction 2).
        fusion: ``"max"`` (official) or ``"sum"``.
        spatial_dims: 1, 2 or 3.

    Shape:
        - Input: ``(N, C, *spatial)``; output: same shape and dtype.
    """

    def __init__(
        self,
        channels: int,
        *,
        rd_ratio: float = 1 / 2,
        rd_channels: int | None = None,
        rd_divisor: int | None = None,
        act_layer: ActLayer = "relu",
        fusion: str = "max",
        spatial_dims: int = 2,
    ) -> None:
        super().__init__(channels, spatial_dims)
        check_choice(type(self).__name__, "fusion", fusion, FUSIONS)
        self.fusion = fusion
        self.cse = ChannelSE(
            channels,
            rd_ratio=rd_ratio,
            rd_channels=rd_channels,
            rd_divisor=rd_divisor,
            act_layer=act_layer,
            spatial_dims=spatial_dims,
        )
        self.sse = SpatialSE(channels, spatial_dims=spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        channel_recalibrated = self.cse(x)
        spatial_recalibrated = self.sse(x)
        if self.fusion == "max":
            return torch.maximum(channel_recalibrated, spatial_recalibrated)
        return channel_recalibrated + spatial_recalibrated

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fusion={self.fusion!r}"
