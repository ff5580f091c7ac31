"""FcaNet: Frequency Channel Attention Networks, Qin, Zhang, Wu and Li, ICCV 2021.
https://arxiv.org/abs/2012.11879

Global average pooling is the lowest-frequency (DC) component of the 2-D discrete cosine
transform. Multi-spectral channel attention splits the C channels into ``n`` equal groups and
describes group ``i`` by its 2-D DCT coefficient at frequency ``(u_i, v_i)``:
``Freq_c = sum_{h,w} x_c(h, w) B_{u,v}(h, w)`` with the orthonormal DCT-II basis
``B_{u,v}(h, w) = a_u a_v cos(pi u (h + 1/2) / H) cos(pi v (w + 1/2) / W)``,
``a_0 = sqrt(1/H)``, ``a_u = sqrt(2/H)`` otherwise (and likewise for ``v`` and ``W``; the
official code's scaling: the paper writes the basis without these constants). The descriptor then goes through SE's excitation without biases:
``y = x * sigma(W2 relu(W1 Freq))``. The frequencies are the best (``top``), lowest
(``low``) or worst (``bot``) ones found on a 7x7 grid in the paper's ablation, scaled to the
DCT grid size (``(u, v) * (size // 7)``).
"""

import math

import torch
from torch import nn

from convattn.layers._helpers import (
    AttentionModule,
    check_choice,
    check_positive_int,
    reduced_channels,
)
from convattn.registry import register

__all__ = ["FREQ_SEL_METHODS", "MultiSpectralAttention", "frequency_indices"]

# Frequency indices (u along the height, v along the width) on a 7x7 DCT grid, ranked by the
# paper's single-frequency ablation on ImageNet (the tables of the official code).
# fmt: off
_TOP_U = (0, 0, 6, 0, 0, 1, 1, 4, 5, 1, 3, 0, 0, 0, 3, 2,
          4, 6, 3, 5, 5, 2, 6, 5, 5, 3, 3, 4, 2, 2, 6, 1)
_TOP_V = (0, 1, 0, 5, 2, 0, 2, 0, 0, 6, 0, 4, 6, 3, 5, 2,
          6, 3, 3, 3, 5, 1, 1, 2, 4, 2, 1, 1, 3, 0, 5, 3)
_LOW_U = (0, 0, 1, 1, 0, 2, 2, 1, 2, 0, 3, 4, 0, 1, 3, 0,
          1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6, 1, 2, 3, 4)
_LOW_V = (0, 1, 0, 1, 2, 0, 1, 2, 2, 3, 0, 0, 4, 3, 1, 5,
          4, 3, 2, 1, 0, 6, 5, 4, 3, 2, 1, 0, 6, 5, 4, 3)
_BOT_U = (6, 1, 3, 3, 2, 4, 1, 2, 4, 4, 5, 1, 4, 6, 2, 5,
          6, 1, 6, 2, 2, 4, 3, 3, 5, 5, 6, 2, 5, 5, 3, 6)
_BOT_V = (6, 4, 4, 6, 6, 3, 1, 4, 4, 5, 6, 5, 2, 2, 5, 1,
          4, 3, 5, 0, 3, 1, 1, 2, 4, 2, 1, 1, 5, 3, 3, 3)
# fmt: on
_TABLES = {"top": (_TOP_U, _TOP_V), "low": (_LOW_U, _LOW_V), "bot": (_BOT_U, _BOT_V)}

FREQ_SEL_METHODS = tuple(
    f"{kind}{count}" for kind in ("top", "low", "bot") for count in (1, 2, 4, 8, 16, 32)
)
_GRID = 7  # the frequency tables index a 7x7 DCT grid


def frequency_indices(freq_sel_method: str) -> list[tuple[int, int]]:
    """The ``(u, v)`` frequencies on the 7x7 grid selected by ``freq_sel_method``
    (e.g. ``"top16"``: the 16 best single frequencies of the paper's ablation)."""
    check_choice("frequency_indices", "freq_sel_method", freq_sel_method, FREQ_SEL_METHODS)
    us, vs = _TABLES[freq_sel_method[:3]]
    count = int(freq_sel_method[3:])
    return list(zip(us[:count], vs[:count], strict=True))


