"""Put convattn attention modules into existing networks: torchvision, timm, any ``nn.Module``.

``attach(model, "eca")`` inserts a module where the mechanism's paper puts it
(``convattn.placement``) in the blocks it knows; ``attach(model, "se", where="layer*.bn2")``
inserts one after every matching module of any network. ``detach(model)`` undoes it.

How a module is inserted (a plain module tree: no hooks, no wrappers around the original
modules, so TorchScript, torch.export, ONNX, pickling and ``deepcopy`` keep working):

- **after** module ``M``: ``M``'s class is swapped for a cached subclass
  (``BatchNorm2d`` -> ``BatchNorm2dWithAttention``) whose ``forward`` is
  ``self.attn(<the original forward>(x))``, and the attention becomes ``M``'s new child ``attn``.
  Its keys are ``<M>.attn.*``, e.g. ``layer1.0.bn3.attn.fc1.weight``.
- **before** convolution ``C``: the same with a child ``pre_attn`` applied to ``C``'s input
  (``Conv2d`` -> ``Conv2dWithPreAttention``): keys ``<C>.pre_attn.*``.
- **in place of** a module (SK replacing ``conv2``, another attention replacing the built-in
  squeeze-and-excitation of EfficientNet/MobileNetV3, an attention pool replacing the global
  pool): the new module takes the old one's name; the old module is kept outside the module
  tree (not in ``state_dict``, not moved by ``.to()``) so ``detach`` can put it back.

The state-dict promise: every key of the original model keeps its name and tensor, so a
state dict saved from the original model loads into the attached one with
``load_state_dict(sd, strict=False)`` reporting exactly ``AttachReport.new_keys`` as missing
and nothing unexpected. Replaced modules are the exception: their keys are gone
(``AttachReport.removed_keys``) and their place holds the new module's keys.

Placements (keys of ``convattn.placement.PLACEMENTS``) in the block
families attach() knows:

- ResNet / ResNeXt / Wide-ResNet (torchvision ``BasicBlock``/``Bottleneck``, timm
  ``timm.models.resnet`` ``BasicBlock``/``Bottleneck``): ``block_end`` (after ``bn2``/``bn3``,
  before the residual add; in timm that is where the block's ``se`` slot sits),
  ``after_conv2``, ``replace_conv2``, ``before_conv``, ``stage_end``, ``every_other_block``,
  ``head``, ``pool``.
- MobileNetV2 (torchvision ``InvertedResidual``): ``block_end`` (after the projection BN),
  ``after_dw`` (after the depthwise conv + BN + ReLU6 of blocks with expansion != 1),
  ``before_conv``, ``stage_end``, ``every_other_block``, ``head``.
- EfficientNet / MobileNetV3 (torchvision ``MBConv``, ``FusedMBConv``, MobileNetV3
  ``InvertedResidual``): ``replace_se`` (the default where the MobileNetV2 placement is
  ``block_end`` or ``after_dw``: the built-in ``SqueezeExcitation`` is swapped for the new
  attention, as Coordinate Attention's paper does in EfficientNet), ``block_end``, ``after_dw``,
  ``before_conv``, ``stage_end``, ``every_other_block``, ``head``, ``pool``.

Stages are runs of blocks at one output stride; ``stage_end`` puts one module after the last
block of the stages at output stride 4, 8 and 16 (ResNet: ``layer1``-``layer3``; MobileNetV2:
``features.3``, ``.6``, ``.13``), ``every_other_block`` one after every odd-numbered block of
the stages at output stride 8 and 16 (5 in ResNet-50).
"""

from __future__ import annotations

import fnmatch
import inspect
import re
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from convattn.layers._helpers import AttentionModule
from convattn.placement import PLACEMENTS, paper_placement
from convattn.registry import create, info, list_attention

__all__ = ["AttachReport", "IdentityStart", "attach", "detach"]

AFTER_CHILD = "attn"
BEFORE_CHILD = "pre_attn"

Where = (
    str
    | re.Pattern[str]
    | type[nn.Module]
    | tuple[type[nn.Module], ...]
    | Callable[[str, nn.Module], bool]
)
AttentionArg = str | type[nn.Module] | Callable[[int], nn.Module]


# --------------------------------------------------------------------------------------
# The inserted pieces
# --------------------------------------------------------------------------------------


