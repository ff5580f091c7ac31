"""Reference MobileNetV2 (Sandler et al., CVPR 2018, arXiv 1801.04381) with attention.

torchvision's layout and module names (``features.N.conv.K``), so torchvision's weights load
into the plain network and, with ``strict=False``, into the attention variants. Coordinate
Attention (and SimAM) go after the depthwise conv + BN + ReLU6 of every inverted residual with
expansion != 1, as in the Coordinate Attention paper; channel attention goes at the end of
every block, after the projection BN and before the residual add (ECA's released MobileNetV2).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from convattn.layers._helpers import make_divisible
from convattn.models._attention import AttentionArg, AttentionFactory, backbone_modules

__all__ = ["InvertedResidual", "MobileNetV2", "mobilenet_v2"]

# t (expansion), c (channels), n (repeats), s (stride of the first repeat)
_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
_PLACEMENTS = ("block_end", "after_dw", "head", "pool")


def _conv_bn_relu6(
    cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> project (1x1, linear), residual when shapes allow.

    Attention slots: ``attn_dw`` after the depthwise conv (after_dw, expansion != 1 only) and
    ``attn`` after the projection BN (block_end); unused slots are ``nn.Identity``.
    """

    def __init__(
        self, inp: int, oup: int, stride: int, expand_ratio: int, *, attention: AttentionFactory
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"InvertedResidual: stride must be 1 or 2, got {stride}")
        hidden = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        self.expand = expand_ratio != 1
        layers: list[nn.Module] = []
        if self.expand:
            layers.append(_conv_bn_relu6(inp, hidden, kernel=1))
        layers += [
            _conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.attn_dw = (
            attention(hidden) if self.expand and attention.at("after_dw") else nn.Identity()
        )
        self.attn = attention.make_or_identity("block_end", oup)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for index, layer in enumerate(self.conv):
            out = layer(out)
            if index == len(self.conv) - 3:  # right after the depthwise conv + BN + ReLU6
                out = self.attn_dw(out)
        out = self.attn(out)
        return x + out if self.use_res_connect else out


class MobileNetV2(nn.Module):
    """MobileNetV2 (torchvision's layout), with attention.

    Args:
        num_classes: classifier outputs.
        width_mult: channel multiplier (channels rounded to multiples of 8).
        dropout: dropout before the classifier.
        attention: registry key, module class, or None.
        attention_options: options for every attention module.
        placement: ``"block_end"``, ``"after_dw"``, ``"head"`` or ``"pool"``; None takes the
            paper placement.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        dropout: float = 0.2,
        *,
        attention: AttentionArg = None,
        attention_options: Mapping[str, Any] | None = None,
        placement: str | None = None,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        factory = AttentionFactory(
            attention, attention_options, placement, "mobilenetv2", "mobilenet_v2"
        )
        factory.check_supported(_PLACEMENTS)
        self.attention_name = factory.name
        self.placement = factory.placement
        input_channel = make_divisible(32 * width_mult, 8)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult), 8)
        features: list[nn.Module] = [_conv_bn_relu6(in_channels, input_channel, stride=2)]
        for t, c, n, s in _SETTINGS:
            output_channel = make_divisible(c * width_mult, 8)
            for i in range(n):
                features.append(
                    InvertedResidual(
                        input_channel, output_channel, s if i == 0 else 1, t, attention=factory
                    )
                )
                input_channel = output_channel
        features.append(_conv_bn_relu6(input_channel, self.last_channel, kernel=1))
        self.features = nn.Sequential(*features)
        self.head_attn = factory(self.last_channel) if factory.at("head") else nn.Identity()
        self.attn_pool = factory(self.last_channel, spatial_size=7) if factory.at("pool") else None
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes)
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in backbone_modules(self):
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_attn(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.attn_pool(x) if self.attn_pool is not None else torch.flatten(x.mean((2, 3)), 1)
        return self.classifier(x)


def mobilenet_v2(
    attention: AttentionArg = None,
    attention_options: Mapping[str, Any] | None = None,
    placement: str | None = None,
    **kwargs: Any,
) -> MobileNetV2:
    """MobileNetV2 1.0 with ``attention`` at its paper placement (3,504,872 parameters plain)."""
    return MobileNetV2(
        attention=attention, attention_options=attention_options, placement=placement, **kwargs
    )
