"""FcaNet (multi-spectral channel attention): DCT basis values, frequency tables, numbers
against the official recipe (adaptive average pooling to the DCT grid, then the basis) at any
map size, parameter counts."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convattn.layers.fca import MultiSpectralAttention, frequency_indices
from convattn.registry import create, info

torch.manual_seed(0)

# The 16 best frequencies (u along H, v along W) of the paper's 7x7 ablation, 'top16'.
TOP16 = [
    (0, 0), (0, 1), (6, 0), (0, 5), (0, 2), (1, 0), (1, 2), (4, 0),
    (5, 0), (1, 6), (3, 0), (0, 4), (0, 6), (0, 3), (3, 5), (2, 2),
]  # fmt: skip


@contextlib.contextmanager
def float64_default() -> Iterator[None]:
    """Build modules in float64 so the basis buffer is computed without float32 rounding."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def make(channels: int, **options: Any) -> MultiSpectralAttention:
    with float64_default():
        module = MultiSpectralAttention(channels, **options)
    with torch.no_grad():
        module.fc1.weight.copy_(torch.randn_like(module.fc1.weight) * 0.3)
        module.fc2.weight.copy_(torch.randn_like(module.fc2.weight) * 0.3)
    return module.eval()


def dct_value(u: int, v: int, h: int, w: int, height: int, width: int) -> float:
    """Orthonormal 2-D DCT-II basis: cos(pi u (h + 1/2) / H) cos(pi v (w + 1/2) / W) with the
    official scaling sqrt(1/H) for u = 0, sqrt(2/H) otherwise (likewise for v, W)."""
    scale_u = math.sqrt((1 if u == 0 else 2) / height)
    scale_v = math.sqrt((1 if v == 0 else 2) / width)
    return (
        scale_u
        * scale_v
        * math.cos(math.pi * u * (h + 0.5) / height)
        * math.cos(math.pi * v * (w + 0.5) / width)
    )


def reference_basis(freqs: list[tuple[int, int]], height: int, width: int) -> torch.Tensor:
    return torch.tensor(
        [
            [[dct_value(u, v, h, w, height, width) for w in range(width)] for h in range(height)]
            for u, v in freqs
        ],
        dtype=torch.float64,
    )