class IdentityStart(nn.Module):
    """``y = x + alpha * (attention(x) - x)`` with a learnable scalar ``alpha`` starting at 0.

    At ``alpha = 0`` the output is ``x`` exactly, so a network with attention attached through
    ``attach(..., identity_init=True)`` computes what the original computed; training moves
    ``alpha`` (its gradient is ``sum((attention(x) - x) * dL/dy)``) and, through it, the
    attention's own parameters.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.alpha * (self.module(x) - x)


class _Attached(nn.Module):
    """Common base of the dynamic ``<Class>WithAttention`` classes: pickles by rebuilding the
    dynamic class from the original class instead of looking it up by name."""

    _convattn_base: type[nn.Module]
    _convattn_kind: str

    def __reduce_ex__(self, protocol: Any) -> Any:
        root, kinds = _attached_chain(type(self))
        return (_rebuild_attached, (root, kinds), self.__dict__)


class _AttentionAfter(_Attached):
    if TYPE_CHECKING:
        attn: nn.Module

        def forward_without_attention(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(self.forward_without_attention(x))


class _AttentionBefore(_Attached):
    if TYPE_CHECKING:
        pre_attn: nn.Module

        def forward_without_pre_attention(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_without_pre_attention(self.pre_attn(x))


_MIXINS: dict[str, tuple[type[_Attached], str, str, str]] = {
    # kind: (mixin, child name, name of the original forward, class-name suffix)
    "after": (_AttentionAfter, AFTER_CHILD, "forward_without_attention", "WithAttention"),
    "before": (_AttentionBefore, BEFORE_CHILD, "forward_without_pre_attention", "WithPreAttention"),
}
_CLASS_CACHE: dict[tuple[type[nn.Module], str], type[nn.Module]] = {}


def _renamed_function(fn: Any, name: str) -> Any:
    """A copy of ``fn`` called ``name``: TorchScript compiles a method under its function name,
    so the original ``forward`` must not be called ``forward`` in the subclass."""
    if not isinstance(fn, types.FunctionType):
        return fn
    new = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__annotations__ = dict(fn.__annotations__)
    new.__qualname__ = fn.__qualname__
    new.__module__ = fn.__module__
    new.__doc__ = fn.__doc__
    return new


def _attached_class(base: type[nn.Module], kind: str) -> type[nn.Module]:
    """The cached subclass of ``base`` that runs an attention child after/before it."""
    key = (base, kind)
    if key not in _CLASS_CACHE:
        mixin, _, original_name, suffix = _MIXINS[kind]
        name = f"{base.__name__}{suffix}"
        namespace = {
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": f"{base.__name__} with a convattn attention module {kind} it "
            "(made by convattn.attach; convattn.detach restores the original class).",
            original_name: _renamed_function(base.forward, original_name),
            "_convattn_base": base,
            "_convattn_kind": kind,
        }
        _CLASS_CACHE[key] = type(name, (mixin, base), namespace)
    return _CLASS_CACHE[key]


def _attached_chain(cls: type[nn.Module]) -> tuple[type[nn.Module], tuple[str, ...]]:
    """(original class, kinds applied in order) of a dynamic class."""
    kinds: list[str] = []
    while issubclass(cls, _Attached) and "_convattn_kind" in cls.__dict__:
        kinds.append(cls.__dict__["_convattn_kind"])
        cls = cls.__dict__["_convattn_base"]
    return cls, tuple(reversed(kinds))


def _rebuild_attached(root: type[nn.Module], kinds: tuple[str, ...]) -> nn.Module:
    cls = root
    for kind in kinds:
        cls = _attached_class(cls, kind)
    module: nn.Module = cls.__new__(cls)
    return module


def _is_attached(module: nn.Module) -> bool:
    return isinstance(module, _Attached) and "_convattn_kind" in type(module).__dict__


def _has_kind(module: nn.Module, kind: str) -> bool:
    return _is_attached(module) and kind in _attached_chain(type(module))[1]


_ORIGINAL = "_convattn_original"  # replaced module, stored in the replacement's __dict__


# --------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttachReport:
    """What ``attach`` did.

    Attributes:
        attention: the registry key (or class / factory name) that was attached.
        placement: a key of ``PLACEMENTS``, or ``"where"`` for where=.
        locations: qualified names (in the original model) of the modules the attention went
            after, before or in place of, one per inserted module.
        modules: qualified names of the new attention modules in the attached model.
        how: ``"after"``, ``"before"`` or ``"replace"`` for each location.
        replaced: names of the modules that were replaced (their weights are gone; ``detach``
            puts them back).
        added_params: parameters of the new modules (``IdentityStart``'s alphas included).
        removed_params: parameters of the replaced modules.
        new_keys: state-dict keys the attached model has and the original had not.
        removed_keys: state-dict keys of the replaced modules (no longer in the model).
        identity_init: whether each module was wrapped in ``IdentityStart``.
    """

    attention: str
    placement: str
    locations: tuple[str, ...]
    modules: tuple[str, ...]
    how: tuple[str, ...]
    replaced: tuple[str, ...]
    added_params: int
    removed_params: int
    new_keys: tuple[str, ...] = field(repr=False)
    removed_keys: tuple[str, ...] = field(repr=False)
    identity_init: bool = False

    @property
    def count(self) -> int:
        """Number of attention modules inserted."""
        return len(self.modules)

    def __str__(self) -> str:
        text = PLACEMENTS.get(self.placement)
        where = f" ({text})" if text else ""
        net = self.added_params - self.removed_params
        lines = [
            f"attach({self.attention!r}): {self.count} module(s) at {self.placement!r}{where}",
            f"  parameters: +{self.added_params:,} added, -{self.removed_params:,} replaced, "
            f"net {net:+,}" + (", identity start (alpha = 0)" if self.identity_init else ""),
        ]
        for how, location, module in zip(self.how, self.locations, self.modules, strict=True):
            arrow = "replaced by" if how == "replace" else f"{how:<6} ->"
            lines.append(f"  {location} {arrow} {module}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Known block families
# --------------------------------------------------------------------------------------


def _loaded_class(module: str, name: str) -> type[nn.Module] | None:
    """A class from an already imported module: a model holding it must have imported it."""
    mod = sys.modules.get(module)
    cls = getattr(mod, name, None) if mod is not None else None
    return cls if isinstance(cls, type) else None


def _family_classes() -> dict[str, tuple[type[nn.Module], ...]]:
    spec = {
        "resnet": [
            ("torchvision.models.resnet", "BasicBlock"),
            ("torchvision.models.resnet", "Bottleneck"),
            ("timm.models.resnet", "BasicBlock"),
            ("timm.models.resnet", "Bottleneck"),
        ],
        "mobilenetv2": [("torchvision.models.mobilenetv2", "InvertedResidual")],
        "mbconv": [
            ("torchvision.models.efficientnet", "MBConv"),
            ("torchvision.models.efficientnet", "FusedMBConv"),
            ("torchvision.models.mobilenetv3", "InvertedResidual"),
        ],
    }
    out: dict[str, tuple[type[nn.Module], ...]] = {}
    for family, names in spec.items():
        found = [_loaded_class(m, n) for m, n in names]
        out[family] = tuple(c for c in found if c is not None)
    return out


_FAMILY_TEXT = {
    "resnet": "ResNet/ResNeXt blocks",
    "mobilenetv2": "MobileNetV2 inverted residuals",
    "mbconv": "EfficientNet/MobileNetV3 blocks",
}
_FAMILY_PLACEMENTS = {
    "resnet": (
        "block_end",
        "after_conv2",
        "replace_conv2",
        "before_conv",
        "stage_end",
        "every_other_block",
        "head",
        "pool",
    ),
    "mobilenetv2": (
        "block_end",
        "after_dw",
        "before_conv",
        "stage_end",
        "every_other_block",
        "head",
    ),
    "mbconv": (
        "replace_se",
        "block_end",
        "after_dw",
        "before_conv",
        "stage_end",
        "every_other_block",
        "head",
        "pool",
    ),
}

# Attention modules that ship inside models (placements never go inside them).
_BUILTIN_ATTENTION = {
    "SqueezeExcitation",
    "SqueezeExcite",
    "SEModule",
    "EffectiveSEModule",
    "EcaModule",
    "CecaModule",
    "CbamModule",
    "LightCbamModule",
}


def _is_attention_module(module: nn.Module) -> bool:
    return isinstance(module, (AttentionModule, IdentityStart)) or (
        type(module).__name__ in _BUILTIN_ATTENTION
    )


def _is_builtin_se(module: nn.Module) -> bool:
    cls = _loaded_class("torchvision.ops.misc", "SqueezeExcitation")
    return cls is not None and isinstance(module, cls)


@dataclass
class _Block:
    name: str
    module: nn.Module
    family: str
    parent: str
    stride: int
    out_stride: int = 0


def _stride_of(module: nn.Module) -> int:
    stride = getattr(module, "stride", None)
    if isinstance(stride, int):
        return stride
    if isinstance(stride, tuple) and stride and all(isinstance(s, int) for s in stride):
        return max(stride)
    return 1


def _walk(
    module: nn.Module, prefix: str = "", *, skip_added: bool = True
) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` without the modules attach() added (attention children, replacements
    stay listed themselves but not their insides)."""
    yield prefix, module
    if skip_added and _ORIGINAL in module.__dict__:
        return
    for name, child in module.named_children():
        if child is None:
            continue
        if skip_added and _is_attached(module) and name in (AFTER_CHILD, BEFORE_CHILD):
            continue
        yield from _walk(child, f"{prefix}.{name}" if prefix else name, skip_added=skip_added)


def _find_blocks(model: nn.Module) -> list[_Block]:
    families = _family_classes()
    blocks: list[_Block] = []
    stem_stride = 1
    seen_block = False

    def visit(module: nn.Module, name: str, parent: str) -> None:
        nonlocal stem_stride, seen_block
        if _ORIGINAL in module.__dict__ or _is_attention_module(module):
            return
        for family, classes in families.items():
            if classes and isinstance(module, classes):
                stride = max(_stride_of(m) for _, m in _walk(module))
                blocks.append(_Block(name, module, family, parent, stride))
                seen_block = True
                return
        children = [
            (n, c)
            for n, c in module.named_children()
            if c is not None and not (_is_attached(module) and n in (AFTER_CHILD, BEFORE_CHILD))
        ]
        if not children and not seen_block:
            stem_stride *= _stride_of(module)
        for child_name, child in children:
            visit(child, f"{name}.{child_name}" if name else child_name, name)

    visit(model, "", "")
    out_stride = stem_stride
    for block in blocks:
        out_stride *= block.stride
        block.out_stride = out_stride
    return blocks


def _stages(blocks: list[_Block]) -> list[list[_Block]]:
    """Runs of consecutive blocks at one output stride."""
    stages: list[list[_Block]] = []
    for block in blocks:
        if stages and stages[-1][-1].out_stride == block.out_stride:
            stages[-1].append(block)
        else:
            stages.append([block])
    return stages


# --------------------------------------------------------------------------------------
# Planning: where each module goes
# --------------------------------------------------------------------------------------


@dataclass
class _Site:
    how: str  # "after" | "before" | "replace"
    name: str  # qualified name of the target module
    module: nn.Module
    channels: int
    spatial_dims: int = 2
    extra: dict[str, Any] = field(default_factory=dict)  # constructor options (replace_conv2)


def _spatial_dims_of(module: nn.Module) -> int:
    one = (nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d, nn.InstanceNorm1d)
    three = (nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d, nn.InstanceNorm3d)
    if isinstance(module, one):
        return 1
    if isinstance(module, three):
        return 3
    if isinstance(module, nn.Sequential):
        for child in reversed(list(module)):
            if isinstance(child, one + three + (nn.Conv2d, nn.BatchNorm2d)):
                return _spatial_dims_of(child)
    return 2


def _out_channels(module: nn.Module) -> int | None:
    """Channels of ``module``'s output, read from its attributes (None: unknown)."""
    for attr in ("out_channels", "num_features", "num_channels"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, (tuple, list)) and len(shape) == 1 and isinstance(shape[0], int):
        return int(shape[0])
    families = _family_classes()
    if families["resnet"] and isinstance(module, families["resnet"]):
        bn = getattr(module, "bn3" if hasattr(module, "bn3") else "bn2", None)
        return _out_channels(bn) if isinstance(bn, nn.Module) else None
    if isinstance(module, nn.Sequential):
        for child in reversed(list(module)):
            channels = _out_channels(child)
            if channels is not None:
                return channels
    return None


def _after_target(name: str, module: nn.Module) -> tuple[str, nn.Module]:
    """The module whose output is ``module``'s output and that can take an ``attn`` child:
    a Sequential runs every child, so the attention goes after its last child instead."""
    while isinstance(module, nn.Sequential):
        if len(module) == 0:
            raise ValueError(f"attach: cannot insert after the empty Sequential {name!r}")
        index = len(module) - 1
        name, module = f"{name}.{list(module._modules)[index]}", module[index]
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        raise ValueError(
            f"attach: cannot insert after {name!r}: a {type(module).__name__} is not called "
            "with an input; match the modules it holds instead"
        )
    return name, module


def _after(name: str, module: nn.Module, channels: int | None = None) -> _Site:
    if channels is None:
        channels = _out_channels(module)
    if channels is None:
        raise ValueError(
            f"attach: cannot infer the channel count after {name!r} "
            f"({type(module).__name__}): it has no out_channels, num_features, num_channels "
            "or one-element normalized_shape; match a convolution or normalisation layer instead"
        )
    dims = _spatial_dims_of(module)
    target_name, target = _after_target(name, module)
    return _Site("after", target_name, target, channels, dims)


def _child(block: _Block, *path: str) -> tuple[str, nn.Module]:
    name = ".".join((block.name, *path))
    return name, block.module.get_submodule(".".join(path))


def _sequential_of(block: _Block) -> tuple[str, nn.Sequential]:
    attr = "conv" if block.family == "mobilenetv2" else "block"
    seq = getattr(block.module, attr)
    return f"{block.name}.{attr}", seq


def _depthwise_index(seq: nn.Sequential) -> int | None:
    for index, layer in enumerate(seq):
        conv = layer[0] if isinstance(layer, nn.Sequential) and len(layer) else layer
        if (
            isinstance(conv, nn.Conv2d)
            and conv.groups > 1
            and conv.groups == conv.in_channels == conv.out_channels
        ):
            return index
    return None


def _replace_conv2(block: _Block) -> _Site:
    name, conv = _child(block, "conv2")
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"attach: replace_conv2 expects {name!r} to be a Conv2d, got {conv}")
    if conv.kernel_size != (3, 3) or conv.dilation != (1, 1) or conv.stride[0] != conv.stride[1]:
        raise ValueError(
            f"attach: replace_conv2 replaces 3x3 convolutions with dilation 1 and a square "
            f"stride; {name!r} is {conv}"
        )
    extra = {"out_channels": conv.out_channels, "stride": conv.stride[0], "groups": conv.groups}
    return _Site("replace", name, conv, conv.in_channels, 2, extra)


