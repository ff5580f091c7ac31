"""Small helpers shared by the per-family reference tests."""

from __future__ import annotations

import torch
from torch import nn


def randomize(module: nn.Module, scale: float = 0.5, *, seed: int | None = None) -> nn.Module:
    """Give every parameter and BN running statistic a non-trivial random value, so that a
    reference that gets an index, a bias or a normalisation wrong cannot pass by luck. With
    ``seed`` the values come from their own generator, independent of the global RNG."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.3 * torch.randn(b.shape, generator=gen, dtype=b.dtype))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen, dtype=b.dtype))
    return module


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def spatial_shape(spatial_dims: int) -> tuple[int, ...]:
    return (7, 5, 4)[:spatial_dims]


def bn_eval(x: torch.Tensor, bn: nn.Module, channel_dim: int = 1) -> torch.Tensor:
    """BatchNorm with running statistics, written out: (x - mean) / sqrt(var + eps) * w + b."""
    shape = [1] * x.dim()
    shape[channel_dim] = -1
    mean = bn.running_mean.view(shape)
    var = bn.running_var.view(shape)
    out = (x - mean) / torch.sqrt(var + bn.eps)
    if bn.weight is not None:
        out = out * bn.weight.view(shape) + bn.bias.view(shape)
    return out
