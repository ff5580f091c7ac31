"""SRM (style-based recalibration): numbers against the paper's equations, init, sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convattn.layers.srm import SRM
from convattn.registry import create, info

torch.manual_seed(0)


def _randomise(module: SRM) -> SRM:
    """Non-trivial weights and BN statistics, float64."""
    module = module.double()
    channels = module.channels
    with torch.no_grad():
        module.cfc.copy_(torch.randn(channels, 2, dtype=torch.float64))
        module.bn.weight.copy_(torch.rand(channels, dtype=torch.float64) + 0.5)
        module.bn.bias.copy_(torch.randn(channels, dtype=torch.float64))
        module.bn.running_mean.copy_(torch.randn(channels, dtype=torch.float64))
        module.bn.running_var.copy_(torch.rand(channels, dtype=torch.float64) + 0.5)
    return module


def reference_srm(x: torch.Tensor, module: SRM, training: bool = False) -> torch.Tensor:
    """SRM from the paper: style pooling [mean, std], channel-wise FC, BN, sigmoid, multiply."""
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1)
    positions = flat.shape[-1]
    mean = flat.sum(-1) / positions
    squares = ((flat - mean[..., None]) ** 2).sum(-1)
    var = squares / (positions - 1) if positions > 1 else squares / positions
    std = torch.sqrt(var + 1e-5)
    w = module.cfc.detach().clone()
    z = mean * w[:, 0] + std * w[:, 1]
    bn = module.bn
    running_mean = bn.running_mean.clone()
    running_var = bn.running_var.clone()
    z_hat = F.batch_norm(
        z,
        running_mean,
        running_var,
        bn.weight.detach(),
        bn.bias.detach(),
        training=training,
        momentum=0.1,
        eps=1e-5,
    )
    g = 1 / (1 + torch.exp(-z_hat))
    return x * g.reshape(n, c, *([1] * (x.dim() - 2)))


@pytest.mark.parametrize(
    ("spatial_dims", "shape"),
    [(1, (3, 16, 11)), (2, (3, 16, 5, 7)), (3, (2, 16, 3, 4, 5)), (2, (1, 16, 6, 6))],
)
def test_matches_reference_eval(spatial_dims: int, shape: tuple[int, ...]) -> None:
    module = _randomise(SRM(16, spatial_dims=spatial_dims)).eval()
    x = torch.randn(shape, dtype=torch.float64) * 2 + 0.3
    torch.testing.assert_close(module(x), reference_srm(x, module))


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_matches_reference_train(spatial_dims: int) -> None:
    module = _randomise(SRM(8, spatial_dims=spatial_dims)).train()
    x = torch.randn((4, 8) + (5,) * spatial_dims, dtype=torch.float64)
    expected = reference_srm(x, module, training=True)
    torch.testing.assert_close(module(x), expected)


def test_one_position_uses_population_variance() -> None:
    module = _randomise(SRM(8)).eval()
    x = torch.randn(2, 8, 1, 1, dtype=torch.float64)
    y = module(x)
    assert torch.isfinite(y).all()
    # population variance of one value is 0: std = sqrt(1e-5)
    torch.testing.assert_close(y, reference_srm(x, module))
    assert torch.isfinite(SRM(8, spatial_dims=1).eval()(torch.randn(1, 8, 1))).all()


def test_init_follows_official() -> None:
    module = SRM(32)
    assert torch.equal(module.cfc, torch.zeros(32, 2))
    assert torch.equal(module.bn.weight, torch.ones(32))
    assert torch.equal(module.bn.bias, torch.zeros(32))
    assert isinstance(module.gate, nn.Sigmoid)
    # z = 0 at init, BN with fresh statistics maps it to 0: every gate is sigmoid(0) = 1/2.
    x = torch.randn(2, 32, 4, 4)
    torch.testing.assert_close(module.eval()(x), x * 0.5)


def test_state_dict_matches_official_keys() -> None:
    keys = set(SRM(16).state_dict())
    assert keys == {
        "cfc",
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
    }


@pytest.mark.parametrize("channels", [64, 256, 2048])
def test_param_count(channels: int) -> None:
    cfc = channels * 2  # (C, 2) channel-wise FC, no bias
    bn = 2 * channels  # BN weight and bias
    module = create("srm", channels)
    assert sum(p.numel() for p in module.parameters()) == cfc + bn


def test_gate_hook_sees_channel_weights() -> None:
    module = _randomise(SRM(8)).eval()
    seen: list[torch.Tensor] = []
    module.gate.register_forward_hook(lambda _m, _i, out: seen.append(out))
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    y = module(x)
    assert seen[0].shape == (2, 8)
    torch.testing.assert_close(y, x * seen[0][:, :, None, None])


def test_bad_input() -> None:
    module = SRM(8)
    with pytest.raises(ValueError, match=r"^SRM: expected 8 channels"):
        module(torch.randn(1, 4, 3, 3))
    with pytest.raises(ValueError, match=r"^SRM: expected a 4-D input"):
        module(torch.randn(1, 8, 3))
    with pytest.raises(ValueError, match=r"^SRM: spatial_dims"):
        SRM(8, spatial_dims=4)


def test_registry_entry() -> None:
    spec = info("srm")
    assert spec.cls is SRM and spec.kind == "channel" and spec.arxiv == "1903.10829"
    assert any("population variance" in d for d in spec.differences)