def _block_sites(block: _Block, placement: str) -> list[_Site]:
    if block.family == "resnet":
        if placement == "block_end":
            return [_after(*_child(block, "bn3" if hasattr(block.module, "bn3") else "bn2"))]
        if placement == "after_conv2":
            return [_after(*_child(block, "conv2"))]
        if placement == "replace_conv2":
            return [_replace_conv2(block)]
        raise AssertionError(placement)  # pragma: no cover - filtered by _FAMILY_PLACEMENTS
    seq_name, seq = _sequential_of(block)
    if placement == "block_end":
        return [_after(f"{seq_name}.{len(seq) - 1}", seq[-1])]
    if placement == "after_dw":
        index = _depthwise_index(seq)
        if index is None or index == 0:  # no depthwise conv, or no expansion before it
            return []
        return [_after(f"{seq_name}.{index}", seq[index])]
    if placement == "replace_se":
        return [
            _Site("replace", f"{seq_name}.{n}", m, _se_channels(m))
            for n, m in seq.named_children()
            if _is_builtin_se(m)
        ]
    raise AssertionError(placement)  # pragma: no cover


def _se_channels(se: nn.Module) -> int:
    fc1 = se.get_submodule("fc1")
    if not isinstance(fc1, nn.Conv2d):
        raise ValueError(f"attach: expected the SqueezeExcitation's fc1 to be a Conv2d, got {fc1}")
    return fc1.in_channels


