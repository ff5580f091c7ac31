"""See where attention attends: capture every attention map of a forward pass and plot it.

Every convattn module computes its weights through a named gate submodule (``gate``,
``gate_h``, ``cw.gate``, ...). :func:`capture` puts forward hooks on those gates, for any
model that contains convattn modules (the reference backbones, a model built by hand, a
third-party model after ``attach()``), and turns each gate output into one of four kinds:

- ``"channel"``: per-channel weights, ``(N, K)`` (K = C for SE, ECA, CBAM's channel gate...);
- ``"spatial"``: maps over positions, ``(N, K, *spatial)``: K = 1 for one map (CBAM, sSE),
  the groups or heads (SGE, EMA, attention pooling), or the channels for per-neuron weights
  (SimAM, BAM, Coordinate Attention's ``(N, C, H, 1)`` / ``(N, C, 1, W)`` gates, where an axis
  the map does not vary along has size 1). Gates that flatten positions (GC's ``(N, 1, HW)``)
  are reshaped back to the map;
- ``"selection"``: SK's softmax over branches, ``(N, M, K)``;
- ``"affinity"``: query-by-key matrices (non-local, DANet): ``(N, Q, P)`` kept as is, plus a
  summary, the mean attention each key position (or channel) receives.

A gate output that fits none of them (a user module with an unusual layout) is kept raw with
kind ``"other"``.

>>> import torch
>>> from convattn import models
>>> from convattn.viz import capture
>>> net = models.create_model("resnet50", attention="cbam").eval()
>>> with capture(net) as maps, torch.no_grad():
...     net(torch.randn(1, 3, 224, 224))
>>> maps["layer1.0.attn.spatial_gate.gate"].spatial().shape   # torch.Size([1, 56, 56])
>>> maps["layer1.0.attn.channel_gate.gate"].tensor.shape      # torch.Size([1, 256])

``convattn viz --model resnet50 --attention cbam --image astronaut`` draws the maps over a
photo (``spatial.png``), the channel weights as strips (``channel.png``) and SK's branch
selections (``selection.png``). Plotting needs the ``viz`` extra (matplotlib, pillow,
scikit-image); capturing needs only torch.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import math
import os
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from convattn.layers._helpers import AttentionModule
from convattn.layers.attn_pool import AttentionPool2d
from convattn.layers.bam import BAM
from convattn.layers.channel import ChannelAttention
from convattn.layers.coord import CoordAttention
from convattn.layers.danet import DAChannelAttention, DAPositionAttention
from convattn.layers.ema import EMA
from convattn.layers.fca import MultiSpectralAttention
from convattn.layers.gc import GlobalContext
from convattn.layers.gct import GCT
from convattn.layers.ge import GatherExcite
from convattn.layers.nonlocal_ import NonLocalBlock
from convattn.layers.psa import PolarizedSelfAttention
from convattn.layers.scse import SpatialSE
from convattn.layers.sge import SpatialGroupEnhance
from convattn.layers.shuffle import ShuffleAttention
from convattn.layers.simam import SimAM
from convattn.layers.sk import SKConv
from convattn.layers.spatial import SpatialAttention
from convattn.layers.srm import SRM
from convattn.layers.triplet import TripletAttention

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "BUILTIN_IMAGES",
    "MAP_KINDS",
    "AttentionMaps",
    "CapturedMap",
    "add_parser",
    "capture",
    "load_checkpoint",
    "load_image",
    "plot_channel",
    "plot_selection",
    "plot_spatial",
    "save_figures",
]

MAP_KINDS = ("channel", "spatial", "selection", "affinity", "other")

# ImageNet normalisation (the reference backbones' training statistics).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Photos shipped with scikit-image (no download): name -> skimage.data function name.
BUILTIN_IMAGES = {
    "astronaut": "astronaut",
    "chelsea": "chelsea",
    "cat": "chelsea",
    "coffee": "coffee",
    "rocket": "rocket",
    "camera": "camera",
}

# ---------------------------------------------------------------------------------------------
# Gate layouts
# ---------------------------------------------------------------------------------------------
#
# How each built-in module's gate output is laid out (read from the layer files; their
# docstrings give the same shapes). Keys are gate paths relative to the attention module that
# owns them. Modules not listed here (user subclasses of AttentionModule) go through "auto",
# which infers the layout from the shapes.
#
# channel          (N[*G], K, 1, ..., 1) or (N[*G], ..., K): per-channel weights -> (N, G*K)
# spatial          (N[*G], K, *T) with T_i in {1, S_i} -> (N, G*K, *T)
# flat_positions   (N, K, L): positions flattened row-major -> (N, K, *S)
# token_positions  (N, K, ..., 1 + L): index 0 is a pooled token, then the positions
# selection        (N, M, K): a softmax over M branches per channel
# affinity_pos     (N, L, P): rows are query positions, columns key positions (P = L or a
#                  subsampled grid)
# affinity_chan    (N, C, C): channel-by-channel
# plane_cw         (N, 1, C, W): triplet's C-W plane, broadcast over H -> (N, C, 1, W)
# plane_hc         (N, 1, H, C): triplet's H-C plane, broadcast over W -> (N, C, H, 1)
# auto             the shape decides (GE's gate is (N, C, 1, 1) for the global extent and
#                  (N, C, *S) otherwise)
_GATE_LAYOUTS: dict[type[nn.Module], dict[str, str]] = {
    ChannelAttention: {"gate": "channel"},  # SE, ECA, cSE, CBAM's channel gate
    SpatialAttention: {"gate": "spatial"},  # CBAM's spatial gate
    SpatialSE: {"gate": "spatial"},
    BAM: {"gate": "spatial"},  # sigma(Mc + Ms): per-neuron (N, C, *S)
    CoordAttention: {"gate_h": "spatial", "gate_w": "spatial"},
    DAPositionAttention: {"gate": "affinity_pos"},
    DAChannelAttention: {"gate": "affinity_chan"},
    EMA: {
        "gate_h": "spatial",
        "gate_w": "spatial",
        "gate": "spatial",
        "gate_context_1x1": "channel",
        "gate_context_3x3": "channel",
    },
    MultiSpectralAttention: {"gate": "channel"},
    GlobalContext: {"gate": "flat_positions", "gate_mul": "channel"},
    GCT: {"gate": "channel"},
    GatherExcite: {"gate": "auto"},
    NonLocalBlock: {"gate": "affinity_pos"},
    PolarizedSelfAttention: {"gate_channel": "channel", "gate_spatial": "spatial"},
    SpatialGroupEnhance: {"gate": "spatial"},
    ShuffleAttention: {"gate_channel": "channel", "gate_spatial": "spatial"},
    SimAM: {"gate": "spatial"},
    SKConv: {"gate": "selection"},
    SRM: {"gate": "channel"},
    TripletAttention: {"cw.gate": "plane_cw", "hc.gate": "plane_hc", "hw.gate": "spatial"},
    AttentionPool2d: {"gate": "token_positions"},
}


def _layout_for(owner: nn.Module, gate_path: str) -> str:
    for cls in type(owner).__mro__:
        layouts = _GATE_LAYOUTS.get(cls)
        if layouts is not None and gate_path in layouts:
            return layouts[gate_path]
    return "auto"


def _is_gate_name(qualified_name: str) -> bool:
    return qualified_name.rsplit(".", 1)[-1].startswith("gate")


# ---------------------------------------------------------------------------------------------
# Captured maps
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False, eq=False)
class CapturedMap:
    """One gate's output from one forward pass, in a canonical layout.

    Attributes:
        name: qualified name of the gate in the model (the key in :class:`AttentionMaps`),
            e.g. ``"layer1.0.attn.spatial_gate.gate"``.
        module_name: qualified name of the attention module that owns the gate
            (``"layer1.0.attn.spatial_gate"``; ``""`` when the model is the module itself).
        gate_name: the gate's path inside that module (``"gate"``, ``"gate_h"``, ``"cw.gate"``).
        module_type: class name of the owning module.
        kind: one of :data:`MAP_KINDS`.
        tensor: the map (detached, on the CPU): channel ``(N, K)``; spatial ``(N, K, *S)``;
            selection ``(N, M, K)``; affinity ``(N, Q, P)`` (None when captured with
            ``keep_affinity=False``); other: the gate output as produced.
        input_shape: shape of the owning module's input, ``(N, C, *S)``.
        raw_shape: shape of the gate output as produced (before any reshaping).
        axis: for affinity maps, what the rows and columns index: ``"positions"`` or
            ``"channels"``; ``""`` otherwise.
        summary: for affinity maps, the mean attention each key receives (the mean over the
            query rows): ``(N, *grid)`` for positions (``grid`` the key map, smaller than
            ``S`` where the keys are subsampled, as in the non-local block), ``(N, C)`` for
            channels; None otherwise.
    """

    name: str
    module_name: str
    gate_name: str
    module_type: str
    kind: str
    tensor: torch.Tensor | None
    input_shape: tuple[int, ...]
    raw_shape: tuple[int, ...]
    axis: str = ""
    summary: torch.Tensor | None = None

    @property
    def spatial_size(self) -> tuple[int, ...]:
        """The owning module's input map size ``S``."""
        return self.input_shape[2:]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of :attr:`tensor` (of :attr:`summary` when the matrix was not kept)."""
        held = self.tensor if self.tensor is not None else self.summary
        return tuple(held.shape) if held is not None else ()

    def spatial(self) -> torch.Tensor:
        """A float map per sample over positions.

        Spatial maps: the mean over their K maps, broadcast over the axes they do not vary
        along, ``(N, *S)``. Affinity over positions: :attr:`summary`, ``(N, *grid)``.
        Raises ValueError for kinds that hold no map over positions.
        """
        if self.kind == "spatial" and self.tensor is not None:
            mean = self.tensor.float().mean(1)
            return mean.expand(mean.shape[0], *self.spatial_size).contiguous()
        if self.kind == "affinity" and self.axis == "positions" and self.summary is not None:
            if self.summary.dim() == 2 and len(self.spatial_size) > 1:
                raise ValueError(
                    f"CapturedMap.spatial: the key positions of {self.name!r} "
                    f"({self.summary.shape[1]}) do not form a grid derived from the input map "
                    f"{self.spatial_size}; use .summary (N, P) instead"
                )
            return self.summary.float()
        raise ValueError(
            f"CapturedMap.spatial: {self.name!r} holds {self._what()}, not a map over positions"
        )

    def channel(self) -> torch.Tensor:
        """Per-channel weights ``(N, K)``: the channel map itself, or for a channel affinity
        the mean attention each channel receives. Raises ValueError for other kinds."""
        if self.kind == "channel" and self.tensor is not None:
            return self.tensor.float()
        if self.kind == "affinity" and self.axis == "channels" and self.summary is not None:
            return self.summary.float()
        raise ValueError(
            f"CapturedMap.channel: {self.name!r} holds {self._what()}, not per-channel weights"
        )

    def _what(self) -> str:
        if self.kind == "affinity":
            return f"an affinity over {self.axis}"
        return {
            "channel": "channel weights",
            "spatial": "spatial maps",
            "selection": "branch selection weights",
        }.get(self.kind, f"a gate output of unrecognised layout {self.raw_shape}")

    def __repr__(self) -> str:
        return (
            f"CapturedMap({self.name!r}, kind={self.kind!r}, shape={self.shape}, "
            f"module={self.module_type})"
        )


class AttentionMaps(Mapping[str, CapturedMap]):
    """The maps captured by :func:`capture`: gate name -> :class:`CapturedMap`, in the order
    the gates first ran. Filled while the model runs inside the ``with`` block; readable after
    it. A gate that runs again (a second forward pass) replaces its entry."""

    def __init__(self, attention_modules: Mapping[str, str]) -> None:
        self._maps: dict[str, CapturedMap] = {}
        self._modules = dict(attention_modules)

    def __getitem__(self, name: str) -> CapturedMap:
        try:
            return self._maps[name]
        except KeyError:
            known = ", ".join(self._maps) or "none captured yet"
            raise KeyError(f"AttentionMaps: no map named {name!r}; captured: {known}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._maps)

    def __len__(self) -> int:
        return len(self._maps)

    def _put(self, item: CapturedMap) -> None:
        self._maps[item.name] = item

    @property
    def attention_modules(self) -> dict[str, str]:
        """Every convattn attention module found in the model: qualified name -> class name
        (nested ones too, e.g. CBAM and its two gates)."""
        return dict(self._modules)

    def by_kind(self, kind: str) -> list[CapturedMap]:
        """The maps of one kind (see :data:`MAP_KINDS`), in forward order."""
        if kind not in MAP_KINDS:
            raise ValueError(
                f"AttentionMaps.by_kind: kind must be one of {MAP_KINDS}, got {kind!r}"
            )
        return [m for m in self._maps.values() if m.kind == kind]

    def uncaptured(self) -> list[str]:
        """Outermost attention modules none of whose gates produced a map (modules the forward
        pass did not reach, or configurations without a gate such as GC with average pooling
        and additive fusion)."""
        names = list(self._modules)
        outermost = [n for n in names if not any(_is_inside(n, other) for other in names)]
        owners = {m.module_name for m in self._maps.values()}
        return [n for n in outermost if not any(o == n or _is_inside(o, n) for o in owners)]

    def clear(self) -> None:
        """Forget the maps captured so far (the hooks stay while the block is active)."""
        self._maps.clear()

    def summary(self) -> str:
        """A text table: name, kind, shape and module class of every map."""
        rows = [(m.name, m.kind, "x".join(map(str, m.shape)), m.module_type) for m in self.values()]
        headers = ("name", "kind", "shape", "module")
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
        lines += [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
        ]
        return "\n".join(lines)

    def __repr__(self) -> str:
        kinds = {k: len(self.by_kind(k)) for k in MAP_KINDS}
        counts = ", ".join(f"{v} {k}" for k, v in kinds.items() if v)
        return f"AttentionMaps({len(self)} maps: {counts or 'none'})"


def _is_inside(name: str, parent: str) -> bool:
    """Whether module ``name`` is a strict descendant of module ``parent``."""
    if name == parent:
        return False
    return parent == "" or name.startswith(parent + ".")


# ---------------------------------------------------------------------------------------------
# Converting gate outputs
# ---------------------------------------------------------------------------------------------


def _fold_groups(raw: torch.Tensor, batch: int) -> torch.Tensor | None:
    """(N*G, d1, ...) -> (N, G*d1, ...): modules that fold groups into the batch (EMA, shuffle
    attention) reshape ``x`` to ``(N*G, C/G, ...)``, so merging back is this reshape."""
    if raw.dim() < 2 or batch < 1 or raw.shape[0] % batch:
        return None
    if raw.shape[0] == batch:
        return raw
    return raw.reshape(batch, -1, *raw.shape[2:])


def _key_grid(count: int, spatial: tuple[int, ...]) -> tuple[int, ...] | None:
    """The key map of an affinity with ``count`` keys over an input map ``spatial``: the map
    itself, or a map subsampled by a stride s in every dim (or all dims but the first, as the
    non-local block's (1, 2, 2) pooling of videos), rounding up or down."""
    if math.prod(spatial) == count:
        return spatial
    for stride in range(2, 9):
        for rounding in (math.ceil, math.floor):
            full = tuple(max(1, int(rounding(s / stride))) for s in spatial)
            if math.prod(full) == count:
                return full
            if len(spatial) == 3:
                keep_first = (spatial[0], *full[1:])
                if math.prod(keep_first) == count:
                    return keep_first
    return None


def _convert(
    layout: str, raw: torch.Tensor, input_shape: tuple[int, ...]
) -> tuple[str, torch.Tensor, str, torch.Tensor | None]:
    """Gate output -> (kind, canonical tensor, affinity axis, affinity summary)."""
    batch, spatial = input_shape[0], tuple(input_shape[2:])
    positions = math.prod(spatial)
    channels = input_shape[1] if len(input_shape) > 1 else 0
    other = ("other", raw, "", None)

    if layout == "auto":
        layout = _infer_layout(raw, batch, channels, spatial)
    if layout == "channel":
        folded = _fold_groups(raw, batch)
        return other if folded is None else ("channel", folded.reshape(batch, -1), "", None)
    if layout == "spatial":
        folded = _fold_groups(raw, batch)
        if folded is None or not _matches_map(folded.shape[2:], spatial):
            return other
        return ("spatial", folded, "", None)
    if layout == "flat_positions":
        if raw.dim() != 3 or raw.shape[0] != batch or raw.shape[-1] != positions:
            return other
        return ("spatial", raw.reshape(batch, raw.shape[1], *spatial), "", None)
    if layout == "token_positions":
        if raw.shape[0] != batch or raw.shape[-1] != positions + 1:
            return other
        maps = raw.reshape(batch, -1, positions + 1)[..., 1:]
        return ("spatial", maps.reshape(batch, -1, *spatial), "", None)
    if layout == "selection":
        if raw.dim() != 3 or raw.shape[0] != batch:
            return other
        return ("selection", raw, "", None)
    if layout == "affinity_pos":
        if raw.dim() != 3 or raw.shape[0] != batch or raw.shape[1] != positions:
            return other
        received = raw.float().mean(1)  # (N, P): mean over the query rows
        grid = _key_grid(raw.shape[2], spatial)
        summary = received.reshape(batch, *grid) if grid is not None else received
        return ("affinity", raw, "positions", summary)
    if layout == "affinity_chan":
        if raw.dim() != 3 or raw.shape[0] != batch or raw.shape[1] != raw.shape[2]:
            return other
        return ("affinity", raw, "channels", raw.float().mean(1))
    if layout == "plane_cw":
        if raw.dim() != 4 or raw.shape[1] != 1 or raw.shape[2:] != (channels, spatial[-1]):
            return other
        return ("spatial", raw.transpose(1, 2), "", None)  # (N, C, 1, W)
    if layout == "plane_hc":
        if raw.dim() != 4 or raw.shape[1] != 1 or raw.shape[2:] != (spatial[0], channels):
            return other
        return ("spatial", raw.permute(0, 3, 2, 1), "", None)  # (N, C, H, 1)
    return other


def _matches_map(trailing: Sequence[int], spatial: tuple[int, ...]) -> bool:
    return len(trailing) == len(spatial) and all(
        t in (1, s) for t, s in zip(trailing, spatial, strict=True)
    )


def _infer_layout(raw: torch.Tensor, batch: int, channels: int, spatial: tuple[int, ...]) -> str:
    """Guess the layout of a gate output from its shape (modules not in the layout table)."""
    folded = _fold_groups(raw, batch)
    if folded is None:
        return "other"
    trailing = tuple(folded.shape[2:])
    positions = math.prod(spatial)
    if all(t == 1 for t in trailing):
        return "channel"
    if _matches_map(trailing, spatial):
        return "spatial"
    if raw.shape[0] == batch and raw.dim() == 3 and len(spatial) > 0:
        rows, cols = raw.shape[1], raw.shape[2]
        if rows == positions and (cols == positions or _key_grid(cols, spatial)):
            return "affinity_pos"
        if cols == positions:
            return "flat_positions"
        if rows == cols == channels:
            return "affinity_chan"
    if raw.shape[0] == batch and raw.shape[-1] == positions + 1:
        return "token_positions"
    return "other"


# ---------------------------------------------------------------------------------------------
# capture()
# ---------------------------------------------------------------------------------------------


def _first_tensor(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


@contextlib.contextmanager
def capture(
    model: nn.Module,
    *,
    include: str | Sequence[str] | None = None,
    samples: int | None = None,
    keep_affinity: bool = True,
) -> Iterator[AttentionMaps]:
    """Record the attention maps of every convattn module in ``model`` while the block runs.

    ``with capture(model) as maps: model(x)`` fills ``maps`` (an :class:`AttentionMaps`,
    gate name -> :class:`CapturedMap`) with every gate's output from the forward pass,
    detached and on the CPU. The hooks are removed when the block exits, also on an error.

    Args:
        model: any ``nn.Module`` containing convattn attention modules (subclasses of
            ``convattn.layers._helpers.AttentionModule``), at any depth.
        include: fnmatch pattern(s) on gate or module names (``"layer4.*"``); only matching
            gates are hooked. None: all.
        samples: keep only the first ``samples`` items of each batch (to bound memory).
        keep_affinity: keep the full ``(N, Q, P)`` affinity matrices of non-local / DANet
            modules; False keeps only their summary (the matrices grow as positions**2).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or an option has the wrong type.
        ValueError: the model holds no attention module, or ``include`` matches no gate.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"capture: model must be an nn.Module, got {type(model).__name__}")
    if samples is not None and (
        isinstance(samples, bool) or not isinstance(samples, int) or samples < 1
    ):
        raise ValueError(f"capture: samples must be a positive int or None, got {samples!r}")
    if not isinstance(keep_affinity, bool):
        raise TypeError(
            f"capture: keep_affinity must be a bool, got {type(keep_affinity).__name__}"
        )
    patterns = _patterns(include)

    named = dict(model.named_modules())
    owners = {name: m for name, m in named.items() if isinstance(m, AttentionModule)}
    if not owners:
        raise ValueError(
            f"capture: {type(model).__name__} contains no convattn attention module (subclass "
            "of convattn.layers._helpers.AttentionModule); build it with attention=... or add "
            "modules with convattn.attach()"
        )
    maps = AttentionMaps({n: type(m).__name__ for n, m in owners.items()})

    gates: list[tuple[str, str, str, nn.Module]] = []  # (gate name, owner name, path, module)
    for name, module in named.items():
        if not _is_gate_name(name) or isinstance(module, AttentionModule):
            continue
        owner_name = max(
            (o for o in owners if _is_inside(name, o)), key=len, default=None
        )  # the innermost attention module above the gate
        if owner_name is None:
            continue
        if patterns and not any(
            fnmatch.fnmatchcase(n, p) for p in patterns for n in (name, owner_name)
        ):
            continue
        path = name[len(owner_name) + 1 :] if owner_name else name
        gates.append((name, owner_name, path, module))
    if patterns and not gates:
        raise ValueError(
            f"capture: include={include!r} matches no gate; attention modules: "
            f"{', '.join(n or '<model>' for n in owners)}"
        )

    input_shapes: dict[str, tuple[int, ...]] = {}
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def owner_pre_hook(owner_name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = _first_tensor(args, kwargs)
            if x is not None:
                input_shapes[owner_name] = tuple(x.shape)

        return hook

    def gate_hook(name: str, owner_name: str, path: str) -> Callable[..., None]:
        owner = owners[owner_name]
        layout = _layout_for(owner, path)
        module_type = type(owner).__name__

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not isinstance(output, torch.Tensor) or owner_name not in input_shapes:
                return
            input_shape = input_shapes[owner_name]
            raw = output.detach()
            try:
                kind, tensor, axis, summary = _convert(layout, raw, input_shape)
            except RuntimeError:  # a layout the shapes do not fit: keep the output raw
                kind, tensor, axis, summary = "other", raw, "", None
            if kind != "other" and samples is not None:
                tensor = tensor[:samples]
                summary = summary[:samples] if summary is not None else None
            held: torch.Tensor | None = tensor
            if kind == "affinity" and not keep_affinity:
                held = None
            maps._put(
                CapturedMap(
                    name=name,
                    module_name=owner_name,
                    gate_name=path,
                    module_type=module_type,
                    kind=kind,
                    tensor=None if held is None else held.to("cpu", copy=True),
                    input_shape=input_shape,
                    raw_shape=tuple(output.shape),
                    axis=axis,
                    summary=None if summary is None else summary.to("cpu", copy=True),
                )
            )

        return hook

    try:
        for owner_name in {o for _, o, _, _ in gates}:
            handles.append(
                owners[owner_name].register_forward_pre_hook(
                    owner_pre_hook(owner_name), with_kwargs=True
                )
            )
        for name, owner_name, path, module in gates:
            handles.append(module.register_forward_hook(gate_hook(name, owner_name, path)))
        yield maps
    finally:
        for handle in handles:
            handle.remove()


def _patterns(include: str | Sequence[str] | None) -> tuple[str, ...]:
    if include is None:
        return ()
    if isinstance(include, str):
        return (include,)
    if isinstance(include, Sequence) and all(isinstance(p, str) for p in include):
        return tuple(include)
    raise TypeError(
        f"capture: include must be a pattern string or a sequence of them, got {include!r}"
    )


# ---------------------------------------------------------------------------------------------
# Images and checkpoints
# ---------------------------------------------------------------------------------------------


def load_image(
    source: str | os.PathLike[str] | None = None, *, size: int = 224
) -> tuple[np.ndarray, torch.Tensor]:
    """A photo as the reference backbones expect it, and as it is displayed.

    ``source`` is a path to an image file (anything PIL reads) or the name of a photo shipped
    with scikit-image (:data:`BUILTIN_IMAGES`: astronaut, chelsea/cat, coffee, rocket,
    camera); None is the astronaut. The shorter side is resized to ``size`` (bicubic) and the
    centre ``size x size`` crop kept.

    Returns:
        ``(display, batch)``: the crop as a float ``(size, size, 3)`` array in [0, 1], and
        the ImageNet-normalised ``(1, 3, size, size)`` float tensor.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"load_image: size must be an int >= 8, got {size!r}")
    if source is None:
        source = "astronaut"
    path = Path(source)
    if path.is_file():
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"load_image: cannot read {str(path)!r} as an image: {exc}") from exc
    elif str(source).lower() in BUILTIN_IMAGES:
        from skimage import data

        array = getattr(data, BUILTIN_IMAGES[str(source).lower()])()
        image = Image.fromarray(array).convert("RGB")
    else:
        raise ValueError(
            f"load_image: {str(source)!r} is neither an image file nor a built-in photo "
            f"({', '.join(sorted(BUILTIN_IMAGES))})"
        )
    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize(
        (max(size, round(width * scale)), max(size, round(height * scale))),
        Image.Resampling.BICUBIC,
    )
    left = (resized.width - size) // 2
    top = (resized.height - size) // 2
    crop = resized.crop((left, top, left + size, top + size))
    display = np.asarray(crop, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(display.copy()).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return display, ((tensor - mean) / std).unsqueeze(0)


_PREFIXES = ("module.", "_orig_mod.")


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read model weights from ``path`` with ``torch.load(..., weights_only=True)``.

    Accepts a raw state dict or a dict holding one under ``"model"`` (as convattn's training
    command writes), ``"state_dict"`` or ``"model_state_dict"``; ``"module."`` (DDP) and
    ``"_orig_mod."`` (torch.compile) prefixes are removed. Returns ``(state_dict, config)``
    where ``config`` is the checkpoint's ``"config"`` dict (empty when absent).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"load_checkpoint: no such file {str(path)!r}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors have many types
        raise ValueError(
            f"load_checkpoint: cannot read {str(path)!r} as a weights-only torch checkpoint: {exc}"
        ) from exc
    if not isinstance(loaded, Mapping):
        raise ValueError(
            f"load_checkpoint: {str(path)!r} holds a {type(loaded).__name__}, expected a state "
            "dict or a dict with a 'model' state dict"
        )
    config: dict[str, Any] = {}
    if isinstance(loaded.get("config"), Mapping):
        config = dict(loaded["config"])
    state: Mapping[str, Any] = loaded
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(loaded.get(key), Mapping):
            state = loaded[key]
            break
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors or len(tensors) != len(state):
        raise ValueError(
            f"load_checkpoint: {str(path)!r} is neither a state dict nor a dict with one under "
            f"'model' / 'state_dict'; its keys: {', '.join(map(str, list(loaded)[:10]))}"
        )
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
    return tensors, config


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _evenly(items: Sequence[CapturedMap], limit: int) -> list[CapturedMap]:
    """At most ``limit`` items spread evenly from first to last (across depth)."""
    if len(items) <= limit:
        return list(items)
    picks = np.unique(np.linspace(0, len(items) - 1, limit).round().astype(int))
    return [items[i] for i in picks]


def _label(item: CapturedMap) -> str:
    name = item.name
    if name.endswith(".gate"):
        name = name[: -len(".gate")]
    return name or "gate"


def _to_plane(values: torch.Tensor) -> np.ndarray | None:
    """One sample's map -> 2-D array (1-D maps are not drawn; 3-D maps are averaged over
    their first axis)."""
    if values.dim() == 3:
        values = values.mean(0)
    if values.dim() != 2:
        return None
    return values.float().numpy()


def _spatial_entries(
    maps: Mapping[str, CapturedMap], sample: int
) -> list[tuple[CapturedMap, np.ndarray]]:
    entries = []
    for item in maps.values():
        if item.kind == "spatial" or (item.kind == "affinity" and item.axis == "positions"):
            try:
                values = item.spatial()
            except ValueError:
                continue
            if sample < values.shape[0]:
                plane = _to_plane(values[sample])
                if plane is not None:
                    entries.append((item, plane))
    return entries


def _check_panels(max_panels: int) -> None:
    if isinstance(max_panels, bool) or not isinstance(max_panels, int) or max_panels < 1:
        raise ValueError(f"max_panels must be a positive int, got {max_panels!r}")


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically (a temp file in the same folder, then
    os.replace), so a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    # os.open with 0o666 honours the umask (tempfile.mkstemp would leave the file 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            fig.savefig(handle, format="png")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def plot_spatial(
    maps: Mapping[str, CapturedMap],
    image: np.ndarray,
    path: str | os.PathLike[str],
    *,
    max_panels: int = 16,
    alpha: float = 0.5,
    cmap: str = "jet",
    sample: int = 0,
) -> Path | None:
    """Spatial maps upsampled (bilinear) to ``image`` and overlaid on it, one panel per gate.

    ``image`` is the ``(H, W, 3)`` array in [0, 1] the model saw (see :func:`load_image`).
    Each map is rescaled to [0, 1] in its panel (its raw range is in the title); affinity maps
    show the attention each position receives. At most ``max_panels`` maps, picked evenly
    across depth. Returns the path written, or None when there is no spatial map.
    """
    _check_panels(max_panels)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"plot_spatial: alpha must be in [0, 1], got {alpha!r}")
    entries = _spatial_entries(maps, sample)
    if not entries:
        return None
    keep = {id(m) for m in _evenly([m for m, _ in entries], max_panels)}
    entries = [(m, p) for m, p in entries if id(m) in keep]
    height, width = image.shape[:2]
    panels = len(entries) + 1
    cols = min(4, panels)
    rows = math.ceil(panels / cols)
    fig = _new_figure(3.2 * cols, 3.4 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    axes[0].imshow(image)
    axes[0].set_title("input", fontsize=8)
    for ax, (item, plane) in zip(axes[1:], entries, strict=False):
        lo, hi = float(plane.min()), float(plane.max())
        grid = torch.from_numpy(np.ascontiguousarray(plane))[None, None]
        up = nn.functional.interpolate(
            grid, size=(height, width), mode="bilinear", align_corners=False
        )[0, 0].numpy()
        ax.imshow(image)
        what = "received" if item.kind == "affinity" else item.module_type
        # The map's own resolution (Coordinate Attention's gate_h is H x 1, drawn as rows).
        native = item.tensor.shape[2:] if item.kind == "spatial" and item.tensor is not None else ()
        size = "x".join(map(str, native if len(native) == 2 else plane.shape))
        if hi - lo > 1e-6 * max(1.0, abs(hi)):
            ax.imshow((up - lo) / (hi - lo), cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0)
            ax.set_title(f"{_label(item)}\n{what} {size} [{lo:.3g}, {hi:.3g}]", fontsize=7)
        else:  # a constant map (e.g. CBAM's zero-initialised spatial BN): no overlay
            ax.set_title(f"{_label(item)}\n{what} {size} constant {lo:.3g}", fontsize=7)
    fig.suptitle("spatial attention (each panel scaled to its own range)", fontsize=9)
    return _save(fig, Path(path))


def plot_channel(
    maps: Mapping[str, CapturedMap],
    path: str | os.PathLike[str],
    *,
    max_panels: int = 16,
    cmap: str = "viridis",
    sample: int = 0,
) -> Path | None:
    """Channel weights as strips, one row per gate in channel order (colours scaled per row,
    the range printed at its right). Channel affinities (DANet) show the attention each
    channel receives. Returns the path written, or None when there is no channel map."""
    _check_panels(max_panels)
    items = [
        m
        for m in maps.values()
        if m.kind == "channel" or (m.kind == "affinity" and m.axis == "channels")
    ]
    items = [m for m in _evenly(items, max_panels) if sample < m.channel().shape[0]]
    if not items:
        return None
    fig = _new_figure(10.0, 0.62 * len(items) + 0.9)
    axes = fig.subplots(len(items), 1, squeeze=False).ravel()
    for ax, item in zip(axes, items, strict=True):
        weights = item.channel()[sample].numpy()
        lo, hi = float(weights.min()), float(weights.max())
        ax.imshow(
            weights[None, :],
            aspect="auto",
            cmap=cmap,
            vmin=lo,
            vmax=hi if hi > lo else lo + 1e-12,
            interpolation="nearest",
        )
        ax.set_yticks([])
        ax.set_xticks([0, weights.size - 1])
        ax.tick_params(labelsize=6, length=2, pad=1)
        what = "received" if item.kind == "affinity" else item.module_type
        ax.set_title(f"{_label(item)}  ({what})", fontsize=7, loc="left", pad=2)
        ax.set_title(f"C={weights.size}  [{lo:.3g}, {hi:.3g}]", fontsize=7, loc="right", pad=2)
    fig.suptitle("channel attention weights (colours scaled per row)", fontsize=9)
    return _save(fig, Path(path))


def plot_selection(
    maps: Mapping[str, CapturedMap],
    path: str | os.PathLike[str],
    *,
    max_panels: int = 16,
    cmap: str = "viridis",
    sample: int = 0,
) -> Path | None:
    """Branch selection weights (SK): one ``branches x channels`` heatmap per gate on a shared
    [0, 1] scale, with each branch's mean weight. Returns the path, or None when there is
    none."""
    _check_panels(max_panels)
    selections = [m for m in maps.values() if m.kind == "selection"]
    items = [
        (m, m.tensor[sample].float().numpy())  # (M, K)
        for m in _evenly(selections, max_panels)
        if m.tensor is not None and sample < m.tensor.shape[0]
    ]
    if not items:
        return None
    fig = _new_figure(10.0, 0.35 * sum(w.shape[0] for _, w in items) + 0.8 * len(items) + 0.6)
    axes = fig.subplots(len(items), 1, squeeze=False).ravel()
    image = None
    for ax, (item, weights) in zip(axes, items, strict=True):
        image = ax.imshow(
            weights, aspect="auto", cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest"
        )
        ax.set_yticks(range(weights.shape[0]), [f"branch {m}" for m in range(weights.shape[0])])
        ax.set_xticks([0, weights.shape[1] - 1])
        ax.tick_params(labelsize=6, length=2, pad=1)
        means = " / ".join(f"{v:.2f}" for v in weights.mean(1))
        ax.set_title(f"{_label(item)}  mean per branch: {means}", fontsize=7, loc="left", pad=2)
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.8, label="selection weight")
    fig.suptitle("branch selection (softmax over branches, per channel)", fontsize=9)
    return _save(fig, Path(path))


