"""SGE against a reference written from the paper's equations."""

from __future__ import annotations

import math

import pytest
import torch

from convattn import registry
from convattn.layers.sge import SpatialGroupEnhance


def sge_reference(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    n, c = x.shape[:2]
    groups = gamma.numel()
    m = math.prod(x.shape[2:])
    xg = x.reshape(n, groups, c // groups, m)
    g = xg.mean(dim=3, keepdim=True)  # the group's global average feature
    similarity = (xg * g).sum(dim=2)  # c_i = g . x_i, (n, G, m)
    mu = similarity.mean(dim=2, keepdim=True)
    sigma = torch.sqrt(((similarity - mu) ** 2).sum(dim=2, keepdim=True) / (m - 1))
    normalised = (similarity - mu) / (sigma + 1e-5)
    a = normalised * gamma.reshape(1, groups, 1) + beta.reshape(1, groups, 1)
    return (xg * torch.sigmoid(a)[:, :, None, :]).reshape(x.shape)


@pytest.mark.parametrize(
    ("channels", "groups", "spatial"),
    [
        (64, 64, (5, 7)),
        (128, 64, (4, 3)),
        (8, 4, (9,)),
        (12, 3, (3, 4, 2)),
        (6, 1, (2, 5)),
    ],
)
def test_matches_reference(channels: int, groups: int, spatial: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    module = SpatialGroupEnhance(channels, groups=groups, spatial_dims=len(spatial)).double()
    with torch.no_grad():
        module.weight.normal_()
        module.bias.normal_()
    x = torch.randn(2, channels, *spatial, dtype=torch.float64)
    torch.testing.assert_close(module(x), sge_reference(x, module.weight, module.bias))


@pytest.mark.parametrize("spatial", [(6,), (4, 5), (2, 3, 4)])
def test_initial_gate_is_sigmoid_one(spatial: tuple[int, ...]) -> None:
    """gamma = 0 and beta = 1 at init, as in the official code: y = x * sigmoid(1)."""
    module = SpatialGroupEnhance(64, spatial_dims=len(spatial))
    assert torch.equal(module.weight, torch.zeros((1, 64) + (1,) * len(spatial)))
    assert torch.equal(module.bias, torch.ones((1, 64) + (1,) * len(spatial)))
    x = torch.randn(2, 64, *spatial)
    torch.testing.assert_close(module(x), x * torch.sigmoid(torch.tensor(1.0)))


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_single_position_is_finite(spatial_dims: int) -> None:
    """One position: the normalised similarity is 0, so the gate is sigmoid(beta) (the
    official code returns NaN here)."""
    module = SpatialGroupEnhance(8, groups=4, spatial_dims=spatial_dims).train()
    with torch.no_grad():
        module.weight.normal_()
        module.bias.normal_()
    x = torch.randn((2, 8) + (1,) * spatial_dims, requires_grad=True)
    y = module(x)
    beta = module.bias.reshape(1, 4, 1).repeat_interleave(2, dim=1)
    expected = x * torch.sigmoid(beta).reshape((1, 8) + (1,) * spatial_dims)
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_gate_is_hookable() -> None:
    module = SpatialGroupEnhance(16, groups=4)
    seen = []
    module.gate.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    module(torch.randn(2, 16, 5, 6))
    assert seen == [(2, 4, 5, 6)]


@pytest.mark.parametrize("channels", [64, 256, 2048])
def test_param_count(channels: int) -> None:
    groups = 64
    closed_form = 2 * groups  # one (gamma, beta) pair per group, independent of C
    assert sum(p.numel() for p in SpatialGroupEnhance(channels).parameters()) == closed_form
    assert registry.count_params("sge", channels) == 128


def test_defaults_and_registry() -> None:
    spec = registry.info("sge")
    assert spec.cls is SpatialGroupEnhance
    assert spec.kind == "spatial"
    assert spec.spatial_dims == (1, 2, 3)
    assert spec.defaults == {"groups": 64, "spatial_dims": 2}


def test_bad_options() -> None:
    with pytest.raises(ValueError, match=r"^SpatialGroupEnhance: channels must be divisible"):
        SpatialGroupEnhance(96)
    with pytest.raises(ValueError, match=r"^SpatialGroupEnhance: channels must be divisible"):
        SpatialGroupEnhance(32)
    with pytest.raises(TypeError, match=r"^SpatialGroupEnhance: groups must be an int"):
        SpatialGroupEnhance(64, groups=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^SpatialGroupEnhance: expected 64 channels"):
        SpatialGroupEnhance(64)(torch.randn(1, 32, 3, 3))
