"""The module contract of DESIGN.md, checked for every registered mechanism."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import convattn
from convattn.registry import info

NAMES = convattn.list_attention()
# Channel counts for mechanisms whose defaults need more than 64 channels.
CHANNELS = {"shuffle": 128}


def channels_for(name: str) -> int:
    return CHANNELS.get(name, 64)


def default_dims(name: str) -> int:
    dims = info(name).spatial_dims
    return 2 if 2 in dims else dims[0]


def expected_shape(name: str, module: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    spec = info(name)
    if spec.contract == "pool":
        return (x.shape[0], getattr(module, "out_dim", x.shape[1]))
    return tuple(x.shape)


NAME_DIMS = [(name, d) for name in NAMES for d in info(name).spatial_dims]


def sizes(spatial_dims: int, base: tuple[int, ...] = (6, 5, 4)) -> tuple[int, ...]:
    return base[:spatial_dims]


def test_registry_not_empty() -> None:
    core = {
        "se",
        "eca",
        "cbam",
        "cbam_channel",
        "cbam_spatial",
        "cse",
        "sse",
        "scse",
        "sk",
        "coord",
    }
    assert core | {"channel", "spatial"} <= set(NAMES)


@pytest.mark.parametrize(("name", "spatial_dims"), NAME_DIMS)
def test_shape_and_dtype(name: str, spatial_dims: int) -> None:
    c = channels_for(name)
    module = convattn.create(name, c, spatial_dims=spatial_dims).train()
    for dtype in (torch.float32, torch.float64):
        module = module.to(dtype)
        x = torch.randn(2, c, *sizes(spatial_dims), dtype=dtype)
        y = module(x)
        assert y.shape == expected_shape(name, module, x)
        assert y.dtype == dtype
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [(1, 1), (1, 7), (9, 4), (3, 3)])
def test_batch_one_and_odd_sizes_eval(name: str, size: tuple[int, int]) -> None:
    c = channels_for(name)
    d = default_dims(name)
    module = convattn.create(name, c, spatial_dims=d).eval()
    x = torch.randn(1, c, *(*size, size[0])[:d])
    with torch.no_grad():
        y = module(x)
    assert y.shape == expected_shape(name, module, x)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_gets_a_gradient(name: str) -> None:
    c, d = channels_for(name), default_dims(name)
    module = convattn.create(name, c, spatial_dims=d).train()
    x = torch.randn(3, c, *sizes(d), requires_grad=True)
    y = module(x)
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for pname, p in module.named_parameters():
        assert p.grad is not None, f"{name}: parameter {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: parameter {pname} has a non-finite gradient"


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_float64(name: str) -> None:
    c = channels_for(name)
    d = default_dims(name)
    module = convattn.create(name, c, spatial_dims=d).double().eval()
    # Non-trivial parameters so that zero-initialised branches take part in the check.
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, c, *sizes(d, (3, 4, 2)), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        module, (x,), eps=1e-6, atol=1e-5, nondet_tol=0.0, fast_mode=True
    )


@pytest.mark.parametrize("name", NAMES)
def test_gate_is_a_named_submodule(name: str) -> None:
    module = convattn.create(name, channels_for(name))
    gates = [n for n, _ in module.named_modules() if n.split(".")[-1].startswith("gate")]
    param_free = sum(p.numel() for p in module.parameters()) == 0
    assert gates or param_free, f"{name}: no submodule named gate*"


@pytest.mark.parametrize("name", NAMES)
def test_wrong_channel_count_raises_naming_the_module(name: str) -> None:
    c = channels_for(name)
    module = convattn.create(name, c)
    d = module.spatial_dims
    x = torch.randn(2, c + 1, *sizes(d))
    with pytest.raises(ValueError, match=type(module).__name__) as err:
        module(x)
    assert str(c) in str(err.value) and str(c + 1) in str(err.value)


@pytest.mark.parametrize("name", NAMES)
def test_wrong_number_of_dims_raises_naming_the_module(name: str) -> None:
    c = channels_for(name)
    module = convattn.create(name, c)
    for shape in [(2, c), (2, c, *sizes(module.spatial_dims), 3)]:
        with pytest.raises(ValueError, match=type(module).__name__):
            module(torch.randn(*shape))


@pytest.mark.parametrize("name", NAMES)
def test_unsupported_spatial_dims_raise(name: str) -> None:
    spec = info(name)
    for d in (1, 2, 3):
        if d not in spec.spatial_dims:
            with pytest.raises(ValueError, match="spatial_dims"):
                convattn.create(name, channels_for(name), spatial_dims=d)
    with pytest.raises((ValueError, TypeError), match="spatial_dims"):
        convattn.create(name, channels_for(name), spatial_dims=4)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("channels", [0, -3])
def test_bad_channel_argument_raises(name: str, channels: int) -> None:
    with pytest.raises(ValueError, match="channels"):
        convattn.create(name, channels)


@pytest.mark.parametrize("name", NAMES)
def test_constructor_contract(name: str) -> None:
    spec = info(name)
    assert spec.paper and spec.year >= 2017 and spec.placement
    assert spec.kind in convattn.registry.KINDS
    assert "spatial_dims" in spec.options or spec.presets.get("spatial_dims") is not None
    # Every option is keyword-only and has a default.
    for option, default in spec.defaults.items():
        assert default is not inspect.Parameter.empty, f"{name}: option {option} has no default"
