"""Shuffle attention (SA-Net) against a reference written from the paper's equations."""

from __future__ import annotations

import pytest
import torch

from convattn import registry
from convattn.layers.shuffle import ShuffleAttention


def _shuffle_index(channels: int) -> torch.Tensor:
    """Channel shuffle with 2 groups: output channel 2i + r is input channel r * C/2 + i."""
    half = channels // 2
    return torch.tensor([r * half + i for i in range(half) for r in range(2)])


def shuffle_reference(x: torch.Tensor, module: ShuffleAttention) -> torch.Tensor:
    n, c = x.shape[:2]
    spatial = tuple(x.shape[2:])
    groups = module.groups
    k = c // (2 * groups)
    dims = tuple(range(3, 3 + len(spatial)))
    view = (1, 1, k) + (1,) * len(spatial)

    def per_channel(p: torch.Tensor) -> torch.Tensor:
        return p.reshape(view)

    xg = x.reshape(n, groups, 2 * k, *spatial)
    x_channel, x_spatial = xg[:, :, :k], xg[:, :, k:]
    # Channel half: F_c(s) = W1 s + b1 on the global average s.
    s = x_channel.mean(dim=dims, keepdim=True)
    y_channel = x_channel * torch.sigmoid(
        per_channel(module.cweight) * s + per_channel(module.cbias)
    )
    # Spatial half: GroupNorm with one channel per group = per-channel normalisation.
    mu = x_spatial.mean(dim=dims, keepdim=True)
    var = x_spatial.var(dim=dims, keepdim=True, unbiased=False)
    gn = (x_spatial - mu) / torch.sqrt(var + 1e-5)
    gn = gn * per_channel(module.gn.weight) + per_channel(module.gn.bias)
    y_spatial = x_spatial * torch.sigmoid(
        per_channel(module.sweight) * gn + per_channel(module.sbias)
    )
    y = torch.cat([y_channel, y_spatial], dim=2).reshape(n, c, *spatial)
    return y[:, _shuffle_index(c)]


@pytest.mark.parametrize(
    ("channels", "groups", "spatial"),
    [
        (128, 64, (5, 7)),
        (64, 8, (4, 3)),
        (24, 2, (9,)),
        (16, 4, (3, 4, 2)),
        (12, 1, (1, 1)),
    ],
)
def test_matches_reference(channels: int, groups: int, spatial: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    module = ShuffleAttention(channels, groups=groups, spatial_dims=len(spatial)).double()
    with torch.no_grad():
        for param in module.parameters():
            param.normal_()
    x = torch.randn(2, channels, *spatial, dtype=torch.float64)
    torch.testing.assert_close(module(x), shuffle_reference(x, module))


@pytest.mark.parametrize("spatial", [(6,), (4, 5), (2, 3, 4)])
def test_initial_state(spatial: tuple[int, ...]) -> None:
    """Official init: cweight = sweight = 0, cbias = sbias = 1, so every gate is sigmoid(1)
    and the output is the shuffled input times sigmoid(1)."""
    module = ShuffleAttention(128, spatial_dims=len(spatial))
    shape = (1, 1) + (1,) * len(spatial)
    for name, value in [("cweight", 0.0), ("cbias", 1.0), ("sweight", 0.0), ("sbias", 1.0)]:
        assert torch.equal(getattr(module, name), torch.full(shape, value)), name
    x = torch.randn(2, 128, *spatial)
    expected = x[:, _shuffle_index(128)] * torch.sigmoid(torch.tensor(1.0))
    torch.testing.assert_close(module(x), expected)


def test_gates_are_hookable() -> None:
    module = ShuffleAttention(16, groups=2)
    shapes = {}
    for name, sub in module.named_modules():
        if name.startswith("gate"):
            sub.register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, o.shape))
    module(torch.randn(3, 16, 5, 6))
    assert shapes == {"gate_channel": (6, 4, 1, 1), "gate_spatial": (6, 4, 5, 6)}


@pytest.mark.parametrize(("channels", "groups"), [(64, 32), (256, 64), (2048, 64)])
def test_param_count(channels: int, groups: int) -> None:
    k = channels // (2 * groups)
    # cweight, cbias, sweight, sbias and the GroupNorm affine pair: C/2G values each.
    closed_form = 6 * k
    assert closed_form == {64: 6, 256: 12, 2048: 96}[channels]
    module = ShuffleAttention(channels, groups=groups)
    assert sum(p.numel() for p in module.parameters()) == closed_form
    if groups == 64:
        assert registry.count_params("shuffle", channels) == closed_form


def test_default_groups_need_128_channels() -> None:
    with pytest.raises(
        ValueError, match=r"^ShuffleAttention: channels must be divisible by 2 \* groups"
    ):
        ShuffleAttention(64)
    with pytest.raises(ValueError, match=r"channels=80 and groups=16"):
        ShuffleAttention(80, groups=16)


def test_defaults_and_registry() -> None:
    spec = registry.info("shuffle")
    assert spec.cls is ShuffleAttention
    assert spec.kind == "hybrid"
    assert spec.spatial_dims == (1, 2, 3)
    assert spec.defaults == {"groups": 64, "spatial_dims": 2}


def test_bad_input() -> None:
    with pytest.raises(ValueError, match=r"^ShuffleAttention: expected a 3-D input"):
        ShuffleAttention(128, spatial_dims=1)(torch.randn(1, 128, 3, 3))