def save_figures(
    maps: Mapping[str, CapturedMap],
    image: np.ndarray,
    out_dir: str | os.PathLike[str],
    *,
    max_panels: int = 16,
    alpha: float = 0.5,
    sample: int = 0,
) -> dict[str, Path]:
    """Write ``spatial.png``, ``channel.png`` and ``selection.png`` (those the maps allow) to
    ``out_dir``; returns ``{"spatial": path, ...}`` for the files written."""
    out = Path(out_dir)
    written: dict[str, Path] = {}
    spatial = plot_spatial(
        maps, image, out / "spatial.png", max_panels=max_panels, alpha=alpha, sample=sample
    )
    if spatial is not None:
        written["spatial"] = spatial
    channel = plot_channel(maps, out / "channel.png", max_panels=max_panels, sample=sample)
    if channel is not None:
        written["channel"] = channel
    selection = plot_selection(maps, out / "selection.png", max_panels=max_panels, sample=sample)
    if selection is not None:
        written["selection"] = selection
    return written


# ---------------------------------------------------------------------------------------------
# The `convattn viz` command
# ---------------------------------------------------------------------------------------------


def _classifier_width(state: Mapping[str, torch.Tensor], model: nn.Module) -> int | None:
    """The number of classes in ``state`` when it differs from ``model``'s last Linear."""
    last: tuple[str, nn.Linear] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = (name, module)
    if last is None:
        return None
    weight = state.get(f"{last[0]}.weight")
    if weight is None or weight.dim() != 2 or weight.shape[0] == last[1].out_features:
        return None
    return int(weight.shape[0])


