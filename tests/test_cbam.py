"""CBAM (channel gate, spatial gate, both) against references written from the paper."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _reference import bn_eval, n_params, randomize, spatial_shape
from convattn.layers import CBAM, CBAMChannelGate, CBAMSpatialGate, SpatialAttention

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def channel_reference(x, gate):
    """Eq. 2: Mc(F) = sigmoid(MLP(AvgPool(F)) + MLP(MaxPool(F))), one shared MLP with biases."""
    flat = x.flatten(2)

    def mlp(z):
        return F.linear(
            F.relu(F.linear(z, gate.fc1.weight, gate.fc1.bias)), gate.fc2.weight, gate.fc2.bias
        )

    mc = torch.sigmoid(mlp(flat.mean(-1)) + mlp(flat.max(-1).values))
    return x * mc.reshape(*mc.shape, *([1] * (x.dim() - 2)))


def spatial_reference(x, gate, train: bool = False):
    """Eq. 3: Ms(F) = sigmoid(BN(f7x7([MaxPool_c(F); AvgPool_c(F)]))), BN as in the official code."""
    pooled = torch.cat([x.max(1, keepdim=True).values, x.mean(1, keepdim=True)], 1)
    k = gate.conv.weight.shape[-1]
    conv = CONV[x.dim() - 2](pooled, gate.conv.weight, padding=k // 2)
    if train:
        mean, var = conv.mean(), conv.var(unbiased=False)
        normed = (conv - mean) / torch.sqrt(var + 1e-5) * gate.bn.weight + gate.bn.bias
    else:
        normed = bn_eval(conv, gate.bn)
    return x * torch.sigmoid(normed)


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_channel_gate(spatial_dims: int) -> None:
    gate = randomize(CBAMChannelGate(64, spatial_dims=spatial_dims)).double()
    x = torch.randn(2, 64, *spatial_shape(spatial_dims), dtype=torch.float64)
    torch.testing.assert_close(gate(x), channel_reference(x, gate))


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
@pytest.mark.parametrize("train", [False, True])
def test_spatial_gate(spatial_dims: int, train: bool) -> None:
    gate = randomize(CBAMSpatialGate(16, spatial_dims=spatial_dims)).double().train(train)
    x = torch.randn(2, 16, *spatial_shape(spatial_dims), dtype=torch.float64)
    expected = spatial_reference(x, gate, train)
    torch.testing.assert_close(gate(x), expected)


def test_spatial_bn_is_official() -> None:
    gate = CBAMSpatialGate(8)
    assert gate.bn.momentum == 0.01 and gate.bn.eps == 1e-5
    assert gate.conv.bias is None and gate.conv.weight.shape == (1, 2, 7, 7)


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_cbam_is_channel_then_spatial(spatial_dims: int) -> None:
    module = randomize(CBAM(32, spatial_dims=spatial_dims)).double().eval()
    x = torch.randn(2, 32, *spatial_shape(spatial_dims), dtype=torch.float64)
    refined = channel_reference(x, module.channel_gate)
    expected = spatial_reference(refined, module.spatial_gate)
    torch.testing.assert_close(module(x), expected)


@pytest.mark.parametrize("channels", [64, 256, 2048])
def test_parameter_counts(channels: int) -> None:
    r = channels // 16
    channel = 2 * channels * r + r + channels
    spatial = 2 * 7 * 7 + 2  # conv (no bias) + BN affine
    assert n_params(CBAMChannelGate(channels)) == channel
    assert n_params(CBAMSpatialGate(channels)) == spatial
    assert n_params(CBAM(channels)) == channel + spatial


def test_no_residual_inside() -> None:
    module = CBAM(16).eval()
    with torch.no_grad():
        module.channel_gate.fc2.bias.fill_(-100.0)  # channel gate ~ 0
    x = torch.randn(1, 16, 5, 5)
    assert module(x).abs().max() < 1e-6


def test_generic_spatial_expresses_cbam_spatial() -> None:
    cbam = randomize(CBAMSpatialGate(24)).double().eval()
    generic = (
        SpatialAttention(24, pool="both", kernel_size=7, norm=True, bias=False).double().eval()
    )
    generic.load_state_dict(cbam.state_dict())
    x = torch.randn(2, 24, 6, 9, dtype=torch.float64)
    torch.testing.assert_close(generic(x), cbam(x))


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_generic_spatial_single_pool(pool: str) -> None:
    module = randomize(
        SpatialAttention(8, pool=pool, kernel_size=3, norm=False, bias=True)
    ).double()
    x = torch.randn(2, 8, 4, 5, dtype=torch.float64)
    pooled = x.mean(1, keepdim=True) if pool == "mean" else x.max(1, keepdim=True).values
    logits = F.conv2d(pooled, module.conv.weight, module.conv.bias, padding=1)
    torch.testing.assert_close(module(x), x * torch.sigmoid(logits))


def test_even_kernel_is_rejected() -> None:
    with pytest.raises(ValueError, match="CBAMSpatialGate: kernel_size must be odd"):
        CBAMSpatialGate(8, kernel_size=6)
