"""cSE, sSE and scSE against references written from the paper."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import convattn
from _reference import n_params, randomize, spatial_shape
from convattn.layers import ChannelSE, ChannelSpatialSE, SpatialSE


def cse_reference(x, m):
    z = x.flatten(2).mean(-1)
    s = torch.sigmoid(
        F.linear(F.relu(F.linear(z, m.fc1.weight, m.fc1.bias)), m.fc2.weight, m.fc2.bias)
    )
    return x * s.reshape(*s.shape, *([1] * (x.dim() - 2)))


def sse_reference(x, m):
    # q = W_sq * x, a 1x1 convolution: a weighted sum over channels at each position.
    w = m.conv.weight.reshape(-1)
    q = torch.einsum("nc...,c->n...", x, w) + m.conv.bias
    return x * torch.sigmoid(q).unsqueeze(1)


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_cse_and_sse(spatial_dims: int) -> None:
    x = torch.randn(2, 32, *spatial_shape(spatial_dims), dtype=torch.float64)
    cse = randomize(ChannelSE(32, spatial_dims=spatial_dims)).double()
    sse = randomize(SpatialSE(32, spatial_dims=spatial_dims)).double()
    torch.testing.assert_close(cse(x), cse_reference(x, cse))
    torch.testing.assert_close(sse(x), sse_reference(x, sse))
    assert cse.fc1.out_features == 16  # reduction 2


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
@pytest.mark.parametrize("fusion", ["max", "sum"])
def test_scse_fusion(spatial_dims: int, fusion: str) -> None:
    module = randomize(ChannelSpatialSE(32, fusion=fusion, spatial_dims=spatial_dims)).double()
    x = torch.randn(2, 32, *spatial_shape(spatial_dims), dtype=torch.float64)
    a, b = cse_reference(x, module.cse), sse_reference(x, module.sse)
    expected = torch.maximum(a, b) if fusion == "max" else a + b
    torch.testing.assert_close(module(x), expected)


def test_scse_default_is_official_max() -> None:
    assert convattn.info("scse").defaults["fusion"] == "max"
    assert convattn.info("scse").defaults["rd_ratio"] == 0.5
    with pytest.raises(ValueError, match="ChannelSpatialSE: fusion must be one of"):
        ChannelSpatialSE(8, fusion="mean")


@pytest.mark.parametrize("channels", [64, 256, 2048])
def test_parameter_counts(channels: int) -> None:
    r = channels // 2
    cse = 2 * channels * r + r + channels
    sse = channels + 1
    assert n_params(ChannelSE(channels)) == cse
    assert n_params(SpatialSE(channels)) == sse
    assert n_params(ChannelSpatialSE(channels)) == cse + sse
