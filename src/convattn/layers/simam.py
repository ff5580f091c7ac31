"""SimAM: A Simple, Parameter-Free Attention Module for Convolutional Neural Networks,
Yang, Zhang, Li and Xie, ICML 2021 (PMLR v139, pp. 11863-11874; no arXiv version).
https://proceedings.mlr.press/v139/yang21o.html

Every neuron gets its own weight from an energy function inspired by spatial suppression in
neuroscience. Per sample and channel, over the ``M = H W`` positions: ``mu = mean(x)``,
``d = (x - mu)^2``, ``v = sum(d) / n`` with ``n = M - 1``; the inverse of the minimal energy
is ``E_inv = d / (4 (v + lambda)) + 1/2``, and the output is
``y = x * sigmoid(E_inv)``. No parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from convattn.layers._helpers import AttentionModule, at_least_float32, spatial_numel
from convattn.registry import register

__all__ = ["SimAM"]


@register(
    "simam",
    kind="hybrid",
    paper="SimAM: A Simple, Parameter-Free Attention Module for Convolutional Neural Networks",
    year=2021,
    arxiv="",
    placement="after conv2 (the 3x3 conv), before bn2, in ImageNet ResNet bottlenecks and "
    "CIFAR basic blocks",
    summary="per-neuron energy d / (4 (var + lambda)) + 1/2 -> sigmoid -> multiply; no parameters",
    differences=(
        "e_lambda defaults to 1e-4 as in the official module; the ImageNet training commands "
        "in the official README pass 0.1, so pass e_lambda=0.1 to reproduce those models.",
        "On a map with a single position n = M - 1 = 0 and the official code divides 0 by 0 "
        "(NaN); convattn uses n = max(M - 1, 1) there, so v = 0 and every weight is "
        "sigmoid(1/2).",
        "The official module is written for 2-D maps; the same per-channel statistics over "
        "all spatial positions give the 1-D and 3-D versions.",
        "The paper has no arXiv version: the registry's arxiv field is empty and the "
        "docstring links the PMLR proceedings.",
    ),
)
class SimAM(AttentionModule):
    """Parameter-free attention ``y = x * sigmoid(d / (4 (v + lambda)) + 1/2)``.

    Args:
        channels: C (only used to check inputs; the module has no parameters).
        e_lambda: ``lambda`` of the energy function (1e-4 in the official code).
        spatial_dims: 1, 2 or 3.

    Attributes:
        gate: the sigmoid; its output is the per-neuron weight.

    Shape:
        - Input: ``(N, C, *spatial)``; output: same shape and dtype.
    """

    def __init__(self, channels: int, *, e_lambda: float = 1e-4, spatial_dims: int = 2) -> None:
        super().__init__(channels, spatial_dims)
        owner = type(self).__name__
        valid = isinstance(e_lambda, (int, float)) and not isinstance(e_lambda, bool)
        if not valid or not e_lambda > 0:
            raise ValueError(f"{owner}: e_lambda must be a positive number, got {e_lambda!r}")
        self.e_lambda = float(e_lambda)
        self.gate = nn.Sigmoid()

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Per-neuron weights in (0, 1), same shape as ``x``."""
        dims = list(range(2, x.dim()))
        # n = M - 1; a single position has no spread, so divide by 1 there (v = 0), not by 0.
        n = max(spatial_numel(x) - 1, 1)
        wide = at_least_float32(x)  # squared deviations overflow float16
        d = (wide - wide.mean(dims, keepdim=True)).pow(2)
        v = d.sum(dims, keepdim=True) / n
        return self.gate(d / (4 * (v + self.e_lambda)) + 0.5).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return x * self.attention(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, e_lambda={self.e_lambda:g}"
