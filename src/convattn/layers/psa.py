"""Polarized Self-Attention: Towards High-quality Pixel-wise Regression, Huajun Liu, Fuqiang
Liu, Xinyi Fan and Dong Huang, arXiv 2021. https://arxiv.org/abs/2107.00782

Two "polarized" branches, each collapsing one axis completely while keeping the other at high
resolution (C/2 inner channels), each ending in a softmax -> sigmoid pair:

- channel-only (eq. 2): ``A^ch(X) = sigma(LN(W_z((sigma_1 W_v(X)) x softmax(sigma_2 W_q(X)))))``,
  with ``W_v: C -> C/2`` and ``W_q: C -> 1`` 1x1 convs, the softmax over the positions, the
  matrix product giving one C/2 vector, ``W_z: C/2 -> C``, a LayerNorm over the C channels and
  a sigmoid; ``Z^ch = A^ch(X) * X`` (per channel);
- spatial-only (eq. 4): ``A^sp(X) = sigma(softmax(GAP(W_q(X))) x W_v(X))``, with
  ``W_q, W_v: C -> C/2`` 1x1 convs, the softmax over the C/2 channels of the pooled query, the
  product giving one value per position, and a sigmoid; ``Z^sp = A^sp(X) * X`` (per position).

Compositions: parallel ``PSA_p(X) = Z^ch + Z^sp`` (eq. 5), sequential
``PSA_s(X) = A^sp(Z^ch) * Z^ch`` (eq. 6).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from convattn.layers._helpers import (
    AttentionModule,
    check_choice,
    conv_nd,
    reduced_channels,
    unsqueeze_spatial,
)
from convattn.registry import register

__all__ = ["PolarizedSelfAttention"]

LAYOUTS = ("parallel", "sequential")
FORMS = ("paper", "official")


@register(
    "psa",
    kind="hybrid",
    paper="Polarized Self-Attention: Towards High-quality Pixel-wise Regression",
    year=2021,
    arxiv="2107.00782",
    placement=(
        "HRNet / ResNet basic and bottleneck blocks for pixel-wise regression (pose, "
        "segmentation): after the last conv + BN of the residual branch, before the add"
    ),
    summary=(
        "channel-only branch (Wv, Wq -> softmax over positions -> Wz -> LayerNorm -> sigmoid) "
        "and spatial-only branch (Wq -> GAP -> softmax over C/2 -> x Wv -> sigmoid), "
        "summed (parallel) or chained (sequential)"
    ),
    differences=(
        "form='paper' (default) follows the paper's eqs. 2-6 (LayerNorm after W_z; the spatial "
        "branch's softmax over the C/2 channels of the pooled query). The only released code "
        "(DeLightCMU/PSA, semantic-segmentation/network/PSA.py) differs: PSA_p has no LayerNorm "
        "and applies the spatial softmax over positions after the matrix product; PSA_s "
        "replaces W_z by a bottleneck (C/2 -> C/8 conv with bias, LayerNorm, ReLU, -> C conv "
        "with bias) and applies the spatial softmax over positions to W_v(x) before the "
        "product. form='official' reproduces PSA_p (layout='parallel') or PSA_s "
        "(layout='sequential') exactly, parameters included. The default follows the paper "
        "rather than that code because PSA_p and PSA_s disagree with each other and with the "
        "paper, and PSA_p's spatial gate (a sigmoid of a softmax over positions) can only take "
        "values in [0.5, 0.73].",
        "As in the official code, the 1x1 convs W_q and W_v of both branches and W_z have no "
        "bias (the paper does not say) and W_q, W_v get Kaiming-normal (fan_in) init; W_z "
        "keeps PyTorch's default init; the LayerNorm is affine over the C channels.",
        "The official constructor's planes / kernel_size / stride arguments are not exposed: "
        "kernel_size is unused there and stride != 1 breaks the multiplication with x; "
        "convattn uses planes = inplanes = C.",
        "Inner widths are max(1, C // 2) (and max(1, C // 8) for the official PSA_s "
        "bottleneck); the official code fails for C < 2 (C < 8).",
        "Generalised to 1-D and 3-D maps (positions are flattened; the paper uses 2-D).",
    ),
)
class PolarizedSelfAttention(AttentionModule):
    """Polarized self-attention, parallel ``x * A^ch + x * A^sp`` or sequential layout.

    Args:
        channels: C.
        layout: ``"parallel"`` (PSA_p, eq. 5: ``y = x * A^ch(x) + x * A^sp(x)``) or
            ``"sequential"`` (PSA_s, eq. 6: ``z = x * A^ch(x)``, ``y = z * A^sp(z)``).
        form: ``"paper"`` (eqs. 2 and 4) or ``"official"`` (the released PSA_p / PSA_s code,
            see the registry entry's differences).
        spatial_dims: 1, 2 or 3.

    The sigmoids producing ``A^ch`` (N, C, 1, ..) and ``A^sp`` (N, 1, *spatial) are the
    submodules ``gate_channel`` and ``gate_spatial``.

    Shape:
        - Input: ``(N, C, *spatial)``; output: same shape and dtype.
    """

    def __init__(
        self,
        channels: int,
        *,
        layout: str = "parallel",
        form: str = "paper",
        spatial_dims: int = 2,
    ) -> None:
        super().__init__(channels, spatial_dims)
        owner = type(self).__name__
        check_choice(owner, "layout", layout, LAYOUTS)
        check_choice(owner, "form", form, FORMS)
        self.layout = layout
        self.form = form
        inner = reduced_channels(channels, 1 / 2, owner=owner)
        self.inner_channels = inner
        conv = conv_nd(spatial_dims)
        unit = (1,) * spatial_dims

        # Channel-only branch: W_v (C -> C/2), W_q (C -> 1), softmax over positions, W_z.
        self.ch_wv = conv(channels, inner, 1, bias=False)
        self.ch_wq = conv(channels, 1, 1, bias=False)
        self.ch_softmax = nn.Softmax(dim=-1)
        self.ch_wz: nn.Module
        if form == "paper":
            self.ch_wz = nn.Sequential(
                conv(inner, channels, 1, bias=False), nn.LayerNorm([channels, *unit])
            )
        elif layout == "parallel":  # official PSA_p: a single conv, no LayerNorm
            self.ch_wz = conv(inner, channels, 1, bias=False)
        else:  # official PSA_s: bottleneck with ratio 4 on the C/2 inner channels
            hidden = max(1, inner // 4)
            self.ch_wz = nn.Sequential(
                conv(inner, hidden, 1),
                nn.LayerNorm([hidden, *unit]),
                nn.ReLU(inplace=True),
                conv(hidden, channels, 1),
            )
        self.gate_channel = nn.Sigmoid()

        # Spatial-only branch: W_q (C -> C/2) + GAP, W_v (C -> C/2), product, sigmoid.
        self.sp_wq = conv(channels, inner, 1, bias=False)
        self.sp_wv = conv(channels, inner, 1, bias=False)
        # Where the spatial branch's softmax acts: the paper normalises the pooled query over
        # its C/2 channels; the official PSA_p normalises the product over positions, PSA_s
        # normalises W_v(x) over positions before the product.
        if form == "paper":
            self.spatial_softmax_on = "query"
            self.sp_softmax = nn.Softmax(dim=1)
        else:
            self.spatial_softmax_on = "product" if layout == "parallel" else "value"
            self.sp_softmax = nn.Softmax(dim=-1)
        self.gate_spatial = nn.Sigmoid()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan_in, ReLU gain) init of the four W_q / W_v convs, as the official
        ``reset_parameters``; W_z and the LayerNorm keep PyTorch's defaults."""
        for module in (self.ch_wv, self.ch_wq, self.sp_wq, self.sp_wv):
            weight = cast(torch.Tensor, module.weight)
            nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity="relu")

    def channel_attention(self, x: torch.Tensor) -> torch.Tensor:
        """``A^ch(x)``: channel weights, (N, C, 1, ..., 1)."""
        value = self.ch_wv(x).flatten(2)  # (N, C/2, L)
        query = self.ch_softmax(self.ch_wq(x).flatten(2))  # (N, 1, L), softmax over positions
        context = torch.matmul(value, query.transpose(1, 2))[..., 0]  # (N, C/2)
        logits = self.ch_wz(unsqueeze_spatial(context, self.spatial_dims))  # (N, C, 1, ..)
        return self.gate_channel(logits)

    def spatial_attention(self, x: torch.Tensor) -> torch.Tensor:
        """``A^sp(x)``: spatial weights, (N, 1, *spatial)."""
        query = self.sp_wq(x).flatten(2).mean(-1)  # GAP: (N, C/2)
        value = self.sp_wv(x).flatten(2)  # (N, C/2, L)
        if self.spatial_softmax_on == "query":
            query = self.sp_softmax(query)
        elif self.spatial_softmax_on == "value":
            value = self.sp_softmax(value)
        logits = torch.matmul(query.unsqueeze(1), value)  # (N, 1, L)
        if self.spatial_softmax_on == "product":
            logits = self.sp_softmax(logits)
        return self.gate_spatial(logits.reshape([x.shape[0], 1] + list(x.shape[2:])))  # noqa: RUF005 (TorchScript: no * in lists)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.layout == "parallel":
            return x * self.channel_attention(x) + x * self.spatial_attention(x)
        z = x * self.channel_attention(x)
        return z * self.spatial_attention(z)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layout={self.layout!r}, form={self.form!r}"
