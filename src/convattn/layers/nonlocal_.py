"""Non-local Neural Networks, Wang, Girshick, Gupta and He, CVPR 2018.
https://arxiv.org/abs/1711.07971

A non-local block (eqs. 1 and 6): ``y_i = 1/C(x) sum_j f(x_i, x_j) g(x_j)`` over every
position j, then ``z_i = W_z y_i + x_i``. ``g``, ``theta``, ``phi`` are 1x1 convs to
``C/2`` inner channels and ``W_z`` a 1x1 conv back to C followed by BN whose scale starts at 0,
so the block starts as the identity. The pairwise function f and normaliser C(x):

- embedded Gaussian (default): ``f = exp(theta(x_i)^T phi(x_j))``, ``C = sum_j f``: a softmax
  over j (eq. 3); the official code scales the logits by ``1/sqrt(C/2)`` first;
- Gaussian: ``f = exp(x_i^T x_j)`` (no theta / phi), a softmax over j;
- dot product: ``f = theta(x_i)^T phi(x_j)``, ``C = N`` the number of positions j;
- concatenation: ``f = ReLU(w_f^T [theta(x_i); phi(x_j)])``, ``C = N``.

Subsampling (Sec. 3.3): ``phi`` and ``g`` see a max-pooled (2x2 in space) map, which cuts the
pairwise cost by 4.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from convattn.layers._helpers import (
    AttentionModule,
    batch_norm_nd,
    check_choice,
    check_positive_int,
    conv_nd,
)
from convattn.registry import register

__all__ = ["NonLocalBlock"]

MODES = ("embedded_gaussian", "gaussian", "dot_product", "concatenation")
_SOFTMAX_MODES = ("embedded_gaussian", "gaussian")
_CONV_INIT_STD = 0.01  # cfg.NONLOCAL.CONV_INIT_STD of the official code


class _DotProductAffinity(nn.Module):
    """``f(x_i, x_j) = scale * theta_i^T phi_j``: (N, d, L), (N, d, M) -> (N, L, M)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, theta: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        return torch.bmm(theta.transpose(1, 2), phi) * self.scale


