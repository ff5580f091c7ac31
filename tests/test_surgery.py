"""attach()/detach() on real torchvision and timm models built without weights.

Expected counts and places are worked out here from the models' own structure (block classes,
configs), not from convattn.surgery.
"""

from __future__ import annotations

import copy
import io
import re
from collections.abc import Callable

import pytest
import torch
from torch import nn

import convattn
from convattn.surgery import AttachReport, IdentityStart, attach, detach

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

from torchvision.models import mobilenetv2 as tv_mobilenetv2  # noqa: E402
from torchvision.models import resnet as tv_resnet  # noqa: E402
from torchvision.ops.misc import SqueezeExcitation  # noqa: E402

X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def build(name: str) -> nn.Module:
    """A model in eval mode, random init (no weights can be downloaded)."""
    if name.startswith("timm_"):
        model = timm.create_model(name[5:], pretrained=False)
    else:
        model = getattr(torchvision.models, name)(weights=None)
    return model.eval()


def require(key: str) -> None:
    """Skip when a catalogue module being written elsewhere is missing or broken."""
    if key not in convattn.list_attention():
        pytest.skip(f"attention {key!r} is not registered yet")
    try:
        convattn.create(key, 64)
    except Exception as err:  # pragma: no cover - depends on other people's work in progress
        pytest.skip(f"attention {key!r} cannot be built at C=64: {err}")


def resnet_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    classes: tuple[type, ...] = (tv_resnet.BasicBlock, tv_resnet.Bottleneck)
    classes += (timm.models.resnet.BasicBlock, timm.models.resnet.Bottleneck)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, classes)]


def structure(model: nn.Module) -> list[tuple[str, type]]:
    return [(n, type(m)) for n, m in model.named_modules()]


def check_state_dict(
    original: dict[str, torch.Tensor], model: nn.Module, report: AttachReport
) -> None:
    """Original keys and tensors kept (except replaced modules'), new keys = the report's, and
    the original state dict loads with only the new keys missing."""
    now = model.state_dict()
    new = set(now) - set(original)
    removed = set(original) - set(now)
    assert new == set(report.new_keys)
    assert removed == set(report.removed_keys)
    assert all(any(k.startswith(r + ".") for r in report.replaced) for k in removed)
    for key in set(original) & set(now):
        if original[key].shape == now[key].shape:
            assert torch.equal(original[key], now[key]), key
    kept = {k: v for k, v in original.items() if k not in removed}
    missing, unexpected = model.load_state_dict(kept, strict=False)
    assert unexpected == []
    # BatchNorm fills in a missing num_batches_tracked itself (old checkpoints lack it), so
    # load_state_dict does not list it.
    assert set(missing) == {k for k in new if not k.endswith("num_batches_tracked")}


# --------------------------------------------------------------------------------------
# Paper placements in ResNets
# --------------------------------------------------------------------------------------

RESNETS = {
    # name: (blocks, last BN of a block)
    "resnet18": (8, "bn2"),
    "resnet50": (16, "bn3"),
    "resnext50_32x4d": (16, "bn3"),
    "wide_resnet50_2": (16, "bn3"),
    "timm_resnet18": (8, "bn2"),
    "timm_resnet50": (16, "bn3"),
}


@pytest.mark.parametrize("name", list(RESNETS))
def test_block_end_in_resnets(name: str) -> None:
    model = build(name)
    blocks, last_bn = RESNETS[name]
    assert len(resnet_blocks(model)) == blocks
    original = model.state_dict()
    params = sum(p.numel() for p in model.parameters())
    report = attach(model, "se")
    assert report.placement == "block_end"
    assert report.count == blocks
    assert list(report.locations) == [f"{n}.{last_bn}" for n, _ in resnet_blocks(model)]
    assert list(report.modules) == [f"{n}.{last_bn}.attn" for n, _ in resnet_blocks(model)]
    assert all(k.split(".attn.")[0].endswith(last_bn) for k in report.new_keys)
    check_state_dict(original, model, report)
    assert model(X).shape == (1, 1000)
    assert sum(p.numel() for p in model.parameters()) == params + report.added_params


