"""ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks,
Wang et al., CVPR 2020. https://arxiv.org/abs/1910.03151

ECA replaces SE's bottleneck MLP with a 1-D convolution of size k across the channel axis of
the globally pooled descriptor (local cross-channel interaction, no dimensionality
reduction, k parameters). k adapts to the channel count: ``k = |log2(C)/gamma + b/gamma|_odd``.
"""

from __future__ import annotations

from convattn.layers.channel import ChannelAttention
from convattn.registry import register

__all__ = ["ECAModule"]


@register(
    "eca",
    kind="channel",
    paper="ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks",
    year=2020,
    arxiv="1910.03151",
    placement="ResNet bottleneck/basic block: after the last BN (bn3), before the residual add",
    summary="GAP -> Conv1d(k) over channels (no bias) -> sigmoid -> multiply",
    differences=(
        "Adaptive k follows the official code: t = int(|(log2 C + b) / gamma|), k = t if t is "
        "odd else t + 1 (the paper writes 'nearest odd'; the two differ when t is even).",
        "The released ECA-ResNet-50 passes k = 3, 5, 5, 7 per stage instead of the formula; "
        "pass kernel_size to reproduce it (the reference backbones do).",
    ),
)
class ECAModule(ChannelAttention):
    """Efficient Channel Attention: ``y = x * sigma(conv1d_k(GAP(x)))`` (eq. 5 with eq. 12).

    Args:
        channels: C.
        kernel_size: k, the 1-D convolution size (odd). None: adaptive, from ``gamma`` and
            ``beta`` (the paper's ``gamma = 2``, ``b = 1``).
        gamma, beta: parameters of the adaptive kernel-size mapping.
        gate_layer: ``"sigmoid"`` or ``"hard_sigmoid"``.
        spatial_dims: 1, 2 or 3.

    Shape:
        - Input: ``(N, C, *spatial)``; output: same shape and dtype.
    """

    def __init__(
        self,
        channels: int,
        *,
        kernel_size: int | None = None,
        gamma: float = 2,
        beta: float = 1,
        gate_layer: str = "sigmoid",
        spatial_dims: int = 2,
    ) -> None:
        super().__init__(
            channels,
            pool="avg",
            excitation="conv1d",
            kernel_size=kernel_size,
            gamma=gamma,
            beta=beta,
            bias=False,
            gate_layer=gate_layer,
            spatial_dims=spatial_dims,
        )
