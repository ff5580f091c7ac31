"""What a network costs: parameters, FLOPs and MACs with the attention ops counted, latency
and peak memory, for one model (:func:`profile`) or for a backbone against its attention
variants (:func:`compare`, ``convattn compare``).

Counting conventions
--------------------
FLOPs are counted on the ATen operators a forward pass in eval mode runs (a
``TorchDispatchMode`` sees every one of them, so no gate, multiply or pooling is missed),
one rule per operator family:

- convolution, linear (``addmm``/``mm``), ``bmm``/``baddbmm``: **MACs** =
  multiply-accumulates; FLOPs = 2 x MACs, plus 1 per output element for a bias add.
- element-wise operators (``add``, ``sub``, ``mul``, ``div``, ``maximum``, comparisons,
  ``relu``, ``sigmoid``, ``hardsigmoid``, ``hardswish``, ``tanh``, ``exp``, ``sqrt``,
  ``pow``...): 1 FLOP per output element. Transcendental functions and composite
  activations count 1 per element as well, whatever their cost in instructions.
  ``addcmul``/``addcdiv``: 2 per element.
- reductions (``sum``, ``mean``, ``amax``, ``amin``, ``max``, ``min``, ``prod``, ``argmax``,
  ``cumsum``): 1 per *input* element; ``var``, ``std``, ``var_mean``, ``std_mean``: 4 per
  input element (sum for the mean, subtract, square, accumulate); ``linalg_vector_norm``: 2.
- ``softmax``/``log_softmax``: 5 per element (max, subtract, exp, sum, divide/log).
- batch norm in eval: 2 per element (the affine scale-and-shift that the running statistics
  fold into; a deployment that folds BN into the preceding convolution pays 0, a choice this
  counter does not make); in training mode 6 (statistics 4 + scale-and-shift 2).
  layer norm and group norm: 5 per element (statistics 4 + normalise 1), plus 2 with an
  affine scale and shift.
- pooling with a window (``max_pool``, ``avg_pool``): window size x output elements;
  adaptive pooling: 1 per input element.
- views, copies, concatenation, indexing and tensor creation: 0.

Operators no rule covers are listed in :attr:`Profile.uncounted_ops` instead of being
silently dropped.

**Papers' "FLOPs" are multiply-accumulates**: the "3.86 GFLOPs" of ResNet-50 are 3.86
GMACs of its convolutions and fully connected layer. Compare :attr:`Profile.macs` with
published figures; :attr:`Profile.flops` is every operation, 2 per MAC.

Memory
------
On CUDA, peak memory is the caching allocator's ``max_memory_allocated`` over the step. On
the CPU it is tracked tensor by tensor: every tensor an ATen operator allocates is added when
it is created and removed when its storage is freed (a weak-reference finaliser), so saved
activations, gradients and optimizer state are counted for exactly as long as they live.
Both report the bytes live at the start (weights, buffers, input, optimizer state) plus the
largest growth during the step. Scratch buffers inside a kernel that never become tensors
are not seen on the CPU.
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from convattn.layers._helpers import AttentionModule

__all__ = [
    "DEFAULT_ATTENTION",
    "FlopCount",
    "LatencyStats",
    "ModuleCost",
    "Profile",
    "TensorMemoryTracker",
    "add_parser",
    "compare",
    "count_flops",
    "load_published",
    "measure_latency",
    "profile",
    "write_comparison",
]

# --------------------------------------------------------------------------------------
# FLOP rules
# --------------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return text.split()


# 0 FLOPs: views, copies, layout changes, indexing, tensor creation, random numbers.
_FREE_OPS = frozenset(
    _words(
        """
    _reshape_alias _to_copy _unsafe_view alias arange as_strided cat channel_shuffle clone
    constant_pad_nd contiguous copy detach diagonal empty empty_like empty_strided expand fill
    flip full full_like gather index index_select lift_fresh lift_fresh_copy narrow
    native_channel_shuffle new_empty new_empty_strided new_ones new_zeros normal ones ones_like
    permute pixel_shuffle pixel_unshuffle rand rand_like randint randn randn_like repeat roll
    scalar_tensor select slice split split_with_sizes squeeze stack t transpose unbind unfold
    uniform unsqueeze view zero zeros zeros_like
    """
    )
)

# FLOPs per output element.
_ELEMENTWISE = {
    name: 1
    for name in _words(
        """
    abs add bitwise_and bitwise_not bitwise_or ceil clamp clamp_max clamp_min cos div elu eq erf
    exp floor floor_divide ge gelu gt hardsigmoid hardswish hardtanh le leaky_relu lerp log
    log_sigmoid_forward logical_and logical_not logical_or lt masked_fill maximum minimum mish mul
    ne neg pow reciprocal relu remainder round rsqrt rsub sigmoid sign silu sin softplus sqrt
    square sub tanh threshold where
    """
    )
} | {"addcmul": 2, "addcdiv": 2}

# FLOPs per input element.
_REDUCTIONS = {
    name: 1
    for name in _words(
        """
    amax amin argmax argmin cumsum max mean min prod sum _adaptive_avg_pool1d
    _adaptive_avg_pool2d _adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d
    adaptive_max_pool3d
    """
    )
} | {"var": 4, "std": 4, "var_mean": 4, "std_mean": 4, "linalg_vector_norm": 2, "logsumexp": 3}

_SOFTMAX_FLOPS = 5  # max, subtract, exp, sum, divide (or log)
_SOFTMAX_OPS = frozenset({"_softmax", "softmax", "_log_softmax", "log_softmax"})
_WINDOW_POOLS = frozenset(
    {
        "max_pool1d",
        "max_pool2d",
        "max_pool3d",
        "max_pool1d_with_indices",
        "max_pool2d_with_indices",
        "max_pool3d_with_indices",
        "avg_pool1d",
        "avg_pool2d",
        "avg_pool3d",
    }
)
_BATCH_NORMS = frozenset(
    {"native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training"}
)
_NORM_STATS_FLOPS = 4  # mean (1), subtract (1), square (1), accumulate (1)
_NORM_APPLY_FLOPS = 1  # multiply by the reciprocal standard deviation
_AFFINE_FLOPS = 2  # scale and shift


def _numel(value: Any) -> int:
    return sum(t.numel() for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor))


def _first_numel(value: Any) -> int:
    for t in tree_flatten(value)[0]:
        if isinstance(t, torch.Tensor):
            return t.numel()
    return 0


def _op_name(func: Any) -> str:
    """The operator's family name: ``aten.relu_.default`` -> ``relu``."""
    name: str = func.overloadpacket.__name__
    if name.endswith("_") and not name.endswith("__") and len(name) > 1:
        name = name[:-1]
    return name