def _pool_site(model: nn.Module, blocks: list[_Block]) -> _Site:
    pools = []
    for name, child in model.named_children():
        is_avg = isinstance(child, nn.AdaptiveAvgPool2d) and child.output_size in (1, (1, 1))
        is_timm = type(child).__name__ == "SelectAdaptivePool2d" and isinstance(
            getattr(child, "flatten", None), nn.Flatten
        )
        if is_avg or is_timm:
            pools.append((name, child))
    if len(pools) != 1:
        raise ValueError(
            f"attach: placement 'pool' replaces the model's global-average-pool module; "
            f"{type(model).__name__} has {len(pools)} such top-level modules (it may pool "
            "with a function call in forward); use where= or build the head yourself"
        )
    head = _head_site(model, blocks)
    name, pool = pools[0]
    return _Site("replace", name, pool, head.channels)


def _head_site(model: nn.Module, blocks: list[_Block]) -> _Site:
    """After the container of the last block, climbing through Sequential parents (whose
    later children, e.g. MobileNet's last 1x1 conv, also belong to the feature extractor)."""
    name = blocks[-1].parent
    if not name:
        return _after(blocks[-1].name, blocks[-1].module)
    while "." in name:
        grandparent = name.rpartition(".")[0]
        if not isinstance(model.get_submodule(grandparent), nn.Sequential):
            break
        name = grandparent
    return _after(name, model.get_submodule(name))


