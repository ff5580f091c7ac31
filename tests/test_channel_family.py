"""SE, ECA and the generic channel attention against references written from the papers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import convattn
from _reference import n_params, randomize, spatial_shape
from convattn.layers import ChannelAttention, ECAModule, SEModule
from convattn.layers._helpers import eca_kernel_size


def se_reference(x, w1, b1, w2, b2):
    """SE eqs. 2-4: z = GAP(x); s = sigmoid(W2 relu(W1 z)); y = x * s."""
    dims = tuple(range(2, x.dim()))
    z = x.mean(dims)
    s = torch.sigmoid(F.linear(F.relu(F.linear(z, w1, b1)), w2, b2))
    return x * s.reshape(*s.shape, *([1] * len(dims)))


def eca_reference(x, kernel):
    """ECA: y = x * sigmoid(w * GAP(x)) with w a zero-padded 1-D correlation across channels."""
    dims = tuple(range(2, x.dim()))
    z = x.mean(dims)  # (N, C)
    k = kernel.numel()
    pad = (k - 1) // 2
    padded = F.pad(z, (pad, pad))
    weights = torch.stack([(padded[:, c : c + k] * kernel).sum(1) for c in range(z.shape[1])], 1)
    s = torch.sigmoid(weights)
    return x * s.reshape(*s.shape, *([1] * len(dims)))


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_se_matches_reference(spatial_dims: int) -> None:
    module = randomize(SEModule(64, spatial_dims=spatial_dims)).double()
    x = torch.randn(3, 64, *spatial_shape(spatial_dims), dtype=torch.float64)
    expected = se_reference(
        x, module.fc1.weight, module.fc1.bias, module.fc2.weight, module.fc2.bias
    )
    torch.testing.assert_close(module(x), expected)


def test_se_hard_sigmoid_and_no_bias() -> None:
    module = randomize(SEModule(32, gate_layer="hard_sigmoid", bias=False, rd_channels=5)).double()
    x = torch.randn(2, 32, 4, 6, dtype=torch.float64)
    z = x.mean((2, 3))
    s = F.linear(F.relu(F.linear(z, module.fc1.weight)), module.fc2.weight)
    expected = x * torch.clamp(s / 6 + 0.5, 0, 1)[:, :, None, None]
    torch.testing.assert_close(module(x), expected)
    assert module.fc1.bias is None and module.fc1.out_features == 5


@pytest.mark.parametrize("channels", [64, 256, 2048])
def test_se_parameter_count(channels: int) -> None:
    r = channels // 16
    assert n_params(SEModule(channels)) == 2 * channels * r + r + channels


def test_se_rounding_options() -> None:
    assert SEModule(100).rd_channels == 6  # floor(100/16), the official C // r
    assert SEModule(100, rd_divisor=8).rd_channels == 8  # timm's make_divisible
    assert SEModule(100, rd_channels=13).rd_channels == 13


@pytest.mark.parametrize(
    ("channels", "k"), [(16, 3), (64, 3), (128, 5), (256, 5), (512, 5), (1024, 5), (2048, 7)]
)
def test_eca_adaptive_kernel_size(channels: int, k: int) -> None:
    # Worked by hand from t = int(|(log2 C + 1) / 2|), k = t if odd else t + 1.
    assert eca_kernel_size(channels) == k
    assert ECAModule(channels).kernel_size == k


def test_eca_kernel_size_formula_independent() -> None:
    for c in [3, 10, 100, 300, 5000]:
        t = int(abs((math.log(c, 2) + 1) / 2))
        assert ECAModule(c).kernel_size == (t if t % 2 else t + 1)


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
@pytest.mark.parametrize("kernel_size", [None, 3, 9])
def test_eca_matches_reference(spatial_dims: int, kernel_size: int | None) -> None:
    module = randomize(ECAModule(64, kernel_size=kernel_size, spatial_dims=spatial_dims)).double()
    x = torch.randn(2, 64, *spatial_shape(spatial_dims), dtype=torch.float64)
    expected = eca_reference(x, module.conv.weight.view(-1))
    torch.testing.assert_close(module(x), expected)


@pytest.mark.parametrize(("channels", "k"), [(64, 3), (256, 5), (2048, 7)])
def test_eca_parameter_count(channels: int, k: int) -> None:
    assert n_params(ECAModule(channels)) == k
    assert ECAModule(channels).conv.bias is None


def test_eca_rejects_even_kernel() -> None:
    with pytest.raises(ValueError, match="ECAModule: kernel_size must be odd"):
        ECAModule(64, kernel_size=4)


# --- the generic form -------------------------------------------------------------------


def test_generic_expresses_se() -> None:
    se = randomize(SEModule(48)).double()
    generic = ChannelAttention(48, pool="avg", excitation="mlp", rd_ratio=1 / 16).double()
    generic.load_state_dict(se.state_dict())
    x = torch.randn(2, 48, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(generic(x), se(x))


def test_generic_expresses_eca() -> None:
    eca = randomize(ECAModule(256)).double()
    generic = ChannelAttention(256, pool="avg", excitation="conv1d").double()
    generic.load_state_dict(eca.state_dict())
    x = torch.randn(2, 256, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(generic(x), eca(x))


@pytest.mark.parametrize("pool", ["avg", "max", "avg+max", "std"])
def test_generic_pools(pool: str) -> None:
    module = randomize(ChannelAttention(32, pool=pool, rd_channels=4)).double()
    x = torch.randn(2, 32, 5, 3, dtype=torch.float64)
    w1, b1, w2, b2 = module.fc1.weight, module.fc1.bias, module.fc2.weight, module.fc2.bias
    flat = x.flatten(2)
    descriptors = {
        "avg": [flat.sum(-1) / flat.shape[-1]],
        "max": [flat.max(-1).values],
        "avg+max": [flat.sum(-1) / flat.shape[-1], flat.max(-1).values],
        "std": [torch.sqrt(((flat - flat.mean(-1, keepdim=True)) ** 2).mean(-1) + 1e-5)],
    }[pool]
    logits = sum(F.linear(F.relu(F.linear(z, w1, b1)), w2, b2) for z in descriptors)
    expected = x * torch.sigmoid(logits)[:, :, None, None]
    torch.testing.assert_close(module(x), expected)


def test_generic_rejects_options_of_the_other_excitation() -> None:
    with pytest.raises(ValueError, match=r"ChannelAttention: option.*kernel_size"):
        ChannelAttention(32, excitation="mlp", kernel_size=3)
    with pytest.raises(ValueError, match=r"ChannelAttention: option.*rd_ratio"):
        ChannelAttention(32, excitation="conv1d", rd_ratio=0.5)
    with pytest.raises(ValueError, match="ChannelAttention: pool must be one of"):
        ChannelAttention(32, pool="median")
    with pytest.raises(ValueError, match="ChannelAttention: gate_layer"):
        ChannelAttention(32, gate_layer="softmax")


def test_create_passes_options() -> None:
    module = convattn.create("channel", 64, pool="max", excitation="conv1d", kernel_size=5)
    assert isinstance(module, ChannelAttention) and module.kernel_size == 5


def test_activation_option_errors_name_the_module() -> None:
    with pytest.raises(ValueError, match="SEModule: act_layer must be one of"):
        SEModule(32, act_layer="nope")
    with pytest.raises(
        TypeError, match=r"SEModule: act_layer class must be an nn\.Module subclass"
    ):
        SEModule(32, act_layer=int)  # type: ignore[arg-type]
    module = SEModule(32, act_layer=torch.nn.GELU)
    assert isinstance(module.act, torch.nn.GELU)