def _conv_cost(args: Sequence[Any], out: torch.Tensor, name: str) -> tuple[int, int]:
    x, weight, bias = args[0], args[1], args[2] if len(args) > 2 else None
    transposed = (
        bool(args[6]) if name in ("convolution", "_convolution") and len(args) > 6 else False
    )
    kernel = math.prod(weight.shape[2:])
    if transposed:  # weight (C_in, C_out / groups, *k): every input element feeds C_out/g*k outputs
        macs = x.numel() * weight.shape[1] * kernel
    else:  # weight (C_out, C_in / groups, *k): every output element sums C_in/g*k products
        macs = out.numel() * weight.shape[1] * kernel
    flops = 2 * macs + (out.numel() if isinstance(bias, torch.Tensor) else 0)
    return flops, macs


def _op_cost(
    func: Any, args: Sequence[Any], kwargs: dict[str, Any], out: Any
) -> tuple[int, int] | None:
    """(FLOPs, MACs) of one ATen call; None when no rule covers the operator."""
    name = _op_name(func)
    if name in _FREE_OPS:
        return 0, 0
    if name in ("convolution", "_convolution", "mkldnn_convolution"):
        return _conv_cost(args, out, name)
    if name in ("mm", "addmm", "bmm", "baddbmm"):
        a, b = (args[0], args[1]) if name in ("mm", "bmm") else (args[1], args[2])
        macs = a.numel() * b.shape[-1]  # (..., n, k) @ (..., k, m): n*k*m per batch
        bias = out.numel() if name in ("addmm", "baddbmm") else 0
        return 2 * macs + bias, macs
    if name == "linear":
        x, weight = args[0], args[1]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        macs = x.numel() * weight.shape[0]
        return 2 * macs + (out.numel() if isinstance(bias, torch.Tensor) else 0), macs
    if name in _ELEMENTWISE:
        return _ELEMENTWISE[name] * _first_numel(out), 0
    if name in _REDUCTIONS:
        return _REDUCTIONS[name] * _first_numel(args[0]), 0
    if name in _SOFTMAX_OPS:
        return _SOFTMAX_FLOPS * _first_numel(out), 0
    if name in _WINDOW_POOLS:
        dims = int(name[name.index("pool") + 4])
        kernel = args[1]
        sizes = [int(k) for k in kernel] if isinstance(kernel, (list, tuple)) else [int(kernel)]
        window = sizes[0] ** dims if len(sizes) == 1 else math.prod(sizes)
        return window * _first_numel(out), 0
    if name in _BATCH_NORMS:
        training = (
            bool(args[5]) if name == "native_batch_norm" else name == "_native_batch_norm_legit"
        )
        per_element = _AFFINE_FLOPS + (_NORM_STATS_FLOPS if training else 0)
        return per_element * args[0].numel(), 0
    if name in ("native_layer_norm", "native_group_norm"):
        weight, bias = (args[2], args[3]) if name == "native_layer_norm" else (args[1], args[2])
        affine = (
            _AFFINE_FLOPS
            if isinstance(weight, torch.Tensor) or isinstance(bias, torch.Tensor)
            else 0
        )
        return (_NORM_STATS_FLOPS + _NORM_APPLY_FLOPS + affine) * args[0].numel(), 0
    return None


@dataclass
class ModuleCost:
    """What one named module (with its children) contributes to a forward pass."""

    name: str
    type: str
    params: int
    flops: int = 0
    macs: int = 0
    is_attention: bool = False


@dataclass
class FlopCount:
    """FLOPs and MACs of one forward pass, in total, per module and per operator.

    Attributes:
        flops: every counted operation (see the module docstring for the rules).
        macs: multiply-accumulates of convolutions, linear layers and matrix products (what
            papers call FLOPs).
        by_module: per module name (``""`` is the whole model), its cost with its children.
        by_op: FLOPs per operator family (``"convolution"``, ``"mul"``, ``"sigmoid"``...).
        uncounted: operators no rule covers, with their number of calls.
        attention_modules: names of the outermost attention modules in the model.
    """

    flops: int
    macs: int
    by_module: dict[str, ModuleCost]
    by_op: dict[str, int]
    uncounted: dict[str, int]
    attention_modules: list[str]

    @property
    def attention_flops(self) -> int:
        return sum(self.by_module[n].flops for n in self.attention_modules)

    @property
    def attention_macs(self) -> int:
        return sum(self.by_module[n].macs for n in self.attention_modules)


class _FlopCounterMode(TorchDispatchMode):
    """Adds each ATen call's cost to every module on the current module stack."""

    def __init__(self, totals: dict[str, list[int]]) -> None:
        super().__init__()
        self.stack: list[str] = [""]
        self.totals = totals
        self.by_op: dict[str, int] = {}
        self.uncounted: dict[str, int] = {}

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        cost = _op_cost(func, args, kwargs, out)
        name = _op_name(func)
        if cost is None:
            self.uncounted[name] = self.uncounted.get(name, 0) + 1
            return out
        flops, macs = cost
        if flops:
            self.by_op[name] = self.by_op.get(name, 0) + flops
        for module_name in dict.fromkeys(self.stack):  # a module re-entered counts once
            entry = self.totals[module_name]
            entry[0] += flops
            entry[1] += macs
        return out


def _outermost_attention(model: nn.Module) -> list[str]:
    """Names of the attention modules that are not inside another attention module."""
    names: list[str] = []
    for name, module in model.named_modules():
        inside = any(n == "" or name.startswith(n + ".") for n in names)
        if isinstance(module, AttentionModule) and not inside:
            names.append(name)
    return names


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _check_module(owner: str, model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model must be an nn.Module, got {type(model).__name__}")


def count_flops(model: nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor]) -> FlopCount:
    """Count the FLOPs and MACs of ``model(*inputs)`` in eval mode, without gradients.

    The model's train/eval mode is restored afterwards. Every ATen operator of the forward is
    counted by the rules in this module's docstring; ``by_module`` says which named module
    contributed what.

    >>> from convattn import models
    >>> count = count_flops(models.resnet50(attention="se"), torch.randn(1, 3, 224, 224))
    >>> round(count.macs / 1e9, 2), count.attention_modules[:1]
    (4.09, ['layer1.0.attn'])
    """
    _check_module("count_flops", model)
    args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    if not all(isinstance(a, torch.Tensor) for a in args):
        raise TypeError("count_flops: inputs must be a tensor or a sequence of tensors")
    totals: dict[str, list[int]] = {name: [0, 0] for name, _ in model.named_modules()}
    mode = _FlopCounterMode(totals)
    handles = []
    for name, module in model.named_modules():
        if name == "":
            continue

        def push(_m: nn.Module, _a: Any, name: str = name) -> None:
            mode.stack.append(name)

        def pop(_m: nn.Module, _a: Any, _o: Any, name: str = name) -> None:
            if mode.stack and mode.stack[-1] == name:
                mode.stack.pop()

        handles.append(module.register_forward_pre_hook(push))
        handles.append(module.register_forward_hook(pop, always_call=True))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), mode:
            model(*args)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    modules = dict(model.named_modules())
    attention = _outermost_attention(model)
    by_module = {
        name: ModuleCost(
            name=name,
            type=type(modules[name]).__name__,
            params=_param_count(modules[name]),
            flops=flops,
            macs=macs,
            is_attention=name in attention,
        )
        for name, (flops, macs) in totals.items()
    }
    return FlopCount(
        flops=totals[""][0],
        macs=totals[""][1],
        by_module=by_module,
        by_op=dict(sorted(mode.by_op.items(), key=lambda kv: -kv[1])),
        uncounted=mode.uncounted,
        attention_modules=attention,
    )


