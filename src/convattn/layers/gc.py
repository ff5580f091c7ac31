"""GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond, Cao, Xu, Lin, Wei and
Hu, ICCV Workshops 2019 (extended in TPAMI 2020). https://arxiv.org/abs/1904.11492

Global context (GC) block, eq. 4 of the paper:
``z_i = x_i + W_v2 ReLU(LN(W_v1 sum_j a_j x_j))`` with ``a_j = exp(W_k x_j) / sum_m exp(W_k x_m)``.

- context modelling: a 1x1 conv ``W_k: C -> 1`` scores every position, a softmax over all
  positions turns the scores into weights ``a_j``, and attention pooling ``sum_j a_j x_j``
  gives one context vector per sample (or plain global average pooling);
- transform: a bottleneck ``W_v1: C -> C/r``, LayerNorm, ReLU, ``W_v2: C/r -> C``;
- fusion: broadcast add of the transformed context to every position (default), and/or a
  channel-wise multiply by its sigmoid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from convattn.layers._helpers import (
    AttentionModule,
    check_choice,
    conv_nd,
    reduced_channels,
)
from convattn.registry import register

__all__ = ["GlobalContext"]

POOLINGS = ("att", "avg")
FUSIONS = ("add", "mul")


@register(
    "gc",
    kind="channel",
    paper="GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond",
    year=2019,
    arxiv="1904.11492",
    placement=(
        "ResNet bottleneck: after the last BN (bn3), before the residual add "
        "(the detection configs use stages c3-c5)"
    ),
    summary=(
        "kind 'channel': softmax attention pooling (1x1 conv C->1, softmax over positions) gives "
        "one context vector, transformed by 1x1 conv(C/r) -> LayerNorm -> ReLU -> 1x1 conv(C) "
        "and added to every position (a per-channel term)"
    ),
    differences=(
        "Matches the official ContextBlock (xvjiarui/GCNet, mmcv): convs with bias, "
        "LayerNorm([C/r, 1, 1]), width int(C * ratio), ratio 1/16 as in the official configs, "
        "fusion 'add' (official 'channel_add') by default, 'mul' ('channel_mul') available, "
        "both at once applied as in the official code (multiply first, then add).",
        "Initialisation as in the official reset_parameters: the scoring conv W_k is "
        "kaiming-normal (fan_in) with zero bias, and the last conv of every fusion branch is "
        "zero, so with fusion 'add' the block starts as the identity (with 'mul' it starts as "
        "x * 0.5). zero_init_last=False keeps PyTorch's default init there. (timm's "
        "GlobalContext port differs from the official block by default: ratio 1/8, 'mul' "
        "fusion, no zero init.)",
        "Average pooling is written as a mean over all positions instead of AdaptiveAvgPool2d; "
        "the numbers are the same. The module works for 1-D and 3-D maps too (LayerNorm over "
        "(C/r, 1, ...)).",
        "The reduced width is at least 1 (the official int(C * ratio) gives 0 for C < 16).",
        "The context softmax (submodule 'gate') outputs the attention weights flattened over "
        "positions, shape (N, 1, H*W). With pooling_type='avg' and fusion 'add' only, there are "
        "no attention weights and no gate.",
    ),
)
class GlobalContext(AttentionModule):
    """Global context block ``y = x [* sigmoid(T_mul(c))] [+ T_add(c)]``, ``c = sum_j a_j x_j``.

    Args:
        channels: C.
        rd_ratio: the official ``ratio`` (1/16): transform width ``int(C * rd_ratio)``.
        rd_channels: the transform width, overriding ``rd_ratio``.
        pooling_type: ``"att"`` (softmax attention pooling, ``W_k`` and ``a_j`` of eq. 4) or
            ``"avg"`` (global average pooling, SE's squeeze).
        fusion_types: ``"add"``, ``"mul"`` or a sequence of them (the official
            ``fusion_types``, with ``channel_add`` / ``channel_mul`` written ``add`` / ``mul``).
        zero_init_last: zero the last conv of each fusion branch (the official
            ``last_zero_init``), so that with ``"add"`` the block starts as the identity.
            False keeps PyTorch's default init there.
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
        pooling_type: str = "att",
        fusion_types: str | Sequence[str] = ("add",),
        zero_init_last: bool = True,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__(channels, spatial_dims)
        owner = type(self).__name__
        check_choice(owner, "pooling_type", pooling_type, POOLINGS)
        fusions = (fusion_types,) if isinstance(fusion_types, str) else fusion_types
        if not isinstance(fusions, Sequence) or len(fusions) == 0:
            raise ValueError(
                f"{owner}: fusion_types must be 'add', 'mul' or a non-empty sequence of them, "
                f"got {fusion_types!r}"
            )
        for fusion in fusions:
            check_choice(owner, "fusion_types", fusion, FUSIONS)
        self.pooling_type = pooling_type
        self.fusion_types = tuple(f for f in FUSIONS if f in fusions)
        if not isinstance(zero_init_last, bool):
            raise TypeError(
                f"{owner}: zero_init_last must be a bool, got {type(zero_init_last).__name__}"
            )
        self.zero_init_last = zero_init_last
        self.rd_channels = reduced_channels(channels, rd_ratio, rd_channels, owner=owner)
        conv = conv_nd(spatial_dims)

        self.conv_mask: nn.Module | None = None
        self.gate: nn.Softmax | None = None
        if pooling_type == "att":
            self.conv_mask = conv(channels, 1, 1)
            self.gate = nn.Softmax(dim=2)
            # Official init: kaiming-normal (fan_in) weight, zero bias.
            for name, param in self.conv_mask.named_parameters():
                if name == "weight":
                    nn.init.kaiming_normal_(param, mode="fan_in", nonlinearity="relu")
                else:
                    nn.init.zeros_(param)
        self.channel_add_conv = self._transform() if "add" in self.fusion_types else None
        self.channel_mul_conv = self._transform() if "mul" in self.fusion_types else None
        self.gate_mul = nn.Sigmoid() if "mul" in self.fusion_types else None

    def _transform(self) -> nn.Sequential:
        """``W_v2 ReLU(LN(W_v1 c))``; last conv zero-initialised (official last_zero_init)."""
        conv = conv_nd(self.spatial_dims)
        rd = self.rd_channels
        transform = nn.Sequential(
            conv(self.channels, rd, 1),
            nn.LayerNorm([rd] + [1] * self.spatial_dims),
            nn.ReLU(inplace=True),
            conv(rd, self.channels, 1),
        )
        if self.zero_init_last:
            for param in transform[-1].parameters():
                nn.init.zeros_(param)
        return transform

    def context(self, x: torch.Tensor) -> torch.Tensor:
        """The context vector ``c``, shape ``(N, C, 1, ..., 1)``."""
        dims = list(range(2, x.dim()))
        if self.conv_mask is None or self.gate is None:
            return x.mean(dims, keepdim=True)
        n, c = x.shape[0], x.shape[1]
        scores = self.conv_mask(x).reshape(n, 1, -1)  # W_k x_j: (N, 1, L)
        weights = self.gate(scores)  # a_j, softmax over positions: (N, 1, L)
        pooled = torch.matmul(x.reshape(n, c, -1), weights.transpose(1, 2))  # (N, C, 1)
        return pooled.reshape([n, c] + [1] * self.spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        context = self.context(x)
        out = x
        if self.channel_mul_conv is not None and self.gate_mul is not None:
            out = out * self.gate_mul(self.channel_mul_conv(context))
        if self.channel_add_conv is not None:
            out = out + self.channel_add_conv(context)
        return out

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, rd_channels={self.rd_channels}, "
            f"pooling_type={self.pooling_type!r}, fusion_types={self.fusion_types!r}"
        )
