"""Small helpers shared by the per-family reference tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def gc_transform(c: torch.Tensor, sd: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """GCNet's transform W_v2 ReLU(LN(W_v1 c)) on a (N, C) context, from the ``prefix``
    branch of a GlobalContext state dict; 1x1 convs written as matrix products."""
    w1 = sd[f"{prefix}.0.weight"].flatten(1)
    t = c @ w1.T + sd[f"{prefix}.0.bias"]
    mean = t.mean(1, keepdim=True)
    var = t.var(1, correction=0, keepdim=True)
    t = (t - mean) / torch.sqrt(var + 1e-5)
    t = t * sd[f"{prefix}.1.weight"].flatten() + sd[f"{prefix}.1.bias"].flatten()
    t = torch.relu(t)
    return t @ sd[f"{prefix}.3.weight"].flatten(1).T + sd[f"{prefix}.3.bias"]


def gc_reference(
    x: torch.Tensor, sd: dict[str, torch.Tensor], *, pooling: str, fusions: tuple[str, ...]
) -> torch.Tensor:
    """The GC block (GCNet eq. 4) from a GlobalContext state dict: softmax attention pooling
    ("att") or the mean, then the ``mul`` and / or ``add`` fusions."""
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1)  # (N, C, L)
    if pooling == "att":
        scores = torch.einsum("c,ncl->nl", sd["conv_mask.weight"].flatten(), flat)
        scores = scores + sd["conv_mask.bias"]
        weights = torch.exp(scores - scores.amax(1, keepdim=True))
        weights = weights / weights.sum(1, keepdim=True)  # a_j
        context = (flat * weights[:, None, :]).sum(-1)  # sum_j a_j x_j
    else:
        context = flat.mean(-1)
    expand = [n, c] + [1] * (x.dim() - 2)
    out = x
    if "mul" in fusions:
        out = out * (1 / (1 + torch.exp(-gc_transform(context, sd, "channel_mul_conv")))).reshape(
            expand
        )
    if "add" in fusions:
        out = out + gc_transform(context, sd, "channel_add_conv").reshape(expand)
    return out


def fast_path_model(name: str, attention: str | None, **options: object) -> nn.Module:
    """A reference backbone with ``attention`` in every block (sSE-like mechanisms at the
    block end) whose zero-initialised weights and BatchNorm affines are made random, so that
    every path of a fast-path comparison carries signal."""
    from convattn.models import create_model

    placement = "block_end" if attention in ("scse", "sse", "cse", "spatial") else None
    model = create_model(
        name, attention=attention, attention_options=options or None, placement=placement
    )
    torch.manual_seed(1)
    for param in model.parameters():
        if param.dim() > 1 and not param.abs().sum():
            nn.init.normal_(param, 0, 0.05)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
    return model


def assert_training_agrees(
    fast: nn.Module, direct: nn.Module, x: torch.Tensor, target: torch.Tensor
) -> None:
    """Two cross-entropy training steps of ``fast`` and ``direct`` (float64) give the same
    outputs, the same parameter gradients and the same running statistics (two steps, so
    that ``num_batches_tracked`` and the statistics evolve alike)."""
    for _ in range(2):
        outs = []
        for model in (fast, direct):
            model.train()
            model.zero_grad(set_to_none=True)
            out = model(x)
            F.cross_entropy(out, target).backward()
            outs.append(out)
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-12)
    for (name, p), (_, q) in zip(fast.named_parameters(), direct.named_parameters(), strict=True):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=name)
    for (name, a), (_, b) in zip(fast.named_buffers(), direct.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