# --------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------


class TensorMemoryTracker(TorchDispatchMode):
    """Tracks the bytes of CPU tensors created inside the ``with`` block while they live.

    Every tensor an ATen operator returns that is new storage (not a view and not an
    in-place result) adds its storage's bytes when it is created; a weak-reference finaliser
    on the storage subtracts them when it is freed. ``peak_bytes`` is the largest total seen,
    ``current_bytes`` what is still alive. Tensors allocated before the block are not counted.

    >>> with TensorMemoryTracker() as tracker:
    ...     x = torch.empty(1024, 1024)  # 4 MiB
    ...     del x
    >>> tracker.peak_bytes, tracker.current_bytes
    (4194304, 0)
    """

    def __init__(self) -> None:
        super().__init__()
        self.current_bytes = 0
        self.peak_bytes = 0
        self._live: dict[int, int] = {}
        self._finalizers: list[weakref.finalize[Any, Any]] = []

    def _free(self, key: int) -> None:
        self.current_bytes -= self._live.pop(key, 0)

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        # Storages still alive stay counted in current_bytes; stop watching them.
        for finalizer in self._finalizers:
            finalizer.detach()
        self._finalizers.clear()

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        for i, value in enumerate(outputs):
            aliased = i < len(returns) and returns[i].alias_info is not None
            tensors = value if isinstance(value, (tuple, list)) else (value,)
            for tensor in tensors:
                if aliased or not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
                    continue
                self._track(tensor)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._live:
            return
        self._live[key] = size
        self.current_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        self._finalizers.append(weakref.finalize(storage, self._free, key))