def test_timm_resnet_trains_with_attention_before_the_inplace_add() -> None:
    model = build("timm_resnet50").train()
    attach(model, "eca")
    model(torch.randn(2, 3, 32, 32)).square().mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if ".attn." in n]
    assert grads and all(g is not None for g in grads)


def test_paper_placements_resnet50() -> None:
    for key in ("simam", "gct", "bam", "nonlocal", "da_position"):
        require(key)
    convs = sum(isinstance(m, nn.Conv2d) for m in build("resnet50").modules())
    assert convs == 53  # stem + 16 blocks x 3 + 4 downsample convs

    model = build("resnet50")
    report = attach(model, "simam")
    assert (report.placement, report.count) == ("after_conv2", 16)
    assert all(loc.endswith(".conv2") for loc in report.locations)

    model = build("resnet50")
    original = model.state_dict()
    report = attach(model, "gct")
    assert (report.placement, report.count) == ("before_conv", convs)
    assert report.how == ("before",) * convs
    assert {"conv1", "layer1.0.downsample.0", "layer4.2.conv3"} <= set(report.locations)
    assert "conv1.pre_attn" in report.modules
    check_state_dict(original, model, report)
    assert model(X).shape == (1, 1000)

    model = build("resnet50")
    report = attach(model, "bam")
    assert report.placement == "stage_end"
    assert report.locations == ("layer1.2", "layer2.3", "layer3.5")  # 3 of the 4 stages
    assert [model.get_submodule(m).channels for m in report.modules] == [256, 512, 1024]

    model = build("resnet50")
    report = attach(model, "nonlocal")
    assert report.placement == "every_other_block"
    assert report.locations == ("layer2.1", "layer2.3", "layer3.1", "layer3.3", "layer3.5")

    model = build("resnet50")
    report = attach(model, "da_position")
    assert (report.placement, report.locations) == ("head", ("layer4.2",))
    assert model(X).shape == (1, 1000)


@pytest.mark.parametrize("name", ["resnet50", "resnext50_32x4d", "timm_resnet18"])
def test_sk_replaces_conv2(name: str) -> None:
    model = build(name)
    originals = {f"{n}.conv2": b.conv2 for n, b in resnet_blocks(model)}
    original = model.state_dict()
    report = attach(model, "sk")
    assert report.placement == "replace_conv2"
    assert report.replaced == tuple(originals) == report.locations
    assert report.how == ("replace",) * len(originals)
    for location, conv in originals.items():
        sk = model.get_submodule(location)
        assert isinstance(sk, convattn.layers.sk.SKConv)
        assert (sk.channels, sk.out_channels) == (conv.in_channels, conv.out_channels)
        assert all(b[0].stride == conv.stride and b[0].groups == conv.groups for b in sk.branches)
    assert report.removed_params == sum(c.weight.numel() for c in originals.values())
    check_state_dict(original, model, report)
    assert model(X).shape == (1, 1000)


def test_attnpool_replaces_the_global_pool() -> None:
    require("attnpool")
    for name, pool in (("resnet18", "avgpool"), ("timm_resnet18", "global_pool")):
        model = build(name)
        reference = model(X)
        report = attach(model, "attnpool")
        assert (report.placement, report.replaced) == ("pool", (pool,))
        assert model(X).shape == (1, 1000)
        detach(model)
        assert torch.equal(model(X), reference)


# --------------------------------------------------------------------------------------
# MobileNetV2, EfficientNet, MobileNetV3
# --------------------------------------------------------------------------------------


