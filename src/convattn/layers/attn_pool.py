"""Learning Transferable Visual Models From Natural Language Supervision (CLIP), Radford et al.,
ICML 2021. https://arxiv.org/abs/2103.00020

Attention pooling, the head of CLIP's ModifiedResNet that replaces the global average pool:
the H*W positions of the final map become tokens, their mean is prepended as an extra token,
a learned positional embedding (one vector per token) is added, and one layer of multi-head
QKV attention is run in which only the mean token queries:
``q = W_q t_0``, ``k_j = W_k t_j``, ``v_j = W_v t_j`` (j = 0 .. HW),
``a_h = softmax_j(q_h . k_{h,j} / sqrt(d_h))`` per head h, ``y = W_c concat_h(sum_j a_hj v_hj)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from convattn.layers._helpers import AttentionModule, at_least_float32, check_positive_int
from convattn.registry import register

__all__ = ["AttentionPool2d"]

_CLIP_HEAD_DIM = 64  # CLIP: heads = embed_dim // 64


@register(
    "attnpool",
    kind="pooling",
    contract="pool",
    paper="Learning Transferable Visual Models From Natural Language Supervision",
    year=2021,
    arxiv="2103.00020",
    placement="replaces the final global average pool of a ResNet (CLIP's ModifiedResNet head)",
    spatial_dims=(2,),
    summary=(
        "tokens = [mean; positions] + positional embedding -> multi-head attention queried by "
        "the mean token -> output projection: (N, C, H, W) -> (N, out_dim)"
    ),
    differences=(
        "The official head is built for one grid (spacial_dim = input_resolution // 32, 7 for "
        "224 inputs) and fails on any other map size. convattn resamples the H*W part of the "
        "positional embedding from the spatial_size x spatial_size grid to the input's H x W "
        "with bicubic interpolation (align_corners=False, no antialiasing) on every call; the "
        "mean token's embedding is kept. At H = W = spatial_size this is exactly the identity.",
        "num_heads defaults to CLIP's rule C // 64 (64 channels per head; 32 heads for "
        "ResNet-50's C = 2048) when 64 divides C, and to 1 head otherwise; any num_heads that "
        "divides C can be passed.",
        "The attention is written out with tensor ops (the official code calls "
        "F.multi_head_attention_forward and computes all HW + 1 queries, keeping the first); "
        "only the mean token's query is computed, which gives the same output.",
        "Init as CLIP's initialize_parameters: q/k/v/c projection weights normal(0, C**-0.5), "
        "biases PyTorch's Linear default, positional embedding randn / sqrt(C). Parameter "
        "names (positional_embedding, q_proj, k_proj, v_proj, c_proj) match CLIP's attnpool, "
        "so its state dict loads.",
    ),
)
class AttentionPool2d(AttentionModule):
    """CLIP's attention pooling: ``(N, C, H, W) -> (N, out_dim)``.

    Args:
        channels: C, the embedding width.
        num_heads: attention heads; must divide C. None: ``C // 64`` when 64 divides C (CLIP's
            rule), else 1.
        out_dim: width of the output projection ``c_proj`` (None: C).
        spatial_size: S, the side of the grid the positional embedding is built for (7 for
            224 x 224 inputs of a stride-32 ResNet). Other map sizes resample it bicubically.
        spatial_dims: 2 only.

    The softmax producing the (N, heads, 1, HW + 1) attention weights of the mean token
    (index 0 of the last axis: the mean token itself) is ``gate``.

    Shape:
        - Input: ``(N, C, H, W)``, any H and W.
        - Output: ``(N, out_dim)``, same dtype.
    """

    def __init__(
        self,
        channels: int,
        *,
        num_heads: int | None = None,
        out_dim: int | None = None,
        spatial_size: int = 7,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__(channels, spatial_dims, supported_dims=(2,))
        owner = type(self).__name__
        if num_heads is None:
            num_heads = channels // _CLIP_HEAD_DIM if channels % _CLIP_HEAD_DIM == 0 else 1
        self.num_heads = check_positive_int(owner, "num_heads", num_heads)
        if channels % num_heads:
            raise ValueError(
                f"{owner}: num_heads must divide channels, got num_heads={num_heads} for "
                f"{channels} channels"
            )
        self.out_dim = check_positive_int(
            owner, "out_dim", channels if out_dim is None else out_dim
        )
        self.spatial_size = check_positive_int(owner, "spatial_size", spatial_size)
        self.head_dim = channels // num_heads
        self.positional_embedding = nn.Parameter(torch.empty(spatial_size**2 + 1, channels))
        self.q_proj = nn.Linear(channels, channels)
        self.k_proj = nn.Linear(channels, channels)
        self.v_proj = nn.Linear(channels, channels)
        self.c_proj = nn.Linear(channels, self.out_dim)
        self.gate = nn.Softmax(dim=-1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """CLIP's init: positional embedding ``randn / sqrt(C)``, projection weights
        ``normal(0, C**-0.5)`` (biases keep nn.Linear's default)."""
        std = self.channels**-0.5
        with torch.no_grad():
            self.positional_embedding.normal_(0.0, std)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.c_proj):
            nn.init.normal_(proj.weight, std=std)

    def positional_embedding_for(self, height: int, width: int) -> torch.Tensor:
        """The (H*W + 1, C) positional embedding for an H x W map: the mean token's row, then
        the S x S grid resampled bicubically to H x W (the identity when H = W = S)."""
        size = self.spatial_size
        mean_token = self.positional_embedding[:1]
        grid = self.positional_embedding[1:].reshape(1, size, size, self.channels)
        grid = F.interpolate(
            grid.permute(0, 3, 1, 2), size=(height, width), mode="bicubic", align_corners=False
        )
        grid = grid.permute(0, 2, 3, 1).reshape(height * width, self.channels)
        return torch.cat([mean_token, grid], dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        batch, height, width = x.shape[0], x.shape[2], x.shape[3]
        tokens = x.flatten(2).transpose(1, 2)  # (N, HW, C), row-major positions
        tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)  # (N, HW + 1, C)
        tokens = tokens + self.positional_embedding_for(height, width).to(x.dtype)
        heads, head_dim = self.num_heads, self.head_dim
        query = self.q_proj(tokens[:, :1]).reshape(batch, 1, heads, head_dim).transpose(1, 2)
        key = self.k_proj(tokens).reshape(batch, -1, heads, head_dim).transpose(1, 2)
        value = self.v_proj(tokens).reshape(batch, -1, heads, head_dim).transpose(1, 2)
        # Scores and softmax in float32 for half-precision inputs (q . k overflows float16).
        scores = torch.matmul(at_least_float32(query), at_least_float32(key).transpose(-2, -1))
        weights = self.gate(scores * head_dim**-0.5).to(value.dtype)  # (N, h, 1, L)
        pooled = torch.matmul(weights, value).reshape(batch, self.channels)  # (N, C)
        return self.c_proj(pooled)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_heads={self.num_heads}, out_dim={self.out_dim}, "
            f"spatial_size={self.spatial_size}"
        )