def _plan_placement(model: nn.Module, blocks: list[_Block], placement: str) -> list[_Site]:
    if placement == "before_conv":
        sites = []
        for name, module in _walk(model):
            if _is_attention_module(module) or _ORIGINAL in module.__dict__:
                continue
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and not _inside_attention(
                model, name
            ):
                dims = _spatial_dims_of(module)
                sites.append(_Site("before", name, module, module.in_channels, dims))
        return sites
    if not blocks:
        raise ValueError(
            f"attach: placement {placement!r} needs blocks attach() knows "
            f"({', '.join(_FAMILY_TEXT.values())}); {type(model).__name__} has none: "
            "pass where= to choose the modules to insert after"
        )
    family = blocks[0].family
    if placement not in _FAMILY_PLACEMENTS[family]:
        raise ValueError(
            f"attach: placement {placement!r} is not available in a model of "
            f"{_FAMILY_TEXT[family]}; available: {', '.join(_FAMILY_PLACEMENTS[family])} "
            "(or pass where=)"
        )
    if placement == "stage_end":
        return [
            _after(stage[-1].name, stage[-1].module)
            for stage in _stages(blocks)[:-1]
            if stage[-1].out_stride in (4, 8, 16)
        ]
    if placement == "every_other_block":
        return [
            _after(block.name, block.module)
            for stage in _stages(blocks)
            if stage[0].out_stride in (8, 16)
            for index, block in enumerate(stage)
            if index % 2 == 1
        ]
    if placement == "head":
        return [_head_site(model, blocks)]
    if placement == "pool":
        return [_pool_site(model, blocks)]
    return [site for block in blocks for site in _block_sites(block, placement)]


