"""CLIP attention pooling against torch's own multi-head attention with copied weights, called
as CLIP's AttentionPool2d calls it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import convattn
from _reference import n_params, randomize
from convattn.layers.attn_pool import AttentionPool2d


def clip_reference(x, m, positional_embedding):
    """CLIP's forward: (HW+1, N, C) tokens, all of them query, keep the mean token's output."""
    n, c, h, w = x.shape
    tokens = x.reshape(n, c, h * w).permute(2, 0, 1)
    tokens = torch.cat([tokens.mean(0, keepdim=True), tokens], dim=0)
    tokens = tokens + positional_embedding[:, None, :]
    out, weights = F.multi_head_attention_forward(
        query=tokens,
        key=tokens,
        value=tokens,
        embed_dim_to_check=c,
        num_heads=m.num_heads,
        in_proj_weight=None,
        in_proj_bias=torch.cat([m.q_proj.bias, m.k_proj.bias, m.v_proj.bias]),
        bias_k=None,
        bias_v=None,
        add_zero_attn=False,
        dropout_p=0.0,
        out_proj_weight=m.c_proj.weight,
        out_proj_bias=m.c_proj.bias,
        training=False,
        need_weights=True,
        average_attn_weights=False,
        use_separate_proj_weight=True,
        q_proj_weight=m.q_proj.weight,
        k_proj_weight=m.k_proj.weight,
        v_proj_weight=m.v_proj.weight,
    )
    return out[0], weights[:, :, :1]  # (N, out_dim), (N, heads, 1, HW + 1)


def resampled_embedding(m, h, w):
    """Bicubic resampling of the S x S grid rows, written with the grid as an image."""
    s = m.spatial_size
    grid = m.positional_embedding[1:].T.reshape(1, -1, s, s)
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    return torch.cat([m.positional_embedding[:1], grid.reshape(-1, h * w).T], dim=0)


@pytest.mark.parametrize(("channels", "num_heads"), [(32, 4), (16, 1), (64, None)])
def test_matches_torch_multi_head_attention(channels: int, num_heads: int | None) -> None:
    module = AttentionPool2d(channels, num_heads=num_heads, out_dim=24, spatial_size=4)
    module = randomize(module).double()
    maps = []
    module.gate.register_forward_hook(lambda _m, _i, out: maps.append(out))
    x = torch.randn(3, channels, 4, 4, dtype=torch.float64)
    expected, weights = clip_reference(x, module, module.positional_embedding)
    torch.testing.assert_close(module(x), expected)
    torch.testing.assert_close(maps[0], weights)


@pytest.mark.parametrize("size", [(7, 5), (2, 2), (1, 1), (9, 9)])
def test_other_map_sizes_resample_the_positional_embedding(size: tuple[int, int]) -> None:
    module = randomize(AttentionPool2d(32, num_heads=4, spatial_size=4)).double()
    x = torch.randn(2, 32, *size, dtype=torch.float64)
    pos = resampled_embedding(module, *size)
    expected, _ = clip_reference(x, module, pos)
    torch.testing.assert_close(module(x), expected)


def test_resampling_is_the_identity_at_the_native_size() -> None:
    module = AttentionPool2d(16, spatial_size=7)
    assert torch.equal(module.positional_embedding_for(7, 7), module.positional_embedding)


def test_usable_as_global_pool_head() -> None:
    module = AttentionPool2d(64, out_dim=10)
    for size in [(1, 1), (3, 11), (7, 7), (14, 14)]:
        for dtype in (torch.float32, torch.float64):
            y = module.to(dtype)(torch.randn(2, 64, *size, dtype=dtype))
            assert y.shape == (2, 10) and y.dtype == dtype
    module = AttentionPool2d(64).eval()
    assert module(torch.randn(1, 64, 5, 6)).shape == (1, 64)


def test_head_count_rule_and_errors() -> None:
    assert AttentionPool2d(2048).num_heads == 32  # CLIP RN50: embed_dim // 64
    assert AttentionPool2d(64).num_heads == 1
    assert AttentionPool2d(96).num_heads == 1  # 64 does not divide 96
    assert AttentionPool2d(96, num_heads=3).head_dim == 32
    with pytest.raises(ValueError, match="AttentionPool2d: num_heads must divide channels"):
        AttentionPool2d(96, num_heads=5)
    with pytest.raises(ValueError, match="spatial_dims"):
        AttentionPool2d(64, spatial_dims=3)
    spec = convattn.info("attnpool")
    assert spec.kind == "pooling" and spec.contract == "pool" and spec.spatial_dims == (2,)
    assert spec.defaults == {
        "num_heads": None,
        "out_dim": None,
        "spatial_size": 7,
        "spatial_dims": 2,
    }


def test_clip_init() -> None:
    module = AttentionPool2d(256)
    assert module.positional_embedding.shape == (50, 256)
    for tensor in (module.positional_embedding, module.q_proj.weight, module.c_proj.weight):
        assert 0.8 / 16 < tensor.std().item() < 1.2 / 16  # std C**-0.5 = 1/16


@pytest.mark.parametrize("channels", [64, 256, 2048])
def test_parameter_counts(channels: int) -> None:
    # (S^2 + 1) x C positional embedding, q/k/v (C x C + C each), c_proj (C x out + out).
    def expected(s: int, out: int) -> int:
        return (s * s + 1) * channels + 3 * (channels * channels + channels) + channels * out + out

    with torch.device("meta"):
        assert n_params(AttentionPool2d(channels)) == expected(7, channels)
        assert n_params(AttentionPool2d(channels, out_dim=1024, spatial_size=14)) == expected(
            14, 1024
        )