def _build_model(args: argparse.Namespace) -> tuple[nn.Module, str, str | None, dict[str, Any]]:
    from convattn import models

    state: dict[str, torch.Tensor] | None = None
    config: dict[str, Any] = {}
    if args.checkpoint is not None:
        state, config = load_checkpoint(args.checkpoint)
    model_name = args.model or config.get("model")
    if not isinstance(model_name, str):
        raise ValueError(
            "viz: --model is required (the checkpoint's config names no model); "
            f"choose from {', '.join(models.list_models())}"
        )
    attention = args.attention if args.attention is not None else config.get("attention")
    if attention is not None and not isinstance(attention, str):
        raise ValueError(
            f"viz: the checkpoint's config has attention={attention!r}; pass --attention"
        )
    kwargs: dict[str, Any] = {}
    if attention is not None and attention.lower() != "none":
        kwargs["attention"] = attention
        options = args.attention_options
        if options is None and isinstance(config.get("attention_options"), Mapping):
            options = dict(config["attention_options"])
        if options:
            kwargs["attention_options"] = options
        placement = args.placement or config.get("placement")
        if isinstance(placement, str):
            kwargs["placement"] = placement
    else:
        attention = None
    num_classes = args.num_classes or config.get("num_classes")
    if isinstance(num_classes, int) and not isinstance(num_classes, bool):
        kwargs["num_classes"] = num_classes
    model = models.create_model(model_name, **kwargs)
    if state is not None:
        width = _classifier_width(state, model)
        if width is not None and "num_classes" not in kwargs:
            model = models.create_model(model_name, **kwargs, num_classes=width)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(
                f"viz: the checkpoint {str(args.checkpoint)!r} does not fit {model_name} with "
                f"attention={attention!r}: {_mismatch(model, state)}"
            ) from exc
    return model, model_name, attention, config


