"""Where each mechanism goes in a network: the placements its paper designed it for.

The reference backbones (``convattn.models``) and ``attach()`` both read this table, so that a
module lands in the same place whichever way a network is built. A placement can always be
overridden for experiments.
"""

from __future__ import annotations

from convattn.registry import info

__all__ = ["PLACEMENTS", "paper_placement"]

PLACEMENTS: dict[str, str] = {
    "block_end": "in each residual block, after the last BN and before the residual add",
    "after_conv2": "in each residual block, right after the 3x3 conv (conv2), before its BN",
    "before_conv": "before every convolution, the stem and downsample convs included",
    "stage_end": "after stages 1, 2 and 3 (one module per stage, at the stage's width)",
    "replace_conv2": "replaces the 3x3 (grouped) conv of each residual block",
    "after_dw": "in each inverted residual with expansion != 1, after the depthwise conv + BN + ReLU6",
    "every_other_block": (
        "after every other residual block (the 2nd, 4th, ...) of stages 2 and 3 (5 modules in "
        "ResNet-50), as the official non-local ResNets"
    ),
    "head": "once, after the last stage, before the global pool",
    "pool": "replaces the global average pool of the classifier head",
    "replace_se": "replaces the built-in squeeze-and-excitation of each EfficientNet / MobileNetV3 block",
}

# The paper placement in ResNet-style backbones, where it is not "block_end".
_RESNET: dict[str, str] = {
    "simam": "after_conv2",
    "gct": "before_conv",
    "bam": "stage_end",
    "sk": "replace_conv2",
    "nonlocal": "every_other_block",
    "da_position": "head",
    "da_channel": "head",
    "attnpool": "pool",
}

# MobileNetV2: Coordinate Attention after the depthwise conv (its paper), SimAM there too (the
# depthwise 3x3 stands for the ResNet block's 3x3); channel attention at the end of the block, as
# in ECA's released MobileNetV2. Stage- and conv-level mechanisms have no defined place there.
_MOBILENETV2: dict[str, str] = {
    "coord": "after_dw",
    "simam": "after_dw",
    "gct": "unsupported",
    "bam": "unsupported",
    "sk": "unsupported",
    "nonlocal": "head",
    "da_position": "head",
    "da_channel": "head",
    "attnpool": "pool",
}

FAMILIES = ("resnet", "mobilenetv2")


def paper_placement(name: str, family: str = "resnet") -> str:
    """The placement a mechanism was designed for in a backbone ``family``.

    Raises ``ValueError`` where the paper defines none (SK, GCT and BAM in MobileNetV2); pass an
    explicit placement to experiment there.
    """
    if family not in FAMILIES:
        raise ValueError(f"paper_placement: family must be one of {list(FAMILIES)}, got {family!r}")
    spec = info(name)
    table = _RESNET if family == "resnet" else _MOBILENETV2
    default = {"gate": "block_end", "conv": "replace_conv2", "pool": "pool"}[spec.contract]
    placement = table.get(spec.name, default)
    if placement == "unsupported":
        raise ValueError(
            f"paper_placement: {spec.name!r} has no paper placement in a {family} backbone; "
            f"choose one with placement= (one of {list(PLACEMENTS)})"
        )
    return placement