def test_mobilenet_v2_placements() -> None:
    require("coord")
    # torchvision's MobileNetV2 config: (t, c, n, s); expansion t != 1 in all rows but the first
    config = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1)]
    config += [(6, 160, 3, 2), (6, 320, 1, 1)]
    blocks = sum(n for _, _, n, _ in config)
    expanded = sum(n for t, _, n, _ in config if t != 1)
    assert (blocks, expanded) == (17, 16)

    model = build("mobilenet_v2")
    assert sum(isinstance(m, tv_mobilenetv2.InvertedResidual) for m in model.modules()) == blocks
    original = model.state_dict()
    report = attach(model, "coord")
    assert (report.placement, report.count) == ("after_dw", expanded)
    # after the depthwise Conv2dNormActivation's ReLU6: features.<i>.conv.1.2
    assert report.locations[0] == "features.2.conv.1.2"
    assert all(re.fullmatch(r"features\.\d+\.conv\.1\.2", loc) for loc in report.locations)
    check_state_dict(original, model, report)
    assert model(X).shape == (1, 1000)

    model = build("mobilenet_v2")
    report = attach(model, "eca")
    assert (report.placement, report.count) == ("block_end", blocks)
    assert report.locations[:2] == ("features.1.conv.2", "features.2.conv.3")  # projection BN

    model = build("mobilenet_v2")
    report = attach(model, "eca", placement="stage_end")
    # last block at output stride 4, 8, 16 (24, 32, 96 channels)
    assert report.locations == ("features.3", "features.6", "features.13")
    assert [model.get_submodule(m).channels for m in report.modules] == [24, 32, 96]

    model = build("mobilenet_v2")
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert attach(model, "eca", placement="before_conv").count == convs == 52


@pytest.mark.parametrize(("name", "ses"), [("efficientnet_b0", 16), ("mobilenet_v3_small", 9)])
def test_builtin_se_is_replaced(name: str, ses: int) -> None:
    model = build(name)
    se_names = [n for n, m in model.named_modules() if isinstance(m, SqueezeExcitation)]
    assert len(se_names) == ses
    reference = model(X)
    original = model.state_dict()
    before = structure(model)
    report = attach(model, "eca")
    assert report.placement == "replace_se"
    assert report.replaced == tuple(se_names) == report.locations
    assert not any(isinstance(m, SqueezeExcitation) for m in model.modules())
    check_state_dict(original, model, report)
    assert model(X).shape == (1, 1000)
    detach(model)
    assert structure(model) == before
    assert model.state_dict().keys() == original.keys()
    assert torch.equal(model(X), reference)


def test_efficientnet_keeps_se_for_spatial_attention_and_block_end() -> None:
    model = build("efficientnet_b0")
    mbconvs = sum(type(m).__name__ == "MBConv" for m in model.modules())
    report = attach(model, "sse")  # spatial: goes beside the SE, after the projection BN
    assert (report.placement, report.count) == ("block_end", mbconvs)
    model = build("efficientnet_b0")
    report = attach(model, "eca", placement="block_end")
    assert report.replaced == ()
    assert sum(isinstance(m, SqueezeExcitation) for m in model.modules()) == 16
    with pytest.raises(ValueError, match="identity_init"):
        attach(build("efficientnet_b0"), "eca", identity_init=True)


# --------------------------------------------------------------------------------------
# Identity start
# --------------------------------------------------------------------------------------

IDENTITY_CASES = [
    ("resnet18", "se", None),
    ("resnet18", "cbam", None),
    ("resnet18", "eca", None),
    ("resnet18", "simam", None),
    ("resnet18", "gct", None),
    ("resnet18", "bam", None),
    ("resnet18", "scse", "stage_end"),
    ("timm_resnet18", "coord", None),
    ("mobilenet_v2", "coord", None),
    ("mobilenet_v2", "gct", "before_conv"),
    ("efficientnet_b0", "cbam", "after_dw"),
]


@pytest.mark.parametrize(("name", "key", "placement"), IDENTITY_CASES)
def test_identity_init_is_exact(name: str, key: str, placement: str | None) -> None:
    require(key)
    model = build(name)
    reference = model(X)
    report = attach(model, key, placement=placement, identity_init=True)
    assert report.count > 0 and report.identity_init
    assert all(isinstance(model.get_submodule(m), IdentityStart) for m in report.modules)
    assert torch.equal(model(X), reference)


def test_identity_start_alpha_learns() -> None:
    model = build("resnet18").train()
    report = attach(model, "se", identity_init=True)
    alphas = [model.get_submodule(m).alpha for m in report.modules]
    model(torch.randn(2, 3, 32, 32)).square().mean().backward()
    assert all(a.grad is not None and a.grad.abs() > 0 for a in alphas)
    assert report.added_params == 8 + sum(
        p.numel() for m in report.modules for p in model.get_submodule(m).module.parameters()
    )


