"""Gather-Excite: numbers against functional references written from the paper's operators."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _reference import randomize
from convattn.layers.ge import GatherExcite
from convattn.registry import create, info

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def bn_eval(x: torch.Tensor, sd: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = sd[f"{key}.running_mean"].reshape(shape)
    std = torch.sqrt(sd[f"{key}.running_var"].reshape(shape) + 1e-5)
    return (x - mean) / std * sd[f"{key}.weight"].reshape(shape) + sd[f"{key}.bias"].reshape(shape)


def along(x: torch.Tensor, dim: int, matrix: torch.Tensor) -> torch.Tensor:
    """Apply ``matrix`` (out, in) along spatial dim ``dim`` of ``x``."""
    return torch.movedim(torch.tensordot(x, matrix.T.to(x.dtype), dims=([dim], [0])), -1, dim)


def window_mean_matrix(length: int, e: int) -> torch.Tensor:
    """Average over the window [o*e - (e-1), o*e + (e-1)], clipped to the map (GE-theta-minus)."""
    out = math.ceil(length / e)
    m = torch.zeros(out, length, dtype=torch.float64)
    for o in range(out):
        lo, hi = max(0, o * e - (e - 1)), min(length - 1, o * e + (e - 1))
        m[o, lo : hi + 1] = 1 / (hi - lo + 1)
    return m


def nearest_matrix(out: int, inp: int) -> torch.Tensor:
    """Nearest-neighbour resize: output position i reads input floor(i * inp / out)."""
    m = torch.zeros(out, inp, dtype=torch.float64)
    for i in range(out):
        m[i, (i * inp) // out] = 1
    return m


def upsample(g: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    for k, s in enumerate(size):
        g = along(g, 2 + k, nearest_matrix(s, g.shape[2 + k]))
    return g


def sigmoid(t: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + torch.exp(-t))


def plus_excite(g: torch.Tensor, sd: dict[str, torch.Tensor]) -> torch.Tensor:
    """ReLU -> 1x1 conv (C/16, bias) -> ReLU -> 1x1 conv (C, bias), per position."""
    t = torch.relu(g).movedim(1, -1)
    t = torch.relu(t @ sd["excite.1.weight"].flatten(1).T + sd["excite.1.bias"])
    t = t @ sd["excite.3.weight"].flatten(1).T + sd["excite.3.bias"]
    return t.movedim(-1, 1)


# --------------------------------------------------------------------------- GE-theta-minus


@pytest.mark.parametrize("spatial_dims,size", [(1, (6,)), (2, (5, 9)), (3, (2, 3, 4))])
def test_minus_global_matches_reference(spatial_dims: int, size: tuple[int, ...]) -> None:
    module = create("ge_minus", 16, spatial_dims=spatial_dims)
    x = torch.randn(2, 16, *size, dtype=torch.float64)
    gate = sigmoid(x.flatten(2).mean(-1)).reshape(2, 16, *([1] * spatial_dims))
    torch.testing.assert_close(module(x), x * gate)


@pytest.mark.parametrize("extent", [2, 4, 8])
@pytest.mark.parametrize("size", [(7, 7), (5, 9), (1, 1), (16, 12)])
def test_minus_extent_matches_reference(extent: int, size: tuple[int, int]) -> None:
    module = GatherExcite(8, variant="minus", extent=extent)
    x = torch.randn(2, 8, *size, dtype=torch.float64)
    g = x
    for k, s in enumerate(size):
        g = along(g, 2 + k, window_mean_matrix(s, extent))
    torch.testing.assert_close(module(x), x * sigmoid(upsample(g, size)))


@pytest.mark.parametrize("spatial_dims,size", [(1, (9,)), (3, (3, 5, 4))])
def test_minus_extent_other_dims(spatial_dims: int, size: tuple[int, ...]) -> None:
    module = GatherExcite(8, variant="minus", extent=2, spatial_dims=spatial_dims)
    x = torch.randn(1, 8, *size, dtype=torch.float64)
    g = x
    for k, s in enumerate(size):
        g = along(g, 2 + k, window_mean_matrix(s, 2))
    torch.testing.assert_close(module(x), x * sigmoid(upsample(g, size)))


@pytest.mark.parametrize("extent", [0, 2, 8])
@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_minus_has_no_parameters(extent: int, spatial_dims: int) -> None:
    module = create("ge_minus", 2048, extent=extent, spatial_dims=spatial_dims)
    assert sum(p.numel() for p in module.parameters()) == 0


# --------------------------------------------------------------------------- GE-theta (global)


def theta_global_reference(
    x: torch.Tensor, sd: dict[str, torch.Tensor], kernel: torch.Tensor | None = None
) -> torch.Tensor:
    """Official GE-theta: depth-wise conv with a map-sized kernel (no bias) + BN + sigmoid."""
    c, d = x.shape[1], x.dim() - 2
    weight = sd["gather_weight"] if kernel is None else kernel
    g = CONV[d](x, weight, groups=c)  # (N, C, 1, ..., 1)
    return bn_eval(g, sd, "gather_bn")


@pytest.mark.parametrize("spatial_dims,size", [(1, (7,)), (2, (7, 7)), (2, (5, 9)), (3, (3, 4, 2))])
def test_theta_global_matches_official_conv(spatial_dims: int, size: tuple[int, ...]) -> None:
    module = GatherExcite(16, feat_size=size, spatial_dims=spatial_dims)
    module = randomize(module, seed=0).double().eval()
    x = torch.randn(2, 16, *size, dtype=torch.float64)
    sd = module.state_dict()
    torch.testing.assert_close(module(x), x * sigmoid(theta_global_reference(x, sd)))


def test_theta_global_default_feat_size_and_batch_one() -> None:
    module = randomize(create("ge", 16), seed=0).double().eval()
    assert module.feat_size == (7, 7)
    x = torch.randn(1, 16, 7, 7, dtype=torch.float64)
    ref = x * sigmoid(theta_global_reference(x, module.state_dict()))
    torch.testing.assert_close(module(x), ref)


def test_theta_global_kernel_resampled_to_other_sizes() -> None:
    module = randomize(GatherExcite(16), seed=0).double().eval()
    sd = module.state_dict()
    w = sd["gather_weight"]  # (16, 1, 7, 7)
    # 14x14: each tap covers 2x2 positions, weights scaled by 49 / 196.
    x = torch.randn(2, 16, 14, 14, dtype=torch.float64)
    kernel = w.repeat_interleave(2, -1).repeat_interleave(2, -2) / 4
    ref = x * sigmoid(theta_global_reference(x, sd, kernel))
    torch.testing.assert_close(module(x), ref)
    # 1x1: the whole kernel collapses to its sum.
    x1 = torch.randn(1, 16, 1, 1, dtype=torch.float64)
    ref1 = x1 * sigmoid(theta_global_reference(x1, sd, w.sum((2, 3), keepdim=True)))
    torch.testing.assert_close(module(x1), ref1)
    # Any other size runs and keeps the shape.
    assert module(torch.randn(1, 16, 5, 9, dtype=torch.float64)).shape == (1, 16, 5, 9)


def test_theta_global_constant_map_invariance() -> None:
    module = randomize(GatherExcite(8), seed=0).double().eval()
    gathered = [
        module.gathered(torch.full((1, 8, s, s), 0.7, dtype=torch.float64)) for s in (1, 7, 14)
    ]
    torch.testing.assert_close(gathered[0], gathered[1])
    torch.testing.assert_close(gathered[2], gathered[1])


# --------------------------------------------------------------------------- GE-theta (extent)


def theta_extent_reference(
    x: torch.Tensor, sd: dict[str, torch.Tensor], extent: int
) -> torch.Tensor:
    c, d = x.shape[1], x.dim() - 2
    g = x
    num = int(math.log2(extent))
    for i in range(num):
        g = CONV[d](g, sd[f"gather.{3 * i}.weight"], stride=2, padding=1, groups=c)
        g = bn_eval(g, sd, f"gather.{3 * i + 1}")
        if i != num - 1:
            g = torch.relu(g)
    return g


@pytest.mark.parametrize("extent", [2, 4, 8])
@pytest.mark.parametrize("size", [(7, 7), (5, 9), (1, 1)])
def test_theta_extent_matches_reference(extent: int, size: tuple[int, int]) -> None:
    module = randomize(GatherExcite(8, extent=extent), seed=0).double().eval()
    x = torch.randn(2, 8, *size, dtype=torch.float64)
    g = theta_extent_reference(x, module.state_dict(), extent)
    torch.testing.assert_close(module(x), x * sigmoid(upsample(g, size)))


@pytest.mark.parametrize("spatial_dims,size", [(1, (11,)), (3, (4, 5, 3))])
def test_theta_extent_other_dims(spatial_dims: int, size: tuple[int, ...]) -> None:
    module = GatherExcite(8, extent=4, spatial_dims=spatial_dims)
    module = randomize(module, seed=0).double().eval()
    x = torch.randn(1, 8, *size, dtype=torch.float64)
    g = theta_extent_reference(x, module.state_dict(), 4)
    torch.testing.assert_close(module(x), x * sigmoid(upsample(g, size)))


# --------------------------------------------------------------------------- GE-theta-plus


@pytest.mark.parametrize("spatial_dims,size", [(1, (6,)), (2, (6, 4)), (3, (2, 3, 2))])
def test_plus_global_matches_reference(spatial_dims: int, size: tuple[int, ...]) -> None:
    module = create("ge_plus", 32, feat_size=size, spatial_dims=spatial_dims)
    module = randomize(module, seed=0).double().eval()
    x = torch.randn(2, 32, *size, dtype=torch.float64)
    sd = module.state_dict()
    g = plus_excite(theta_global_reference(x, sd), sd)
    torch.testing.assert_close(module(x), x * sigmoid(g))


def test_plus_extent_matches_reference() -> None:
    module = randomize(create("ge_plus", 32, extent=2), seed=0).double().eval()
    x = torch.randn(2, 32, 5, 9, dtype=torch.float64)
    sd = module.state_dict()
    g = plus_excite(theta_extent_reference(x, sd, 2), sd)
    torch.testing.assert_close(module(x), x * sigmoid(upsample(g, (5, 9))))


def test_train_mode_uses_batch_statistics() -> None:
    module = randomize(GatherExcite(8, feat_size=4), seed=0).double().train()
    x = torch.randn(4, 8, 4, 4, dtype=torch.float64)
    g = F.conv2d(x, module.gather_weight.detach(), groups=8)
    g = (g - g.mean(0, keepdim=True)) / torch.sqrt(g.var(0, correction=0, keepdim=True) + 1e-5)
    bn = module.gather_bn
    g = g * bn.weight.detach().reshape(1, -1, 1, 1) + bn.bias.detach().reshape(1, -1, 1, 1)
    torch.testing.assert_close(module(x), x * sigmoid(g))


# --------------------------------------------------------------------------- counts, init, errors


def ge_params(c: int, *, variant: str = "theta", feat: int = 49, extent: int = 0) -> int:
    if variant == "minus":
        return 0
    gather = c * feat + 2 * c if extent == 0 else int(math.log2(extent)) * (9 * c + 2 * c)
    p = c // 16
    excite = (c * p + p) + (p * c + c) if variant == "plus" else 0
    return gather + excite


@pytest.mark.parametrize("channels", [64, 256, 2048])
def test_param_counts(channels: int) -> None:
    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    assert count(create("ge", channels)) == ge_params(channels)
    assert count(create("ge_plus", channels)) == ge_params(channels, variant="plus")
    assert count(create("ge_minus", channels)) == 0
    # The official ResNet-50 stage-2 module: kernel 56x56.
    official = create("ge", channels, feat_size=56)
    assert count(official) == ge_params(channels, feat=56 * 56)
    assert count(create("ge", channels, extent=8)) == ge_params(channels, extent=8)
    assert count(create("ge_plus", channels, extent=4)) == ge_params(
        channels, variant="plus", extent=4
    )


def test_param_count_values() -> None:
    assert ge_params(256) == 13056
    assert ge_params(256, feat=56 * 56) == 803328
    assert ge_params(256, variant="plus") == 21520


def test_official_init() -> None:
    torch.manual_seed(0)
    module = create("ge_plus", 2048)
    for i in (1, 3):
        conv = module.excite[i]
        assert torch.count_nonzero(conv.bias) == 0
        assert abs(conv.weight.std().item() - 0.01) < 0.001
    # msra: std = sqrt(2 / fan_in), fan_in = 7 * 7 for the depth-wise kernel
    assert abs(module.gather_weight.std().item() - (2 / 49) ** 0.5) < 0.02
    assert module.rd_channels == 128


def test_gate_hook_has_input_size_with_extent() -> None:
    module = GatherExcite(8, variant="minus", extent=4)
    seen: list[torch.Tensor] = []
    module.gate.register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.randn(1, 8, 9, 6)
    torch.testing.assert_close(module(x), x * seen[0])
    assert seen[0].shape == x.shape


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"^GatherExcite: variant"):
        GatherExcite(64, variant="theta+")
    for extent in (1, 3, 6, -2):
        with pytest.raises(ValueError, match=r"^GatherExcite: extent"):
            GatherExcite(64, extent=extent)
    with pytest.raises(ValueError, match=r"^GatherExcite: feat_size only applies"):
        GatherExcite(64, variant="minus", feat_size=7)
    with pytest.raises(ValueError, match=r"^GatherExcite: feat_size only applies"):
        GatherExcite(64, extent=2, feat_size=7)
    with pytest.raises(ValueError, match=r"^GatherExcite: feat_size must be"):
        GatherExcite(64, feat_size=(7, 7, 7))
    with pytest.raises(ValueError, match=r"^GatherExcite: rd_ratio / rd_channels"):
        GatherExcite(64, rd_ratio=0.25)
    with pytest.raises(TypeError, match=r"fixed to 'plus'"):
        create("ge_plus", 64, variant="theta")
    with pytest.raises(ValueError, match=r"^GatherExcite: expected 64 channels"):
        GatherExcite(64)(torch.randn(1, 32, 7, 7))


def test_registry_entries() -> None:
    assert info("ge").cls is GatherExcite and info("ge").defaults["variant"] == "theta"
    assert info("ge_minus").defaults["variant"] == "minus"
    assert info("ge_plus").defaults["variant"] == "plus"
    assert info("ge").arxiv == "1810.12348"