def reference_fca(x: torch.Tensor, module: MultiSpectralAttention) -> torch.Tensor:
    """The official recipe: adaptive average pooling to the DCT grid when the size differs,
    channel group i weighted by basis i and summed, FC -> ReLU -> FC (no biases) -> sigmoid."""
    _, c, height, width = x.shape
    grid_h, grid_w = module.dct_size
    pooled = (
        x if (height, width) == (grid_h, grid_w) else F.adaptive_avg_pool2d(x, (grid_h, grid_w))
    )
    basis = reference_basis(module.frequencies, grid_h, grid_w)  # (F, H, W)
    per_channel = basis.repeat_interleave(c // len(module.frequencies), dim=0)  # (C, H, W)
    descriptor = (pooled * per_channel).sum((2, 3))
    hidden = F.relu(descriptor @ module.fc1.weight.detach().T)
    weights = torch.sigmoid(hidden @ module.fc2.weight.detach().T)
    return x * weights[:, :, None, None]


def test_top16_table() -> None:
    assert frequency_indices("top16") == TOP16
    assert frequency_indices("top1") == [(0, 0)]
    assert frequency_indices("low4") == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert frequency_indices("bot2") == [(6, 6), (1, 4)]
    for method in ("top32", "low32", "bot32"):
        pairs = frequency_indices(method)
        assert len(pairs) == len(set(pairs)) == 32
        assert all(0 <= u < 7 and 0 <= v < 7 for u, v in pairs)


@pytest.mark.parametrize(
    ("dct_size", "grid", "scale"),
    [(7, (7, 7), (1, 1)), (14, (14, 14), (2, 2)), ((7, 15), (7, 15), (1, 2))],
)
def test_dct_basis_values(dct_size: Any, grid: tuple[int, int], scale: tuple[int, int]) -> None:
    module = make(32, dct_size=dct_size)
    expected_freqs = [(u * scale[0], v * scale[1]) for u, v in TOP16]
    assert module.frequencies == expected_freqs
    assert module.dct_basis.shape == (16, *grid)
    torch.testing.assert_close(module.dct_basis, reference_basis(expected_freqs, *grid))
    # an orthonormal basis: distinct frequencies are orthogonal, each has unit norm
    flat = module.dct_basis.reshape(16, -1)
    torch.testing.assert_close(flat @ flat.T, torch.eye(16, dtype=torch.float64))


def test_basis_is_a_fixed_non_persistent_buffer() -> None:
    module = create("fca", 64)
    assert "dct_basis" in dict(module.named_buffers())
    assert set(module.state_dict()) == {"fc1.weight", "fc2.weight"}
    assert not module.dct_basis.requires_grad


@pytest.mark.parametrize(
    ("options", "size"),
    [
        ({}, (7, 7)),  # the grid size: the basis as is
        ({}, (14, 14)),  # larger: pooled 2x2
        ({}, (9, 5)),  # non-square, uneven bins
        ({}, (3, 2)),  # smaller than the grid: bins repeat
        ({}, (1, 1)),
        ({"dct_size": 14}, (28, 28)),
        ({"dct_size": 14}, (14, 14)),
        ({"dct_size": (7, 14), "freq_sel_method": "low8"}, (10, 21)),
        ({"freq_sel_method": "bot4", "rd_ratio": 1 / 4}, (7, 7)),
        ({"freq_sel_method": "top32", "rd_channels": 5}, (8, 6)),
    ],
)
def test_matches_official_recipe(options: dict[str, Any], size: tuple[int, int]) -> None:
    module = make(64, **options)
    x = torch.randn(2, 64, *size, dtype=torch.float64)
    torch.testing.assert_close(module(x), reference_fca(x, module))


def test_train_mode_and_batch_one() -> None:
    module = make(32).train()
    x = torch.randn(1, 32, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(module(x), reference_fca(x, module))


def test_gate_hook_and_defaults() -> None:
    module = make(32)
    assert isinstance(module.gate, nn.Sigmoid)
    assert module.fc1.bias is None and module.fc2.bias is None
    assert module.rd_channels == 2  # 32 // 16
    seen: list[torch.Tensor] = []
    module.gate.register_forward_hook(lambda _m, _i, out: seen.append(out))
    x = torch.randn(2, 32, 7, 7, dtype=torch.float64)
    y = module(x)
    assert seen[0].shape == (2, 32)
    torch.testing.assert_close(y, x * seen[0][:, :, None, None])
    assert info("fca").defaults == {
        "dct_size": 7,
        "freq_sel_method": "top16",
        "rd_ratio": 1 / 16,
        "rd_channels": None,
        "spatial_dims": 2,
    }


@pytest.mark.parametrize("channels", [64, 256, 2048])
def test_param_count(channels: int) -> None:
    hidden = channels // 16
    expected = channels * hidden + hidden * channels  # two FCs without biases
    module = create("fca", channels)
    assert sum(p.numel() for p in module.parameters()) == expected


def test_bad_options_and_input() -> None:
    with pytest.raises(ValueError, match=r"^MultiSpectralAttention: channels must be divisible"):
        MultiSpectralAttention(24)
    with pytest.raises(ValueError, match=r"^MultiSpectralAttention: dct_size must be at least 7"):
        MultiSpectralAttention(64, dct_size=5)
    with pytest.raises(ValueError, match=r"^MultiSpectralAttention: freq_sel_method"):
        MultiSpectralAttention(64, freq_sel_method="top3")
    with pytest.raises(ValueError, match=r"^MultiSpectralAttention: spatial_dims"):
        MultiSpectralAttention(64, spatial_dims=1)
    with pytest.raises(TypeError, match=r"^MultiSpectralAttention: dct_size"):
        MultiSpectralAttention(64, dct_size=7.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^MultiSpectralAttention: expected 64 channels"):
        MultiSpectralAttention(64)(torch.randn(1, 32, 7, 7))


def test_float32_module_on_float32_input() -> None:
    module = create("fca", 64).eval()
    x = torch.randn(2, 64, 10, 3)
    y = module(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