def _inside_attention(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    module = model
    for part in parts[:-1]:
        module = getattr(module, part)
        if _is_attention_module(module):
            return True
    return False


def _plan_where(model: nn.Module, where: Where) -> list[_Site]:
    match = _matcher(where)
    candidates = [(n, m) for n, m in _walk(model) if n]
    sites = [_after(n, m) for n, m in candidates if match(n, m)]
    if not sites:
        examples = ", ".join(n for n, _ in candidates[:8])
        raise ValueError(
            f"attach: where={where!r} matched no module of {type(model).__name__}; "
            f"qualified names look like: {examples}, ..."
        )
    return sites


def _matcher(where: Where) -> Callable[[str, nn.Module], bool]:
    if isinstance(where, str):
        pattern = where
        return lambda name, _: fnmatch.fnmatchcase(name, pattern)
    if isinstance(where, re.Pattern):
        regex = where
        return lambda name, _: regex.fullmatch(name) is not None
    if isinstance(where, type) and issubclass(where, nn.Module):
        cls = where
        return lambda _, module: isinstance(module, cls)
    if isinstance(where, tuple) and where and all(isinstance(t, type) for t in where):
        classes = where
        return lambda _, module: isinstance(module, classes)
    if callable(where):
        predicate = cast(Callable[[str, nn.Module], bool], where)
        return lambda name, module: bool(predicate(name, module))
    raise TypeError(
        "attach: where must be a glob pattern (str), a compiled regex, an nn.Module type or "
        f"tuple of types, or a predicate (name, module) -> bool; got {type(where).__name__}"
    )


# --------------------------------------------------------------------------------------
# Building the attention modules
# --------------------------------------------------------------------------------------


@dataclass
class _Builder:
    name: str
    contract: str
    registry_name: str | None
    cls: type[nn.Module] | None
    factory: Callable[[int], nn.Module] | None
    options: dict[str, Any]

    def accepts(self, option: str) -> bool:
        if self.registry_name is not None:
            return option in info(self.registry_name).options
        if self.cls is not None:
            return option in inspect.signature(self.cls.__init__).parameters
        return False

    def build(self, site: _Site) -> nn.Module:
        options = dict(site.extra)
        for key in ("out_channels", "stride"):
            if key in site.extra and key in self.options:
                raise TypeError(
                    f"attach: {key}= is fixed by the convolution {site.name!r} being replaced; "
                    "do not pass it"
                )
        options.update(self.options)
        if (
            site.spatial_dims != 2
            and "spatial_dims" not in options
            and self.accepts("spatial_dims")
        ):
            options["spatial_dims"] = site.spatial_dims
        if self.registry_name is not None:
            module = create(self.registry_name, site.channels, **options)
        elif self.cls is not None:
            module = self.cls(site.channels, **options)
        else:
            assert self.factory is not None
            if site.extra:
                raise TypeError(
                    f"attach: placement replace_conv2 needs a registry name or a class that "
                    f"takes out_channels/stride/groups, not the factory {self.name!r}"
                )
            module = self.factory(site.channels)
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"attach: the attention factory {self.name!r} must return an nn.Module, got "
                f"{type(module).__name__}"
            )
        return module


def _builder(attention: AttentionArg, options: dict[str, Any]) -> _Builder:
    if isinstance(attention, str):
        spec = info(attention)
        return _Builder(spec.name, spec.contract, spec.name, None, None, options)
    if isinstance(attention, type):
        if not issubclass(attention, nn.Module):
            raise TypeError(
                f"attach: attention must be a registry name, an nn.Module subclass or a factory "
                f"callable(channels) -> nn.Module; got the class {attention.__name__}"
            )
        for key in list_attention():
            spec = info(key)
            if spec.cls is attention and not spec.presets:
                return _Builder(key, spec.contract, None, attention, None, options)
        return _Builder(attention.__name__, "gate", None, attention, None, options)
    if isinstance(attention, nn.Module):
        raise TypeError(
            "attach: attention must be a registry name, an nn.Module subclass or a factory "
            f"callable(channels) -> nn.Module; got a {type(attention).__name__} instance (one "
            "instance cannot sit at several places: pass its class or a factory)"
        )
    if callable(attention):
        if options:
            raise TypeError(
                f"attach: options {sorted(options)} go to a registry name or class; bind them "
                "inside the factory instead"
            )
        name = getattr(attention, "__name__", type(attention).__name__)
        return _Builder(name, "gate", None, None, attention, {})
    raise TypeError(
        "attach: attention must be a registry name, an nn.Module subclass or a factory "
        f"callable(channels) -> nn.Module; got {type(attention).__name__}"
    )


def _reference_tensor(*modules: nn.Module) -> torch.Tensor | None:
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.is_floating_point():
                return tensor
    return None


def _check_model(model: object, caller: str) -> nn.Module:
    wrapper = type(model).__name__
    wrapped = isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel))
    if wrapped or wrapper == "FullyShardedDataParallel":
        raise TypeError(
            f"{caller}: got the model wrapped in {wrapper}; call {caller}() on the bare model "
            "before wrapping it (or pass model.module)"
        )
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(f"{caller}: got a TorchScript module; {caller}() works on the eager model")
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be an nn.Module, got {wrapper}")
    if "_orig_mod" in model._modules:  # torch.compile's OptimizedModule
        raise TypeError(
            f"{caller}: got a torch.compile'd model; call {caller}() before compiling "
            "(or pass model._orig_mod)"
        )
    return model