def _dct_basis_1d(size: int, frequencies: list[int]) -> torch.Tensor:
    """Orthonormal DCT-II vectors, (len(frequencies), size), in float64."""
    position = torch.arange(size, dtype=torch.float64) + 0.5
    freq = torch.tensor(frequencies, dtype=torch.float64)[:, None]
    scale = torch.where(freq == 0, math.sqrt(1 / size), math.sqrt(2 / size))
    return scale * torch.cos(math.pi * freq * position / size)


def _adaptive_pool_matrix(out_size: int, in_size: int, like: torch.Tensor) -> torch.Tensor:
    """(out_size, in_size) matrix ``P`` with ``P @ v`` equal to 1-D adaptive average pooling of
    ``v`` to ``out_size`` bins: bin ``i`` averages ``[floor(i n / m), ceil((i + 1) n / m))``.
    For ``in_size == out_size`` it is the identity; for ``in_size < out_size`` bins repeat."""
    index = torch.arange(out_size, device=like.device)
    start = torch.div(index * in_size, out_size, rounding_mode="floor")
    end = torch.div((index + 1) * in_size + out_size - 1, out_size, rounding_mode="floor")
    position = torch.arange(in_size, device=like.device)
    inside = (position[None, :] >= start[:, None]) & (position[None, :] < end[:, None])
    return inside.to(like.dtype) / (end - start).to(like.dtype)[:, None]