# --------------------------------------------------------------------------------------
# detach, copies, export
# --------------------------------------------------------------------------------------


def test_detach_round_trip_after_stacked_attachments() -> None:
    for key in ("gct", "simam"):
        require(key)
    model = build("resnext50_32x4d")
    reference = model(X)
    original = model.state_dict()
    before = structure(model)
    attach(model, "gct")  # before every conv, conv2 included
    attach(model, "simam", identity_init=True)  # after conv2: conv2 now has both
    assert type(model.layer1[0].conv2).__name__ == "Conv2dWithPreAttentionWithAttention"
    attach(model, "sk")  # replaces those conv2s
    attach(model, "se", placement="stage_end")
    assert model(X).shape == (1, 1000)
    assert detach(model) is model
    assert structure(model) == before
    assert list(model.state_dict()) == list(original)
    assert torch.equal(model(X), reference)
    assert detach(model) is model  # nothing attached: unchanged


def test_copies_and_pickling_keep_the_attached_model() -> None:
    model = build("resnet18")
    reference = model(X)
    attach(model, "eca", identity_init=True)
    attach(model, "se", placement="stage_end")
    out = model(X)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for copy_ in (loaded, copy.deepcopy(model)):
        assert type(copy_.layer1[0].bn2) is type(model.layer1[0].bn2)
        assert torch.equal(copy_(X), out)
        detach(copy_)
        assert torch.equal(copy_(X), reference)


def conv1x1(channels: int) -> nn.Module:
    return nn.Conv2d(channels, channels, 1)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script is deprecated
@pytest.mark.parametrize("name", ["resnet18", "timm_resnet18"])
def test_attached_structure_scripts(name: str) -> None:
    # A plain factory module: the structure attach() builds is what is checked here.
    model = build(name)
    attach(model, conv1x1, identity_init=True)
    attach(model, conv1x1, placement="before_conv")
    attach(model, conv1x1, placement="stage_end")
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(X), model(X))


# --------------------------------------------------------------------------------------
# where=
# --------------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


WHERE_CASES: list[tuple[object, list[str]]] = [
    (nn.BatchNorm2d, ["features.1", "features.4"]),
    ((nn.Conv2d, nn.BatchNorm2d), ["features.0", "features.1", "features.3", "features.4"]),
    ("features.[14]", ["features.1", "features.4"]),
    ("*.3", ["features.3"]),
    (re.compile(r"features\.(0|4)"), ["features.0", "features.4"]),
    (lambda n, m: isinstance(m, nn.Conv2d) and m.stride == (2, 2), ["features.3"]),
    ("features", ["features.5"]),  # a Sequential: after its last child
]


@pytest.mark.parametrize(("where", "locations"), WHERE_CASES)
def test_where(where: object, locations: list[str]) -> None:
    model = Net().eval()
    original = model.state_dict()
    report = attach(model, "se", where=where)  # type: ignore[arg-type]
    assert report.placement == "where"
    assert list(report.locations) == locations
    channels = {"features.0": 8, "features.1": 8, "features.3": 16, "features.4": 16}
    channels["features.5"] = 16
    assert [model.get_submodule(m).channels for m in report.modules] == [
        channels[loc] for loc in locations
    ]
    check_state_dict(original, model, report)
    assert model(X).shape == (1, 10)


def test_where_in_real_models() -> None:
    model = build("mobilenet_v2")
    report = attach(model, "eca", where="features.*.conv.2")
    # the projection conv of 16 expanded blocks, the projection BN of the t = 1 block
    assert report.count == 17
    assert model(X).shape == (1, 1000)
    model = build("resnet18")
    assert attach(model, "se", where="layer*.bn2").count == 8


def test_where_infers_spatial_dims() -> None:
    model = nn.Sequential(nn.Conv1d(4, 8, 3), nn.BatchNorm1d(8), nn.ReLU()).eval()
    report = attach(model, "se", where=nn.BatchNorm1d)
    assert model.get_submodule(report.modules[0]).spatial_dims == 1
    assert model(torch.randn(2, 4, 20)).shape == (2, 8, 18)


