"""BAM: Bottleneck Attention Module, Park, Woo, Lee and Kweon, BMVC 2018.
https://arxiv.org/abs/1807.06514

Two branches computed in parallel from the same input ``F``:

- channel: ``Mc(F) = W1 relu(BN(W0 GAP(F) + b0)) + b1`` (``W0: C -> C/r``, ``W1: C/r -> C``),
  one value per channel;
- spatial: ``Ms(F) = f3_1x1(g(f2_3x3(g(f1_3x3(g(f0_1x1(F)))))))`` with ``g = relu(BN(.))``,
  ``f0: C -> C/r``, ``f1, f2`` 3x3 convolutions with dilation ``d`` (padding ``d`` keeps the map
  size) and ``f3: C/r -> 1``, one value per position.

The two are broadcast to ``C x H x W`` and fused into ``M(F) = sigma(Mc * Ms)`` (official code)
or ``sigma(Mc + Ms)`` (paper, eq. 2); the output is ``F' = F + F * M(F) = F * (1 + M(F))``
(eq. 1).
"""

from __future__ import annotations

import torch
from torch import nn

from convattn.layers._helpers import (
    AttentionModule,
    batch_norm_nd,
    check_choice,
    check_positive_int,
    conv_nd,
    reduced_channels,
    unsqueeze_spatial,
)
from convattn.registry import register

__all__ = ["BAM"]

FUSIONS = ("product", "sum")


@register(
    "bam",
    kind="hybrid",
    paper="BAM: Bottleneck Attention Module",
    year=2018,
    arxiv="1807.06514",
    placement=(
        "between stages: one module at the end of each of stages 1, 2 and 3 of a ResNet "
        "(before the downsampling of the next stage)"
    ),
    summary=(
        "channel branch (GAP -> FC(C/r)+BN+ReLU -> FC(C)) and spatial branch (1x1 conv(C/r) -> "
        "two 3x3 convs dilation 4 -> 1x1 conv(1)), fused by product -> sigmoid -> x * (1 + M)"
    ),
    differences=(
        "Fusion: the official code computes sigmoid(Mc * Ms) (element-wise product of the "
        "broadcast branches), the paper sigmoid(Mc + Ms); convattn follows the code by default "
        "(fusion='product') and offers fusion='sum'.",
        "The paper ends each branch with a BatchNorm (BN(MLP(.)) and BN(f_1x1(.))); the official "
        "code instead puts BN + ReLU after the hidden FC and after each intermediate conv and "
        "has no BN on the branch outputs. convattn follows the code.",
        "The official channel branch pools with avg_pool2d(kernel=H), which only works on square "
        "maps; convattn averages over all spatial positions, so any map size (non-square, 1x1) "
        "and 1-D/3-D inputs work. The dilated convs use padding = dilation, as in the official "
        "code, so the map size is kept (a popular collection pads them wrongly and only works "
        "on 7x7 maps).",
        "The channel branch's BatchNorm1d sees one value per channel per sample (as in the "
        "official code), so training mode needs batch size >= 2; batch size 1 works in eval "
        "mode.",
        "Initialisation: the module keeps PyTorch's default init. The official ResNet init "
        "applies kaiming-normal (fan_out) to the convs and zeroes all biases; its intended zero "
        "init of the spatial-branch BN weights never fires (it tests for 'SpatialGate' in "
        "state-dict keys, which never contain class names).",
        "The reduced width is floor(C / 16) as in the official code, but at least 1.",
    ),
)
class BAM(AttentionModule):
    """Bottleneck Attention Module ``F' = F * (1 + sigma(fuse(Mc(F), Ms(F))))`` (eqs. 1-4).

    Args:
        channels: C.
        rd_ratio: 1/r, the reduction of both branches (r = 16): width ``floor(C * rd_ratio)``.
        rd_channels: the reduced width, overriding ``rd_ratio``.
        dilation: d, the dilation of the spatial branch's 3x3 convs (4); padding = d.
        num_dilated_convs: number of dilated 3x3 convs in the spatial branch (2).
        fusion: ``"product"`` (official code, ``Mc * Ms``) or ``"sum"`` (paper, ``Mc + Ms``).
        spatial_dims: 1, 2 or 3.

    Shape:
        - Input: ``(N, C, *spatial)``; output: same shape and dtype. Any map size.

    The attention map ``M(F) = sigma(...)`` of shape ``(N, C, *spatial)`` is the output of the
    ``gate`` submodule.
    """

    def __init__(
        self,
        channels: int,
        *,
        rd_ratio: float = 1 / 16,
        rd_channels: int | None = None,
        dilation: int = 4,
        num_dilated_convs: int = 2,
        fusion: str = "product",
        spatial_dims: int = 2,
    ) -> None:
        super().__init__(channels, spatial_dims)
        owner = type(self).__name__
        check_positive_int(owner, "dilation", dilation)
        if isinstance(num_dilated_convs, bool) or not isinstance(num_dilated_convs, int):
            raise TypeError(
                f"{owner}: num_dilated_convs must be an int, got {type(num_dilated_convs).__name__}"
            )
        if num_dilated_convs < 0:
            raise ValueError(f"{owner}: num_dilated_convs must be >= 0, got {num_dilated_convs}")
        check_choice(owner, "fusion", fusion, FUSIONS)
        self.rd_channels = reduced_channels(channels, rd_ratio, rd_channels, owner=owner)
        self.dilation = dilation
        self.fusion = fusion
        rd = self.rd_channels
        conv, norm = conv_nd(spatial_dims), batch_norm_nd(spatial_dims)

        # Channel branch, Mc: GAP -> FC -> BN -> ReLU -> FC (both FCs with bias).
        self.channel_mlp = nn.Sequential(
            nn.Linear(channels, rd),
            nn.BatchNorm1d(rd),
            nn.ReLU(inplace=True),
            nn.Linear(rd, channels),
        )
        # Spatial branch, Ms: 1x1 reduce, dilated 3x3 convs (each + BN + ReLU), 1x1 to one map.
        layers: list[nn.Module] = [conv(channels, rd, 1), norm(rd), nn.ReLU(inplace=True)]
        for _ in range(num_dilated_convs):
            layers += [
                conv(rd, rd, 3, padding=dilation, dilation=dilation),
                norm(rd),
                nn.ReLU(inplace=True),
            ]
        layers.append(conv(rd, 1, 1))
        self.spatial_convs = nn.Sequential(*layers)
        self.gate = nn.Sigmoid()

    def channel_attention(self, x: torch.Tensor) -> torch.Tensor:
        """``Mc(F)`` before the gate, shape ``(N, C, 1, ..., 1)``."""
        pooled = x.mean(list(range(2, x.dim())))
        return unsqueeze_spatial(self.channel_mlp(pooled), self.spatial_dims)

    def spatial_attention(self, x: torch.Tensor) -> torch.Tensor:
        """``Ms(F)`` before the gate, shape ``(N, 1, *spatial)``."""
        return self.spatial_convs(x)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """``M(F)`` in (0, 1), shape ``(N, C, *spatial)``."""
        mc = self.channel_attention(x)
        ms = self.spatial_attention(x)
        logits = mc * ms if self.fusion == "product" else mc + ms
        return self.gate(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return x * (1 + self.attention(x))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, rd_channels={self.rd_channels}, dilation={self.dilation}, "
            f"fusion={self.fusion!r}"
        )
