"""SRM: A Style-based Recalibration Module for Convolutional Neural Networks,
Lee, Kim and Nam, ICCV 2019. https://arxiv.org/abs/1903.10829

Style pooling summarises each channel by its style, the mean and standard deviation over the
spatial positions: ``mu_nc = 1/HW sum x_nc`` and ``sigma_nc = sqrt(var_nc + eps)`` (``var`` is
the unbiased variance in the official code, ``eps = 1e-5``), giving ``t_nc = [mu_nc, sigma_nc]``.
Style integration weighs the two statistics per channel with a channel-wise fully connected
layer ``z_nc = w_c . t_nc`` (C x 2 weights), normalises with BatchNorm and gates with a sigmoid:
``g_nc = sigma(BN(z)_nc)``; the output is ``x_nc * g_nc``.
"""

from __future__ import annotations

import torch
from torch import nn

from convattn.layers._helpers import AttentionModule, spatial_numel, unsqueeze_spatial
from convattn.registry import register

__all__ = ["SRM"]

_STD_EPS = 1e-5


@register(
    "srm",
    kind="channel",
    paper="SRM: A Style-based Recalibration Module for Convolutional Neural Networks",
    year=2019,
    arxiv="1903.10829",
    placement="ResNet bottleneck/basic block: after the last BN (bn3), before the residual add",
    summary="[mean, std] per channel -> channel-wise FC (C x 2, init 0) -> BN -> sigmoid -> "
    "multiply",
    differences=(
        "The channel-wise FC is a (C, 2) parameter named cfc, initialised to 0, and the BN "
        "keeps PyTorch's default init, as in the official code; the state-dict keys (cfc, "
        "bn.*) match it.",
        "Style pooling uses the unbiased variance plus 1e-5 under the square root, as in the "
        "current official code (an earlier revision of it used torch.std, without eps).",
        "On a map with a single position the unbiased variance is undefined (0/0, NaN in the "
        "official code); convattn then uses the population variance (0), so the std "
        "descriptor is sqrt(1e-5).",
        "The official code applies BatchNorm2d to (N, C, 1, 1); convattn applies BatchNorm1d "
        "to (N, C): the same numbers and state-dict entries, and any spatial_dims.",
        "Only the mean + std style descriptor is offered: the official code has no option "
        "for another one.",
    ),
)
class SRM(AttentionModule):
    """Style-based recalibration: ``y = x * sigma(BN(w_c1 mu_c + w_c2 sigma_c))``.

    Args:
        channels: C.
        spatial_dims: 1, 2 or 3.

    Attributes:
        cfc: the channel-wise FC weights ``w``, shape (C, 2): column 0 weighs the mean,
            column 1 the standard deviation. Zero at initialisation.
        bn: the BatchNorm of style integration (one value per sample and channel, so training needs a
            batch of more than one sample).
        gate: the sigmoid.

    Shape:
        - Input: ``(N, C, *spatial)``; output: same shape and dtype.
    """

    # A class constant, so that TorchScript can read it (it cannot close over a global float).
    std_eps = _STD_EPS
    __constants__ = ("std_eps",)

    def __init__(self, channels: int, *, spatial_dims: int = 2) -> None:
        super().__init__(channels, spatial_dims)
        self.cfc = nn.Parameter(torch.zeros(channels, 2))
        self.bn = nn.BatchNorm1d(channels)
        self.gate = nn.Sigmoid()

    def style_pooling(self, x: torch.Tensor) -> torch.Tensor:
        """Style features ``t``, shape (N, C, 2): [mean, std] per channel."""
        dims = list(range(2, x.dim()))
        positions = spatial_numel(x)
        # Unbiased variance as in the official code; a single position has none, so fall
        # back to the population variance (0) there instead of producing NaN.
        var, mean = torch.var_mean(x, dims, correction=1 if positions > 1 else 0)
        std = torch.sqrt(var + self.std_eps)
        return torch.stack([mean, std], dim=-1)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Channel weights ``g`` in (0, 1), shape (N, C)."""
        style = self.style_pooling(x)
        z = (style * self.cfc).sum(-1)
        return self.gate(self.bn(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return x * unsqueeze_spatial(self.attention(x), self.spatial_dims).to(x.dtype)
