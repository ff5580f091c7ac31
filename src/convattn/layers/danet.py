"""Dual Attention Network for Scene Segmentation, Fu, Liu, Tian, Li, Bao, Fang and Lu,
CVPR 2019. https://arxiv.org/abs/1809.02983

Position attention module (PAM, eq. 1-2): 1x1 convs give B = W_q x, C = W_k x (C/8 channels,
with bias) and D = W_v x (C channels, with bias); ``s_ji = softmax_i(B_i . C_j)`` over the N
positions i of the keys; ``E_j = alpha * sum_i s_ji D_i + A_j``.

Channel attention module (CAM, eq. 3-4): ``x_ji = softmax_i(A_j . A_i)`` over channels,
computed on the raw features (no projections); ``E_j = beta * sum_i x_ji A_i + A_j``. The
official code feeds the softmax ``max_i(A_j . A_i) - A_j . A_i``, i.e. it normalises the
negated energies (the softmax is shift-invariant, so subtracting the max only adds stability).

alpha and beta are scalars initialised to 0: both modules start as the identity.
"""

from __future__ import annotations

import torch
from torch import nn

from convattn.layers._helpers import (
    AttentionModule,
    at_least_float32,
    conv_nd,
    reduced_channels,
)
from convattn.registry import register

__all__ = ["DAChannelAttention", "DAPositionAttention"]

_PAPER = "Dual Attention Network for Scene Segmentation"
_PLACEMENT = (
    "segmentation head on the dilated ResNet's last stage (stride 8): 3x3 conv + BN + ReLU "
    "to C/4 channels, then PAM and CAM in two parallel branches whose outputs are summed"
)


@register(
    "da_position",
    kind="self-attention",
    paper=_PAPER,
    year=2019,
    arxiv="1809.02983",
    placement=_PLACEMENT,
    summary=(
        "query/key 1x1 convs (C/8), value 1x1 conv (C); softmax(q^T k) over positions; "
        "y = gamma * v A^T + x, gamma = 0 at init"
    ),
    differences=(
        "Query/key width is floor(C * rd_ratio) = C // 8 as in the official PAM_Module, but at "
        "least 1 (the official code fails for C < 8); rd_channels overrides it.",
        "Generalised to 1-D and 3-D maps (positions are flattened; the official code is 2-D).",
        "The attention over all positions costs O((HW)^2) memory, as in the official code.",
    ),
)
class DAPositionAttention(AttentionModule):
    """DANet position attention module (PAM): ``y = gamma * V softmax(Q^T K)^T + x``.

    Args:
        channels: C.
        rd_ratio: width of the query/key projections relative to C (1/8).
        rd_channels: that width, overriding ``rd_ratio``.
        spatial_dims: 1, 2 or 3.

    The softmax producing the (N, L, L) attention map (rows: query positions) is ``gate``.

    Shape:
        - Input: ``(N, C, *spatial)``; output: same shape and dtype.
    """

    def __init__(
        self,
        channels: int,
        *,
        rd_ratio: float = 1 / 8,
        rd_channels: int | None = None,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__(channels, spatial_dims)
        owner = type(self).__name__
        self.rd_channels = reduced_channels(channels, rd_ratio, rd_channels, owner=owner)
        conv = conv_nd(spatial_dims)
        self.query_conv = conv(channels, self.rd_channels, 1)
        self.key_conv = conv(channels, self.rd_channels, 1)
        self.value_conv = conv(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.gate = nn.Softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        query = self.query_conv(x).flatten(2)  # (N, C/8, L)
        key = self.key_conv(x).flatten(2)  # (N, C/8, L)
        value = self.value_conv(x).flatten(2)  # (N, C, L)
        # Energies and softmax in float32 for half-precision inputs (precision of the logits).
        energy = torch.bmm(at_least_float32(query).transpose(1, 2), at_least_float32(key))
        attention = self.gate(energy).to(value.dtype)  # (N, L_query, L_key)
        out = torch.bmm(value, attention.transpose(1, 2))  # (N, C, L_query)
        return self.gamma * out.reshape(x.shape) + x

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rd_channels={self.rd_channels}"


@register(
    "da_channel",
    kind="self-attention",
    paper=_PAPER,
    year=2019,
    arxiv="1809.02983",
    placement=_PLACEMENT,
    summary=(
        "energy = X X^T over channels; softmax(max(energy) - energy); "
        "y = gamma * A X + x, gamma = 0 at init; one parameter"
    ),
    differences=(
        "Follows the official CAM_Module: the softmax takes max_j(energy) - energy, so "
        "channels with the least similar responses get the largest weights; the paper's eq. 3 "
        "writes softmax(A_i . A_j).",
        "Generalised to 1-D and 3-D maps (positions are flattened; the official code is 2-D).",
    ),
)
class DAChannelAttention(AttentionModule):
    """DANet channel attention module (CAM): ``y = gamma * softmax(max(X X^T) - X X^T) X + x``.

    Args:
        channels: C.
        spatial_dims: 1, 2 or 3.

    The softmax producing the (N, C, C) attention map is ``gate``.

    Shape:
        - Input: ``(N, C, *spatial)``; output: same shape and dtype.
    """

    def __init__(self, channels: int, *, spatial_dims: int = 2) -> None:
        super().__init__(channels, spatial_dims)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.gate = nn.Softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        # Float32 for half-precision inputs: the (N, C, C) energies overflow float16.
        features = at_least_float32(x.flatten(2))  # (N, C, L)
        energy = torch.bmm(features, features.transpose(1, 2))  # (N, C, C)
        energy = energy.amax(-1, keepdim=True) - energy
        attention = self.gate(energy)
        out = torch.bmm(attention, features).to(x.dtype)  # (N, C, L)
        return self.gamma * out.reshape(x.shape) + x
