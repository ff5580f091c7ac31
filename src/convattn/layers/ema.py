"""Efficient Multi-Scale Attention Module with Cross-Spatial Learning, Ouyang, He, Zhang, Luo,
Guo, Zhan and Huang, ICASSP 2023. https://arxiv.org/abs/2305.13563

The C channels are split into G groups of ``C/G`` sub-features, each processed alone (the
group axis is folded into the batch), with weights shared by all groups:

- 1x1 branch: average along W (``z^h``, one value per row) and along H (``z^w``), concatenate,
  a shared 1x1 conv ``C/G -> C/G`` (with bias), split, sigmoids:
  ``x1 = GN(x_g * sigma(z^h) * sigma(z^w))`` with GroupNorm(C/G groups, C/G channels);
- 3x3 branch: ``x2 = conv3x3(x_g)`` (``C/G -> C/G``, with bias);
- cross-spatial learning: each branch's global average, softmaxed over the C/G sub-features,
  is matrix-multiplied with the other branch's features at every position:
  ``w = softmax(GAP(x1)) . x2 + softmax(GAP(x2)) . x1`` (one map per group);
- ``y_g = x_g * sigma(w)``.
"""

from __future__ import annotations

import torch
from torch import nn

from convattn.layers._helpers import AttentionModule, GroupNorm, check_positive_int
from convattn.registry import register

__all__ = ["EMA"]


@register(
    "ema",
    kind="hybrid",
    paper="Efficient Multi-Scale Attention Module with Cross-Spatial Learning",
    year=2023,
    arxiv="2305.13563",
    placement="not fixed by the paper (the official repository adds it to YOLOv5 detectors and "
    "timm classification models); in a ResNet block after the last BN, before the residual add",
    spatial_dims=(2,),
    summary="G groups: directional pooling -> shared 1x1 conv -> sigmoids -> GN, and a 3x3 "
    "conv; cross-spatial softmax matmul -> sigmoid -> multiply",
    differences=(
        "The group count is called `groups` (the official code calls it `factor`); the official "
        "constructor's second argument (c2) is unused there and has no counterpart here.",
        "Channels must be divisible by groups (ValueError); the official code only asserts "
        "C // factor > 0 and then fails in a reshape when C is not a multiple.",
        "Pooling is written as means instead of AdaptiveAvgPool2d layers with None sizes, so it "
        "exports to ONNX/TensorRT; the numbers are the same.",
        "The four gates are nn modules (gate_h, gate_w: the 1x1 branch's directional sigmoids; "
        "gate_context_1x1, gate_context_3x3: the softmaxes over each branch's pooled "
        "descriptor; gate: the final sigmoid) so forward hooks can read them.",
        "Defined for 2-D maps only (the directional pooling is along H and W).",
    ),
)
class EMA(AttentionModule):
    """Efficient multi-scale attention: ``y_g = x_g * sigma(softmax(GAP(x1)) x2 +
    softmax(GAP(x2)) x1)`` per group ``g``.

    Args:
        channels: C, divisible by ``groups``.
        groups: G, the number of sub-feature groups (``factor`` = 32 in the official code).
        spatial_dims: 2 only.

    Shape:
        - Input: ``(N, C, H, W)``; output: same shape and dtype.
        - Gates (forward hooks): ``gate_h`` (N*G, C/G, H, 1), ``gate_w`` (N*G, C/G, 1, W),
          ``gate_context_1x1`` / ``gate_context_3x3`` (N*G, 1, C/G), ``gate`` (N*G, 1, H, W).
    """

    def __init__(self, channels: int, *, groups: int = 32, spatial_dims: int = 2) -> None:
        super().__init__(channels, spatial_dims, supported_dims=(2,))
        owner = type(self).__name__
        check_positive_int(owner, "groups", groups)
        if channels % groups:
            raise ValueError(
                f"{owner}: channels must be divisible by groups, got channels={channels} "
                f"and groups={groups}"
            )
        self.groups = groups
        group_channels = channels // groups
        self.group_channels = group_channels
        self.conv1x1 = nn.Conv2d(group_channels, group_channels, 1, bias=True)
        self.conv3x3 = nn.Conv2d(group_channels, group_channels, 3, padding=1, bias=True)
        self.gn = GroupNorm(group_channels, group_channels)
        self.gate_h = nn.Sigmoid()
        self.gate_w = nn.Sigmoid()
        self.gate_context_1x1 = nn.Softmax(dim=-1)
        self.gate_context_3x3 = nn.Softmax(dim=-1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        batch, height, width = x.shape[0], x.shape[2], x.shape[3]
        grouped = x.reshape(batch * self.groups, self.group_channels, height, width)

        # 1x1 branch: directional descriptors through one shared 1x1 conv.
        pooled_h = grouped.mean(3, keepdim=True)  # (NG, C/G, H, 1)
        pooled_w = grouped.mean(2, keepdim=True).transpose(2, 3)  # (NG, C/G, W, 1)
        mixed = self.conv1x1(torch.cat([pooled_h, pooled_w], dim=2))
        mixed_h, mixed_w = torch.split(mixed, [height, width], dim=2)
        branch_1x1 = self.gn(grouped * self.gate_h(mixed_h) * self.gate_w(mixed_w.transpose(2, 3)))
        # 3x3 branch.
        branch_3x3 = self.conv3x3(grouped)

        # Cross-spatial learning: (NG, 1, C/G) @ (NG, C/G, HW) for each pairing.
        context_1x1 = self.gate_context_1x1(branch_1x1.mean((2, 3)).unsqueeze(1))
        context_3x3 = self.gate_context_3x3(branch_3x3.mean((2, 3)).unsqueeze(1))
        weights = torch.matmul(context_1x1, branch_3x3.flatten(2)) + torch.matmul(
            context_3x3, branch_1x1.flatten(2)
        )
        weights = weights.reshape(batch * self.groups, 1, height, width)
        return (grouped * self.gate(weights)).reshape_as(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, groups={self.groups}"