def _known_placements() -> list[str]:
    return list(PLACEMENTS)


# --------------------------------------------------------------------------------------
# attach / detach
# --------------------------------------------------------------------------------------


def attach(
    model: nn.Module,
    attention: AttentionArg,
    *,
    where: Where | None = None,
    placement: str | None = None,
    identity_init: bool = False,
    **options: Any,
) -> AttachReport:
    """Insert attention modules into ``model`` in place and report what was done.

    Args:
        model: any ``nn.Module`` (not wrapped in DataParallel / DDP / torch.compile).
        attention: a registry name (``"eca"``), an ``nn.Module`` class taking
            ``(channels, **options)``, or a factory ``callable(channels) -> nn.Module``.
        where: insert one module AFTER every module that matches: a glob over qualified names
            (``fnmatch``: ``*`` also crosses dots, e.g. ``"layer*.bn2"``), a compiled regex
            (full match), an ``nn.Module`` type or tuple of types, or a predicate
            ``(name, module) -> bool``. A matched ``nn.Sequential`` gets the module after its
            last child. The channel count comes from the matched module's ``out_channels``,
            ``num_features``, ``num_channels`` or one-element ``normalized_shape``.
        placement: a key of ``convattn.placement.PLACEMENTS`` to use
            instead of the mechanism's paper placement in the blocks attach() knows.
        identity_init: wrap each module in ``IdentityStart`` (``x + alpha * (attn(x) - x)``,
            ``alpha = 0``): the attached model's outputs equal the original's exactly until
            training moves ``alpha``. Not available for replacing placements.
        **options: keyword options of the attention module (see ``convattn.info(name)``).

    Returns:
        An ``AttachReport``; ``print(report)`` lists every insertion.

    Raises:
        TypeError: a wrapped model, an attention of the wrong kind, options with a factory.
        ValueError: no known blocks and no ``where=``, a ``where=`` that matches nothing, a
            placement the model lacks, a place that already holds attention (``detach``
            first), a channel count that cannot be inferred.
    """
    model = _check_model(model, "attach")
    builder = _builder(attention, dict(options))
    if where is not None and placement is not None:
        raise ValueError("attach: pass either where= (custom places) or placement=, not both")
    if placement is not None and placement not in _known_placements():
        raise ValueError(
            f"attach: unknown placement {placement!r}; one of {', '.join(_known_placements())}"
        )

    if where is not None:
        chosen = "where"
        sites = _plan_where(model, where)
        if builder.contract != "gate":
            raise ValueError(
                f"attach: {builder.name!r} is a {builder.contract} module, not a gate; where= "
                "inserts shape-preserving modules only"
            )
    else:
        blocks = _find_blocks(model)
        families = {b.family for b in blocks}
        if len(families) > 1:
            raise ValueError(
                f"attach: {type(model).__name__} mixes block families "
                f"({', '.join(sorted(families))}); pass where= to choose the places"
            )
        if placement is None:
            if not blocks:
                raise ValueError(
                    f"attach: {type(model).__name__} has no block attach() knows "
                    f"({', '.join(_FAMILY_TEXT.values())}); pass where= (a name pattern, a "
                    "module type or a predicate) to choose the modules to insert after"
                )
            placement = _paper_placement(builder, blocks[0].family, type(model).__name__)
        _check_contract(builder, placement)
        chosen = placement
        sites = _plan_placement(model, blocks, placement)
        if not sites:
            raise ValueError(
                f"attach: placement {placement!r} found no place in {type(model).__name__}"
                + (
                    " (it has no built-in squeeze-and-excitation: try placement='block_end')"
                    if placement == "replace_se"
                    else ""
                )
            )

    replacing = any(site.how == "replace" for site in sites)
    if identity_init and replacing:
        raise ValueError(
            f"attach: identity_init=True cannot apply to placement {chosen!r}: it replaces "
            "modules, so the original outputs cannot be kept; use a gate placement"
        )
    sites = _deduplicate(sites)
    _check_free(sites)

    # Build everything before changing the model, so a failure leaves it untouched.
    built: list[tuple[_Site, nn.Module]] = []
    for site in sites:
        module = builder.build(site)
        if identity_init:
            module = IdentityStart(module)
        reference = _reference_tensor(site.module, model)
        if reference is not None:
            module.to(device=reference.device, dtype=reference.dtype)
        module.train(site.module.training)
        built.append((site, module))

    locations, modules, hows, replaced, new_keys, removed_keys = [], [], [], [], [], []
    added = removed = 0
    for site, module in built:
        name = site.name
        if site.how == "replace":
            parent_name, _, child_name = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            object.__setattr__(module, _ORIGINAL, site.module)
            setattr(parent, child_name, module)
            new_name = name
            replaced.append(name)
            removed += sum(p.numel() for p in site.module.parameters())
            removed_keys += [f"{name}.{k}" for k in site.module.state_dict()]
        else:
            child = AFTER_CHILD if site.how == "after" else BEFORE_CHILD
            site.module.__class__ = _attached_class(type(site.module), site.how)
            site.module.add_module(child, module)
            new_name = f"{name}.{child}" if name else child
        locations.append(name)
        modules.append(new_name)
        hows.append(site.how)
        added += sum(p.numel() for p in module.parameters())
        new_keys += [f"{new_name}.{k}" for k in module.state_dict()]

    if replacing:  # a replacement may reuse a removed key name
        kept = set(new_keys) & set(removed_keys)
        new_keys = [k for k in new_keys if k not in kept]
        removed_keys = [k for k in removed_keys if k not in kept]
    return AttachReport(
        attention=builder.name,
        placement=chosen,
        locations=tuple(locations),
        modules=tuple(modules),
        how=tuple(hows),
        replaced=tuple(replaced),
        added_params=added,
        removed_params=removed,
        new_keys=tuple(new_keys),
        removed_keys=tuple(removed_keys),
        identity_init=identity_init,
    )


