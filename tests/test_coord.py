"""Coordinate Attention against a reference written from the paper's eqs. 4-6."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import convattn
from _reference import bn_eval, n_params, randomize
from convattn.layers import CoordAttention


def coord_reference(x, m):
    h, w = x.shape[2:]
    z_h = x.sum(3) / w  # z^h_c(h) = 1/W sum_i x_c(h, i): (N, C, H)
    z_w = x.sum(2) / h  # z^w_c(w) = 1/H sum_j x_c(j, w): (N, C, W)
    cat = torch.cat([z_h, z_w], 2)  # (N, C, H + W)
    f = torch.einsum("nck,mc->nmk", cat, m.conv1.weight[:, :, 0, 0]) + m.conv1.bias[None, :, None]
    f = bn_eval(f, m.bn1)
    f = f * torch.clamp(f + 3, 0, 6) / 6  # h-swish
    f_h, f_w = f[..., :h], f[..., h:]
    g_h = torch.sigmoid(
        torch.einsum("nmk,cm->nck", f_h, m.conv_h.weight[:, :, 0, 0]) + m.conv_h.bias[None, :, None]
    )
    g_w = torch.sigmoid(
        torch.einsum("nmk,cm->nck", f_w, m.conv_w.weight[:, :, 0, 0]) + m.conv_w.bias[None, :, None]
    )
    return x * g_h[:, :, :, None] * g_w[:, :, None, :]  # y_c(i, j) = x_c(i, j) g^h_c(i) g^w_c(j)


@pytest.mark.parametrize("size", [(7, 7), (5, 9), (1, 1), (1, 4)])
def test_coord_matches_reference(size: tuple[int, int]) -> None:
    module = randomize(CoordAttention(64)).double().eval()
    x = torch.randn(2, 64, *size, dtype=torch.float64)
    torch.testing.assert_close(module(x), coord_reference(x, module))


@pytest.mark.parametrize("channels", [64, 256, 2048])
def test_parameter_counts(channels: int) -> None:
    mip = max(8, channels // 32)
    expected = channels * mip + mip + 2 * mip + 2 * (mip * channels + channels)
    assert n_params(CoordAttention(channels)) == expected


def test_only_2d() -> None:
    with pytest.raises(ValueError, match="CoordAttention: spatial_dims must be one of \\[2\\]"):
        convattn.create("coord", 64, spatial_dims=3)


def test_train_mode_uses_batch_statistics() -> None:
    module = CoordAttention(32).train()
    x = torch.randn(3, 32, 6, 4)
    y = module(x)
    assert y.shape == x.shape and F.mse_loss(y, x) > 0
