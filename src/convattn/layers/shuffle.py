"""SA-Net: Shuffle Attention for Deep Convolutional Neural Networks, Zhang and Yang,
ICASSP 2021. https://arxiv.org/abs/2102.00240

The C channels are split into G groups and each group into two halves of ``C/2G`` channels
(the group axis folded into the batch, parameters shared by all groups):

- channel half: ``x_k1' = x_k1 * sigma(W1 GAP(x_k1) + b1)``;
- spatial half: ``x_k2' = x_k2 * sigma(W2 GN(x_k2) + b2)`` with GroupNorm(C/2G groups,
  C/2G channels), i.e. each channel normalised over its positions, with affine parameters;
- ``W1, b1, W2, b2`` are per-channel (C/2G values each), initialised to 0, 1, 0, 1;
- the halves are concatenated, the groups put back together, and the channels shuffled with
  2 groups: ``(N, 2, C/2, ...) -> (N, C/2, 2, ...) -> (N, C, ...)``.
"""

from __future__ import annotations

import torch
from torch import nn

from convattn.layers._helpers import AttentionModule, GroupNorm, check_positive_int
from convattn.registry import register

__all__ = ["ShuffleAttention"]


@register(
    "shuffle",
    kind="hybrid",
    paper="SA-Net: Shuffle Attention for Deep Convolutional Neural Networks",
    year=2021,
    arxiv="2102.00240",
    placement="ResNet bottleneck: after the last BN (bn3), before the residual add",
    summary="G groups split in halves: GAP -> scale+shift -> sigmoid (channel) and GN -> "
    "scale+shift -> sigmoid (spatial); concat, channel shuffle",
    differences=(
        "Channels must be divisible by 2 * groups (ValueError): with the official default "
        "groups=64 that means C % 128 == 0, so C=64 needs groups <= 32. The official code "
        "does not check this.",
        "Generalised to 1-D and 3-D maps (GAP and GroupNorm over all positions); the "
        "parameters keep the official shape (1, C/2G, 1, ..., 1), so 2-D weights load "
        "unchanged.",
        "The two sigmoids are separate modules (gate_channel, gate_spatial) instead of one "
        "shared nn.Sigmoid, so forward hooks can tell the two maps apart.",
    ),
)
class ShuffleAttention(AttentionModule):
    """Shuffle attention: per group, a channel gate on one half and a spatial gate on the
    other, then a channel shuffle.

    Args:
        channels: C, divisible by ``2 * groups``.
        groups: G (64, the official ``sa_layer`` default).
        spatial_dims: 1, 2 or 3.

    Shape:
        - Input: ``(N, C, *spatial)``; output: same shape and dtype.
        - Gates (forward hooks): ``gate_channel`` (N*G, C/2G, 1, ..., 1), ``gate_spatial``
          (N*G, C/2G, *spatial).
    """

    def __init__(self, channels: int, *, groups: int = 64, spatial_dims: int = 2) -> None:
        super().__init__(channels, spatial_dims)
        owner = type(self).__name__
        check_positive_int(owner, "groups", groups)
        if channels % (2 * groups):
            raise ValueError(
                f"{owner}: channels must be divisible by 2 * groups, got channels={channels} "
                f"and groups={groups} (2 * groups = {2 * groups})"
            )
        self.groups = groups
        half = channels // (2 * groups)
        self.half_channels = half
        param_shape = (1, half) + (1,) * spatial_dims
        self.cweight = nn.Parameter(torch.zeros(param_shape))
        self.cbias = nn.Parameter(torch.ones(param_shape))
        self.sweight = nn.Parameter(torch.zeros(param_shape))
        self.sbias = nn.Parameter(torch.ones(param_shape))
        self.gn = GroupNorm(half, half)
        self.gate_channel = nn.Sigmoid()
        self.gate_spatial = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        batch = x.shape[0]
        spatial = list(x.shape[2:])
        pooled_dims = list(range(2, 2 + self.spatial_dims))
        grouped = x.reshape([batch * self.groups, 2 * self.half_channels] + spatial)  # noqa: RUF005 (TorchScript: no * in lists)
        channel_half, spatial_half = torch.chunk(grouped, 2, dim=1)
        descriptor = channel_half.mean(pooled_dims, keepdim=True)
        channel_out = channel_half * self.gate_channel(self.cweight * descriptor + self.cbias)
        normalised = self.gn(spatial_half)
        spatial_out = spatial_half * self.gate_spatial(self.sweight * normalised + self.sbias)
        out = torch.cat([channel_out, spatial_out], dim=1)
        # Channel shuffle with 2 groups: channel k of the second half goes next to channel k.
        out = out.reshape([batch, 2, self.channels // 2] + spatial).transpose(1, 2)  # noqa: RUF005 (TorchScript: no * in lists)
        return out.reshape_as(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, groups={self.groups}"
