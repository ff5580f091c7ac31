"""GCT (gated channel transformation): numbers against the paper's equations, exact identity
at initialisation, options."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convattn.layers.gct import GCT
from convattn.registry import create, info

torch.manual_seed(0)


def _randomise(module: GCT) -> GCT:
    module = module.double()
    with torch.no_grad():
        module.alpha.copy_(torch.rand_like(module.alpha) + 0.5)
        module.gamma.copy_(torch.randn_like(module.gamma))
        module.beta.copy_(torch.randn_like(module.beta))
    return module


def reference_gct(
    x: torch.Tensor,
    alpha: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    mode: str,
    eps: float = 1e-5,
    after_relu: bool = False,
) -> torch.Tensor:
    """GCT from the equations, with per-channel parameters given as (C,) vectors."""
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1)
    if mode == "l2":
        s = alpha * torch.sqrt((flat * flat).sum(-1) + eps)  # (N, C)
        s_hat = gamma * s / torch.sqrt((s * s).sum(1, keepdim=True) / c + eps)
    else:
        magnitude = flat if after_relu else flat.abs()
        s = alpha * magnitude.sum(-1)
        s_hat = gamma * s / (s.abs().sum(1, keepdim=True) / c + eps)
    gate = 1 + torch.tanh(s_hat + beta)
    return x * gate.reshape(n, c, *([1] * (x.dim() - 2)))


def _vectors(module: GCT) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        module.alpha.detach().flatten(),
        module.gamma.detach().flatten(),
        module.beta.detach().flatten(),
    )


@pytest.mark.parametrize("mode", ["l2", "l1"])
@pytest.mark.parametrize(
    ("spatial_dims", "shape"),
    [(1, (2, 12, 9)), (2, (2, 12, 5, 7)), (3, (2, 12, 3, 4, 2)), (2, (1, 12, 1, 1))],
)
def test_matches_reference(mode: str, spatial_dims: int, shape: tuple[int, ...]) -> None:
    module = _randomise(GCT(12, mode=mode, spatial_dims=spatial_dims))
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(module(x), reference_gct(x, *_vectors(module), mode=mode))


def test_l1_after_relu_matches_reference() -> None:
    module = _randomise(GCT(12, mode="l1", after_relu=True))
    x = torch.relu(torch.randn(2, 12, 4, 5, dtype=torch.float64))
    expected = reference_gct(x, *_vectors(module), mode="l1", after_relu=True)
    torch.testing.assert_close(module(x), expected)
    # on non-negative input after_relu changes nothing
    plain = GCT(12, mode="l1").double()
    plain.load_state_dict(module.state_dict())
    torch.testing.assert_close(plain(x), module(x))


def test_eps_option_matches_reference() -> None:
    module = _randomise(GCT(6, eps=0.5))
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64) * 0.1
    torch.testing.assert_close(module(x), reference_gct(x, *_vectors(module), "l2", eps=0.5))


@pytest.mark.parametrize("mode", ["l2", "l1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_identity_at_init(mode: str, dtype: torch.dtype, spatial_dims: int) -> None:
    module = GCT(16, mode=mode, spatial_dims=spatial_dims).to(dtype)
    x = torch.randn((2, 16) + (4,) * spatial_dims, dtype=dtype) * 3
    for train in (True, False):
        y = module.train(train)(x)
        torch.testing.assert_close(y, x, rtol=0, atol=0)
        assert torch.equal(y, x)


def test_init_and_shapes_follow_official() -> None:
    module = GCT(8)
    assert module.alpha.shape == module.gamma.shape == module.beta.shape == (1, 8, 1, 1)
    assert torch.equal(module.alpha, torch.ones(1, 8, 1, 1))
    assert torch.equal(module.gamma, torch.zeros(1, 8, 1, 1))
    assert torch.equal(module.beta, torch.zeros(1, 8, 1, 1))
    assert set(module.state_dict()) == {"alpha", "gamma", "beta"}
    assert GCT(8, spatial_dims=3).alpha.shape == (1, 8, 1, 1, 1)
    assert isinstance(module.gate, nn.Tanh)


@pytest.mark.parametrize("channels", [64, 256, 2048])
def test_param_count(channels: int) -> None:
    expected = 3 * channels  # alpha, gamma, beta: one per channel each
    for mode in ("l2", "l1"):
        module = create("gct", channels, mode=mode)
        assert sum(p.numel() for p in module.parameters()) == expected


def test_gate_hook_sees_tanh() -> None:
    module = _randomise(GCT(8))
    seen: list[torch.Tensor] = []
    module.gate.register_forward_hook(lambda _m, _i, out: seen.append(out))
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    y = module(x)
    assert seen[0].shape == (2, 8, 1, 1)
    torch.testing.assert_close(y, x * (1 + seen[0]))


def test_bad_options_and_input() -> None:
    with pytest.raises(ValueError, match=r"^GCT: mode"):
        GCT(8, mode="l3")
    with pytest.raises(ValueError, match=r"^GCT: after_relu applies to mode='l1'"):
        GCT(8, after_relu=True)
    with pytest.raises(ValueError, match=r"^GCT: eps"):
        GCT(8, eps=0)
    with pytest.raises(ValueError, match=r"^GCT: expected 8 channels"):
        GCT(8)(torch.randn(1, 7, 3, 3))
    with pytest.raises(ValueError, match=r"^GCT: expected a 3-D input"):
        GCT(8, spatial_dims=1)(torch.randn(1, 8, 3, 3))


def test_registry_entry() -> None:
    spec = info("gct")
    assert spec.cls is GCT and spec.kind == "channel" and spec.arxiv == "1909.11519"
    assert spec.defaults == {"mode": "l2", "eps": 1e-5, "after_relu": False, "spatial_dims": 2}
