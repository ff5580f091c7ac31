"""BAM: numbers against a functional reference written from the paper / official code."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _reference import randomize
from convattn.layers.bam import BAM
from convattn.registry import create, info

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def bn(x: torch.Tensor, sd: dict[str, torch.Tensor], key: str, training: bool) -> torch.Tensor:
    if training:
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, correction=0, keepdim=True)
    else:
        shape = [1, -1] + [1] * (x.dim() - 2)
        mean = sd[f"{key}.running_mean"].reshape(shape)
        var = sd[f"{key}.running_var"].reshape(shape)
    shape = [1, -1] + [1] * (x.dim() - 2)
    return (x - mean) / torch.sqrt(var + 1e-5) * sd[f"{key}.weight"].reshape(shape) + sd[
        f"{key}.bias"
    ].reshape(shape)


def bam_reference(
    x: torch.Tensor,
    sd: dict[str, torch.Tensor],
    *,
    fusion: str,
    dilation: int = 4,
    training: bool = False,
) -> torch.Tensor:
    """F' = F * (1 + sigmoid(Mc * Ms)) (official) or sigmoid(Mc + Ms) (paper)."""
    d = x.dim() - 2
    conv = CONV[d]
    # Channel branch: GAP -> FC -> BN -> ReLU -> FC.
    z = x.flatten(2).mean(-1)
    h = z @ sd["channel_mlp.0.weight"].T + sd["channel_mlp.0.bias"]
    h = torch.relu(bn(h, sd, "channel_mlp.1", training))
    mc = h @ sd["channel_mlp.3.weight"].T + sd["channel_mlp.3.bias"]
    mc = mc.reshape(*mc.shape, *([1] * d))
    # Spatial branch: 1x1 -> BN -> ReLU -> [3x3 dilated -> BN -> ReLU] x 2 -> 1x1.
    s = conv(x, sd["spatial_convs.0.weight"], sd["spatial_convs.0.bias"])
    s = torch.relu(bn(s, sd, "spatial_convs.1", training))
    for conv_i, bn_i in ((3, 4), (6, 7)):
        s = conv(
            s,
            sd[f"spatial_convs.{conv_i}.weight"],
            sd[f"spatial_convs.{conv_i}.bias"],
            padding=dilation,
            dilation=dilation,
        )
        s = torch.relu(bn(s, sd, f"spatial_convs.{bn_i}", training))
    ms = conv(s, sd["spatial_convs.9.weight"], sd["spatial_convs.9.bias"])
    logits = mc * ms if fusion == "product" else mc + ms
    return x * (1 + 1 / (1 + torch.exp(-logits)))


@pytest.mark.parametrize("fusion", ["product", "sum"])
@pytest.mark.parametrize("size", [(7, 7), (14, 14), (5, 9), (1, 1)])
def test_matches_reference_eval_any_map_size(fusion: str, size: tuple[int, int]) -> None:
    module = randomize(BAM(32, fusion=fusion), seed=0).double().eval()
    x = torch.randn(2, 32, *size, dtype=torch.float64)
    ref = bam_reference(x, module.state_dict(), fusion=fusion)
    torch.testing.assert_close(module(x), ref)


def test_batch_size_one_eval() -> None:
    module = randomize(BAM(32), seed=0).double().eval()
    x = torch.randn(1, 32, 5, 9, dtype=torch.float64)
    torch.testing.assert_close(module(x), bam_reference(x, module.state_dict(), fusion="product"))


@pytest.mark.parametrize("spatial_dims,size", [(1, (11,)), (3, (3, 4, 5))])
@pytest.mark.parametrize("fusion", ["product", "sum"])
def test_matches_reference_other_dims(
    spatial_dims: int, size: tuple[int, ...], fusion: str
) -> None:
    module = randomize(BAM(32, fusion=fusion, spatial_dims=spatial_dims), seed=0).double().eval()
    x = torch.randn(2, 32, *size, dtype=torch.float64)
    ref = bam_reference(x, module.state_dict(), fusion=fusion)
    torch.testing.assert_close(module(x), ref)


def test_matches_reference_train_mode() -> None:
    module = randomize(BAM(32), seed=0).double().train()
    x = torch.randn(3, 32, 6, 5, dtype=torch.float64)
    sd = {k: v.clone() for k, v in module.state_dict().items()}
    torch.testing.assert_close(module(x), bam_reference(x, sd, fusion="product", training=True))


def test_dilation_option_and_size_kept() -> None:
    module = randomize(BAM(32, dilation=2), seed=0).double().eval()
    x = torch.randn(1, 32, 3, 8, dtype=torch.float64)
    ref = bam_reference(x, module.state_dict(), fusion="product", dilation=2)
    torch.testing.assert_close(module(x), ref)
    for m in module.spatial_convs:
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
            assert m.padding == (2, 2) and m.dilation == (2, 2)


def test_official_structure() -> None:
    module = BAM(256)
    assert module.rd_channels == 16
    convs = [m for m in module.spatial_convs if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(1, 1), (3, 3), (3, 3), (1, 1)]
    assert all(c.bias is not None for c in convs)  # official convs keep the default bias
    assert [c.dilation for c in convs[1:3]] == [(4, 4), (4, 4)]
    assert [c.padding for c in convs[1:3]] == [(4, 4), (4, 4)]
    assert convs[-1].out_channels == 1
    assert isinstance(module.channel_mlp[1], nn.BatchNorm1d)
    assert isinstance(module.gate, nn.Sigmoid)
    assert BAM(256, num_dilated_convs=0).spatial_convs[3].kernel_size == (1, 1)


def bam_params(c: int, r: int = 16) -> int:
    p = c // r
    channel = (c * p + p) + 2 * p + (p * c + c)
    spatial = (c * p + p) + 2 * p + 2 * (9 * p * p + p + 2 * p) + (p + 1)
    return channel + spatial


@pytest.mark.parametrize("channels", [64, 256, 2048])
def test_param_count(channels: int) -> None:
    module = create("bam", channels)
    assert sum(p.numel() for p in module.parameters()) == bam_params(channels)


def test_param_count_values() -> None:
    assert bam_params(256) == 17361
    assert sum(p.numel() for p in BAM(256, spatial_dims=3).parameters()) == 17361 + 2 * 18 * 256


def test_gate_hook_reads_attention_map() -> None:
    module = randomize(BAM(32), seed=0).double().eval()
    x = torch.randn(1, 32, 4, 6, dtype=torch.float64)
    seen: list[torch.Tensor] = []
    module.gate.register_forward_hook(lambda m, i, o: seen.append(o))
    y = module(x)
    assert seen[0].shape == x.shape
    torch.testing.assert_close(y, x * (1 + seen[0]))


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"^BAM: fusion"):
        BAM(64, fusion="max")
    with pytest.raises(ValueError, match=r"^BAM: expected 64 channels"):
        BAM(64).eval()(torch.randn(1, 32, 7, 7))
    with pytest.raises(ValueError, match=r"^BAM: expected a 4-D input"):
        BAM(64).eval()(torch.randn(1, 64, 7))
    with pytest.raises(ValueError, match=r"^BAM: dilation"):
        BAM(64, dilation=0)
    with pytest.raises(ValueError, match=r"^BAM: num_dilated_convs"):
        BAM(64, num_dilated_convs=-1)


def test_registry_entry() -> None:
    spec = info("bam")
    assert spec.cls is BAM and spec.kind == "hybrid" and spec.arxiv == "1807.06514"
    assert spec.defaults["fusion"] == "product" and spec.defaults["dilation"] == 4
