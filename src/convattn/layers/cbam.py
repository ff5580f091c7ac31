"""CBAM: Convolutional Block Attention Module, Woo et al., ECCV 2018.
https://arxiv.org/abs/1807.06521

Channel attention then spatial attention, applied in sequence:
``F' = F * Mc(F)`` with ``Mc = sigma(MLP(AvgPool(F)) + MLP(MaxPool(F)))`` (one shared MLP), and
``F'' = F' * Ms(F')`` with ``Ms = sigma(f7x7([MaxPool_c(F'); AvgPool_c(F')]))`` (eqs. 1-3).
"""

from __future__ import annotations

import torch

from convattn.layers._helpers import ActLayer, AttentionModule
from convattn.layers.channel import ChannelAttention
from convattn.layers.spatial import SpatialAttention
from convattn.registry import register

__all__ = ["CBAM", "CBAMChannelGate", "CBAMSpatialGate"]

_PAPER = "CBAM: Convolutional Block Attention Module"
_PLACEMENT = "ResNet bottleneck/basic block: after the last BN (bn3), before the residual add"


@register(
    "cbam_channel",
    kind="channel",
    paper=_PAPER,
    year=2018,
    arxiv="1807.06521",
    placement=_PLACEMENT,
    summary="GAP and GMP -> shared MLP (C/r, biases) -> sum -> sigmoid -> multiply",
    differences=(
        "The official code builds the shared MLP from nn.Linear layers with bias; so does convattn.",
    ),
)
class CBAMChannelGate(ChannelAttention):
    """CBAM's channel attention ``Mc(F) = sigma(MLP(AvgPool(F)) + MLP(MaxPool(F)))`` (eq. 2).

    Args:
        channels: C.
        rd_ratio: 1/r of the shared MLP's hidden layer (r = 16).
        rd_channels: hidden width, overriding ``rd_ratio``.
        rd_divisor: round the hidden width to a multiple of this (None: floor, as official).
        act_layer: activation of the hidden layer (ReLU).
        gate_layer: ``sigma``.
        spatial_dims: 1, 2 or 3.
    """

    def __init__(
        self,
        channels: int,
        *,
        rd_ratio: float = 1 / 16,
        rd_channels: int | None = None,
        rd_divisor: int | None = None,
        act_layer: ActLayer = "relu",
        gate_layer: str = "sigmoid",
        spatial_dims: int = 2,
    ) -> None:
        super().__init__(
            channels,
            pool="avg+max",
            excitation="mlp",
            rd_ratio=rd_ratio,
            rd_channels=rd_channels,
            rd_divisor=rd_divisor,
            act_layer=act_layer,
            bias=True,
            gate_layer=gate_layer,
            spatial_dims=spatial_dims,
        )


@register(
    "cbam_spatial",
    kind="spatial",
    paper=_PAPER,
    year=2018,
    arxiv="1807.06521",
    placement=_PLACEMENT,
    summary="[max_c; mean_c] -> 7x7 conv (no bias) -> BN -> sigmoid -> multiply",
    differences=(
        "The official code adds BatchNorm (momentum 0.01) after the 7x7 conv, which the paper "
        "does not mention; convattn follows the code.",
        "The official ResNet initialisation sets this BN's weight to 0 (so the gate starts at "
        "0.5 everywhere); the module keeps PyTorch's default init and the reference backbones "
        "apply the official one.",
    ),
)
class CBAMSpatialGate(SpatialAttention):
    """CBAM's spatial attention ``Ms(F) = sigma(f7x7([MaxPool_c(F); AvgPool_c(F)]))`` (eq. 3).

    Args:
        channels: C.
        kernel_size: size of the convolution over the pooled map (7).
        gate_layer: ``sigma``.
        spatial_dims: 1, 2 or 3.
    """

    def __init__(
        self,
        channels: int,
        *,
        kernel_size: int = 7,
        gate_layer: str = "sigmoid",
        spatial_dims: int = 2,
    ) -> None:
        super().__init__(
            channels,
            pool="both",
            kernel_size=kernel_size,
            norm=True,
            bias=False,
            gate_layer=gate_layer,
            spatial_dims=spatial_dims,
        )


@register(
    "cbam",
    kind="hybrid",
    paper=_PAPER,
    year=2018,
    arxiv="1807.06521",
    placement=_PLACEMENT,
    summary="channel gate (shared MLP on GAP+GMP) then spatial gate (7x7 conv on [max; mean])",
    differences=(
        "No residual connection inside the module (one popular collection adds one), and a 7x7 "
        "spatial kernel (the same collection defaults to 49x49).",
        "BatchNorm after the spatial conv, as in the official code (see cbam_spatial).",
    ),
)
class CBAM(AttentionModule):
    """Convolutional Block Attention Module: channel gate, then spatial gate (eq. 1).

    Args:
        channels: C.
        rd_ratio, rd_channels, rd_divisor, act_layer: the channel gate's shared MLP.
        kernel_size: the spatial gate's convolution size (7).
        gate_layer: ``sigma`` of both gates.
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
        kernel_size: int = 7,
        gate_layer: str = "sigmoid",
        spatial_dims: int = 2,
    ) -> None:
        super().__init__(channels, spatial_dims)
        self.channel_gate = CBAMChannelGate(
            channels,
            rd_ratio=rd_ratio,
            rd_channels=rd_channels,
            rd_divisor=rd_divisor,
            act_layer=act_layer,
            gate_layer=gate_layer,
            spatial_dims=spatial_dims,
        )
        self.spatial_gate = CBAMSpatialGate(
            channels, kernel_size=kernel_size, gate_layer=gate_layer, spatial_dims=spatial_dims
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.spatial_gate(self.channel_gate(x))
