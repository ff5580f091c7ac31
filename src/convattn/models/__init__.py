"""Reference backbones with an ``attention=`` argument: ImageNet ResNet-18..152 and
ResNeXt-50 (32x4d), CIFAR ResNet-20..110 and MobileNetV2.

>>> from convattn import models
>>> net = models.resnet50(attention="se")              # SE-ResNet-50, 28,088,024 parameters
>>> net = models.create_model("cifar_resnet20", attention="cbam", num_classes=100)
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from torch import nn

from convattn.models.mobilenetv2 import MobileNetV2, mobilenet_v2
from convattn.models.resnet import (
    CifarResNet,
    ResNet,
    cifar_resnet20,
    cifar_resnet32,
    cifar_resnet44,
    cifar_resnet56,
    cifar_resnet110,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
)

__all__ = [
    "CifarResNet",
    "MobileNetV2",
    "ResNet",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "cifar_resnet110",
    "create_model",
    "list_models",
    "mobilenet_v2",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
]

_MODELS: dict[str, Callable[..., nn.Module]] = {
    fn.__name__: fn
    for fn in (
        resnet18,
        resnet34,
        resnet50,
        resnet101,
        resnet152,
        resnext50_32x4d,
        cifar_resnet20,
        cifar_resnet32,
        cifar_resnet44,
        cifar_resnet56,
        cifar_resnet110,
        mobilenet_v2,
    )
}
# Short aliases that practitioners type.
_ALIASES = {f"resnet{d}": f"cifar_resnet{d}" for d in (20, 32, 44, 56, 110)} | {
    "mobilenetv2": "mobilenet_v2",
    "resnext50": "resnext50_32x4d",
    "sknet50": "resnext50_32x4d",
}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model` (aliases excluded)."""
    return sorted(_MODELS)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a reference backbone by name, e.g. ``create_model("resnet50", attention="eca")``.

    ``resnet20`` ... ``resnet110`` are the CIFAR ResNets; ``sknet50`` is ResNeXt-50 32x4d with
    ``attention="sk"``.
    """
    key = name.lower()
    if key == "sknet50":
        kwargs.setdefault("attention", "sk")
    key = _ALIASES.get(key, key)
    if key not in _MODELS:
        close = difflib.get_close_matches(key, [*_MODELS, *_ALIASES], n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"Unknown model {name!r}.{hint} Available: {', '.join(list_models())}")
    return _MODELS[key](**kwargs)
