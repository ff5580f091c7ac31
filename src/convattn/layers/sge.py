"""Spatial Group-wise Enhance: Improving Semantic Feature Learning in Convolutional Networks,
Li, Hu and Yang, arXiv 2019. https://arxiv.org/abs/1905.09646

The C channels are split into G groups; each group ``x = {x_1..x_m}`` (m positions, C/G
channels per position) enhances itself:

- ``g = (1/m) sum_i x_i``, the group's global average (a C/G vector);
- ``c_i = g . x_i``, the similarity of each position to it (a scalar per position);
- ``c^_i = (c_i - mu_c) / (sigma_c + eps)`` over the m positions (eps = 1e-5; ``sigma_c`` is
  the unbiased standard deviation, as ``torch.std`` in the official code);
- ``a_i = gamma c^_i + beta`` with one (gamma, beta) per group, initialised to (0, 1);
- ``y_i = x_i * sigma(a_i)``.
"""

from __future__ import annotations

import torch
from torch import nn

from convattn.layers._helpers import AttentionModule, check_positive_int
from convattn.registry import register

__all__ = ["SpatialGroupEnhance"]


@register(
    "sge",
    kind="spatial",
    paper="Spatial Group-wise Enhance: Improving Semantic Feature Learning in Convolutional Networks",
    year=2019,
    arxiv="1905.09646",
    placement="ResNet bottleneck/basic block: after the last BN (bn3 / bn2), before the residual add",
    summary="G groups: similarity of each position to the group mean -> normalise over "
    "positions -> per-group scale and shift -> sigmoid -> multiply",
    differences=(
        "On a map with a single position the official code divides 0 by NaN (the unbiased "
        "standard deviation of one value) and returns NaN; convattn skips the division there, "
        "so the normalised similarity is 0 and the gate is sigmoid(beta).",
        "Generalised to 1-D and 3-D maps by normalising over all positions; the parameters keep "
        "the official shape (1, G, 1, ..., 1), so 2-D weights load unchanged.",
        "Channels must be divisible by groups (ValueError); the official code fails in a view.",
    ),
)
class SpatialGroupEnhance(AttentionModule):
    """Spatial group-wise enhance: ``y_i = x_i * sigma(gamma norm_i(g . x_i) + beta)`` per group.

    Args:
        channels: C, divisible by ``groups`` (one channel per group is allowed).
        groups: G (64, as in the official SGE-ResNets).
        spatial_dims: 1, 2 or 3.

    Shape:
        - Input: ``(N, C, *spatial)``; output: same shape and dtype.
        - Gate (forward hook on ``gate``): ``(N, G, *spatial)``.
    """

    eps = 1e-5
    __constants__ = ("eps",)  # readable from TorchScript

    def __init__(self, channels: int, *, groups: int = 64, spatial_dims: int = 2) -> None:
        super().__init__(channels, spatial_dims)
        owner = type(self).__name__
        check_positive_int(owner, "groups", groups)
        if channels % groups:
            raise ValueError(
                f"{owner}: channels must be divisible by groups, got channels={channels} "
                f"and groups={groups}"
            )
        self.groups = groups
        param_shape = (1, groups) + (1,) * spatial_dims
        self.weight = nn.Parameter(torch.zeros(param_shape))  # gamma
        self.bias = nn.Parameter(torch.ones(param_shape))  # beta
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        batch = x.shape[0]
        spatial = list(x.shape[2:])
        group_channels = self.channels // self.groups
        flat = x.reshape(batch, self.groups, group_channels, -1)  # (N, G, C/G, m)
        similarity = (flat * flat.mean(-1, keepdim=True)).sum(2)  # c_i: (N, G, m)
        centred = similarity - similarity.mean(-1, keepdim=True)
        if similarity.shape[-1] > 1:  # a single position is its own mean: c^ = 0
            centred = centred / (centred.std(-1, keepdim=True) + self.eps)
        logits = centred.reshape([batch, self.groups] + spatial) * self.weight + self.bias  # noqa: RUF005 (TorchScript: no * in lists)
        gate = self.gate(logits)  # (N, G, *spatial)
        out = x.reshape([batch, self.groups, group_channels] + spatial) * gate.unsqueeze(2)  # noqa: RUF005 (TorchScript: no * in lists)
        return out.reshape_as(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, groups={self.groups}"
