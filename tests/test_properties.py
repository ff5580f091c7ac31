"""Property-based contract test (hypothesis) over mechanisms, batch sizes, spatial sizes
(non-square, 1x1 included), dtypes, spatial_dims and options.

For every drawn case, in eval mode: the output has the contract's shape (same shape for
gates, ``(N, out_channels, *spatial)`` for ``sk``, ``(N, out_dim)`` for ``attnpool``), the
input's dtype and finite values, and each sample is processed independently of the others in
the batch (the output for sample i equals the module applied to sample i alone).
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import convattn
from convattn import export

MECHANISMS = convattn.list_attention()


def draw_options(draw: st.DrawFn, name: str) -> tuple[int, dict[str, Any]]:
    """Channels and a valid option set for ``name``."""
    one_of = lambda *values: draw(st.sampled_from(values))  # noqa: E731
    if name == "channel":
        excitation = one_of("mlp", "conv1d")
        options: dict[str, Any] = {
            "pool": one_of("avg", "max", "avg+max", "std"),
            "excitation": excitation,
            "gate_layer": one_of("sigmoid", "hard_sigmoid"),
        }
        if excitation == "mlp":
            options["rd_ratio"] = one_of(1 / 16, 1 / 4, 1 / 2)
        else:
            options["kernel_size"] = one_of(1, 3, 5)
        return one_of(8, 16, 32), options
    if name in ("se", "cse", "cbam_channel"):
        return one_of(8, 16, 32), {"rd_ratio": one_of(1 / 16, 1 / 4, 1 / 2)}
    if name == "eca":
        return one_of(8, 16, 32), {"kernel_size": one_of(None, 1, 3, 5)}
    if name in ("cbam", "cbam_spatial"):
        return one_of(8, 16, 32), {
            "kernel_size": one_of(3, 7),
            "gate_layer": one_of("sigmoid", "hard_sigmoid"),
        }
    if name == "spatial":
        return one_of(8, 16), {"pool": one_of("both", "mean", "max"), "norm": one_of(True, False)}
    if name == "scse":
        return one_of(8, 16, 32), {"fusion": one_of("max", "sum")}
    if name == "gc":
        fusion = one_of(("add",), ("mul",), ("add", "mul"))
        return one_of(16, 32), {"pooling_type": one_of("att", "avg"), "fusion_types": fusion}
    if name in ("ge", "ge_plus"):
        return one_of(8, 16), {"extent": one_of(0, 2, 4)}
    if name == "ge_minus":
        return one_of(8, 16), {"extent": one_of(0, 2, 4, 8)}
    if name == "nonlocal":
        mode = one_of("embedded_gaussian", "gaussian", "dot_product", "concatenation")
        return one_of(8, 16), {
            "mode": mode,
            "sub_sample": one_of(True, False),
            "bn": one_of(True, False),
        }
    if name == "psa":
        return one_of(8, 16), {
            "layout": one_of("parallel", "sequential"),
            "form": one_of("paper", "official"),
        }
    if name == "gct":
        return one_of(8, 16), {"mode": one_of("l1", "l2")}
    if name == "triplet":
        return one_of(4, 16), {"kernel_size": one_of(3, 7), "no_spatial": one_of(True, False)}
    if name == "bam":
        return one_of(16, 32), {"fusion": one_of("product", "sum"), "dilation": one_of(1, 4)}
    if name == "sk":
        channels = one_of(16, 32)
        return channels, {
            "groups": one_of(1, 8),
            "num_branches": one_of(1, 2, 3),
            "out_channels": one_of(None, 16),
        }
    if name in ("sge", "ema"):
        return 16, {"groups": one_of(1, 4, 8)}
    if name == "shuffle":
        return 16, {"groups": one_of(1, 2, 4)}
    if name == "fca":
        return 32, {
            "freq_sel_method": one_of("top1", "low4", "bot8", "top16"),
            "dct_size": one_of(7, 14),
        }
    if name == "attnpool":
        return 16, {
            "num_heads": one_of(1, 4),
            "out_dim": one_of(None, 10),
            "spatial_size": one_of(2, 7),
        }
    if name == "coord":
        return one_of(8, 16), {"act_layer": one_of("hard_swish", "relu")}
    if name == "simam":
        return one_of(4, 8), {"e_lambda": one_of(1e-4, 0.1)}
    if name in ("da_position",):
        return one_of(8, 16), {"rd_ratio": one_of(1 / 8, 1 / 2)}
    return one_of(4, 8, 16), {}


@st.composite
def cases(draw: st.DrawFn) -> tuple[str, int, dict[str, Any], torch.Tensor]:
    name = draw(st.sampled_from(MECHANISMS))
    channels, options = draw_options(draw, name)
    spec = convattn.info(name)
    spatial_dims = draw(st.sampled_from(spec.spatial_dims))
    if spatial_dims != 2:
        options["spatial_dims"] = spatial_dims
    if name == "fca" or name == "attnpool":
        options.pop("spatial_dims", None)
    batch = draw(st.integers(1, 3))
    sizes = tuple(draw(st.integers(1, 9)) for _ in range(spatial_dims))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn((batch, channels, *sizes), generator=generator)).to(dtype)
    return name, channels, options, x


def expected_shape(
    name: str, channels: int, options: dict[str, Any], x: torch.Tensor
) -> tuple[int, ...]:
    contract = convattn.info(name).contract
    if contract == "pool":
        return (x.shape[0], options.get("out_dim") or channels)
    if contract == "conv":
        return (x.shape[0], options.get("out_channels") or channels, *x.shape[2:])
    return tuple(x.shape)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_contract_over_shapes_dtypes_and_options(
    case: tuple[str, int, dict[str, Any], torch.Tensor],
) -> None:
    name, channels, options, x = case
    torch.manual_seed(0)
    module = convattn.create(name, channels, **options)
    module = export.randomize_parameters(module).to(x.dtype).eval()
    with torch.no_grad():
        out = module(x)
        assert out.shape == expected_shape(name, channels, options, x), (name, options)
        assert out.dtype == x.dtype
        assert torch.isfinite(out).all(), (name, options, tuple(x.shape))
        # Samples do not interact in eval mode.
        alone = torch.cat([module(x[i : i + 1]) for i in range(x.shape[0])])
    tol = 1e-4 if x.dtype == torch.float32 else 1e-10
    torch.testing.assert_close(out, alone, atol=tol, rtol=tol)


def test_degenerate_sizes_found_by_the_property_test() -> None:
    # One value per GroupNorm group (batch 1, one group, a 1x1 map) normalises to the bias.
    for name, channels in (("ema", 1), ("shuffle", 2)):
        module = convattn.create(name, channels, groups=1).eval()
        assert torch.isfinite(module(torch.randn(1, channels, 1, 1))).all()
    # GE's windowed gather on 3-D maps smaller than its window, as in 1-D and 2-D.
    module = convattn.create("ge_minus", 8, extent=4, spatial_dims=3).eval()
    assert module(torch.randn(1, 8, 1, 2, 3)).shape == (1, 8, 1, 2, 3)
