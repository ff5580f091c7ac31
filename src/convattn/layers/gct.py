"""Gated Channel Transformation for Visual Recognition, Yang, Zhu, Wu and Yang, CVPR 2020.
https://arxiv.org/abs/1909.11519

Global context embedding: ``s_c = alpha_c * sqrt(sum_{h,w} x_c^2 + eps)`` (l2) or
``s_c = alpha_c * sum_{h,w} |x_c|`` (l1). Channel normalisation across the channels:
``s^_c = gamma_c * s_c / sqrt(mean_c(s^2) + eps)`` (l2) or ``gamma_c * s_c / (mean_c |s| + eps)``
(l1). Gating adaptation: ``y_c = x_c * (1 + tanh(s^_c + beta_c))``. With the official
initialisation ``alpha = 1``, ``gamma = 0``, ``beta = 0`` the gate is exactly 1 and the module is
the identity.
"""

from __future__ import annotations

import torch
from torch import nn

from convattn.layers._helpers import AttentionModule, at_least_float32, check_choice
from convattn.registry import register

__all__ = ["GCT"]

MODES = ("l2", "l1")


@register(
    "gct",
    kind="channel",
    paper="Gated Channel Transformation for Visual Recognition",
    year=2020,
    arxiv="1909.11519",
    placement="before every convolution of the network (stem and downsample convs included)",
    summary="alpha * l2-norm per channel -> normalise across channels (gamma) -> 1 + tanh(. + "
    "beta) -> multiply; identity at init",
    differences=(
        "Channel normalisation divides by sqrt(mean_c s^2 + eps) as the official code does; the "
        "paper writes sqrt(C) s / sqrt(sum_c s^2 + eps), which differs only in where eps sits.",
        "alpha, gamma and beta are (1, C, 1, ..., 1) parameters initialised to 1, 0, 0 as in the "
        "official code, so the state-dict keys and shapes match it for 2-D maps; the official "
        "option epsilon is called eps here.",
        "after_relu (skip the absolute value of l1 mode for non-negative inputs) is the official "
        "option; it is refused with mode='l2', where the official code ignores it.",
        "An unknown mode raises ValueError at construction (the official code exits at the "
        "first forward).",
    ),
)
class GCT(AttentionModule):
    """Gated channel transformation ``y = x * (1 + tanh(gamma * s / norm(s) + beta))``.

    Args:
        channels: C.
        mode: ``"l2"`` (default) or ``"l1"``: the norm of the global context embedding.
        eps: ``epsilon`` of the embedding and normalisation (1e-5).
        after_relu: l1 mode only: the input is known to be non-negative, so the embedding
            sums ``x`` instead of ``|x|`` (official option).
        spatial_dims: 1, 2 or 3.

    Attributes:
        alpha: embedding weights (init 1), shape (1, C, 1, ..., 1).
        gamma: gating weights (init 0), same shape.
        beta: gating biases (init 0), same shape.
        gate: the tanh; the applied multiplier is ``1 + gate(...)``.

    Shape:
        - Input: ``(N, C, *spatial)``; output: same shape and dtype.
    """

    def __init__(
        self,
        channels: int,
        *,
        mode: str = "l2",
        eps: float = 1e-5,
        after_relu: bool = False,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__(channels, spatial_dims)
        owner = type(self).__name__
        check_choice(owner, "mode", mode, MODES)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"{owner}: eps must be a positive number, got {eps!r}")
        if not isinstance(after_relu, bool):
            raise TypeError(f"{owner}: after_relu must be a bool, got {type(after_relu).__name__}")
        if after_relu and mode != "l1":
            raise ValueError(f"{owner}: after_relu applies to mode='l1' only, got mode={mode!r}")
        self.mode = mode
        self.eps = float(eps)
        self.after_relu = after_relu
        shape = (1, channels) + (1,) * spatial_dims
        self.alpha = nn.Parameter(torch.ones(shape))
        self.gamma = nn.Parameter(torch.zeros(shape))
        self.beta = nn.Parameter(torch.zeros(shape))
        self.gate = nn.Tanh()

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The multiplier ``1 + tanh(s^ + beta)`` in (0, 2), shape (N, C, 1, ..., 1)."""
        x = at_least_float32(x)  # the sums of squares overflow float16
        dims = list(range(2, x.dim()))
        if self.mode == "l2":
            embedding = torch.sqrt(x.pow(2).sum(dims, keepdim=True) + self.eps) * self.alpha
            norm = self.gamma / torch.sqrt(embedding.pow(2).mean(1, keepdim=True) + self.eps)
        else:
            magnitude = x if self.after_relu else x.abs()
            embedding = magnitude.sum(dims, keepdim=True) * self.alpha
            norm = self.gamma / (embedding.abs().mean(1, keepdim=True) + self.eps)
        return 1 + self.gate(embedding * norm + self.beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return x * self.attention(x).to(x.dtype)

    def extra_repr(self) -> str:
        extra = f", after_relu={self.after_relu}" if self.after_relu else ""
        return f"{super().extra_repr()}, mode={self.mode!r}, eps={self.eps:g}{extra}"