def _mismatch(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    parts = []
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if keys:
            more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
            parts.append(f"{title} {len(keys)}: {', '.join(keys[:5])}{more}")
    return "; ".join(parts) or "load_state_dict failed"


def cmd_viz(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, model_name, attention, config = _build_model(args)
    size = args.image_size
    if size is None:  # the size the checkpoint's model was trained at, else 224
        trained = config.get("image_size")
        size = trained if isinstance(trained, int) and trained >= 8 else 224
    display, batch = load_image(args.image, size=size)
    device = torch.device(args.device)
    model = model.to(device).eval()
    with capture(model, include=args.include or None, samples=1) as maps, torch.inference_mode():
        logits = model(batch.to(device))
    if not maps:
        raise ValueError(
            f"viz: no attention map was captured from {model_name} (attention modules: "
            f"{', '.join(maps.attention_modules) or 'none'})"
        )
    out = Path(args.out or Path("runs") / "viz" / f"{model_name}-{attention or 'none'}")
    written = save_figures(maps, display, out, max_panels=args.max_panels, alpha=args.alpha)
    if not written:
        raise ValueError(
            f"viz: the {len(maps)} captured maps have no plottable kind "
            f"({', '.join(sorted({m.kind for m in maps.values()}))})"
        )
    source = args.image or "astronaut"
    modules = list(maps.attention_modules)
    outermost = [n for n in modules if not any(_is_inside(n, o) for o in modules)]
    print(
        f"{model_name} + {attention or 'no attention'} on {source} ({size}px): "
        f"{len(maps)} maps from {len(outermost)} attention modules"
    )
    skipped = [m.name for m in maps.values() if m.kind == "other"]
    if skipped:
        print(f"  not drawn (unrecognised layout): {', '.join(skipped)}")
    if args.checkpoint is not None and isinstance(logits, torch.Tensor) and logits.dim() == 2:
        top = logits[0].float().softmax(-1).topk(min(3, logits.shape[1]))
        classes = ", ".join(
            f"{i} ({p:.3f})" for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        )
        print(f"  top classes: {classes}")
    for kind, path in written.items():
        print(f"  {kind}: {path}")
    return 0


def _json_options(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def add_parser(subparsers: Any) -> None:
    """Register ``convattn viz``."""
    p = subparsers.add_parser(
        "viz",
        help="draw a model's attention maps over a photo",
        description=(
            "Run a reference backbone on a photo and write its attention maps as PNGs: spatial "
            "maps overlaid on the image (spatial.png), channel weights as strips "
            "(channel.png) and SK branch selections (selection.png)."
        ),
    )
    p.add_argument("--model", help="reference backbone (convattn.models.list_models())")
    p.add_argument("--attention", help="registry key of the attention (e.g. cbam)")
    p.add_argument(
        "--attention-options",
        type=_json_options,
        default=None,
        help="options for every attention module, as JSON: '{\"rd_ratio\": 0.25}'",
    )
    p.add_argument("--placement", help="override the paper placement (convattn.placement)")
    p.add_argument("--num-classes", type=_positive_int, help="classifier width (default: model's)")
    p.add_argument(
        "--checkpoint",
        help="weights: a state dict, or a dict with one under 'model' (convattn train writes "
        "these); its 'config' supplies --model / --attention when they are not given",
    )
    p.add_argument(
        "--image",
        help=f"image file, or a built-in photo ({', '.join(sorted(BUILTIN_IMAGES))}); "
        "default astronaut",
    )
    p.add_argument(
        "--image-size",
        type=_positive_int,
        default=None,
        help="crop side (the checkpoint config's image_size, else 224)",
    )
    p.add_argument("--out", help="output folder (default runs/viz/<model>-<attention>)")
    p.add_argument(
        "--max-panels", type=_positive_int, default=16, help="maps per figure, spread over depth"
    )
    p.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity (0.5)")
    p.add_argument(
        "--include", action="append", help="only gates/modules matching this glob (repeatable)"
    )
    p.add_argument("--device", default="cpu", help="torch device (cpu)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.set_defaults(func=cmd_viz)