def _storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: dict[tuple[str, int], int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def _state_tensors(
    model: nn.Module, inputs: Sequence[Any], optimizer: torch.optim.Optimizer | None = None
) -> list[torch.Tensor]:
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [t for t in tree_flatten(list(inputs))[0] if isinstance(t, torch.Tensor)]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors += [t for t in tree_flatten(state)[0] if isinstance(t, torch.Tensor)]
    return tensors


def _peak_memory(
    step: Callable[[], Any], device: torch.device, baseline: Callable[[], list[torch.Tensor]]
) -> int:
    """Bytes live at the start (``baseline()``'s tensors on the CPU) plus the peak growth."""
    if device.type == "cuda":  # pragma: no cover - needs a GPU
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    start = _storage_bytes(baseline())
    with TensorMemoryTracker() as tracker:
        step()
    return start + tracker.peak_bytes


# --------------------------------------------------------------------------------------
# Latency
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyStats:
    """Wall-clock times of repeated runs, in milliseconds."""

    median_ms: float
    iqr_ms: float
    min_ms: float
    mean_ms: float
    repeats: int
    samples_ms: tuple[float, ...] = field(repr=False)

    @classmethod
    def from_samples(cls, samples: Sequence[float]) -> LatencyStats:
        ordered = sorted(samples)
        if len(ordered) > 1:
            q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
            iqr = q3 - q1
        else:
            iqr = 0.0
        return cls(
            median_ms=statistics.median(ordered),
            iqr_ms=iqr,
            min_ms=ordered[0],
            mean_ms=statistics.fmean(ordered),
            repeats=len(ordered),
            samples_ms=tuple(samples),
        )


def _check_counts(owner: str, warmup: int, repeats: int) -> None:
    for option, value, low in (("warmup", warmup, 0), ("repeats", repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{owner}: {option} must be an int >= {low}, got {value!r}")


def _interleaved_latency(
    steps: Sequence[Callable[[], Any]], device: torch.device, warmup: int, repeats: int
) -> list[LatencyStats]:
    """Times each step ``repeats`` times after ``warmup`` runs, the steps taking turns in
    every round so that a slow spell of the machine hits them all alike."""
    sync: Callable[[], None] = (
        (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    )
    for _ in range(warmup):
        for step in steps:
            step()
    sync()
    samples: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for i, step in enumerate(steps):
            start = time.perf_counter()
            step()
            sync()
            samples[i].append((time.perf_counter() - start) * 1e3)
    return [LatencyStats.from_samples(s) for s in samples]


def measure_latency(
    step: Callable[[], Any],
    *,
    warmup: int = 3,
    repeats: int = 10,
    device: str | torch.device = "cpu",
) -> LatencyStats:
    """Median and spread of ``step()``'s wall-clock time, after ``warmup`` untimed runs.

    On CUDA the device is synchronised before the clock stops, so queued kernels count.
    """
    _check_counts("measure_latency", warmup, repeats)
    if not callable(step):
        raise TypeError(f"measure_latency: step must be callable, got {type(step).__name__}")
    return _interleaved_latency([step], torch.device(device), warmup, repeats)[0]


# --------------------------------------------------------------------------------------
# profile()
# --------------------------------------------------------------------------------------


@dataclass
class Profile:
    """What a model costs at one input size. ``None`` marks what was not measured.

    ``macs`` is what papers print as FLOPs; ``flops`` counts every operation (2 per MAC plus
    the element-wise, reduction, normalisation and pooling ops). Latencies are medians over
    ``latency_repeats`` runs with their inter-quartile range; memory is the peak of bytes
    allocated, weights included (see the module docstring).
    """

    name: str
    input_size: tuple[int, ...]
    device: str
    threads: int
    params: int
    trainable_params: int
    flops: int | None
    macs: int | None
    attention_params: int
    attention_flops: int | None
    attention_macs: int | None
    latency_ms: float | None
    latency_iqr_ms: float | None
    latency_repeats: int
    train_latency_ms: float | None
    train_latency_iqr_ms: float | None
    train_batch_size: int | None
    peak_memory_bytes: int | None
    train_peak_memory_bytes: int | None
    uncounted_ops: dict[str, int] = field(default_factory=dict)
    by_module: dict[str, ModuleCost] = field(default_factory=dict, repr=False)

    def to_dict(self, breakdown: bool = False) -> dict[str, Any]:
        """A JSON-serialisable dict of the fields; the per-module costs only with
        ``breakdown=True``."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "by_module"}
        data["input_size"] = list(self.input_size)
        data["uncounted_ops"] = dict(self.uncounted_ops)
        if breakdown:
            data["by_module"] = {name: asdict(cost) for name, cost in self.by_module.items()}
        return data

    def summary(self) -> str:
        """A few lines for a terminal."""
        lines = [
            f"{self.name} at input {tuple(self.input_size)} on {self.device} "
            f"({self.threads} thread(s))",
            f"  params             {self.params:,} (attention {self.attention_params:,})",
        ]
        if self.macs is not None and self.flops is not None:
            lines.append(
                f"  MACs               {self.macs / 1e9:.4g} G  (papers' 'FLOPs'; attention "
                f"{(self.attention_macs or 0) / 1e6:.4g} M)"
            )
            lines.append(
                f"  FLOPs (all ops)    {self.flops / 1e9:.4g} G  (attention "
                f"{(self.attention_flops or 0) / 1e6:.4g} M, "
                f"{100 * (self.attention_flops or 0) / max(self.flops, 1):.2f} %)"
            )
        if self.latency_ms is not None:
            lines.append(
                f"  latency            {self.latency_ms:.2f} ms median, IQR "
                f"{self.latency_iqr_ms or 0:.2f} ms ({self.latency_repeats} runs, inference)"
            )
        if self.train_latency_ms is not None:
            lines.append(
                f"  training step      {self.train_latency_ms:.2f} ms median, IQR "
                f"{self.train_latency_iqr_ms or 0:.2f} ms (batch {self.train_batch_size}: "
                "forward + backward + SGD step)"
            )
        if self.peak_memory_bytes is not None:
            lines.append(f"  peak memory        {self.peak_memory_bytes / 2**20:.1f} MiB (forward)")
        if self.train_peak_memory_bytes is not None:
            lines.append(
                f"  peak memory train  {self.train_peak_memory_bytes / 2**20:.1f} MiB (training step)"
            )
        if self.uncounted_ops:
            lines.append(f"  not counted        {', '.join(sorted(self.uncounted_ops))}")
        return "\n".join(lines)


def _resolve_device(
    owner: str, device: str | torch.device | None, model: nn.Module
) -> torch.device:
    params = list(model.parameters()) + list(model.buffers())
    model_device = params[0].device if params else torch.device("cpu")
    if device is None:
        return model_device
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{owner}: device must be 'cpu' or 'cuda[:N]', got {device!r}") from exc
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"{owner}: device must be 'cpu' or 'cuda[:N]', got {device!r}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{owner}: device {device!r} requested but CUDA is not available")
    if params and model_device.type != resolved.type:
        raise ValueError(
            f"{owner}: the model is on {model_device} but device={str(resolved)!r}; "
            f"move it first with model.to({str(resolved)!r})"
        )
    return resolved


def _input_shape(owner: str, input_size: int | Sequence[int]) -> tuple[int, ...]:
    """An int ``s`` is an RGB image batch of one, (1, 3, s, s); a sequence is the full shape."""
    if isinstance(input_size, int) and not isinstance(input_size, bool):
        shape: tuple[int, ...] = (1, 3, input_size, input_size)
    elif isinstance(input_size, Sequence) and not isinstance(input_size, str):
        shape = tuple(input_size)
    else:
        raise TypeError(
            f"{owner}: input_size must be an int or a sequence of ints (N, C, *spatial), "
            f"got {type(input_size).__name__}"
        )
    if len(shape) < 2 or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape
    ):
        raise ValueError(
            f"{owner}: input_size must be positive ints (N, C, *spatial) with at least 2 "
            f"dims, got {input_size!r}"
        )
    return shape


@contextmanager
def _num_threads(threads: int | None) -> Iterator[int]:
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _loss(output: Any, target: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy for (N, K) logits, else the mean square of every output tensor."""
    if isinstance(output, torch.Tensor) and output.dim() == 2 and target is not None:
        return F.cross_entropy(output.float(), target)
    tensors = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]
    return sum(
        (t.float().square().mean() for t in tensors), torch.zeros((), device=tensors[0].device)
    )


class _TrainStep:
    """One training step on a fixed batch: zero grads, forward, loss, backward, and an SGD
    (momentum 0.9) step when ``optimizer_step``."""

    def __init__(
        self, model: nn.Module, x: torch.Tensor, optimizer_step: bool, seed: int = 0
    ) -> None:
        self.model = model.train()
        self.x = x
        self.optimizer = (
            torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9) if optimizer_step else None
        )
        with torch.no_grad():
            out = model(x)
        self.target: torch.Tensor | None = None
        if isinstance(out, torch.Tensor) and out.dim() == 2:
            generator = torch.Generator().manual_seed(seed)
            self.target = torch.randint(out.shape[1], (out.shape[0],), generator=generator).to(
                x.device
            )

    def __call__(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.model.zero_grad(set_to_none=True)
        loss = _loss(self.model(self.x), self.target)
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()

    def state(self) -> list[torch.Tensor]:
        inputs = [self.x] + ([self.target] if self.target is not None else [])
        return _state_tensors(self.model, inputs, self.optimizer)


def _random_input(
    shape: Sequence[int], model: nn.Module, device: torch.device, seed: int = 0
) -> torch.Tensor:
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator).to(device=device, dtype=dtype)


def _inference_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode():
            model(x)

    return step


def profile(
    model: nn.Module,
    input_size: int | Sequence[int],
    *,
    name: str | None = None,
    device: str | torch.device | None = None,
    threads: int | None = None,
    warmup: int = 3,
    repeats: int = 10,
    flops: bool = True,
    latency: bool = True,
    memory: bool = True,
    train: bool = False,
    train_batch_size: int | None = None,
    train_warmup: int = 1,
    train_repeats: int = 3,
    optimizer_step: bool = True,
) -> Profile:
    """Parameters, FLOPs/MACs, latency and peak memory of ``model`` on a random input.

    Args:
        model: any ``nn.Module``; it is left as it was (mode, weights, BN statistics):
            training steps run on a deep copy.
        input_size: the input's full shape ``(N, C, *spatial)``, or an int ``s`` for
            ``(1, 3, s, s)``.
        name: label in the result (default: the model's class name).
        device: ``"cpu"`` or ``"cuda[:N]"``; None: where the model's parameters are. The model
            must already be there.
        threads: CPU threads for the measurement (``torch.set_num_threads``, restored after);
            None or 0 keeps the current setting.
        warmup, repeats: untimed and timed inference runs (``torch.inference_mode``, eval).
        flops, latency, memory: what to measure.
        train: also time a training step (forward, loss, backward and, with
            ``optimizer_step``, an SGD step with momentum) and measure its peak memory. The
            loss is cross-entropy against fixed random labels for ``(N, K)`` outputs, else
            the mean square of the output.
        train_batch_size: batch of the training step (default: the input's). BatchNorm on
            pooled descriptors (SRM, SK) needs more than one sample in training.
        train_warmup, train_repeats: untimed and timed training steps.

    Returns:
        A :class:`Profile`.
    """
    owner = "profile"
    _check_module(owner, model)
    shape = _input_shape(owner, input_size)
    _check_counts(owner, warmup, repeats)
    _check_counts(owner + " (train)", train_warmup, train_repeats)
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 0
    ):
        raise ValueError(f"{owner}: threads must be an int >= 0 or None, got {threads!r}")
    if train_batch_size is not None and (
        isinstance(train_batch_size, bool)
        or not isinstance(train_batch_size, int)
        or train_batch_size < 1
    ):
        raise ValueError(
            f"{owner}: train_batch_size must be a positive int, got {train_batch_size!r}"
        )
    resolved = _resolve_device(owner, device, model)
    with _num_threads(threads) as used_threads:
        return _profile(
            model,
            shape,
            name=name or type(model).__name__,
            device=resolved,
            threads=used_threads,
            warmup=warmup,
            repeats=repeats,
            do_flops=flops,
            do_latency=latency,
            do_memory=memory,
            train=train,
            train_batch_size=train_batch_size or shape[0],
            train_warmup=train_warmup,
            train_repeats=train_repeats,
            optimizer_step=optimizer_step,
        )


def _profile(
    model: nn.Module,
    shape: tuple[int, ...],
    *,
    name: str,
    device: torch.device,
    threads: int,
    warmup: int,
    repeats: int,
    do_flops: bool,
    do_latency: bool,
    do_memory: bool,
    train: bool,
    train_batch_size: int,
    train_warmup: int,
    train_repeats: int,
    optimizer_step: bool,
) -> Profile:
    x = _random_input(shape, model, device)
    attention = _outermost_attention(model)
    modules = dict(model.named_modules())
    attention_params = sum(_param_count(modules[n]) for n in attention)
    count = count_flops(model, x) if do_flops else None
    stats: LatencyStats | None = None
    peak: int | None = None
    was_training = model.training
    model.eval()
    try:
        step = _inference_step(model, x)
        if do_latency:
            stats = _interleaved_latency([step], device, warmup, repeats)[0]
        if do_memory:
            step()
            peak = _peak_memory(step, device, lambda: _state_tensors(model, [x]))
    finally:
        model.train(was_training)
    train_stats: LatencyStats | None = None
    train_peak: int | None = None
    if train:
        train_shape = (train_batch_size, *shape[1:])
        train_step = _TrainStep(
            copy.deepcopy(model), _random_input(train_shape, model, device), optimizer_step
        )
        if do_latency:
            train_stats = _interleaved_latency([train_step], device, train_warmup, train_repeats)[0]
        if do_memory:
            train_step()  # grads and optimizer state exist from here on, as in training
            train_peak = _peak_memory(train_step, device, train_step.state)
    return Profile(
        name=name,
        input_size=shape,
        device=str(device),
        threads=threads,
        params=_param_count(model),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        flops=count.flops if count else None,
        macs=count.macs if count else None,
        attention_params=attention_params,
        attention_flops=count.attention_flops if count else None,
        attention_macs=count.attention_macs if count else None,
        latency_ms=stats.median_ms if stats else None,
        latency_iqr_ms=stats.iqr_ms if stats else None,
        latency_repeats=stats.repeats if stats else 0,
        train_latency_ms=train_stats.median_ms if train_stats else None,
        train_latency_iqr_ms=train_stats.iqr_ms if train_stats else None,
        train_batch_size=train_batch_size if train else None,
        peak_memory_bytes=peak,
        train_peak_memory_bytes=train_peak,
        uncounted_ops=count.uncounted if count else {},
        by_module=count.by_module if count else {},
    )


# --------------------------------------------------------------------------------------
# Published figures
# --------------------------------------------------------------------------------------


def load_published() -> list[dict[str, Any]]:
    """The published figures shipped with convattn (``convattn/data/published.json``).

    Each entry has ``backbone``, ``attention`` (None for the plain network), ``source`` and
    the figures as printed (``params_m``, ``gflops`` — multiply-accumulates, as the papers
    count them —, ``top1``/``top5`` or their errors, ``cpu_latency_ms``). Entries for the same
    (backbone, attention) are listed in the order :func:`compare` picks them (the first).
    """
    text = resources.files("convattn").joinpath("data/published.json").read_text("utf-8")
    entries: list[dict[str, Any]] = json.loads(text)["figures"]
    return entries


def _published_for(
    entries: Sequence[dict[str, Any]], backbone: str, attention: str | None
) -> list[dict[str, Any]]:
    return [e for e in entries if e["backbone"] == backbone and e["attention"] == attention]


# --------------------------------------------------------------------------------------
# compare()
# --------------------------------------------------------------------------------------

# The main mechanisms of each backbone family (those its papers evaluate it with).
DEFAULT_ATTENTION: dict[str, tuple[str, ...]] = {
    "resnet": ("se", "eca", "cbam", "bam", "gc", "ge", "srm", "fca", "triplet", "simam"),
    "resnext": ("sk", "se", "eca", "cbam"),
    "cifar": ("se", "eca", "cbam", "gc", "srm", "triplet", "simam"),
    "mobilenet": ("se", "eca", "cbam", "coord"),
}

_OVERHEAD_FIELDS = (
    "params",
    "macs",
    "flops",
    "latency_ms",
    "peak_memory_bytes",
    "train_latency_ms",
    "train_peak_memory_bytes",
)


def _canonical_backbone(backbone: str) -> str:
    from convattn import models

    model = models.create_model(backbone)  # raises the ValueError with suggestions
    del model
    key = backbone.lower()
    aliases = {f"resnet{d}": f"cifar_resnet{d}" for d in (20, 32, 44, 56, 110)}
    aliases |= {"mobilenetv2": "mobilenet_v2", "resnext50": "resnext50_32x4d"}
    return aliases.get(key, key)


def _family(backbone: str) -> str:
    for prefix in ("cifar", "resnext", "mobilenet", "resnet"):
        if backbone.startswith(prefix):
            return prefix
    return "resnet"


def default_input_size(backbone: str) -> int:
    """32 px for the CIFAR ResNets, 224 px for the ImageNet networks."""
    return 32 if _family(backbone) == "cifar" else 224


def _pct(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return 100.0 * (value - base) / base


def compare(
    backbone: str = "resnet50",
    attentions: Sequence[str] | None = None,
    *,
    input_size: int | Sequence[int] | None = None,
    batch_size: int = 1,
    num_classes: int = 1000,
    device: str = "cpu",
    threads: int | None = None,
    warmup: int = 2,
    repeats: int = 8,
    memory: bool = True,
    train: bool = False,
    train_batch_size: int = 2,
    train_warmup: int = 1,
    train_repeats: int = 3,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Profile ``backbone`` without attention and with each mechanism in ``attentions``.

    Models come from ``convattn.models.create_model(backbone, attention=name)`` with the
    paper placement. FLOPs and memory are measured model by model; latencies are measured
    with the models taking turns in every round, so that the machine's slow spells hit them
    alike and the overheads stay comparable.

    Returns one row per model, the plain backbone first: ``Profile.to_dict()`` plus
    ``backbone``, ``attention`` (None for the plain network), ``overhead_<field>_pct`` for
    params, macs, flops, latency and memory relative to the plain network, and the published
    figures picked from :func:`load_published` (``paper_params_m``, ``paper_gflops``,
    ``paper_cpu_latency_ms``, ``paper_source``; None where there is none).
    """
    from convattn import models

    owner = "compare"
    if not isinstance(backbone, str):
        raise TypeError(f"{owner}: backbone must be a model name, got {type(backbone).__name__}")
    key = _canonical_backbone(backbone)
    if attentions is None:
        attentions = DEFAULT_ATTENTION[_family(key)]
    if isinstance(attentions, str) or not all(isinstance(a, str) for a in attentions):
        raise TypeError(
            f"{owner}: attentions must be a sequence of registry names, got {attentions!r}"
        )
    names: list[str | None] = [None, *dict.fromkeys(a.lower() for a in attentions)]
    size = default_input_size(key) if input_size is None else input_size
    if isinstance(size, int) and not isinstance(size, bool):
        shape = _input_shape(owner, (batch_size, 3, size, size))
    else:
        shape = _input_shape(owner, (batch_size, 3, *size))  # type: ignore[misc]
    _check_counts(owner, warmup, repeats)
    _check_counts(owner + " (train)", train_warmup, train_repeats)
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{owner}: device {device!r} requested but CUDA is not available")

    built: dict[str | None, nn.Module] = {}
    profiles: dict[str | None, Profile] = {}
    bar = _progress(names, progress, desc=f"{key} @ {'x'.join(map(str, shape[2:]))}")
    with _num_threads(threads) as used_threads:
        for name in bar:
            _describe(bar, f"profiling {name or key}")
            torch.manual_seed(0)
            model = models.create_model(key, attention=name, num_classes=num_classes).to(resolved)
            built[name] = model
            profiles[name] = profile(
                model,
                shape,
                name=name or key,
                device=resolved,
                latency=False,
                memory=memory,
                train=train and memory,
                train_batch_size=train_batch_size,
                train_warmup=0,
                train_repeats=1,
            )
        _describe(bar, "timing inference (interleaved)")
        inputs = {n: _random_input(shape, m, resolved) for n, m in built.items()}
        for model in built.values():
            model.eval()
        steps = [_inference_step(built[n], inputs[n]) for n in names]
        stats = _interleaved_latency(steps, resolved, warmup, repeats)
        train_stats: list[LatencyStats | None] = [None] * len(names)
        if train:
            _describe(bar, "timing training steps (interleaved)")
            train_shape = (train_batch_size, *shape[1:])
            train_steps = [
                _TrainStep(
                    copy.deepcopy(built[n]), _random_input(train_shape, built[n], resolved), True
                )
                for n in names
            ]
            train_stats = list(
                _interleaved_latency(train_steps, resolved, train_warmup, train_repeats)
            )
            del train_steps
        if hasattr(bar, "close"):
            bar.close()
    published = load_published()
    rows: list[dict[str, Any]] = []
    for name, stat, train_stat in zip(names, stats, train_stats, strict=True):
        result = profiles[name]
        result.threads = used_threads
        result.latency_ms, result.latency_iqr_ms = stat.median_ms, stat.iqr_ms
        result.latency_repeats = stat.repeats
        if train_stat is not None:
            result.train_latency_ms = train_stat.median_ms
            result.train_latency_iqr_ms = train_stat.iqr_ms
            result.train_batch_size = train_batch_size
        row: dict[str, Any] = {"backbone": key, "attention": name, **result.to_dict()}
        rows.append(row)
    base = rows[0]
    for row in rows:
        for name in _OVERHEAD_FIELDS:
            row[f"overhead_{name}_pct"] = _pct(row[name], base[name])
        figures = _published_for(published, key, row["attention"])
        first = figures[0] if figures else {}
        row["paper_params_m"] = first.get("params_m")
        row["paper_gflops"] = first.get("gflops")
        row["paper_cpu_latency_ms"] = next(
            (f["cpu_latency_ms"] for f in figures if "cpu_latency_ms" in f), None
        )
        row["paper_source"] = first.get("source")
        row["paper_all"] = figures
    return rows


class _NoBar:
    def __init__(self, items: Sequence[Any], desc: str) -> None:
        self.items, self.desc = items, desc

    def __iter__(self) -> Iterator[Any]:
        for i, item in enumerate(self.items):
            print(f"[{i + 1}/{len(self.items)}] {self.desc}: {item or 'plain'}", file=sys.stderr)
            yield item


def _progress(items: Sequence[Any], enabled: bool, desc: str) -> Any:
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency of the CLI extras
        return _NoBar(items, desc)
    return tqdm(items, desc=desc, unit="model", file=sys.stderr, dynamic_ncols=True)


def _describe(bar: Any, text: str) -> None:
    if hasattr(bar, "set_postfix_str"):
        bar.set_postfix_str(text)


# --------------------------------------------------------------------------------------
# Writing the comparison: Markdown, CSV, JSON, PNG
# --------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def _pct_cell(row: dict[str, Any], name: str) -> str:
    return _fmt(row[f"overhead_{name}_pct"], "+.2f", " %")


def _mib_cell(row: dict[str, Any], name: str) -> str:
    return _fmt(None if row[name] is None else row[name] / 2**20, ".1f")


def _table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]], list[str]]:
    """Headers, cells and footnotes of the comparison table."""
    with_train = any(r["train_latency_ms"] is not None for r in rows)
    with_memory = any(r["peak_memory_bytes"] is not None for r in rows)
    headers = [
        "attention",
        "params (M)",
        "Δparams",
        "GMACs*",
        "ΔMACs",
        "GFLOPs",
        "ms",
        "IQR",
        "Δms",
    ]
    if with_memory:
        headers += ["peak MiB", "Δmem"]
    if with_train:
        headers += ["train ms", "Δtrain"]
        if with_memory:
            headers += ["train MiB", "Δtrain mem"]
    headers += ["paper params (M)", "paper GFLOPs*", "ref"]
    sources: list[str] = []
    cells: list[list[str]] = []
    for row in rows:
        line = [
            row["attention"] or f"(none: {row['backbone']})",
            f"{row['params'] / 1e6:.2f}",
            _pct_cell(row, "params"),
            _fmt(None if row["macs"] is None else row["macs"] / 1e9, ".3f"),
            _pct_cell(row, "macs"),
            _fmt(None if row["flops"] is None else row["flops"] / 1e9, ".3f"),
            _fmt(row["latency_ms"], ".2f"),
            _fmt(row["latency_iqr_ms"], ".2f"),
            _pct_cell(row, "latency_ms"),
        ]
        if with_memory:
            line += [_mib_cell(row, "peak_memory_bytes"), _pct_cell(row, "peak_memory_bytes")]
        if with_train:
            line += [_fmt(row["train_latency_ms"], ".1f"), _pct_cell(row, "train_latency_ms")]
            if with_memory:
                line += [
                    _mib_cell(row, "train_peak_memory_bytes"),
                    _pct_cell(row, "train_peak_memory_bytes"),
                ]
        ref = ""
        if row["paper_source"]:
            if row["paper_source"] not in sources:
                sources.append(row["paper_source"])
            ref = f"[{sources.index(row['paper_source']) + 1}]"
        line += [_fmt(row["paper_params_m"], ".2f"), _fmt(row["paper_gflops"], ".3g"), ref]
        cells.append(line)
    notes = [f"[{i + 1}] {s}" for i, s in enumerate(sources)]
    return headers, cells, notes


def _header_text(rows: Sequence[dict[str, Any]]) -> str:
    first = rows[0]
    size = "x".join(str(s) for s in first["input_size"][2:])
    text = (
        f"{first['backbone']} at {size} px, batch {first['input_size'][0]}, on {first['device']} "
        f"({first['threads']} thread(s)); latency: median of {first['latency_repeats']} "
        "interleaved runs (inference mode)"
    )
    if first["train_latency_ms"] is not None:
        text += f"; training step: batch {first['train_batch_size']}, forward + backward + SGD step"
    return text + "."


_FOOTNOTE = (
    "* GMACs are multiply-accumulates of convolutions, linear layers and matrix products: the "
    "papers' 'GFLOPs' count the same thing. GFLOPs counts every operation (2 per MAC, plus the "
    "gates, multiplies, pooling and normalisation). Δ columns: overhead over the plain backbone."
)


def format_text_table(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison as a plain-text table with its notes."""
    headers, cells, notes = _table(rows)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    fmt = lambda cs: "  ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w)
        for i, (c, w) in enumerate(zip(cs, widths, strict=True))
    ).rstrip()
    lines = [_header_text(rows), "", fmt(headers), fmt(["-" * w for w in widths])]
    lines += [fmt(c) for c in cells]
    return "\n".join([*lines, "", _FOOTNOTE, *notes])


def format_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison as Markdown, with the sources of the published figures as notes."""
    headers, cells, notes = _table(rows)
    lines = [f"# Attention cost: {rows[0]['backbone']}", "", _header_text(rows), ""]
    lines.append("| " + " | ".join(headers) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|")
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    lines += ["", _FOOTNOTE, ""]
    lines += [f"{n}  " for n in notes]
    others = [
        f"- {row['attention'] or 'plain'}: "
        + "; ".join(_describe_figure(f) for f in row["paper_all"])
        for row in rows
        if len(row["paper_all"]) > 1
    ]
    if others:
        lines += ["", "Every published figure for these rows:", "", *others]
    return "\n".join(lines) + "\n"


def _describe_figure(figure: dict[str, Any]) -> str:
    parts = []
    if figure.get("params_m") is not None:
        parts.append(f"{figure['params_m']}M params")
    if figure.get("gflops") is not None:
        parts.append(f"{figure['gflops']} GFLOPs")
    if figure.get("cpu_latency_ms") is not None:
        parts.append(f"{figure['cpu_latency_ms']} ms CPU")
    return f"{', '.join(parts) or 'accuracy only'} ({figure['source']})"


_CSV_SKIP = ("uncounted_ops", "paper_all")


def _csv_text(rows: Sequence[dict[str, Any]]) -> str:
    columns = [k for k in rows[0] if k not in _CSV_SKIP]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        flat = dict(row)
        flat["input_size"] = "x".join(map(str, row["input_size"]))
        writer.writerow({k: "" if flat[k] is None else flat[k] for k in columns})
    return buffer.getvalue()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file next to ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; give it the usual mode
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _chart_png(rows: Sequence[dict[str, Any]]) -> bytes:
    from matplotlib.figure import Figure

    variants = rows[1:]
    series = [
        ("params", "params"),
        ("macs", "MACs"),
        ("latency_ms", "latency"),
        ("peak_memory_bytes", "peak memory"),
        ("train_latency_ms", "training step"),
        ("train_peak_memory_bytes", "training memory"),
    ]
    series = [
        (k, label)
        for k, label in series
        if any(r[f"overhead_{k}_pct"] is not None for r in variants)
    ]
    figure = Figure(figsize=(max(6.0, 0.9 * len(variants) + 2), 4.2), layout="constrained")
    axes = figure.subplots()
    width = 0.8 / max(len(series), 1)
    for i, (key, label) in enumerate(series):
        values = [r[f"overhead_{key}_pct"] or 0.0 for r in variants]
        positions = [j + (i - (len(series) - 1) / 2) * width for j in range(len(variants))]
        axes.bar(positions, values, width, label=label)
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set_xticks(range(len(variants)), [r["attention"] for r in variants])
    axes.set_ylabel("overhead over the plain network (%)")
    axes.set_title(_header_text(rows).split(";")[0], fontsize=9)
    axes.legend(fontsize=8, ncols=min(len(series), 3))
    axes.grid(axis="y", alpha=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def write_comparison(
    rows: Sequence[dict[str, Any]], out_dir: str | os.PathLike[str]
) -> dict[str, Path]:
    """Write ``compare.md``, ``compare.csv``, ``compare.json`` and ``compare.png`` (when
    matplotlib is installed) into ``out_dir``; returns their paths by format."""
    if not rows:
        raise ValueError("write_comparison: rows is empty; run compare() first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {
        "md": out / "compare.md",
        "csv": out / "compare.csv",
        "json": out / "compare.json",
    }
    _write_atomic(written["md"], format_markdown(rows).encode())
    _write_atomic(written["csv"], _csv_text(rows).encode())
    _write_atomic(written["json"], (json.dumps(list(rows), indent=2) + "\n").encode())
    try:
        png = _chart_png(rows)
    except ImportError:
        print("convattn compare: matplotlib is not installed; no chart written", file=sys.stderr)
    else:
        written["png"] = out / "compare.png"
        _write_atomic(written["png"], png)
    return written


# --------------------------------------------------------------------------------------
# Command line: `convattn profile` and `convattn compare`
# --------------------------------------------------------------------------------------


def _parse_size(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected SIZE or HxW, e.g. 224 or 224x160, got {text!r}"
        ) from None
    if not 1 <= len(sizes) <= 3 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected SIZE or HxW with positive ints, got {text!r}")
    return sizes


def _spatial(sizes: tuple[int, ...]) -> tuple[int, ...]:
    return sizes * 2 if len(sizes) == 1 else sizes


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip() and part.strip() != "none"]


def cmd_profile(args: argparse.Namespace) -> int:
    from convattn import models, registry

    if args.channels:
        if not args.attention:
            raise ValueError(
                "convattn profile: --channels profiles one attention module; give --attention"
            )
        model: nn.Module = registry.create(args.attention, args.channels)
        size = _spatial(args.input or (56,))
        shape: tuple[int, ...] = (args.batch, args.channels, *size)
        label = f"{args.attention} (C={args.channels})"
    else:
        backbone = _canonical_backbone(args.model)
        model = models.create_model(
            backbone,
            attention=args.attention,
            num_classes=args.num_classes,
            placement=args.placement,
        )
        size = _spatial(args.input or (default_input_size(backbone),))
        shape = (args.batch, 3, *size)
        label = backbone + (f" + {args.attention}" if args.attention else "")
    model = model.to(args.device)
    result = profile(
        model,
        shape,
        name=label,
        device=args.device,
        threads=args.threads or None,
        warmup=args.warmup,
        repeats=args.repeats,
        memory=not args.no_memory,
        train=args.train,
        train_batch_size=args.train_batch,
        train_repeats=args.train_repeats,
    )
    if args.json:
        print(json.dumps(result.to_dict(breakdown=args.breakdown), indent=2))
        return 0
    print(result.summary())
    if args.breakdown:
        print()
        print(_breakdown_text(result, args.depth))
    return 0


def _breakdown_text(result: Profile, depth: int) -> str:
    total = max(result.flops or 0, 1)
    rows = [
        cost
        for name, cost in result.by_module.items()
        if name and (name.count(".") < depth or cost.is_attention)
    ]
    name_width = max([len("module"), *(len(c.name) for c in rows)])
    lines = [
        f"{'module':<{name_width}}  {'type':<22} {'params':>12} {'MMACs':>10} {'MFLOPs':>10} {'%FLOPs':>7}"
    ]
    for cost in rows:
        mark = " *" if cost.is_attention else ""
        lines.append(
            f"{cost.name:<{name_width}}  {cost.type[:22]:<22} {cost.params:>12,} "
            f"{cost.macs / 1e6:>10.2f} {cost.flops / 1e6:>10.2f} {100 * cost.flops / total:>6.2f}%{mark}"
        )
    return "\n".join([*lines, "(* attention modules)"])


def cmd_compare(args: argparse.Namespace) -> int:
    backbone = _canonical_backbone(args.backbone)
    attentions = _names(args.attention) if args.attention else None
    size = _spatial(args.input) if args.input else None
    rows = compare(
        backbone,
        attentions,
        input_size=size,
        batch_size=args.batch,
        num_classes=args.num_classes,
        device=args.device,
        threads=args.threads or None,
        warmup=args.warmup,
        repeats=args.repeats,
        memory=not args.no_memory,
        train=args.train,
        train_batch_size=args.train_batch,
        train_repeats=args.train_repeats,
        progress=not args.no_progress,
    )
    print(format_text_table(rows))
    written = write_comparison(rows, args.out)
    print("\nwrote " + ", ".join(str(p) for p in written.values()))
    return 0


def _add_measure_options(parser: argparse.ArgumentParser, repeats: int, warmup: int) -> None:
    parser.add_argument("--batch", type=int, default=1, help="inference batch size (1)")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (cpu)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--warmup", type=int, default=warmup, help=f"untimed runs ({warmup})")
    parser.add_argument("--repeats", type=int, default=repeats, help=f"timed runs ({repeats})")
    parser.add_argument(
        "--train", action="store_true", help="also time a training step and measure its memory"
    )
    parser.add_argument(
        "--train-batch",
        type=int,
        default=2,
        help="training-step batch (2: BatchNorm on pooled descriptors needs more than one sample)",
    )
    parser.add_argument("--train-repeats", type=int, default=3, help="timed training steps (3)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory passes")


def add_parser(subparsers: Any) -> None:
    """Register ``convattn profile`` and ``convattn compare``."""
    p = subparsers.add_parser(
        "profile",
        help="params, FLOPs/MACs, latency and memory of one model or one attention module",
        description="Profile a reference backbone (with an attention module), or one attention "
        "module alone with --channels.",
    )
    p.add_argument("--model", default="resnet50", help="backbone name (resnet50)")
    p.add_argument("--attention", default=None, help="registry key of the attention (none)")
    p.add_argument("--placement", default=None, help="override the paper placement")
    p.add_argument(
        "--channels", type=int, default=0, help="profile the attention module alone at C channels"
    )
    p.add_argument(
        "--input",
        type=_parse_size,
        default=None,
        help="SIZE or HxW (224; 32 for CIFAR; 56 with --channels)",
    )
    _add_measure_options(p, repeats=10, warmup=3)
    p.add_argument("--breakdown", action="store_true", help="per-module costs")
    p.add_argument("--depth", type=int, default=1, help="module depth of --breakdown (1)")
    p.add_argument("--json", action="store_true", help="print the profile as JSON")
    p.set_defaults(func=cmd_profile)

    p = subparsers.add_parser(
        "compare",
        help="a backbone against its attention variants: cost, overhead and published figures",
        description="Profile the plain backbone and each attention variant, print the table "
        "and write compare.md/.csv/.json/.png to --out.",
    )
    p.add_argument("--backbone", default="resnet50", help="backbone name (resnet50)")
    p.add_argument(
        "--attention",
        default=None,
        help="comma-separated registry keys (default for resnet50: "
        + ",".join(DEFAULT_ATTENTION["resnet"])
        + ")",
    )
    p.add_argument(
        "--input", type=_parse_size, default=None, help="SIZE or HxW (224; 32 for CIFAR)"
    )
    _add_measure_options(p, repeats=8, warmup=2)
    p.add_argument("--out", default="runs/compare", help="output folder (runs/compare)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compare)