class _ConcatAffinity(nn.Module):
    """``f(x_i, x_j) = ReLU(w_f^T [theta_i; phi_j])``, written as ``ReLU(a_i + b_j)`` with
    ``a = w_theta^T theta`` and ``b = w_phi^T phi`` (the two halves of ``w_f``), which avoids
    building the (N, 2d, L, M) concatenation."""

    def __init__(self, inter_channels: int, spatial_dims: int) -> None:
        super().__init__()
        self.inter_channels = inter_channels
        # w_f: a 1x1 conv 2d -> 1 without bias, as in the concatenation variant's code.
        self.project = cast(_ConvNd, conv_nd(spatial_dims)(2 * inter_channels, 1, 1, bias=False))
        self.act = nn.ReLU()

    def forward(self, theta: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        weight = self.project.weight.flatten(1)  # (1, 2d)
        a = torch.matmul(weight[:, : self.inter_channels], theta)  # (N, 1, L)
        b = torch.matmul(weight[:, self.inter_channels :], phi)  # (N, 1, M)
        return self.act(a.transpose(1, 2) + b)  # (N, L, M)


class _DivideByCount(nn.Module):
    """``C(x) = N``: divide the pairwise values by the number of positions j (last dim)."""

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return f / f.shape[-1]


@register(
    "nonlocal",
    kind="self-attention",
    paper="Non-local Neural Networks",
    year=2018,
    arxiv="1711.07971",
    placement=(
        "ResNet stages 3 and 4 (res3/res4): after a residual block's output (after the add); "
        "the video models insert 5 or 10 blocks, every other residual block"
    ),
    summary=(
        "theta, phi, g 1x1 convs (C/2) -> softmax(theta^T phi) g -> W_z 1x1 conv + BN "
        "(zero-initialised scale) -> + x"
    ),
    differences=(
        "Follows the official Caffe2 code (facebookresearch/video-nonlocal-net, "
        "nonlocal_helper.py and config.py): embedded-Gaussian logits scaled by 1/sqrt(C/2) "
        "(USE_SCALE; the paper does not mention it; scale=False gives the paper's "
        "softmax(theta^T phi)); subsampling on (USE_MAXPOOL) with the max pool applied to x "
        "once before the phi and g convs; 3-D maps are pooled (1, 2, 2), i.e. in space only.",
        "The paper (Fig. 2) and the PyTorch port AlexHex7/Non-local_pytorch put the max pool "
        "after the phi and g convs instead; the port also has no logit scaling and PyTorch's "
        "default conv init.",
        "Init as the official code: theta, phi, g and W_z weights normal(0, 0.01), biases 0, "
        "BN scale and shift 0 (identity at start). With bn=False the W_z conv weights and bias "
        "are zero-initialised instead (as in the PyTorch port) so the block still starts as "
        "the identity.",
        "The subsampling max pool uses ceil_mode=True so that 1x1 and odd-sized maps work: "
        "equal to the official floor pooling on even sizes; on odd sizes the last row/column "
        "is kept in a window of its own instead of being dropped.",
        "Gaussian, dot-product and concatenation modes follow the paper's Sec. 3.2 / the PyTorch "
        "port (the official code has embedded Gaussian and an un-softmaxed dot product). "
        "Concatenation computes w_f^T [theta_i; phi_j] as w_theta^T theta_i + w_phi^T phi_j "
        "(identical numbers, no (L x M x 2d) tensor).",
    ),
)
class NonLocalBlock(AttentionModule):
    """Non-local block ``z = BN(W_z y) + x`` with ``y_i = 1/C(x) sum_j f(x_i, x_j) g(x_j)``.

    Args:
        channels: C.
        inter_channels: width of theta, phi and g (None: ``max(1, C // 2)``).
        mode: the pairwise function: ``"embedded_gaussian"``, ``"gaussian"``,
            ``"dot_product"`` or ``"concatenation"``.
        sub_sample: max-pool (kernel and stride 2; (1, 2, 2) for 3-D maps) the map seen by
            phi and g (official default and the paper's Sec. 3.3).
        bn: BN after W_z (official); without it W_z itself is zero-initialised.
        scale: multiply ``theta^T phi`` by ``d**-0.5`` (d the length of the dot product) before
            the normaliser. None: the official behaviour, True for ``"embedded_gaussian"`` and
            False for the other modes. Not defined for ``"concatenation"``.
        spatial_dims: 1, 2 or 3.

    The normaliser turning f into the (N, L, M) attention weights (rows: positions i of the
    output, columns: the subsampled positions j) is ``gate``: a softmax over j, or a division
    by the number of positions j.

    Shape:
        - Input: ``(N, C, *spatial)``; output: same shape and dtype.
    """

    def __init__(
        self,
        channels: int,
        *,
        inter_channels: int | None = None,
        mode: str = "embedded_gaussian",
        sub_sample: bool = True,
        bn: bool = True,
        scale: bool | None = None,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__(channels, spatial_dims)
        owner = type(self).__name__
        check_choice(owner, "mode", mode, MODES)
        for option, flag in (("sub_sample", sub_sample), ("bn", bn)):
            if not isinstance(flag, bool):
                raise TypeError(f"{owner}: {option} must be a bool, got {type(flag).__name__}")
        if scale is None:
            scale = mode == "embedded_gaussian"
        elif not isinstance(scale, bool):
            raise TypeError(f"{owner}: scale must be a bool or None, got {type(scale).__name__}")
        if scale and mode == "concatenation":
            raise ValueError(
                f"{owner}: scale=True is not defined for mode='concatenation' (f is "
                f"ReLU(w_f^T [theta_i; phi_j]), not a dot product); pass scale=False or None"
            )
        if inter_channels is None:
            inter_channels = max(1, channels // 2)
        self.inter_channels = check_positive_int(owner, "inter_channels", inter_channels)
        self.mode = mode
        self.sub_sample = sub_sample
        self.scale = scale
        conv = conv_nd(spatial_dims)

        # theta / phi embeddings (the Gaussian mode compares the raw features).
        self.theta: nn.Module
        self.phi: nn.Module
        if mode == "gaussian":
            self.theta, self.phi = nn.Identity(), nn.Identity()
            dot_length = channels
        else:
            self.theta = conv(channels, self.inter_channels, 1)
            self.phi = conv(channels, self.inter_channels, 1)
            dot_length = self.inter_channels
        self.g = conv(channels, self.inter_channels, 1)
        self.pool: nn.Module = nn.Identity()
        if sub_sample:
            kernel = (2, (2, 2), (1, 2, 2))[spatial_dims - 1]
            max_pool = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)[spatial_dims - 1]
            self.pool = max_pool(kernel, stride=kernel, ceil_mode=True)

        self.pairwise: nn.Module
        if mode == "concatenation":
            self.pairwise = _ConcatAffinity(self.inter_channels, spatial_dims)
        else:
            self.pairwise = _DotProductAffinity(dot_length**-0.5 if scale else 1.0)
        self.gate: nn.Module = nn.Softmax(dim=-1) if mode in _SOFTMAX_MODES else _DivideByCount()

        self.out_conv = cast(_ConvNd, conv(self.inter_channels, channels, 1))  # W_z
        self.out_bn: nn.Module = batch_norm_nd(spatial_dims)(channels) if bn else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official init: convs normal(0, 0.01) with zero bias, BN scale and shift 0; with
        ``bn=False`` the W_z conv is zero-initialised instead, so the block starts as x."""
        for module in (self.theta, self.phi, self.g, self.out_conv):
            if isinstance(module, _ConvNd):
                nn.init.normal_(module.weight, std=_CONV_INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if isinstance(self.out_bn, nn.modules.batchnorm._BatchNorm):
            nn.init.zeros_(self.out_bn.weight)
            nn.init.zeros_(self.out_bn.bias)
        else:
            nn.init.zeros_(self.out_conv.weight)
            if self.out_conv.bias is not None:
                nn.init.zeros_(self.out_conv.bias)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The non-local response ``y`` before W_z, (N, inter_channels, *spatial)."""
        pooled = self.pool(x)
        theta = self.theta(x).flatten(2)  # (N, d, L)
        phi = self.phi(pooled).flatten(2)  # (N, d, M)
        g = self.g(pooled).flatten(2)  # (N, inner, M)
        weights = self.gate(self.pairwise(theta, phi))  # (N, L, M)
        y = torch.bmm(g, weights.transpose(1, 2))  # (N, inner, L)
        return y.reshape([x.shape[0], self.inter_channels] + list(x.shape[2:]))  # noqa: RUF005 (TorchScript: no * in lists)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.out_bn(self.out_conv(self.attention(x))) + x

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, inter_channels={self.inter_channels}, mode={self.mode!r}, "
            f"sub_sample={self.sub_sample}, scale={self.scale}"
        )