_SE_KINDS = ("channel", "hybrid")


def _paper_placement(builder: _Builder, family: str, model_name: str) -> str:
    table = "resnet" if family == "resnet" else "mobilenetv2"
    available = ", ".join(_FAMILY_PLACEMENTS[family])
    kind = "channel"
    if builder.registry_name is not None:
        kind = info(builder.registry_name).kind
        try:
            placement = paper_placement(builder.registry_name, table)
        except ValueError:
            raise ValueError(
                f"attach: {builder.name!r} has no paper placement in {model_name} "
                f"({_FAMILY_TEXT[family]}); pass placement= (available here: {available})"
            ) from None
    else:
        placement = {"gate": "block_end", "conv": "replace_conv2", "pool": "pool"}[builder.contract]
    # Blocks with a built-in SE: channel (and channel + spatial) attention takes its place, as
    # Coordinate Attention's paper does in EfficientNet; spatial attention goes beside it.
    if family == "mbconv" and placement in ("block_end", "after_dw") and kind in _SE_KINDS:
        placement = "replace_se"
    if placement not in _FAMILY_PLACEMENTS[family]:
        raise ValueError(
            f"attach: {builder.name!r} goes at {placement!r} in its paper, which {model_name} "
            f"({_FAMILY_TEXT[family]}) lacks; pass placement= (available here: {available})"
        )
    return placement


def _check_contract(builder: _Builder, placement: str) -> None:
    needed = {"conv": "replace_conv2", "pool": "pool"}.get(builder.contract)
    if needed is not None and placement != needed:
        raise ValueError(
            f"attach: {builder.name!r} is a {builder.contract} module: it goes at {needed!r}, "
            f"not {placement!r}"
        )
    if needed is None and placement in ("replace_conv2", "pool"):
        raise ValueError(
            f"attach: placement {placement!r} needs a "
            f"{'convolution' if placement == 'replace_conv2' else 'pooling head'} "
            f"(e.g. {'sk' if placement == 'replace_conv2' else 'attnpool'}); "
            f"{builder.name!r} is a gate"
        )


def _deduplicate(sites: list[_Site]) -> list[_Site]:
    seen: set[tuple[int, str]] = set()
    unique = []
    for site in sites:
        key = (id(site.module), site.how)
        if key not in seen:
            seen.add(key)
            unique.append(site)
    return unique


def _check_free(sites: list[_Site]) -> None:
    for site in sites:
        if site.how == "replace":
            continue
        child = AFTER_CHILD if site.how == "after" else BEFORE_CHILD
        if _has_kind(site.module, site.how):
            raise ValueError(
                f"attach: {site.name!r} already has an attention module {site.how} it "
                f"({site.name}.{child}); call convattn.detach(model) first (attach allows one "
                "module after and one before each place)"
            )
        if hasattr(site.module, child):
            raise ValueError(
                f"attach: {site.name!r} ({type(site.module).__name__}) already has an "
                f"attribute {child!r}; attach cannot add its {child!r} child there"
            )


def detach(model: nn.Module) -> nn.Module:
    """Undo every ``attach`` on ``model`` in place and return it.

    Attention children are removed, swapped classes restored and replaced modules (with their
    original weights) put back, so the model's structure, state-dict keys and outputs are the
    original's. A model without attached attention is returned unchanged.
    """
    model = _check_model(model, "detach")
    for name, module in list(_walk(model, skip_added=False)):
        original = module.__dict__.get(_ORIGINAL)
        if original is None:
            continue
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        reference = _reference_tensor(module)
        if reference is not None:
            original.to(device=reference.device, dtype=reference.dtype)
        original.train(module.training)
        setattr(parent, child_name, original)
        del module.__dict__[_ORIGINAL]
    for _, module in list(_walk(model, skip_added=False)):
        if _is_attached(module):
            root, _ = _attached_chain(type(module))
            for child in (AFTER_CHILD, BEFORE_CHILD):
                module._modules.pop(child, None)
            module.__class__ = root
    return model
