"""Reference backbones: architectures, parameter counts and paper placements.

Expected counts are computed here from the layer definitions of each mechanism (closed forms
per module, summed over the places the paper puts it), independently of the code under test.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import convattn
from convattn import models
from convattn.layers._helpers import AttentionModule


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def attention_modules(model: nn.Module) -> list[tuple[str, AttentionModule]]:
    """Top-level attention modules (not their sub-gates)."""
    found: list[tuple[str, AttentionModule]] = []
    for name, module in model.named_modules():
        if isinstance(module, AttentionModule) and not any(
            name.startswith(f + ".") for f, _ in found
        ):
            found.append((name, module))
    return found


# --- layout of ResNet-50 ------------------------------------------------------------------------
R50_BLOCKS = [3, 4, 6, 3]
R50_OUT = [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3  # block output widths (after bn3)
R50_WIDTH = [64] * 3 + [128] * 4 + [256] * 6 + [512] * 3  # 3x3 conv widths
R50_IN = [64, 256, 256, 256, 512, 512, 512, 512, 1024, 1024, 1024, 1024, 1024, 1024, 2048, 2048]
R50_PLAIN = 25_557_032  # torchvision's ResNet-50


def se_params(c: int, r: int = 16) -> int:
    return 2 * c * (c // r) + c // r + c  # FC(C, C/r) + FC(C/r, C), both with bias


def cbam_params(c: int) -> int:
    return se_params(c) + 2 * 49 + 2  # shared MLP + 7x7 conv (no bias) + BN(1)


def gc_params(c: int) -> int:
    p = c // 16
    return (c + 1) + (c * p + p) + 2 * p + (p * c + c)  # context conv, conv, LayerNorm, conv


def bam_params(c: int) -> int:
    p = c // 16
    channel = (c * p + p) + 2 * p + (p * c + c)  # FC, BN1d, FC
    spatial = (c * p + p) + 2 * p + 2 * (9 * p * p + p + 2 * p) + (p + 1)  # 1x1, 2 dilated 3x3, 1x1
    return channel + spatial


def srm_params(c: int) -> int:
    return 2 * c + 2 * c  # channel-wise FC (C x 2) + BN


def fca_params(c: int) -> int:
    return 2 * c * (c // 16)  # SE excitation without biases


def triplet_params(c: int) -> int:
    return 3 * (2 * 49 + 2)  # three Z-pool gates: 7x7 conv + BN(1)


def sk_block_delta(w: int, groups: int = 32) -> int:
    d = max(w // 16, 32)
    conv3x3 = w * (w // groups) * 9
    sk = 2 * (conv3x3 + 2 * w) + w * d + 2 * d + d * 2 * w  # 2 branches, fc1 + BN, fc2 (no biases)
    return sk - conv3x3 - 2 * w  # it replaces conv2 + bn2


def coord_params(c: int) -> int:
    mip = max(8, c // 32)
    return c * mip + mip + 2 * mip + 2 * (mip * c + c)


EXPECTED_R50 = {
    "se": R50_PLAIN + sum(se_params(c) for c in R50_OUT),  # 28,088,024 (official SE-ResNet-50)
    "cbam": R50_PLAIN + sum(cbam_params(c) for c in R50_OUT),
    "eca": R50_PLAIN + 3 * 3 + 4 * 5 + 6 * 5 + 3 * 7,  # released k per stage 3, 5, 5, 7
    "gc": R50_PLAIN + sum(gc_params(c) for c in R50_OUT),
    "srm": R50_PLAIN + sum(srm_params(c) for c in R50_OUT),
    "fca": R50_PLAIN + sum(fca_params(c) for c in R50_OUT),
    "triplet": R50_PLAIN + sum(triplet_params(c) for c in R50_OUT),
    "simam": R50_PLAIN,  # parameter-free
    # GE-theta: a depthwise conv with a map-sized kernel (56, 28, 14, 7 per stage) + BN.
    "ge": R50_PLAIN
    + sum(
        c * k * k + 2 * c
        for c, k in zip(R50_OUT, [56] * 3 + [28] * 4 + [14] * 6 + [7] * 3, strict=True)
    ),
    "bam": R50_PLAIN + sum(bam_params(c) for c in (256, 512, 1024)),
    # GCT: 3C before every conv: stem (3 channels), conv1/conv2/conv3 of every block, 4 downsamples.
    "gct": R50_PLAIN
    + 3 * (3 + sum(R50_IN) + 2 * sum(R50_WIDTH) + sum(R50_IN[i] for i in (0, 3, 7, 13))),
}


@pytest.mark.parametrize(
    "name", ["resnet18", "resnet34", "resnet50", "resnext50_32x4d", "mobilenet_v2"]
)
def test_plain_models_equal_torchvision(name: str) -> None:
    ours = models.create_model(name).eval()
    theirs = getattr(torchvision.models, name)(weights=None).eval()
    assert n_params(ours) == n_params(theirs)
    # Same names: torchvision weights load strictly, and the outputs are then identical.
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def test_resnet50_plain_count() -> None:
    assert n_params(models.resnet50()) == R50_PLAIN


@pytest.mark.parametrize("attention", sorted(EXPECTED_R50))
def test_resnet50_attention_counts(attention: str) -> None:
    assert n_params(models.resnet50(attention=attention)) == EXPECTED_R50[attention]


def test_published_counts() -> None:
    # Figures as printed by the papers / official READMEs (rounded to 0.01M).
    assert round(EXPECTED_R50["se"] / 1e6, 2) == 28.09
    assert round(EXPECTED_R50["cbam"] / 1e6, 2) == 28.09
    assert round(EXPECTED_R50["gc"] / 1e6, 2) == 28.11 or round(EXPECTED_R50["gc"] / 1e6, 1) == 28.1
    assert round(EXPECTED_R50["bam"] / 1e6, 2) == 25.92
    assert round(EXPECTED_R50["srm"] / 1e6, 2) == 25.62
    assert round(EXPECTED_R50["triplet"] / 1e6, 2) == 25.56
    assert round(EXPECTED_R50["fca"] / 1e6, 2) == 28.07


def test_sknet50_count() -> None:
    net = models.create_model("sknet50")
    widths = R50_WIDTH  # ResNeXt-50 32x4d has twice the bottleneck width of ResNet-50
    expected = 25_028_904 + sum(sk_block_delta(2 * w) for w in widths)
    assert n_params(net) == expected
    assert round(expected / 1e6, 1) == 27.5  # SKNet-50: 27.5M
    assert all(
        type(b.conv2).__name__ == "SKConv" for stage in (net.layer1, net.layer4) for b in stage
    )


def test_mobilenetv2_coord_attention() -> None:
    net = models.mobilenet_v2(attention="coord")
    # Hidden widths (6 x input width) of the 16 inverted residuals with expansion 6.
    hidden, inp = [], 16
    for c, n in ((24, 2), (32, 3), (64, 4), (96, 3), (160, 3), (320, 1)):
        for _ in range(n):
            hidden.append(6 * inp)
            inp = c
    assert n_params(net) == 3_504_872 + sum(coord_params(h) for h in hidden)
    assert round(n_params(net) / 1e6, 2) == 3.95  # CA README: MobileNetV2 + CA 3.95M
    found = attention_modules(net)
    assert len(found) == 16 and all(name.endswith("attn_dw") for name, _ in found)
    assert [m.channels for _, m in found] == hidden


def test_cifar_resnets() -> None:
    # Option-A shortcuts: 0.27M / 0.46M / 0.66M / 0.85M / 1.7M (He et al., Table 6).
    counts = {d: n_params(models.create_model(f"resnet{d}")) for d in (20, 32, 44, 56, 110)}
    for depth, count in counts.items():
        n = (depth - 2) // 6
        convs = 9 * 3 * 16 + 2 * n * 9 * 16 * 16 + (n * 2 - 1) * 9 * 32 * 32 + 9 * 16 * 32
        convs += (n * 2 - 1) * 9 * 64 * 64 + 9 * 32 * 64
        bns = 2 * 16 + 2 * n * (2 * 16 + 2 * 32 + 2 * 64)
        assert count == convs + bns + 64 * 10 + 10
    assert round(counts[20] / 1e6, 2) == 0.27 and round(counts[110] / 1e6, 1) == 1.7
    net = models.cifar_resnet20(attention="se")
    assert len(attention_modules(net)) == 9
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cifar_shortcut_b_and_depth_errors() -> None:
    assert n_params(models.cifar_resnet20(shortcut="B")) > n_params(models.cifar_resnet20())
    with pytest.raises(ValueError, match="CifarResNet: depth must be 6n \\+ 2"):
        models.CifarResNet(21)


def test_placements_in_resnet50() -> None:
    cases = {
        "se": (16, "attn", R50_OUT),
        "simam": (16, "attn_conv2", None),
        "bam": (3, "stage_attn", [256, 512, 1024]),
        "nonlocal": (5, "block_attn", [512, 512, 1024, 1024, 1024]),
        "gct": (1 + 3 * 16 + 4, "pre_", None),
        "da_position": (1, "head_attn", [2048]),
    }
    for attention, (count, fragment, channels) in cases.items():
        found = attention_modules(models.resnet50(attention=attention))
        assert len(found) == count, attention
        assert all(fragment in name for name, _ in found), (attention, [n for n, _ in found][:3])
        if channels is not None:
            assert [m.channels for _, m in found] == channels, attention


def test_attention_runs_where_the_paper_puts_it() -> None:
    x = torch.randn(1, 3, 64, 64)
    net = models.resnet18(attention="cbam").eval()
    calls: list[str] = []
    for name, module in attention_modules(net):
        module.register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    net(x)
    assert calls == [f"layer{s}.{b}.attn" for s in range(1, 5) for b in range(2)]


def test_cbam_official_spatial_bn_init() -> None:
    net = models.resnet18(attention="cbam")
    gates = [m for m in net.modules() if type(m).__name__ == "CBAMSpatialGate"]
    assert len(gates) == 8 and all(float(g.bn.weight.detach().abs().sum()) == 0 for g in gates)


def test_placement_override_and_errors() -> None:
    net = models.resnet18(attention="simam", placement="block_end")
    assert all(name.endswith(".attn") for name, _ in attention_modules(net))
    with pytest.raises(ValueError, match="placement must be one of"):
        models.resnet18(attention="se", placement="everywhere")
    with pytest.raises(ValueError, match="mobilenet_v2: placement 'stage_end' is not available"):
        models.mobilenet_v2(attention="se", placement="stage_end")
    with pytest.raises(ValueError, match="no paper placement in a mobilenetv2"):
        models.mobilenet_v2(attention="sk")
    with pytest.raises(ValueError, match="Unknown attention 'sse2'"):
        models.resnet18(attention="sse2")
    with pytest.raises(ValueError, match="Unknown model 'resnet51'"):
        models.create_model("resnet51")
    with pytest.raises(ValueError, match="attention_options given without an attention"):
        models.resnet18(attention_options={"rd_ratio": 0.25})


def test_attention_options_and_classes() -> None:
    net = models.resnet18(attention="se", attention_options={"rd_ratio": 0.25})
    assert all(m.rd_channels == m.channels // 4 for _, m in attention_modules(net))
    net = models.resnet18(attention=convattn.layers.ECAModule, attention_options={"kernel_size": 3})
    assert len(attention_modules(net)) == 8
    eca = models.resnet50(attention="eca")
    assert [m.kernel_size for _, m in attention_modules(eca)] == [3] * 3 + [5] * 4 + [5] * 6 + [
        7
    ] * 3


def test_pretrained_torchvision_weights_load_into_attention_variants() -> None:
    state = torchvision.models.resnet50(weights=None).state_dict()
    net = models.resnet50(attention="se")
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert unexpected == []
    assert set(missing) == {k for k in net.state_dict() if ".attn." in k}


# Every registered mechanism builds into a network, runs forward and backward.
CIFAR_OPTIONS = {
    "sk": {"groups": 1},
    "shuffle": {"groups": 4},
    "sge": {"groups": 8},
    "ema": {"groups": 8},
    "attnpool": {"num_heads": 4},
}


@pytest.mark.parametrize("attention", convattn.list_attention())
def test_every_mechanism_trains_in_cifar_resnet20(attention: str) -> None:
    net = models.cifar_resnet20(attention=attention, attention_options=CIFAR_OPTIONS.get(attention))
    x = torch.randn(2, 3, 32, 32)
    out = net(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
