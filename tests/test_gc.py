"""Global context (GCNet) block: numbers against a functional reference from eq. 4."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _reference import gc_reference, randomize
from convattn.layers.gc import GlobalContext
from convattn.registry import create, info

FUSIONS = [("add",), ("mul",), ("add", "mul")]


@pytest.mark.parametrize("pooling", ["att", "avg"])
@pytest.mark.parametrize("fusions", FUSIONS)
def test_matches_reference(pooling: str, fusions: tuple[str, ...]) -> None:
    module = randomize(
        GlobalContext(32, pooling_type=pooling, fusion_types=fusions), seed=0
    ).double()
    x = torch.randn(2, 32, 5, 7, dtype=torch.float64)
    ref = gc_reference(x, module.state_dict(), pooling=pooling, fusions=fusions)
    torch.testing.assert_close(module(x), ref)


@pytest.mark.parametrize("spatial_dims,size", [(1, (9,)), (3, (2, 3, 4))])
@pytest.mark.parametrize("fusions", [("add",), ("add", "mul")])
def test_matches_reference_other_dims(
    spatial_dims: int, size: tuple[int, ...], fusions: tuple[str, ...]
) -> None:
    module = GlobalContext(32, fusion_types=fusions, spatial_dims=spatial_dims)
    module = randomize(module, seed=0).double()
    x = torch.randn(2, 32, *size, dtype=torch.float64)
    ref = gc_reference(x, module.state_dict(), pooling="att", fusions=fusions)
    torch.testing.assert_close(module(x), ref)


def test_batch_one_and_one_by_one_map() -> None:
    module = randomize(GlobalContext(32), seed=0).double().eval()
    for size in [(1, 1), (3, 8)]:
        x = torch.randn(1, 32, *size, dtype=torch.float64)
        ref = gc_reference(x, module.state_dict(), pooling="att", fusions=("add",))
        torch.testing.assert_close(module(x), ref)


def test_starts_as_identity_with_add_fusion() -> None:
    module = GlobalContext(64)
    last = module.channel_add_conv[3]
    assert torch.count_nonzero(last.weight) == 0 and torch.count_nonzero(last.bias) == 0
    x = torch.randn(2, 64, 7, 7)
    assert torch.equal(module(x), x)
    assert torch.equal(module.train()(x), x)


def test_mul_fusion_starts_at_half_and_zero_init_last_off() -> None:
    x = torch.randn(2, 64, 5, 5)
    torch.testing.assert_close(GlobalContext(64, fusion_types="mul")(x), x * 0.5)
    torch.manual_seed(0)
    module = GlobalContext(64, zero_init_last=False)
    assert torch.count_nonzero(module.channel_add_conv[3].weight) > 0
    assert not torch.allclose(module(x), x)


def test_official_init_of_the_mask_conv() -> None:
    torch.manual_seed(0)
    module = GlobalContext(2048)
    assert torch.count_nonzero(module.conv_mask.bias) == 0
    # kaiming-normal, fan_in = C, gain sqrt(2): std = sqrt(2 / C)
    std = module.conv_mask.weight.std().item()
    assert abs(std - (2 / 2048) ** 0.5) < 0.1 * (2 / 2048) ** 0.5


def test_structure_matches_official_context_block() -> None:
    module = GlobalContext(256, fusion_types=("add", "mul"))
    assert module.rd_channels == 16  # int(256 * 1/16)
    for branch in (module.channel_add_conv, module.channel_mul_conv):
        assert isinstance(branch[1], nn.LayerNorm)
        assert tuple(branch[1].normalized_shape) == (16, 1, 1)
        assert branch[0].bias is not None and branch[3].bias is not None
    keys = set(GlobalContext(256).state_dict())
    assert keys == {
        "conv_mask.weight",
        "conv_mask.bias",
        *(f"channel_add_conv.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")),
    }
    assert GlobalContext(100).rd_channels == 6  # int(100 / 16), floor as official


def test_fusion_types_forms() -> None:
    assert GlobalContext(32, fusion_types="add").fusion_types == ("add",)
    assert GlobalContext(32, fusion_types=["mul", "add"]).fusion_types == ("add", "mul")
    assert GlobalContext(32, fusion_types=("mul",)).channel_add_conv is None


def gc_params(c: int, *, pooling: str = "att", fusions: int = 1, r: int = 16) -> int:
    p = int(c / r)
    branch = (c * p + p) + 2 * p + (p * c + c)
    return (c + 1 if pooling == "att" else 0) + fusions * branch


@pytest.mark.parametrize("channels", [64, 256, 2048])
def test_param_count(channels: int) -> None:
    assert sum(p.numel() for p in create("gc", channels).parameters()) == gc_params(channels)
    both = GlobalContext(channels, pooling_type="avg", fusion_types=("add", "mul"))
    assert sum(p.numel() for p in both.parameters()) == gc_params(
        channels, pooling="avg", fusions=2
    )


def test_param_count_values() -> None:
    assert gc_params(256) == 8753
    assert gc_params(2048) == 528769


def test_softmax_gate_hook() -> None:
    module = randomize(GlobalContext(16), seed=0).double()
    seen: list[torch.Tensor] = []
    assert module.gate is not None
    module.gate.register_forward_hook(lambda m, i, o: seen.append(o))
    module(torch.randn(2, 16, 3, 5, dtype=torch.float64))
    assert seen[0].shape == (2, 1, 15)
    torch.testing.assert_close(seen[0].sum(-1), torch.ones(2, 1, dtype=torch.float64))


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"^GlobalContext: pooling_type"):
        GlobalContext(64, pooling_type="max")
    with pytest.raises(ValueError, match=r"^GlobalContext: fusion_types"):
        GlobalContext(64, fusion_types=())
    with pytest.raises(ValueError, match=r"^GlobalContext: fusion_types"):
        GlobalContext(64, fusion_types=("channel_add",))
    with pytest.raises(TypeError, match=r"^GlobalContext: zero_init_last"):
        GlobalContext(64, zero_init_last=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^GlobalContext: expected 64 channels"):
        GlobalContext(64)(torch.randn(1, 32, 7, 7))


def test_registry_entry() -> None:
    spec = info("gc")
    assert spec.cls is GlobalContext and spec.kind == "channel" and spec.arxiv == "1904.11492"
    assert spec.defaults["fusion_types"] == ("add",) and spec.defaults["pooling_type"] == "att"
