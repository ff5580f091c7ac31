"""create / list_attention / info and registration rules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import convattn
from convattn import registry
from convattn.layers import SEModule
from convattn.layers._helpers import AttentionModule


def test_create_returns_configured_module() -> None:
    module = convattn.create("se", 256, rd_ratio=1 / 8)
    assert isinstance(module, SEModule) and module.rd_channels == 32
    assert convattn.create("SE", 64).channels == 64  # keys are case-insensitive


def test_unknown_name_lists_closest() -> None:
    with pytest.raises(ValueError, match=r"Unknown attention 'cbma'\. Did you mean 'cbam'"):
        convattn.create("cbma", 64)
    with pytest.raises(ValueError, match="Registered:"):
        convattn.info("nothing-like-it")


def test_unknown_option_is_named() -> None:
    with pytest.raises(
        TypeError, match="unknown option 'reduction' for SEModule; valid options: rd_ratio"
    ):
        convattn.create("se", 64, reduction=16)


def test_name_must_be_a_string() -> None:
    with pytest.raises(TypeError, match="attention name must be a str"):
        convattn.create(SEModule, 64)  # type: ignore[arg-type]


def test_duplicate_registration_is_an_error() -> None:
    with pytest.raises(ValueError, match="'se' is already registered"):

        @registry.register("se", kind="channel", paper="x", year=2020, arxiv="", placement="x")
        class Another(AttentionModule):
            pass


def test_register_validates_kind_and_presets() -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        registry.register("zz_bad", kind="temporal", paper="x", year=2020, arxiv="", placement="x")
    with pytest.raises(ValueError, match="presets name unknown options"):

        @registry.register(
            "zz_bad2",
            kind="channel",
            paper="x",
            year=2020,
            arxiv="",
            placement="x",
            presets={"nope": 1},
        )
        class Bad(AttentionModule):
            def __init__(self, channels: int, *, spatial_dims: int = 2) -> None:
                super().__init__(channels, spatial_dims)


def test_presets_and_aliases() -> None:
    @registry.register(
        "zz_test_half",
        kind="channel",
        paper="test entry",
        year=2020,
        arxiv="",
        placement="anywhere",
        presets={"rd_ratio": 0.5},
        aliases=("zz_test_half_alias",),
    )
    class Half(SEModule):
        pass

    try:
        module = convattn.create("zz_test_half_alias", 64)
        assert isinstance(module, Half) and module.rd_channels == 32
        assert convattn.info("zz_test_half").defaults["rd_ratio"] == 0.5
        assert "rd_ratio" not in convattn.info("zz_test_half").options
        with pytest.raises(TypeError, match="option 'rd_ratio' is fixed"):
            convattn.create("zz_test_half", 64, rd_ratio=0.25)
        assert "zz_test_half_alias" not in convattn.list_attention()
    finally:
        registry._REGISTRY.pop("zz_test_half")
        registry._ALIASES.pop("zz_test_half_alias")


def test_list_attention_by_kind() -> None:
    names = convattn.list_attention()
    assert names == sorted(names)
    for kind in registry.KINDS:
        subset = convattn.list_attention(kind=kind)
        assert all(convattn.info(n).kind == kind for n in subset)
    assert "se" in convattn.list_attention("channel") and "cbam" in convattn.list_attention(
        "hybrid"
    )
    assert sum(len(convattn.list_attention(k)) for k in registry.KINDS) == len(names)
    with pytest.raises(ValueError, match="list_attention: kind must be one of"):
        convattn.list_attention("temporal")


def test_info_fields() -> None:
    spec = convattn.info("eca")
    assert spec.year == 2020 and spec.link == "https://arxiv.org/abs/1910.03151"
    assert spec.defaults == {
        "kernel_size": None,
        "gamma": 2,
        "beta": 1,
        "gate_layer": "sigmoid",
        "spatial_dims": 2,
    }
    assert spec.differences and "odd" in spec.differences[0]
    text = spec.describe()
    for fragment in (
        "ECA-Net",
        "2020",
        "arxiv.org/abs/1910.03151",
        "kind:",
        "placement:",
        "gamma = 2",
    ):
        assert fragment in text
    assert convattn.info("sk").contract == "conv"


def test_every_class_is_exported_from_layers() -> None:
    exported = {getattr(convattn.layers, n) for n in convattn.layers.__all__}
    for name in convattn.list_attention():
        assert convattn.info(name).cls in exported, f"{name}: class not in convattn.layers.__all__"


def test_public_api() -> None:
    for name in ("create", "list_attention", "info", "register", "AttentionSpec"):
        assert name in convattn.__all__ and hasattr(convattn, name)


@pytest.mark.parametrize("name", convattn.list_attention())
def test_create_uses_paper_defaults(name: str) -> None:
    spec = convattn.info(name)
    module = convattn.create(name, 128 if name == "shuffle" else 64)
    assert isinstance(module, nn.Module)
    assert isinstance(module, spec.cls)
    y = module.eval()(torch.randn(1, module.channels, *(4,) * module.spatial_dims))
    assert y.dtype == torch.float32
