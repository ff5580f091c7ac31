"""DANet's position (PAM) and channel (CAM) attention modules against references written
from the paper's equations (with the official CAM's max - energy)."""

from __future__ import annotations

import pytest
import torch

import convattn
from _reference import n_params, randomize, spatial_shape
from convattn.layers.danet import DAChannelAttention, DAPositionAttention


def conv1x1(x, conv):
    out = torch.einsum("oc,nc...->no...", conv.weight.flatten(1), x)
    return out + conv.bias.reshape(1, -1, *([1] * (x.dim() - 2)))


def pam_reference(x, m):
    """Eqs. 1-2 with B = W_q x, C = W_k x, D = W_v x: for each output position j,
    s_ji = softmax over positions i of (B_j . C_i), E_j = alpha * sum_i s_ji D_i + A_j."""
    b = conv1x1(x, m.query_conv).flatten(2)  # (N, C', L)
    c = conv1x1(x, m.key_conv).flatten(2)
    d = conv1x1(x, m.value_conv).flatten(2)  # (N, C, L)
    energy = torch.einsum("ncj,nci->nji", b, c)  # query j, key i
    s = torch.exp(energy - energy.amax(-1, keepdim=True))
    s = s / s.sum(-1, keepdim=True)
    out = torch.einsum("nji,nci->ncj", s, d)
    return m.gamma * out.reshape(x.shape) + x


def cam_reference(x, m):
    """Eqs. 3-4 with the official max - energy: softmax_i(max_k e_jk - e_ji) = softmax_i(-e_ji)."""
    a = x.flatten(2)
    energy = torch.einsum("njl,nil->nji", a, a)
    weights = torch.softmax(-energy, dim=-1)
    out = torch.einsum("nji,nil->njl", weights, a)
    return m.gamma * out.reshape(x.shape) + x


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_pam_matches_reference(spatial_dims: int) -> None:
    module = randomize(DAPositionAttention(16, spatial_dims=spatial_dims)).double()
    x = torch.randn(2, 16, *spatial_shape(spatial_dims), dtype=torch.float64)
    torch.testing.assert_close(module(x), pam_reference(x, module))


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_cam_matches_reference(spatial_dims: int) -> None:
    module = randomize(DAChannelAttention(16, spatial_dims=spatial_dims)).double()
    # Small values keep the Gram matrix moderate so the softmax is not one-hot.
    x = 0.2 * torch.randn(2, 16, *spatial_shape(spatial_dims), dtype=torch.float64)
    torch.testing.assert_close(module(x), cam_reference(x, module))


@pytest.mark.parametrize("cls", [DAPositionAttention, DAChannelAttention])
def test_identity_at_init(cls: type) -> None:
    module = cls(16)
    assert module.gamma.item() == 0.0
    x = torch.randn(2, 16, 5, 3)
    assert torch.equal(module.train()(x), x)
    assert torch.equal(module.eval()(x), x)


def test_attention_maps_through_gate() -> None:
    maps = {}
    pam, cam = DAPositionAttention(16), DAChannelAttention(16)
    pam.gate.register_forward_hook(lambda _m, _i, out: maps.__setitem__("pam", out))
    cam.gate.register_forward_hook(lambda _m, _i, out: maps.__setitem__("cam", out))
    x = torch.randn(2, 16, 5, 3)
    pam(x)
    cam(x)
    assert maps["pam"].shape == (2, 15, 15)
    assert maps["cam"].shape == (2, 16, 16)
    for attention in maps.values():
        torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:2]))


def test_reduction_width() -> None:
    assert DAPositionAttention(64).query_conv.out_channels == 8
    assert DAPositionAttention(64, rd_channels=16).key_conv.out_channels == 16
    assert DAPositionAttention(4).query_conv.out_channels == 1  # official code fails here
    assert convattn.info("da_position").defaults["rd_ratio"] == 1 / 8


@pytest.mark.parametrize("channels", [64, 256, 2048])
def test_parameter_counts(channels: int) -> None:
    rd = channels // 8
    # query and key: C -> C/8 with bias; value: C -> C with bias; gamma.
    pam = 2 * (channels * rd + rd) + (channels * channels + channels) + 1
    with torch.device("meta"):
        assert n_params(DAPositionAttention(channels)) == pam
        assert n_params(DAChannelAttention(channels)) == 1
