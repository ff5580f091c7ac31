"""Polarized self-attention against references written from the paper's equations and from
the official PSA_p / PSA_s code."""

from __future__ import annotations

import pytest
import torch

import convattn
from _reference import n_params, randomize, spatial_shape
from convattn.layers.psa import PolarizedSelfAttention


def conv1x1(x, conv):
    """A bias-free or biased 1x1 conv as a weighted sum over channels."""
    out = torch.einsum("oc,nc...->no...", conv.weight.flatten(1), x)
    if conv.bias is not None:
        out = out + conv.bias.reshape(1, -1, *([1] * (x.dim() - 2)))
    return out


def layer_norm_all(v, ln):
    """LayerNorm over every non-batch element of v, affine with ln's weight and bias."""
    dims = tuple(range(1, v.dim()))
    mean = v.mean(dims, keepdim=True)
    var = v.var(dims, unbiased=False, keepdim=True)
    return (v - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def channel_context(x, m):
    """sum_j softmax_j(W_q x)_j W_v x_j: (N, C/2, 1, ..., 1)."""
    v = conv1x1(x, m.ch_wv).flatten(2)
    q = torch.softmax(conv1x1(x, m.ch_wq).flatten(2), dim=-1)  # over positions
    z = (v * q).sum(-1)
    return z.reshape(*z.shape, *([1] * (x.dim() - 2)))


def paper_channel(x, m):
    """Eq. 2: sigmoid(LN(W_z z))."""
    wz, ln = m.ch_wz[0], m.ch_wz[1]
    return torch.sigmoid(layer_norm_all(conv1x1(channel_context(x, m), wz), ln))


def paper_spatial(x, m):
    """Eq. 4: sigmoid(softmax_c(GAP(W_q x)) . W_v x) at each position."""
    q = conv1x1(x, m.sp_wq).flatten(2).mean(-1)
    q = torch.softmax(q, dim=1)  # over the C/2 channels
    v = conv1x1(x, m.sp_wv)
    return torch.sigmoid(torch.einsum("nc,nc...->n...", q, v)).unsqueeze(1)


def official_p_channel(x, m):
    """PSA_p.spatial_pool: conv_up without LayerNorm."""
    return torch.sigmoid(conv1x1(channel_context(x, m), m.ch_wz))


def official_p_spatial(x, m):
    """PSA_p.channel_pool: GAP(W_q x) . W_v x, softmax over positions, then sigmoid."""
    q = conv1x1(x, m.sp_wq).flatten(2).mean(-1)
    v = conv1x1(x, m.sp_wv).flatten(2)
    logits = torch.softmax(torch.einsum("nc,ncl->nl", q, v), dim=-1)
    return torch.sigmoid(logits).reshape(x.shape[0], 1, *x.shape[2:])


def official_s_channel(x, m):
    """PSA_s.spatial_pool: conv_up is conv -> LayerNorm -> ReLU -> conv (both with bias)."""
    conv_a, ln, _, conv_b = m.ch_wz
    hidden = torch.relu(layer_norm_all(conv1x1(channel_context(x, m), conv_a), ln))
    return torch.sigmoid(conv1x1(hidden, conv_b))


def official_s_spatial(x, m):
    """PSA_s.channel_pool: softmax over positions of W_v x, then GAP(W_q x) . that, sigmoid."""
    q = conv1x1(x, m.sp_wq).flatten(2).mean(-1)
    v = torch.softmax(conv1x1(x, m.sp_wv).flatten(2), dim=-1)
    logits = torch.einsum("nc,ncl->nl", q, v)
    return torch.sigmoid(logits).reshape(x.shape[0], 1, *x.shape[2:])


BRANCHES = {
    "paper": (paper_channel, paper_spatial),
    "official-parallel": (official_p_channel, official_p_spatial),
    "official-sequential": (official_s_channel, official_s_spatial),
}


def reference(x, m, layout, form):
    key = "paper" if form == "paper" else f"official-{layout}"
    channel, spatial = BRANCHES[key]
    if layout == "parallel":
        return x * channel(x, m) + x * spatial(x, m)
    z = x * channel(x, m)
    return z * spatial(z, m)


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
@pytest.mark.parametrize("layout", ["parallel", "sequential"])
@pytest.mark.parametrize("form", ["paper", "official"])
def test_matches_reference(spatial_dims: int, layout: str, form: str) -> None:
    module = PolarizedSelfAttention(16, layout=layout, form=form, spatial_dims=spatial_dims)
    module = randomize(module).double()
    x = torch.randn(2, 16, *spatial_shape(spatial_dims), dtype=torch.float64)
    torch.testing.assert_close(module(x), reference(x, module, layout, form))


def test_train_mode_equals_eval_mode() -> None:
    # No batch statistics anywhere: the output does not depend on the mode or the batch.
    module = randomize(PolarizedSelfAttention(8)).double()
    x = torch.randn(3, 8, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(module.train()(x), module.eval()(x))
    torch.testing.assert_close(module(x[:1]), module(x)[:1])


def test_gates_capture_channel_and_spatial_maps() -> None:
    module = PolarizedSelfAttention(8).eval()
    maps: dict[str, torch.Tensor] = {}
    for name in ("gate_channel", "gate_spatial"):
        getattr(module, name).register_forward_hook(
            lambda _m, _i, out, name=name: maps.__setitem__(name, out)
        )
    module(torch.randn(2, 8, 5, 3))
    assert maps["gate_channel"].shape == (2, 8, 1, 1)
    assert maps["gate_spatial"].shape == (2, 1, 5, 3)


def test_official_layout_and_init_facts() -> None:
    module = PolarizedSelfAttention(64)
    # 1x1 convs without bias, inner width C/2, LayerNorm over the C channels.
    for conv in (module.ch_wv, module.ch_wq, module.sp_wq, module.sp_wv, module.ch_wz[0]):
        assert conv.bias is None
    assert module.ch_wv.out_channels == module.sp_wq.out_channels == 32
    assert module.ch_wq.out_channels == 1
    assert tuple(module.ch_wz[1].normalized_shape) == (64, 1, 1)
    # Kaiming normal, fan_in, ReLU gain: std = sqrt(2 / fan_in) = sqrt(2 / 64).
    std = module.sp_wv.weight.std().item()
    assert 0.8 * (2 / 64) ** 0.5 < std < 1.2 * (2 / 64) ** 0.5
    official_s = PolarizedSelfAttention(64, form="official", layout="sequential")
    assert official_s.ch_wz[0].out_channels == 8  # (C/2) / 4
    assert tuple(official_s.ch_wz[1].normalized_shape) == (8, 1, 1)


def test_registry_entry_and_defaults() -> None:
    spec = convattn.info("psa")
    assert spec.kind == "hybrid"
    assert spec.defaults == {"layout": "parallel", "form": "paper", "spatial_dims": 2}
    assert spec.spatial_dims == (1, 2, 3)


def test_bad_options_raise() -> None:
    with pytest.raises(ValueError, match="PolarizedSelfAttention: layout must be one of"):
        PolarizedSelfAttention(8, layout="serial")
    with pytest.raises(ValueError, match="PolarizedSelfAttention: form must be one of"):
        PolarizedSelfAttention(8, form="timm")


@pytest.mark.parametrize("channels", [64, 256, 2048])
def test_parameter_counts(channels: int) -> None:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        check_parameter_counts(channels)


def check_parameter_counts(channels: int) -> None:
    inner = channels // 2
    # Channel branch: W_v (C x C/2), W_q (C x 1), W_z (C/2 x C), LayerNorm (2C); spatial
    # branch: W_q and W_v (C x C/2 each). No biases.
    paper = channels * inner + channels + inner * channels + 2 * channels + 2 * channels * inner
    assert paper == 2 * channels**2 + 3 * channels
    assert n_params(PolarizedSelfAttention(channels)) == paper
    assert n_params(PolarizedSelfAttention(channels, layout="sequential")) == paper
    # Official PSA_p: no LayerNorm.
    official_p = 2 * channels**2 + channels
    assert n_params(PolarizedSelfAttention(channels, form="official")) == official_p
    # Official PSA_s: conv_up = conv(C/2 -> C/8, bias), LN(C/8), conv(C/8 -> C, bias).
    hidden = inner // 4
    official_s = (
        channels * inner
        + channels
        + (inner * hidden + hidden)
        + 2 * hidden
        + (hidden * channels + channels)
        + 2 * channels * inner
    )
    module = PolarizedSelfAttention(channels, form="official", layout="sequential")
    assert n_params(module) == official_s
