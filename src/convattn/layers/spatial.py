"""Generic spatial attention: describe (pool across channels), excite (k x k convolution over
the pooled map), gate (sigmoid or hard-sigmoid), apply (per-position multiply).

CBAM's spatial gate is a configuration of this module (see ``cbam.py``).
"""

from __future__ import annotations

import torch

from convattn.layers._helpers import (
    AttentionModule,
    SingleOutputConvMixin,
    amax,
    batch_norm_nd,
    check_choice,
    check_positive_int,
    conv_nd,
    mean_amax,
)
from convattn.registry import register

__all__ = ["SpatialAttention"]

POOLS = ("both", "mean", "max")
GATES = ("sigmoid", "hard_sigmoid")


@register(
    "spatial",
    kind="spatial",
    paper="Generic spatial attention (the CBAM-spatial family)",
    year=2018,
    arxiv="1807.06521",
    placement="anywhere a per-position reweighting fits; in a ResNet block after the last BN, before the residual add",
    summary="pool across channels (max, mean or both) -> k x k conv (+BN) -> sigmoid/hard-sigmoid -> multiply",
)
class SpatialAttention(SingleOutputConvMixin, AttentionModule):
    """Configurable spatial attention ``y = x * gate(norm(conv_k(pool_c(x))))``.

    Args:
        channels: C, the number of input (and output) channels.
        pool: the channel descriptor (describe step): ``"both"`` concatenates
            ``[max_c x, mean_c x]`` (CBAM's order), ``"mean"`` or ``"max"`` alone.
        kernel_size: k of the k x k (x k) convolution (``f^{7x7}`` in CBAM eq. 3). Odd.
        norm: BatchNorm (momentum 0.01, as CBAM's official code) after the convolution.
        bias: bias in the convolution (CBAM: none).
        gate_layer: ``"sigmoid"`` or ``"hard_sigmoid"``.
        spatial_dims: 1, 2 or 3.

    Shape:
        - Input: ``(N, C, *spatial)``; output: same shape and dtype.
    """

    def __init__(
        self,
        channels: int,
        *,
        pool: str = "both",
        kernel_size: int = 7,
        norm: bool = True,
        bias: bool = False,
        gate_layer: str = "sigmoid",
        spatial_dims: int = 2,
    ) -> None:
        super().__init__(channels, spatial_dims)
        owner = type(self).__name__
        check_choice(owner, "pool", pool, POOLS)
        check_choice(owner, "gate_layer", gate_layer, GATES)
        check_positive_int(owner, "kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(
                f"{owner}: kernel_size must be odd to keep the map size, got {kernel_size}"
            )
        self.pool = pool
        self.kernel_size = kernel_size
        in_maps = 2 if pool == "both" else 1
        self.conv = conv_nd(spatial_dims)(
            in_maps, 1, kernel_size, padding=kernel_size // 2, bias=bias
        )
        self.bn = batch_norm_nd(spatial_dims)(1, eps=1e-5, momentum=0.01) if norm else None
        self.gate = torch.nn.Sigmoid() if gate_layer == "sigmoid" else torch.nn.Hardsigmoid()

    def describe(self, x: torch.Tensor) -> torch.Tensor:
        """Channel-pooled map, (N, 1 or 2, *spatial)."""
        if self.pool == "mean":
            return x.mean(1, keepdim=True)
        if self.pool == "max":
            return amax(x, [1])
        mean, peak = mean_amax(x, [1])
        return torch.cat([peak, mean], dim=1)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Spatial weights in (0, 1), shape (N, 1, *spatial)."""
        logits = self._conv(self.describe(x))
        if self.bn is not None:
            logits = self.bn(logits)
        return self.gate(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return x * self.attention(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pool={self.pool!r}, kernel_size={self.kernel_size}"
