"""SimAM (parameter-free energy attention): numbers against the paper's closed form, 1x1 maps,
no parameters."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from convattn.layers.simam import SimAM
from convattn.registry import create, info

torch.manual_seed(0)


def reference_simam(x: torch.Tensor, e_lambda: float) -> torch.Tensor:
    """E_inv = (t - mu)^2 / (4 (sigma^2 + lambda)) + 1/2 with sigma^2 = sum (t - mu)^2 / (M - 1)."""
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1)
    positions = flat.shape[-1]
    mu = flat.sum(-1, keepdim=True) / positions
    d = (flat - mu) ** 2
    var = d.sum(-1, keepdim=True) / (positions - 1)
    e_inv = d / (4 * (var + e_lambda)) + 0.5
    return (flat / (1 + torch.exp(-e_inv))).reshape(x.shape)


@pytest.mark.parametrize("e_lambda", [1e-4, 0.1])
@pytest.mark.parametrize(
    ("spatial_dims", "shape"),
    [(1, (2, 8, 13)), (2, (2, 8, 5, 7)), (3, (2, 8, 3, 4, 5)), (2, (1, 8, 1, 2))],
)
def test_matches_reference(e_lambda: float, spatial_dims: int, shape: tuple[int, ...]) -> None:
    module = SimAM(8, e_lambda=e_lambda, spatial_dims=spatial_dims)
    x = torch.randn(shape, dtype=torch.float64) * 1.5 + 0.2
    torch.testing.assert_close(module(x), reference_simam(x, e_lambda))


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_single_position_is_finite(spatial_dims: int) -> None:
    # n = M - 1 = 0 there: convattn divides by 1 instead, so v = 0 and E_inv = 1/2.
    module = SimAM(8, spatial_dims=spatial_dims)
    x = torch.randn((2, 8) + (1,) * spatial_dims, dtype=torch.float64)
    y = module(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, x / (1 + math.exp(-0.5)))


@pytest.mark.parametrize("channels", [64, 256, 2048])
def test_no_parameters(channels: int) -> None:
    module = create("simam", channels)
    assert sum(p.numel() for p in module.parameters()) == 0
    assert len(module.state_dict()) == 0


def test_default_lambda_is_official() -> None:
    assert SimAM(4).e_lambda == 1e-4
    assert info("simam").defaults == {"e_lambda": 1e-4, "spatial_dims": 2}


def test_gate_hook_sees_neuron_weights() -> None:
    module = SimAM(4)
    assert isinstance(module.gate, nn.Sigmoid)
    seen: list[torch.Tensor] = []
    module.gate.register_forward_hook(lambda _m, _i, out: seen.append(out))
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    y = module(x)
    assert seen[0].shape == x.shape
    torch.testing.assert_close(y, x * seen[0])


def test_gradient() -> None:
    x = torch.randn(1, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SimAM(3), (x,))


def test_bad_options_and_input() -> None:
    with pytest.raises(ValueError, match=r"^SimAM: e_lambda"):
        SimAM(4, e_lambda=0)
    with pytest.raises(ValueError, match=r"^SimAM: e_lambda"):
        SimAM(4, e_lambda="big")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^SimAM: expected 4 channels"):
        SimAM(4)(torch.randn(1, 5, 3, 3))
    with pytest.raises(ValueError, match=r"^SimAM: expected a 5-D input"):
        SimAM(4, spatial_dims=3)(torch.randn(1, 4, 3, 3))


def test_registry_entry() -> None:
    spec = info("simam")
    assert spec.cls is SimAM and spec.kind == "hybrid" and spec.arxiv == ""
    assert any("0.1" in d for d in spec.differences)
