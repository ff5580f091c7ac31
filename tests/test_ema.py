"""EMA against a reference written from the paper's equations (einsum / functional ops)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from convattn import registry
from convattn.layers.ema import EMA


def ema_reference(x: torch.Tensor, module: EMA) -> torch.Tensor:
    n, c, h, w = x.shape
    groups = module.groups
    cg = c // groups
    w1 = module.conv1x1.weight.reshape(cg, cg)
    b1 = module.conv1x1.bias
    xg = x.reshape(n, groups, cg, h, w).reshape(n * groups, cg, h, w)
    # 1x1 branch: directional averages, shared 1x1 conv (a matrix over sub-features).
    along_h = torch.einsum("oc,bch->boh", w1, xg.mean(dim=3)) + b1[None, :, None]
    along_w = torch.einsum("oc,bcw->bow", w1, xg.mean(dim=2)) + b1[None, :, None]
    x1 = xg * torch.sigmoid(along_h)[:, :, :, None] * torch.sigmoid(along_w)[:, :, None, :]
    x1 = F.group_norm(x1, cg, module.gn.weight, module.gn.bias, eps=1e-5)
    # 3x3 branch.
    x2 = F.conv2d(xg, module.conv3x3.weight, module.conv3x3.bias, padding=1)
    # Cross-spatial learning.
    s1 = torch.softmax(x1.mean(dim=(2, 3)), dim=1)
    s2 = torch.softmax(x2.mean(dim=(2, 3)), dim=1)
    weights = torch.einsum("bc,bchw->bhw", s1, x2) + torch.einsum("bc,bchw->bhw", s2, x1)
    return (xg * torch.sigmoid(weights)[:, None]).reshape(n, c, h, w)


@pytest.mark.parametrize(
    ("channels", "groups", "shape"),
    [
        (64, 32, (2, 5, 7)),
        (12, 3, (2, 6, 4)),
        (8, 8, (3, 5, 5)),
        (16, 2, (1, 1, 1)),
        (32, 4, (1, 1, 6)),
    ],
)
def test_matches_reference(channels: int, groups: int, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    module = EMA(channels, groups=groups).double()
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, 0.5)
    x = torch.randn(shape[0], channels, *shape[1:], dtype=torch.float64)
    expected = ema_reference(x, module)
    for mode in (True, False):  # no running statistics: train and eval agree
        module.train(mode)
        torch.testing.assert_close(module(x), expected)


def test_gates_are_hookable() -> None:
    module = EMA(16, groups=4)
    shapes = {}
    for name, sub in module.named_modules():
        if name.startswith("gate"):
            sub.register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, o.shape))
    module(torch.randn(2, 16, 5, 6))
    assert shapes == {
        "gate_h": (8, 4, 5, 1),
        "gate_w": (8, 4, 1, 6),
        "gate_context_1x1": (8, 1, 4),
        "gate_context_3x3": (8, 1, 4),
        "gate": (8, 1, 5, 6),
    }


@pytest.mark.parametrize(("channels", "expected"), [(64, 48), (256, 672), (2048, 41216)])
def test_param_count(channels: int, expected: int) -> None:
    cg = channels // 32
    # conv1x1 (weights + bias), conv3x3 (weights + bias), GroupNorm affine.
    closed_form = (cg * cg + cg) + (9 * cg * cg + cg) + 2 * cg
    assert closed_form == expected
    assert sum(p.numel() for p in EMA(channels).parameters()) == expected
    assert registry.count_params("ema", channels) == expected


def test_defaults_and_registry() -> None:
    spec = registry.info("ema")
    assert spec.cls is EMA
    assert spec.kind == "hybrid"
    assert spec.spatial_dims == (2,)
    assert spec.defaults == {"groups": 32, "spatial_dims": 2}


def test_bad_options() -> None:
    with pytest.raises(ValueError, match=r"^EMA: channels must be divisible by groups"):
        EMA(48)
    with pytest.raises(ValueError, match=r"^EMA: channels must be divisible by groups"):
        EMA(16, groups=32)
    with pytest.raises(ValueError, match=r"^EMA: spatial_dims"):
        EMA(64, spatial_dims=1)
    with pytest.raises(ValueError, match=r"^EMA: expected a 4-D input"):
        EMA(64)(torch.randn(1, 64, 5))