def test_attention_as_class_and_factory() -> None:
    from convattn.layers.se import SEModule

    by_name = attach(build("resnet18"), "se", rd_ratio=1 / 4)
    by_class = attach(build("resnet18"), SEModule, rd_ratio=1 / 4)
    assert (by_class.attention, by_class.added_params) == ("se", by_name.added_params)
    model = build("resnet18")
    report = attach(model, conv1x1)
    assert (report.attention, report.count) == ("conv1x1", 8)
    assert isinstance(model.layer1[0].bn2.attn, nn.Conv2d)


def test_report_text() -> None:
    report = attach(build("resnet18"), "eca")
    text = str(report)
    assert "attach('eca'): 8 module(s) at 'block_end'" in text
    assert "layer1.0.bn2 after  -> layer1.0.bn2.attn" in text
    assert f"+{report.added_params:,} added" in text


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


def test_error_wrapped_models() -> None:
    with pytest.raises(TypeError, match=r"attach: .*DataParallel.*before wrapping"):
        attach(nn.DataParallel(build("resnet18")), "se")
    ddp = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)
    nn.Module.__init__(ddp)
    with pytest.raises(TypeError, match=r"DistributedDataParallel.*model\.module"):
        attach(ddp, "se")
    with pytest.raises(TypeError, match=r"detach: .*DataParallel"):
        detach(nn.DataParallel(build("resnet18")))


def test_error_unknown_model_needs_where() -> None:
    with pytest.raises(ValueError, match=r"attach: Net has no block .* pass where="):
        attach(Net(), "se")
    with pytest.raises(ValueError, match="matched no module"):
        attach(Net(), "se", where="layer*")
    with pytest.raises(ValueError, match=r"cannot infer the channel count after 'features\.2'"):
        attach(Net(), "se", where=nn.ReLU)
    with pytest.raises(TypeError, match="where must be"):
        attach(Net(), "se", where=3)  # type: ignore[arg-type]


def test_error_attaching_twice_at_the_same_place() -> None:
    model = build("resnet18")
    attach(model, "se")
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match=r"'layer1\.0\.bn2' already has an attention module after"):
        attach(model, "eca")
    assert list(model.state_dict()) == keys  # nothing changed
    attach(model, "eca", placement="before_conv")  # other places are free


def test_error_placements_the_model_lacks() -> None:
    with pytest.raises(ValueError, match="'sk' has no paper placement in MobileNetV2"):
        attach(build("mobilenet_v2"), "sk")
    with pytest.raises(ValueError, match="'after_conv2' is not available"):
        attach(build("mobilenet_v2"), "eca", placement="after_conv2")
    with pytest.raises(ValueError, match="unknown placement 'after_bn'"):
        attach(build("resnet18"), "se", placement="after_bn")
    with pytest.raises(ValueError, match="'sk' is a conv module"):
        attach(build("resnet18"), "sk", placement="block_end")
    with pytest.raises(ValueError, match="needs a convolution"):
        attach(build("resnet18"), "se", placement="replace_conv2")
    with pytest.raises(ValueError, match="pooling head"):
        attach(build("resnet18"), "se", placement="pool")
    with pytest.raises(ValueError, match="identity_init=True cannot apply to placement"):
        attach(build("resnet18"), "sk", identity_init=True)
    with pytest.raises(ValueError, match=r"either where= .* or placement="):
        attach(build("resnet18"), "se", where="conv1", placement="block_end")
    with pytest.raises(ValueError, match="'sk' is a conv module, not a gate"):
        attach(build("resnet18"), "sk", where="layer1.0.conv2")


def test_error_bad_attention_arguments() -> None:
    factory: Callable[[int], nn.Module] = conv1x1
    with pytest.raises(TypeError, match="bind them inside the factory"):
        attach(build("resnet18"), factory, rd_ratio=0.5)
    with pytest.raises(TypeError, match="instance"):
        attach(build("resnet18"), nn.Identity())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="the class int"):
        attach(build("resnet18"), int)
    with pytest.raises(ValueError, match="Unknown attention"):
        attach(build("resnet18"), "squeeze")
    with pytest.raises(TypeError, match="stride= is fixed"):
        attach(build("resnet18"), "sk", stride=2)