@register(
    "fca",
    kind="channel",
    paper="FcaNet: Frequency Channel Attention Networks",
    year=2021,
    arxiv="2012.11879",
    placement="ResNet bottleneck/basic block: after the last BN (bn3), before the residual add",
    spatial_dims=(2,),
    summary="channel groups pooled by 2-D DCT bases (top16 frequencies) -> FC(C/r, no bias) -> "
    "ReLU -> FC(C, no bias) -> sigmoid -> multiply",
    differences=(
        "The official FcaNet-ResNets give each stage a DCT grid equal to its map size at 224 "
        "input (56, 28, 14, 7); the module cannot know its stage, so dct_size defaults to 7 "
        "(the frequency tables' grid, stage 4); pass dct_size to reproduce the other stages.",
        "Any map size: the official code adaptive-average-pools the input to the DCT grid when "
        "the sizes differ. convattn folds that pooling into the basis (each basis vector is "
        "multiplied by the adaptive-pooling matrix of the actual size), which gives the same "
        "numbers for every size, 1x1 and maps smaller than the grid included, without an "
        "adaptive pooling layer; at the grid size the basis is used as is.",
        "The DCT basis is a non-persistent buffer holding one (H, W) basis per frequency; the "
        "official code stores a persistent (C, H, W) buffer dct_layer.weight and names the "
        "FCs fc.0 / fc.2. To load an official checkpoint drop dct_layer.weight and rename "
        "fc.0 -> fc1, fc.2 -> fc2.",
        "dct_size must be at least 7 (the official code would silently map every frequency "
        "to (0, 0) below that), and channels must be divisible by the number of frequencies "
        "(the official code asserts).",
        "The basis carries the orthonormal DCT-II constants (sqrt(1/H) for frequency 0, "
        "sqrt(2/H) otherwise, likewise for W) as in the official code; the paper's formula "
        "omits them.",
        "Defined for 2-D maps only.",
    ),
)
class MultiSpectralAttention(AttentionModule):
    """Multi-spectral channel attention: ``y = x * sigma(W2 relu(W1 Freq(x)))``.

    Args:
        channels: C; must be divisible by the number of frequencies.
        dct_size: the DCT grid ``(H, W)`` (or one int for a square grid); at least 7. Inputs of
            another size are adaptive-average-pooled to it (folded into the basis).
        freq_sel_method: ``"top"``, ``"low"`` or ``"bot"`` followed by the number of
            frequencies (1, 2, 4, 8, 16 or 32); ``"top16"`` in the paper.
        rd_ratio: 1/r of the excitation bottleneck (r = 16); width ``floor(C / r)``.
        rd_channels: the bottleneck width, overriding ``rd_ratio``.
        spatial_dims: 2 only.

    Attributes:
        dct_basis: (num_freq, H, W) buffer, the DCT basis of each frequency on the grid;
            channel group ``i`` (channels ``i C/n ... (i + 1) C/n - 1``) uses basis ``i``.
        frequencies: the ``(u, v)`` pairs on the grid (already scaled by ``size // 7``).
        fc1, fc2: the excitation (no biases); gate: the sigmoid.

    Shape:
        - Input: ``(N, C, H, W)``, any ``H, W >= 1``; output: same shape and dtype.
    """

    dct_basis: torch.Tensor

    def __init__(
        self,
        channels: int,
        *,
        dct_size: int | tuple[int, int] = 7,
        freq_sel_method: str = "top16",
        rd_ratio: float = 1 / 16,
        rd_channels: int | None = None,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__(channels, spatial_dims, supported_dims=(2,))
        owner = type(self).__name__
        check_choice(owner, "freq_sel_method", freq_sel_method, FREQ_SEL_METHODS)
        if isinstance(dct_size, int) and not isinstance(dct_size, bool):
            grid = (dct_size, dct_size)
        elif isinstance(dct_size, (tuple, list)) and len(dct_size) == 2:
            grid = (dct_size[0], dct_size[1])
        else:
            raise TypeError(f"{owner}: dct_size must be an int or a pair of ints, got {dct_size!r}")
        for size in grid:
            check_positive_int(owner, "dct_size", size)
            if size < _GRID:
                raise ValueError(
                    f"{owner}: dct_size must be at least {_GRID} (the frequency tables index a "
                    f"{_GRID}x{_GRID} grid), got {dct_size!r}"
                )
        num_freq = int(freq_sel_method[3:])
        if channels % num_freq:
            raise ValueError(
                f"{owner}: channels must be divisible by the number of frequencies "
                f"({num_freq} for freq_sel_method={freq_sel_method!r}), got {channels}"
            )
        self.dct_size = grid
        self.freq_sel_method = freq_sel_method
        self.num_freq = num_freq
        scale_h, scale_w = grid[0] // _GRID, grid[1] // _GRID
        self.frequencies = [
            (u * scale_h, v * scale_w) for u, v in frequency_indices(freq_sel_method)
        ]
        basis_h = _dct_basis_1d(grid[0], [u for u, _ in self.frequencies])
        basis_w = _dct_basis_1d(grid[1], [v for _, v in self.frequencies])
        basis = basis_h[:, :, None] * basis_w[:, None, :]
        self.register_buffer("dct_basis", basis.to(torch.get_default_dtype()), persistent=False)

        self.rd_channels = reduced_channels(channels, rd_ratio, rd_channels, owner=owner)
        self.fc1 = nn.Linear(channels, self.rd_channels, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(self.rd_channels, channels, bias=False)
        self.gate = nn.Sigmoid()

    def basis_for(self, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
        """The basis applied to an (height, width) map: the grid basis after adaptive average
        pooling to the grid, ``P_H^T B P_W``; shape (num_freq, height, width)."""
        pool_h = _adaptive_pool_matrix(self.dct_size[0], height, like)
        pool_w = _adaptive_pool_matrix(self.dct_size[1], width, like)
        basis = self.dct_basis.to(like.dtype)
        return torch.einsum("ih,fij,jw->fhw", pool_h, basis, pool_w)

    def describe(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-spectral descriptor ``Freq``, shape (N, C)."""
        n, c, height, width = x.shape
        basis = self.basis_for(height, width, x).reshape(self.num_freq, height * width)
        groups = x.reshape(n, self.num_freq, c // self.num_freq, height * width)
        return torch.einsum("nfkp,fp->nfk", groups, basis).reshape(n, c)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Channel weights in (0, 1), shape (N, C)."""
        return self.gate(self.fc2(self.act(self.fc1(self.describe(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return x * self.attention(x)[:, :, None, None]

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, dct_size={self.dct_size}, "
            f"freq_sel_method={self.freq_sel_method!r}, rd_channels={self.rd_channels}"
        )
