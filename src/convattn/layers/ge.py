"""Gather-Excite: Exploiting Feature Context in Convolutional Neural Networks, Hu, Shen,
Albanie, Sun and Vedaldi, NeurIPS 2018. https://arxiv.org/abs/1810.12348

A gather operator ``xi_G`` aggregates each channel over a spatial extent ``e`` (the whole map
for the global extent), and an excite operator redistributes it:
``y = x * sigma(interp(xi_G(x)))``, where ``interp`` resizes the gathered map back to the input
size by nearest-neighbour interpolation (no-op for the global extent).

- GE-theta-minus (parameter-free): ``xi_G`` is average pooling (global: the mean of each
  channel; extent ``e``: a ``(2e - 1)``-wide window with stride ``e``);
- GE-theta: ``xi_G`` is a depth-wise convolution without bias followed by BatchNorm (global: a
  kernel as large as the map, i.e. a learned per-channel weighted sum over all positions;
  extent ``e``: ``log2(e)`` depth-wise 3x3 stride-2 convolutions, each with BN, ReLU between);
- GE-theta-plus: GE-theta's gather, then an SE-style excite sub-network
  ``W2 ReLU(W1 ReLU(.))`` (``W1: C -> C/16``, ``W2: C/16 -> C``, 1x1 convs with bias).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from convattn.layers._helpers import (
    AttentionModule,
    batch_norm_nd,
    check_choice,
    check_positive_int,
    conv_nd,
    reduced_channels,
)
from convattn.registry import register

__all__ = ["GatherExcite"]

VARIANTS = ("theta", "minus", "plus")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
DEFAULT_FEAT_SIZE = 7

_PAPER = "Gather-Excite: Exploiting Feature Context in Convolutional Neural Networks"
_PLACEMENT = "ResNet bottleneck: after the last BN (bn3), before the residual add (every block)"
_COMMON_DIFFERENCES = (
    "The official code (hujie-frank/GENet) is Caffe prototxt for ResNet-50 with the global "
    "extent only (GE-theta-minus: global average pooling + sigmoid; GE-theta: depth-wise conv "
    "with a kernel as large as the map, no bias, + BN + sigmoid; GE-theta-plus: the same + "
    "ReLU -> 1x1 conv (C/16, bias) -> ReLU -> 1x1 conv (C, bias) -> sigmoid). Extents e > 0 "
    "follow the paper and timm's port (no official code): average pooling with a (2e - 1) "
    "window, stride e, padding e - 1 (padding not counted) for theta-minus; log2(e) depth-wise "
    "3x3 stride-2 convs (padding 1), each + BN, ReLU between them, for theta; then nearest "
    "upsampling to the input size.",
    "Global theta/plus gather: the official kernel is as large as the map it was built for "
    "(56, 28, 14, 7 in the four ResNet-50 stages), so its parameter count depends on the map "
    "size. convattn keeps that kernel (size feat_size, default 7: the last stage of a "
    "224-pixel ResNet-50; pass the stage's map size to reproduce the official model) and "
    "matches the official numbers and parameter count exactly on maps of that size. On maps "
    "of another size (convattn extension) the kernel is resampled to the map by area "
    "interpolation and scaled by feat_size_numel / map_numel, so the gather stays a weighted "
    "sum of about the same total weight (a constant map gives the same gathered value at "
    "every resolution where one size divides the other, e.g. 7 -> 14 or 7 -> 1).",
    "timm's GE-theta-plus omits the ReLU between the gather BN and the first excite conv and "
    "rounds C/16 to the nearest integer; convattn follows the official prototxt (ReLU there, "
    "floor(C/16), at least 1).",
    "Initialisation as in the official prototxt: gather convs 'msra' (kaiming-normal, fan_in), "
    "excite convs gaussian std 0.01 with zero bias, BN scale 1 and shift 0.",
    "With the global extent the gather BN sees one value per channel per sample, so training "
    "mode needs batch size >= 2 (theta and plus); batch size 1 works in eval mode.",
)


@register(
    "ge",
    kind="channel",
    paper=_PAPER,
    year=2018,
    arxiv="1810.12348",
    placement=_PLACEMENT,
    summary=(
        "GE-theta: depth-wise gather conv over the whole map (no bias) -> BN -> sigmoid -> "
        "multiply; variant='minus' / 'plus' and extent=e for the other forms"
    ),
    differences=_COMMON_DIFFERENCES,
)
@register(
    "ge_minus",
    kind="channel",
    paper=_PAPER,
    year=2018,
    arxiv="1810.12348",
    placement=_PLACEMENT,
    summary=(
        "GE-theta-minus, parameter-free: average pooling (global or extent e) -> sigmoid -> "
        "(nearest upsample) -> multiply"
    ),
    differences=_COMMON_DIFFERENCES[:1],
    presets={"variant": "minus"},
)
@register(
    "ge_plus",
    kind="channel",
    paper=_PAPER,
    year=2018,
    arxiv="1810.12348",
    placement=_PLACEMENT,
    summary=(
        "GE-theta-plus: depth-wise gather conv + BN -> ReLU -> 1x1 conv(C/16) -> ReLU -> "
        "1x1 conv(C) -> sigmoid -> multiply"
    ),
    differences=_COMMON_DIFFERENCES,
    presets={"variant": "plus"},
)
class GatherExcite(AttentionModule):
    """Gather-excite ``y = x * sigma(interp(excite(gather(x))))``.

    Args:
        channels: C.
        variant: ``"theta"`` (GE-theta, parametric gather), ``"minus"`` (GE-theta-minus,
            parameter-free) or ``"plus"`` (GE-theta-plus, parametric gather + excite MLP).
        extent: e, the gather extent: 0 for the global extent (the paper's default and the
            official models), otherwise a power of two (2, 4, 8, ...).
        feat_size: the map size the global depth-wise gather kernel is built for (theta and
            plus with extent 0 only); an int or one size per spatial dim. None means 7. Maps of
            another size use the kernel resampled to their size (see the registry entry).
        rd_ratio: 1/r of the plus variant's excite bottleneck: width ``floor(C * rd_ratio)``
            (None means 1/16). Plus only.
        rd_channels: that width, overriding ``rd_ratio``. Plus only.
        spatial_dims: 1, 2 or 3.

    Shape:
        - Input: ``(N, C, *spatial)``; output: same shape and dtype. Any map size.

    The gate ``sigma`` is the submodule ``gate``; its output has the input's spatial size
    (extent > 0) or ``(N, C, 1, ..., 1)`` (global extent).
    """

    def __init__(
        self,
        channels: int,
        *,
        variant: str = "theta",
        extent: int = 0,
        feat_size: int | tuple[int, ...] | None = None,
        rd_ratio: float | None = None,
        rd_channels: int | None = None,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__(channels, spatial_dims)
        owner = type(self).__name__
        check_choice(owner, "variant", variant, VARIANTS)
        if isinstance(extent, bool) or not isinstance(extent, int):
            raise TypeError(f"{owner}: extent must be an int, got {type(extent).__name__}")
        if extent != 0 and (extent < 2 or extent & (extent - 1)):
            raise ValueError(
                f"{owner}: extent must be 0 (global) or a power of two >= 2, got {extent}"
            )
        global_kernel = variant != "minus" and extent == 0
        if feat_size is not None and not global_kernel:
            raise ValueError(
                f"{owner}: feat_size only applies to the global parametric gather (variant "
                f"'theta' or 'plus' with extent=0), got variant={variant!r}, extent={extent}"
            )
        if variant != "plus" and (rd_ratio is not None or rd_channels is not None):
            raise ValueError(
                f"{owner}: rd_ratio / rd_channels only apply to variant='plus', got "
                f"variant={variant!r}"
            )
        self.variant = variant
        self.extent = extent
        conv, norm = conv_nd(spatial_dims), batch_norm_nd(spatial_dims)

        self.feat_size: tuple[int, ...] | None = None
        self.gather_weight: nn.Parameter | None
        self.gather_bn: nn.Module | None = None
        self.gather: nn.Sequential | None = None
        if global_kernel:
            size = DEFAULT_FEAT_SIZE if feat_size is None else feat_size
            self.feat_size = self._check_feat_size(owner, size, spatial_dims)
            # The weight of a depth-wise conv with a map-sized kernel: (C, 1, *feat_size).
            self.gather_weight = nn.Parameter(torch.empty(channels, 1, *self.feat_size))
            self.gather_bn = norm(channels)
        else:
            self.register_parameter("gather_weight", None)
        if variant != "minus" and extent > 0:
            layers: list[nn.Module] = []
            num_convs = int(math.log2(extent))
            for i in range(num_convs):
                layers += [
                    conv(channels, channels, 3, stride=2, padding=1, groups=channels, bias=False),
                    norm(channels),
                ]
                if i != num_convs - 1:
                    layers.append(nn.ReLU(inplace=True))
            self.gather = nn.Sequential(*layers)

        self.rd_channels: int | None = None
        self.excite: nn.Sequential | None = None
        if variant == "plus":
            ratio = 1 / 16 if rd_ratio is None else rd_ratio
            self.rd_channels = reduced_channels(channels, ratio, rd_channels, owner=owner)
            self.excite = nn.Sequential(
                nn.ReLU(),
                conv(channels, self.rd_channels, 1),
                nn.ReLU(inplace=True),
                conv(self.rd_channels, channels, 1),
            )
        self.gate = nn.Sigmoid()
        self._init_weights()

    @staticmethod
    def _check_feat_size(owner: str, size: object, spatial_dims: int) -> tuple[int, ...]:
        if isinstance(size, int) and not isinstance(size, bool):
            sizes: tuple[object, ...] = (size,) * spatial_dims
        elif isinstance(size, (tuple, list)) and len(size) == spatial_dims:
            sizes = tuple(size)
        else:
            raise ValueError(
                f"{owner}: feat_size must be an int or a tuple of {spatial_dims} ints "
                f"(spatial_dims={spatial_dims}), got {size!r}"
            )
        return tuple(check_positive_int(owner, "feat_size", s) for s in sizes)

    def _init_weights(self) -> None:
        """Official fillers: gather convs 'msra' (fan_in), excite convs N(0, 0.01), bias 0."""
        if self.gather_weight is not None:
            nn.init.kaiming_normal_(self.gather_weight, mode="fan_in", nonlinearity="relu")
        for module in self.gather if self.gather is not None else ():
            if isinstance(module, _CONVS):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        for module in self.excite if self.excite is not None else ():
            if isinstance(module, _CONVS):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _global_gather(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Depth-wise weighted sum over all positions (a conv whose kernel covers the map),
        the (C, 1, *feat_size) kernel resampled to the map size and rescaled."""
        kernel = F.interpolate(weight, size=x.shape[2:], mode="area")  # (C, 1, *spatial)
        scale = weight[0, 0].numel() / x[0, 0].numel()
        dims = list(range(2, x.dim()))
        return (x * kernel.transpose(0, 1)).sum(dims, keepdim=True) * scale

    def _average_gather(self, x: torch.Tensor) -> torch.Tensor:
        """GE-theta-minus: global mean, or a (2e - 1)-wide average with stride e."""
        if self.extent == 0:
            return x.mean(list(range(2, x.dim())), keepdim=True)
        kernel, stride, padding = 2 * self.extent - 1, self.extent, self.extent - 1
        if self.spatial_dims == 1:
            return F.avg_pool1d(x, kernel, stride, padding, count_include_pad=False)
        if self.spatial_dims == 2:
            return F.avg_pool2d(x, kernel, stride, padding, count_include_pad=False)
        # avg_pool3d refuses maps smaller than its window even when the padding covers it, so
        # pad by hand and divide window sums by the count of real (unpadded) positions.
        padded = F.pad(x, [padding] * 6)
        ones = F.pad(torch.ones_like(x[:1, :1]), [padding] * 6)
        sums = F.avg_pool3d(padded, kernel, stride)
        counts = F.avg_pool3d(ones, kernel, stride)
        return sums / counts

    def gathered(self, x: torch.Tensor) -> torch.Tensor:
        """``excite(gather(x))`` before resizing and the gate: ``(N, C, *reduced)``."""
        if self.gather_weight is not None and self.gather_bn is not None:
            g = self.gather_bn(self._global_gather(x, self.gather_weight))
        elif self.gather is not None:
            g = self.gather(x)
        else:
            g = self._average_gather(x)
        if self.excite is not None:
            g = self.excite(g)
        return g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        logits = self.gathered(x)
        if self.extent > 0:
            logits = F.interpolate(logits, size=x.shape[2:], mode="nearest")
        return x * self.gate(logits)

    def extra_repr(self) -> str:
        extra = f", feat_size={self.feat_size}" if self.feat_size is not None else ""
        return f"{super().extra_repr()}, variant={self.variant!r}, extent={self.extent}{extra}"
