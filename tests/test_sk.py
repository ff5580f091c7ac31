"""SK convolution against a reference written from the paper's split-fuse-select equations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import convattn
from _reference import bn_eval, n_params, randomize
from convattn.layers import SKConv

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def sk_reference(x, m, stride=1, groups=32):
    conv = CONV[x.dim() - 2]
    branches = []
    for i, branch in enumerate(m.branches):
        dilation = i + 1
        u = conv(
            x, branch[0].weight, stride=stride, padding=dilation, dilation=dilation, groups=groups
        )
        branches.append(F.relu(bn_eval(u, branch[1])))  # U_m = ReLU(BN(conv))
    u = sum(branches)  # fuse: U = U_1 + U_2 + ...
    s = u.flatten(2).mean(-1)  # s_c = GAP(U_c)
    z = F.relu(bn_eval(F.linear(s, m.fc1.weight), m.bn))  # z = delta(B(W s))
    logits = F.linear(z, m.fc2.weight).view(x.shape[0], len(branches), -1)
    a = torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)  # softmax across branches
    expand = (...,) + (None,) * (x.dim() - 2)
    return sum(a[:, i][expand] * b for i, b in enumerate(branches))  # V = sum a_m U_m


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_sk_matches_reference(spatial_dims: int) -> None:
    module = randomize(SKConv(64, spatial_dims=spatial_dims)).double().eval()
    x = torch.randn(2, 64, *(6, 5, 4)[:spatial_dims], dtype=torch.float64)
    torch.testing.assert_close(module(x), sk_reference(x, module))


def test_sk_three_branches_stride_and_out_channels() -> None:
    module = (
        randomize(SKConv(32, out_channels=64, stride=2, groups=16, num_branches=3)).double().eval()
    )
    x = torch.randn(2, 32, 9, 8, dtype=torch.float64)
    y = module(x)
    assert y.shape == (2, 64, 5, 4)
    torch.testing.assert_close(y, sk_reference(x, module, stride=2, groups=16))


def test_sk_train_mode_selection_sums_to_one() -> None:
    module = SKConv(64).train()
    weights = []
    module.gate.register_forward_hook(lambda _m, _i, out: weights.append(out))
    module(torch.randn(4, 64, 8, 8))
    torch.testing.assert_close(weights[0].sum(1), torch.ones(4, 64))


@pytest.mark.parametrize("channels", [64, 256, 2048])
def test_parameter_counts(channels: int) -> None:
    d = max(channels // 16, 32)
    per_branch = channels * (channels // 32) * 9 + 2 * channels  # grouped conv + BN
    expected = 2 * per_branch + channels * d + 2 * d + d * 2 * channels
    assert n_params(SKConv(channels)) == expected


def test_sknet50_first_block_width() -> None:
    # SKNet-50 conv2_x: 128-wide grouped 3x3 convs, d = max(128/16, 32) = 32, fc2 to 2*128.
    module = SKConv(128)
    assert module.rd_channels == 32 and module.fc2.out_features == 256
    assert module.fc1.bias is None and module.fc2.bias is None


def test_groups_must_divide() -> None:
    with pytest.raises(ValueError, match="SKConv: groups=32 must divide channels"):
        SKConv(48)
    with pytest.raises(TypeError, match="SKConv: stride must be an int"):
        convattn.create("sk", 64, stride=1.5)
