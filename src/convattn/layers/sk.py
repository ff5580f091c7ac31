"""Selective Kernel Networks, Li et al., CVPR 2019. https://arxiv.org/abs/1903.06586

SK convolution: split the input into M branches of grouped 3x3 convolutions with growing
dilation (receptive fields 3, 5, ...; each conv + BN + ReLU), fuse them by summing,
``s = GAP(U)``, ``z = ReLU(BN(W_fc s))`` with ``d = max(C/r, L)``, then select: one logit per
branch and channel, a softmax across the branches, ``V = sum_m a_m * U_m``.
"""

from __future__ import annotations

import torch
from torch import nn

from convattn.layers._helpers import (
    AttentionModule,
    batch_norm_nd,
    check_positive_int,
    conv_nd,
    reduced_channels,
    unsqueeze_spatial,
)
from convattn.registry import register

__all__ = ["SKConv"]


@register(
    "sk",
    kind="channel",
    contract="conv",
    paper="Selective Kernel Networks",
    year=2019,
    arxiv="1903.06586",
    placement="replaces the 3x3 grouped conv of a ResNeXt-50 (32x4d) bottleneck (SKNet-50)",
    summary="M grouped 3x3 branches (dilation 1, 2, ...) -> sum -> GAP -> FC(d)+BN+ReLU -> FC(M*C) -> softmax over branches -> weighted sum",
    differences=(
        "Matches the official SKNet-50 prototxt: both FC layers without bias, BN + ReLU after "
        "the first, d = max(C/16, 32), branch m a 3x3 conv with dilation m + 1.",
        "The fuse BN sees one value per channel per sample, so training needs batch size > 1 "
        "(as in the official model).",
    ),
)
class SKConv(AttentionModule):
    """Selective-kernel convolution, a drop-in replacement for a (grouped) 3x3 convolution.

    Args:
        channels: input channels.
        out_channels: output channels (C in the paper); defaults to ``channels``.
        stride: stride of every branch.
        groups: groups of every branch convolution (32 in SKNet-50); must divide both
            channel counts.
        num_branches: M, the number of branches; branch m uses dilation m + 1.
        kernel_size: kernel of each branch (3).
        rd_ratio: 1/r for ``d = max(C * rd_ratio, min_rd_channels)`` (r = 16).
        min_rd_channels: L, the lower bound of d (32).
        rd_channels: d, overriding the two above.
        spatial_dims: 1, 2 or 3.

    Shape:
        - Input: ``(N, channels, *spatial)``.
        - Output: ``(N, out_channels, *spatial / stride)``.
    """

    def __init__(
        self,
        channels: int,
        *,
        out_channels: int | None = None,
        stride: int = 1,
        groups: int = 32,
        num_branches: int = 2,
        kernel_size: int = 3,
        rd_ratio: float = 1 / 16,
        min_rd_channels: int = 32,
        rd_channels: int | None = None,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__(channels, spatial_dims)
        owner = type(self).__name__
        out_channels = channels if out_channels is None else out_channels
        for option, value in (
            ("out_channels", out_channels),
            ("stride", stride),
            ("groups", groups),
            ("num_branches", num_branches),
            ("kernel_size", kernel_size),
            ("min_rd_channels", min_rd_channels),
        ):
            check_positive_int(owner, option, value)
        if channels % groups or out_channels % groups:
            raise ValueError(
                f"{owner}: groups={groups} must divide channels ({channels}) and out_channels "
                f"({out_channels}); pass groups= a common divisor"
            )
        if kernel_size % 2 == 0:
            raise ValueError(f"{owner}: kernel_size must be odd, got {kernel_size}")
        self.out_channels = out_channels
        self.num_branches = num_branches
        self.rd_channels = max(
            reduced_channels(out_channels, rd_ratio, rd_channels, owner=owner),
            min_rd_channels if rd_channels is None else 1,
        )
        conv, norm = conv_nd(spatial_dims), batch_norm_nd(spatial_dims)
        self.branches = nn.ModuleList()
        for m in range(num_branches):
            dilation = m + 1
            self.branches.append(
                nn.Sequential(
                    conv(
                        channels,
                        out_channels,
                        kernel_size,
                        stride=stride,
                        padding=dilation * (kernel_size - 1) // 2,
                        dilation=dilation,
                        groups=groups,
                        bias=False,
                    ),
                    norm(out_channels),
                    nn.ReLU(inplace=True),
                )
            )
        self.fc1 = nn.Linear(out_channels, self.rd_channels, bias=False)
        self.bn = nn.BatchNorm1d(self.rd_channels)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(self.rd_channels, num_branches * out_channels, bias=False)
        self.gate = nn.Softmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        outs = []
        for branch in self.branches:
            outs.append(branch(x))
        features = torch.stack(outs, dim=1)  # U_m: (N, M, C_out, *spatial)
        fused = features.sum(1)  # U = sum_m U_m
        s = fused.mean(list(range(2, fused.dim())))  # (N, C_out)
        z = self.act(self.bn(self.fc1(s)))
        logits = self.fc2(z).view(-1, self.num_branches, self.out_channels)
        weights = self.gate(logits)  # softmax across branches: (N, M, C_out)
        return (features * unsqueeze_spatial(weights, self.spatial_dims)).sum(1)

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, out_channels={self.out_channels}, num_branches={self.num_branches}, "
            f"rd_channels={self.rd_channels}, spatial_dims={self.spatial_dims}"
        )
