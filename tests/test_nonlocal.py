"""Non-local block against references written from the paper's equations (eqs. 1-6) and the
official code's scaling and subsampling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import convattn
from _reference import bn_eval, n_params, randomize
from convattn.layers.nonlocal_ import NonLocalBlock

# Even sizes: the subsampling max pool then equals the official floor pooling exactly.
EVEN_SHAPES = {1: (8,), 2: (6, 4), 3: (3, 4, 6)}


def conv1x1(x, conv):
    out = torch.einsum("oc,nc...->no...", conv.weight.flatten(1), x)
    if conv.bias is not None:
        out = out + conv.bias.reshape(1, -1, *([1] * (x.dim() - 2)))
    return out


def subsample(x):
    """Official max pool: kernel = stride = 2 in space ((1, 2, 2) for 3-D), floor mode."""
    if x.dim() == 3:
        return F.max_pool1d(x, 2)
    if x.dim() == 4:
        return F.max_pool2d(x, 2)
    return F.max_pool3d(x, (1, 2, 2))


def reference(x, m, mode, sub_sample, bn, scale):
    pooled = subsample(x) if sub_sample else x
    if mode == "gaussian":
        theta, phi = x.flatten(2), pooled.flatten(2)
    else:
        theta = conv1x1(x, m.theta).flatten(2)  # (N, d, L)
        phi = conv1x1(pooled, m.phi).flatten(2)  # (N, d, M)
    g = conv1x1(pooled, m.g).flatten(2)  # (N, d, M)
    n_j = phi.shape[-1]
    if mode == "concatenation":
        # f(x_i, x_j) = ReLU(w_f^T [theta_i; phi_j]) on the explicit concatenation.
        length = theta.shape[-1]
        pairs = torch.cat(
            [
                theta.unsqueeze(-1).expand(-1, -1, -1, n_j),
                phi.unsqueeze(-2).expand(-1, -1, length, -1),
            ],
            dim=1,
        )  # (N, 2d, L, M)
        w_f = m.pairwise.project.weight.flatten()
        weights = torch.relu(torch.einsum("c,ncij->nij", w_f, pairs)) / n_j
    else:
        f = torch.einsum("ndi,ndj->nij", theta, phi)
        if scale:
            f = f / theta.shape[1] ** 0.5
        if mode in ("embedded_gaussian", "gaussian"):
            f = torch.exp(f - f.amax(-1, keepdim=True))
            weights = f / f.sum(-1, keepdim=True)  # C(x) = sum_j f
        else:
            weights = f / n_j  # C(x) = N
    y = torch.einsum("nij,ndj->ndi", weights, g).reshape(x.shape[0], -1, *x.shape[2:])
    wy = conv1x1(y, m.out_conv)
    if bn:
        wy = bn_eval(wy, m.out_bn)
    return wy + x


MODES = ["embedded_gaussian", "gaussian", "dot_product", "concatenation"]


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference(spatial_dims: int, mode: str) -> None:
    module = NonLocalBlock(12, mode=mode, spatial_dims=spatial_dims)
    module = randomize(module).double().eval()
    x = torch.randn(2, 12, *EVEN_SHAPES[spatial_dims], dtype=torch.float64)
    expected = reference(x, module, mode, True, True, mode == "embedded_gaussian")
    torch.testing.assert_close(module(x), expected)


@pytest.mark.parametrize(
    ("sub_sample", "bn", "scale"),
    [(False, True, True), (True, False, True), (True, True, False), (False, False, False)],
)
def test_options_match_reference(sub_sample: bool, bn: bool, scale: bool) -> None:
    module = NonLocalBlock(12, sub_sample=sub_sample, bn=bn, scale=scale)
    module = randomize(module).double().eval()
    x = torch.randn(2, 12, 6, 4, dtype=torch.float64)
    expected = reference(x, module, "embedded_gaussian", sub_sample, bn, scale)
    torch.testing.assert_close(module(x), expected)


def test_odd_and_tiny_maps_keep_the_last_row() -> None:
    # ceil-mode pooling: a 5x3 map pools to 3x2 (the official floor pooling gives 2x1).
    module = randomize(NonLocalBlock(8)).double().eval()
    x = torch.randn(1, 8, 5, 3, dtype=torch.float64)
    pooled = F.max_pool2d(x, 2, ceil_mode=True)
    assert pooled.shape[-2:] == (3, 2)
    theta = conv1x1(x, module.theta).flatten(2)
    phi = conv1x1(pooled, module.phi).flatten(2)
    g = conv1x1(pooled, module.g).flatten(2)
    weights = torch.softmax(torch.einsum("ndi,ndj->nij", theta, phi) / 2.0, dim=-1)
    y = torch.einsum("nij,ndj->ndi", weights, g).reshape(1, 4, 5, 3)
    expected = bn_eval(conv1x1(y, module.out_conv), module.out_bn) + x
    torch.testing.assert_close(module(x), expected)
    assert module(torch.randn(1, 8, 1, 1, dtype=torch.float64)).shape == (1, 8, 1, 1)


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
@pytest.mark.parametrize("bn", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_identity_at_init(spatial_dims: int, bn: bool, mode: str) -> None:
    module = NonLocalBlock(8, mode=mode, bn=bn, spatial_dims=spatial_dims)
    x = torch.randn(2, 8, *EVEN_SHAPES[spatial_dims])
    assert torch.equal(module.train()(x), x)
    assert torch.equal(module.eval()(x), x)


def test_official_init_and_defaults() -> None:
    module = NonLocalBlock(64)
    assert module.inter_channels == 32 and NonLocalBlock(1).inter_channels == 1
    for conv in (module.theta, module.phi, module.g, module.out_conv):
        assert conv.bias is not None and torch.all(conv.bias == 0)
        assert 0.005 < conv.weight.std().item() < 0.015  # normal(0, 0.01)
    assert torch.all(module.out_bn.weight == 0) and torch.all(module.out_bn.bias == 0)
    assert module.pairwise.scale == 32**-0.5
    defaults = convattn.info("nonlocal").defaults
    assert defaults["mode"] == "embedded_gaussian" and defaults["sub_sample"] is True
    assert defaults["bn"] is True and defaults["scale"] is None


def test_attention_map_through_gate() -> None:
    module = NonLocalBlock(8)
    maps = []
    module.gate.register_forward_hook(lambda _m, _i, out: maps.append(out))
    module(torch.randn(2, 8, 6, 4))
    assert maps[0].shape == (2, 24, 6)  # 6x4 query positions, 3x2 subsampled keys
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 24))


def test_bad_options_raise() -> None:
    with pytest.raises(ValueError, match="NonLocalBlock: mode must be one of"):
        NonLocalBlock(8, mode="softmax")
    with pytest.raises(ValueError, match="NonLocalBlock: scale=True is not defined"):
        NonLocalBlock(8, mode="concatenation", scale=True)
    with pytest.raises(TypeError, match="NonLocalBlock: sub_sample must be a bool"):
        NonLocalBlock(8, sub_sample=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NonLocalBlock: inter_channels"):
        NonLocalBlock(8, inter_channels=0)


@pytest.mark.parametrize("channels", [64, 256, 2048])
def test_parameter_counts(channels: int) -> None:
    d = channels // 2
    embedded = 3 * (channels * d + d) + (d * channels + channels) + 2 * channels
    assert embedded == 4 * channels * d + 3 * d + 3 * channels
    gaussian = (channels * d + d) + (d * channels + channels) + 2 * channels
    with torch.device("meta"):
        assert n_params(NonLocalBlock(channels)) == embedded
        assert n_params(NonLocalBlock(channels, mode="dot_product")) == embedded
        assert n_params(NonLocalBlock(channels, mode="concatenation")) == embedded + 2 * d
        assert n_params(NonLocalBlock(channels, mode="gaussian")) == gaussian
        assert n_params(NonLocalBlock(channels, bn=False)) == embedded - 2 * channels
