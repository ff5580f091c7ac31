"""Rotate to Attend: Convolutional Triplet Attention Module, Misra, Nalamada, Arasanipalai and
Hou, WACV 2021. https://arxiv.org/abs/2010.03045

Three branches look at the input ``x`` of shape (N, C, H, W) through three rotations and each
computes a CBAM-style spatial gate on the 2-D plane left after pooling one axis away:

- ``Z-pool`` along an axis: ``[max; mean]`` over that axis (2 maps);
- gate: ``sigma(BN(f_kxk(Z-pool)))`` with a k x k convolution 2 -> 1 without bias (k = 7);
- branch ``cw``: pool over H, gate the (C, W) plane;
  branch ``hc``: pool over W, gate the (H, C) plane (H is the first axis of the conv);
  branch ``hw``: pool over C, gate the (H, W) plane (plain spatial attention);
- ``y = (x * g_cw + x * g_hc + x * g_hw) / 3`` (each gate broadcast over the pooled axis),
  or the mean of the first two with ``no_spatial=True``.
"""

from __future__ import annotations

import torch
from torch import nn

from convattn.layers._helpers import (
    AttentionModule,
    SingleOutputConvMixin,
    check_positive_int,
    mean_amax,
)
from convattn.registry import register

__all__ = ["TripletAttention"]


def _z_pool(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Z-pool: the max and the mean over ``dim``, stacked in dim 1 (the official order)."""
    mean, peak = mean_amax(x, [dim])
    return torch.stack([peak.squeeze(dim), mean.squeeze(dim)], dim=1)


class _ZPoolGate(SingleOutputConvMixin, nn.Module):
    """One branch: Z-pool over dim 1 of a rotated view, k x k conv (2 -> 1, no bias), BN
    (eps 1e-5, momentum 0.01, as the official code), sigmoid. Returns the gate, (N, 1, A, B)."""

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)
        self.gate = nn.Sigmoid()

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.gate(self.bn(self._conv(pooled)))


@register(
    "triplet",
    kind="hybrid",
    paper="Rotate to Attend: Convolutional Triplet Attention Module",
    year=2021,
    arxiv="2010.03045",
    placement="ResNet bottleneck/basic block: after the last BN (bn3 / bn2), before the residual add",
    spatial_dims=(2,),
    summary="3 branches on the (C,W), (H,C), (H,W) planes: [max; mean] -> 7x7 conv -> BN -> "
    "sigmoid -> multiply; average of the three",
    differences=(
        "The gates are written on the pooled maps directly ([max; mean] over H, W or C and a "
        "transpose) instead of permuting the whole tensor and making it contiguous; the "
        "convolutions see the same (C, W), (H, C) and (H, W) planes in the same axis order, so "
        "the weights are interchangeable with the official ones (official cw.conv.conv.weight "
        "is convattn's cw.conv.weight, cw.conv.bn.* is cw.bn.*).",
        "The official module (MODELS/triplet_attention.py) takes gate_channels, reduction_ratio "
        "and pool_types and ignores them; convattn has no such options. Its parameter count "
        "does not depend on C (3 x (2 k^2 + 2) = 300 for k = 7).",
        "The official ImageNet ResNet sets the BN weight of the branch attribute named "
        "'SpatialGate' (the H-W branch) to 0 and the other two to 1, and He-initialises the "
        "convolutions (fan_out); the module keeps PyTorch's default init and leaves that to the "
        "backbone.",
        "Sigmoid through an nn.Sigmoid module per branch (cw.gate, hc.gate, hw.gate) instead of "
        "the in-place torch.sigmoid_; forward hooks on them see the gates in each branch's "
        "plane layout: (N, 1, C, W), (N, 1, H, C) and (N, 1, H, W).",
        "Defined for 2-D maps only (the three rotations are of (C, H, W)).",
    ),
)
class TripletAttention(AttentionModule):
    """Triplet attention: ``y = (x * g_cw + x * g_hc + x * g_hw) / 3``.

    Args:
        channels: C.
        kernel_size: k of the k x k convolution in each branch (7). Odd.
        no_spatial: drop the H-W branch (plain spatial attention) and average the other two,
            as the official ``no_spatial`` option.
        spatial_dims: 2 only.

    Shape:
        - Input: ``(N, C, H, W)``; output: same shape and dtype.
    """

    def __init__(
        self,
        channels: int,
        *,
        kernel_size: int = 7,
        no_spatial: bool = False,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__(channels, spatial_dims, supported_dims=(2,))
        owner = type(self).__name__
        check_positive_int(owner, "kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(
                f"{owner}: kernel_size must be odd to keep the map size, got {kernel_size}"
            )
        if not isinstance(no_spatial, bool):
            raise TypeError(f"{owner}: no_spatial must be a bool, got {type(no_spatial).__name__}")
        self.kernel_size = kernel_size
        self.no_spatial = no_spatial
        self.cw = _ZPoolGate(kernel_size)
        self.hc = _ZPoolGate(kernel_size)
        self.hw = None if no_spatial else _ZPoolGate(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        # (C, W) plane: Z-pool over H -> (N, 2, C, W); gate broadcast back over H.
        gate_cw = self.cw(_z_pool(x, 2))
        out = x * gate_cw.transpose(1, 2)
        # (H, C) plane: Z-pool over W -> (N, 2, H, C); gate (N, 1, H, C) -> (N, C, H, 1).
        gate_hc = self.hc(_z_pool(x, 3).transpose(2, 3))
        out = out + x * gate_hc.permute(0, 3, 2, 1)
        if self.hw is None:
            return out / 2
        # (H, W) plane: Z-pool over C -> (N, 2, H, W).
        gate_hw = self.hw(_z_pool(x, 1))
        return (out + x * gate_hw) / 3

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, kernel_size={self.kernel_size}, no_spatial={self.no_spatial}"
        )
