"""Shipping attention models: ONNX, TorchScript and ``torch.export`` with verification, and
the compatibility checks behind the README's matrix.

Export helpers (each writes atomically: a temporary file in the destination folder, verified,
then ``os.replace``; a failed export or verification leaves nothing at the destination):

- :func:`export_onnx`: ``torch.onnx.export`` (the dynamo exporter, opset >= 17) with a
  dynamic batch axis, verified with onnxruntime against eager at batch sizes 1 and 3;
- :func:`export_torchscript`: ``torch.jit.script`` (or ``trace``), verified after
  ``torch.jit.load``;
- :func:`export_program`: ``torch.export.export`` saved with ``torch.export.save``, verified
  after ``torch.export.load``.

Checks (:data:`CHECKS`), one function each, every one returning a :class:`CheckResult`:

=================  ===========================================================================
``script``         ``torch.jit.script`` output equals eager (fp32 tolerance)
``trace``          ``torch.jit.trace`` output equals eager, also at another batch size
``compile``        ``torch.compile(fullgraph=True)`` (no graph break) equals eager
``export``         ``torch.export.export`` with a dynamic batch axis equals eager (batch 1, 3)
``onnx``           ONNX (opset 18) + onnxruntime equal eager at batch 1 and 3
``fp16``/``bf16``  the module in half precision stays within :data:`HALF_TOLERANCES` of float32
                   on inputs of std 1, std 10, and std 3 with spikes of 300; finite; same dtype
``channels_last``  model and input in channels_last give the contiguous result
``deterministic``  with ``torch.use_deterministic_algorithms(True)``, forward and backward in
                   training mode run twice give bit-identical outputs and gradients
=================  ===========================================================================

All float32 comparisons use :data:`FP32_ATOL` / :data:`FP32_RTOL`.
:func:`compatibility_matrix` runs the checks for every registered mechanism (and, with
``full=True``, for every reference backbone with every mechanism) and
:func:`matrix_markdown` renders the table in the README (``convattn matrix``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convattn import registry

__all__ = [
    "BACKBONE_INPUT_SIZES",
    "CHECKS",
    "DEFAULT_OPSET",
    "FP32_ATOL",
    "FP32_RTOL",
    "HALF_TOLERANCES",
    "MATRIX_PATH",
    "CheckResult",
    "ExportReport",
    "ExportVerificationError",
    "add_parser",
    "backbone_attention_options",
    "build_backbone",
    "build_mechanism",
    "check_channels_last",
    "check_compile",
    "check_deterministic",
    "check_export",
    "check_half",
    "check_onnx",
    "check_script",
    "check_trace",
    "compatibility_matrix",
    "export_onnx",
    "export_program",
    "export_torchscript",
    "half_precision_error",
    "half_precision_inputs",
    "matrix_markdown",
    "randomize_parameters",
    "run_checks",
]

CHECKS = (
    "script",
    "trace",
    "compile",
    "export",
    "onnx",
    "fp16",
    "bf16",
    "channels_last",
    "deterministic",
)
# Float32 paths (TorchScript, compile, export, ONNX, channels_last) against eager.
FP32_ATOL = 1e-5
FP32_RTOL = 1e-4
# Half precision against float32 on the same (rounded) input: relative RMS error
# ||y - y32|| / ||y32|| and max error relative to the output scale max|y - y32| / max|y32|.
HALF_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float16: (1e-2, 5e-2),
    torch.bfloat16: (5e-2, 1.5e-1),
}
_HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_OPSET = 18
MIN_OPSET = 17
DEFAULT_COMPILE_BACKEND = "aot_eager"
MATRIX_PATH = Path(__file__).resolve().parent / "data" / "compat_matrix.json"
# Per-mechanism checks: create(name, C) on an (2, C, 8, 6) input.
MECHANISM_CHANNELS = 64
_MECHANISM_CHANNELS = {"shuffle": 128}  # its default groups=64 needs C % 128 == 0
MECHANISM_INPUT_HW = (8, 6)
# Image size of each backbone in the checks (small: the checks are about graphs, not accuracy).
BACKBONE_INPUT_SIZES = {"cifar": 32, "resnet": 64, "resnext": 64, "mobilenet": 64}
_SPIKE = 300.0


# --------------------------------------------------------------------------------------------
# Results and errors


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one check: ``status`` is ``"pass"``, ``"fail"`` or ``"n/a"`` (the combination
    does not exist, e.g. a mechanism without a placement in a backbone); ``detail`` gives the
    measured error for a pass and the reason otherwise."""

    status: str
    detail: str

    @property
    def ok(self) -> bool:
        return self.status == "pass"

    def to_json(self) -> dict[str, str]:
        return {"status": self.status, "detail": self.detail}


class ExportVerificationError(ValueError):
    """The exported artifact does not reproduce the eager model within tolerance."""


@dataclass
class ExportReport:
    """What an export wrote and how well the artifact reproduces eager."""

    path: Path
    format: str
    max_abs_error: dict[int, float] = field(default_factory=dict)  # batch size -> error
    verified: bool = False

    def summary(self) -> str:
        if not self.verified:
            return f"wrote {self.path} ({self.format}, not verified)"
        errors = ", ".join(f"batch {b}: {e:.2e}" for b, e in sorted(self.max_abs_error.items()))
        return f"wrote {self.path} ({self.format}); max abs error vs eager: {errors}"


# --------------------------------------------------------------------------------------------
# Small utilities


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' warnings and progress prints inside a check."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _outputs(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _outputs(v)]
    raise TypeError(f"convattn.export: model outputs must be tensors, got {type(value).__name__}")


def _max_error(
    actual: Any, expected: Any, atol: float = FP32_ATOL, rtol: float = FP32_RTOL
) -> float:
    """Max abs error between two outputs; raises AssertionError-free ValueError with the error
    when they differ by more than ``atol + rtol * |expected|`` anywhere."""
    got, want = _outputs(actual), _outputs(expected)
    if len(got) != len(want):
        raise ValueError(f"{len(got)} outputs instead of {len(want)}")
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        a, b = a.detach().float().cpu(), b.detach().float().cpu()
        if a.shape != b.shape:
            raise ValueError(f"output shape {tuple(a.shape)} instead of {tuple(b.shape)}")
        diff = (a - b).abs()
        err = float(diff.max()) if diff.numel() else 0.0
        if not bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all()):
            raise ValueError("non-finite outputs where eager is finite")
        if bool((diff > atol + rtol * b.abs()).any()):
            raise ValueError(f"outputs differ from eager: max abs error {err:.2e}")
        worst = max(worst, err)
    return worst


def _batch_like(example: torch.Tensor, batch: int, seed: int = 1) -> torch.Tensor:
    """A random input of ``batch`` samples with the example's trailing shape, dtype and scale."""
    generator = torch.Generator().manual_seed(seed + batch)
    scale = float(example.float().std()) if example.numel() > 1 else 1.0
    x = torch.randn((batch, *example.shape[1:]), generator=generator) * (scale or 1.0)
    return x.to(example.dtype)


@torch.no_grad()
def _eager(model: nn.Module, x: torch.Tensor) -> Any:
    return model(x)


def _check_example(function: str, example: object) -> torch.Tensor:
    if not isinstance(example, torch.Tensor):
        raise TypeError(f"{function}: example must be a torch.Tensor, got {type(example).__name__}")
    if example.dim() < 2 or example.shape[0] < 1:
        raise ValueError(
            f"{function}: example must be a batch (N, C, ...) with N >= 1, got shape "
            f"{tuple(example.shape)}"
        )
    return example


def _check_opset(function: str, opset: object) -> int:
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise TypeError(f"{function}: opset must be an int, got {type(opset).__name__}")
    if opset < MIN_OPSET:
        raise ValueError(f"{function}: opset must be >= {MIN_OPSET}, got {opset}")
    return opset


@contextlib.contextmanager
def _eval_copy(model: nn.Module) -> Iterator[nn.Module]:
    """The model itself in eval mode (its training flag restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _atomic_target(path: str | os.PathLike[str], function: str) -> Iterator[Path]:
    """A temporary path next to ``path``; moved onto ``path`` only if the block succeeds."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{function}: out must be a file path, got the directory {target}")
    if not target.parent.exists():
        raise ValueError(f"{function}: the folder {target.parent} does not exist")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def _dynamic_batch_shapes(example: torch.Tensor, dynamic_batch: bool) -> Any:
    if not dynamic_batch:
        return None
    return ({0: torch.export.Dim("batch", min=1, max=4096)},)


def _export_program(
    model: nn.Module, example: torch.Tensor, dynamic_batch: bool = True
) -> torch.export.ExportedProgram:
    if dynamic_batch and example.shape[0] == 1:
        # torch.export specialises dimensions of size 1; trace with two samples instead.
        example = torch.cat([example, example])
    with _quiet():
        return torch.export.export(
            model, (example,), dynamic_shapes=_dynamic_batch_shapes(example, dynamic_batch)
        )


# --------------------------------------------------------------------------------------------
# Export helpers


def _verify_batches(
    run: Callable[[torch.Tensor], Any],
    model: nn.Module,
    example: torch.Tensor,
    batches: Sequence[int],
    atol: float,
    rtol: float,
    what: str,
) -> dict[int, float]:
    errors: dict[int, float] = {}
    for batch in batches:
        x = _batch_like(example, batch)
        try:
            errors[batch] = _max_error(run(x), _eager(model, x), atol, rtol)
        except ValueError as exc:
            raise ExportVerificationError(
                f"{what} does not reproduce eager at batch size {batch} (atol {atol:g}, "
                f"rtol {rtol:g}): {exc}"
            ) from exc
    return errors


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    example: torch.Tensor,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    verify: bool = True,
    verify_batches: Sequence[int] = (1, 3),
    atol: float = FP32_ATOL,
    rtol: float = FP32_RTOL,
) -> ExportReport:
    """Export ``model`` (in eval mode) to ONNX at ``path`` and check it with onnxruntime.

    Uses the dynamo-based ``torch.onnx.export`` with opset ``opset`` (>= 17). With
    ``dynamic_batch`` the first axis of the input and outputs is symbolic (``batch``). With
    ``verify`` the file is run by onnxruntime at each batch size of ``verify_batches``
    (random inputs shaped like ``example``) and compared with eager within ``atol + rtol * |y|``;
    a mismatch raises :class:`ExportVerificationError` and nothing is written at ``path``.
    """
    example = _check_example("export_onnx", example)
    opset = _check_opset("export_onnx", opset)
    if not dynamic_batch:
        verify_batches = (example.shape[0],)
    report = ExportReport(Path(path), "onnx")
    with _eval_copy(model) as net, _atomic_target(path, "export_onnx") as tmp:
        program = _export_program(net, example, dynamic_batch)
        with _quiet():
            onnx_program = torch.onnx.export(
                program, (example,), dynamo=True, opset_version=opset, external_data=False
            )
            if onnx_program is None:  # pragma: no cover - the dynamo exporter returns it
                raise RuntimeError("export_onnx: torch.onnx.export returned no program")
            onnx_program.save(str(tmp))
        if verify:
            run = _onnxruntime_runner(tmp)
            report.max_abs_error = _verify_batches(
                run, net, example, verify_batches, atol, rtol, "the ONNX model"
            )
            report.verified = True
    return report


def _onnxruntime_runner(path: Path) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - exercised only without the export extra
        raise ImportError(
            "ONNX verification needs onnxruntime: pip install 'convattn[export]'"
        ) from exc
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        outputs = session.run(None, {input_name: x.detach().cpu().numpy()})
        return [torch.from_numpy(o) for o in outputs]

    return run


def export_torchscript(
    model: nn.Module,
    path: str | os.PathLike[str],
    example: torch.Tensor,
    *,
    method: str = "script",
    verify: bool = True,
    verify_batches: Sequence[int] = (1, 3),
    atol: float = FP32_ATOL,
    rtol: float = FP32_RTOL,
) -> ExportReport:
    """Save ``model`` (in eval mode) as TorchScript at ``path`` (``method`` ``"script"`` or
    ``"trace"``), reload it with ``torch.jit.load`` and compare with eager at each batch size
    of ``verify_batches``; a mismatch raises :class:`ExportVerificationError` and nothing is
    written at ``path``."""
    example = _check_example("export_torchscript", example)
    if method not in ("script", "trace"):
        raise ValueError(f"export_torchscript: method must be 'script' or 'trace', got {method!r}")
    report = ExportReport(Path(path), f"torchscript ({method})")
    with _eval_copy(model) as net, _atomic_target(path, "export_torchscript") as tmp:
        with _quiet(), torch.no_grad():
            scripted = (
                torch.jit.script(net) if method == "script" else torch.jit.trace(net, example)
            )
            torch.jit.save(scripted, str(tmp))
        if verify:
            loaded = torch.jit.load(str(tmp))
            with torch.no_grad():
                report.max_abs_error = _verify_batches(
                    loaded, net, example, verify_batches, atol, rtol, "the TorchScript module"
                )
            report.verified = True
    return report


def export_program(
    model: nn.Module,
    path: str | os.PathLike[str],
    example: torch.Tensor,
    *,
    dynamic_batch: bool = True,
    verify: bool = True,
    verify_batches: Sequence[int] = (1, 3),
    atol: float = FP32_ATOL,
    rtol: float = FP32_RTOL,
) -> ExportReport:
    """``torch.export.export`` the model (in eval mode, dynamic batch axis by default), save the
    program with ``torch.export.save`` (``.pt2``), reload it and compare with eager."""
    example = _check_example("export_program", example)
    if not dynamic_batch:
        verify_batches = (example.shape[0],)
    report = ExportReport(Path(path), "torch.export")
    with _eval_copy(model) as net, _atomic_target(path, "export_program") as tmp:
        program = _export_program(net, example, dynamic_batch)
        with _quiet():
            torch.export.save(program, str(tmp))
        if verify:
            loaded = torch.export.load(str(tmp)).module()
            with torch.no_grad():
                report.max_abs_error = _verify_batches(
                    loaded, net, example, verify_batches, atol, rtol, "the exported program"
                )
            report.verified = True
    return report


# --------------------------------------------------------------------------------------------
# Building what the checks run on


@torch.no_grad()
def randomize_parameters(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every constant-initialised parameter and normalisation statistic random values,
    in place, so that zero-initialised branches (residual scales at 0, zero last convs, BN
    scale 0) take part in the computation: norm layers get weights in [0.5, 1.5), biases and
    running means N(0, 0.1), running variances in [0.5, 2); any other parameter whose entries
    are all equal gets N(0, 1/fan_in) (matrices) or N(0, 0.5) (vectors, scalars) noise added.
    Randomly initialised weights are kept. Returns ``module``."""
    generator = torch.Generator().manual_seed(seed)

    def noise(shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=generator)

    handled: set[int] = set()
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            running_mean, running_var = m.running_mean, m.running_var
            if isinstance(running_mean, torch.Tensor) and isinstance(running_var, torch.Tensor):
                running_mean.copy_(0.1 * noise(running_mean.shape))
                running_var.copy_(0.5 + 1.5 * torch.rand(running_var.shape, generator=generator))
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
            weight, bias = m.weight, m.bias
            if isinstance(weight, torch.Tensor):
                weight.copy_(0.5 + torch.rand(weight.shape, generator=generator))
                handled.add(id(weight))
            if isinstance(bias, torch.Tensor):
                bias.copy_(0.1 * noise(bias.shape))
                handled.add(id(bias))
    for param in module.parameters():
        if id(param) in handled or param.numel() == 0:
            continue
        if param.numel() == 1 or bool((param == param.flatten()[0]).all()):
            std = 1 / math.sqrt(param[0].numel()) if param.dim() >= 2 else 0.5
            param.add_(std * noise(param.shape))
    return module


def build_mechanism(
    name: str, *, channels: int | None = None, seed: int = 0
) -> tuple[nn.Module, torch.Tensor]:
    """``create(name, C)`` in eval mode with :func:`randomize_parameters`, and its check input
    ``(2, C, 8, 6)`` (C = 64, 128 for ``shuffle``)."""
    spec = registry.info(name)
    if channels is None:
        channels = _MECHANISM_CHANNELS.get(spec.name, MECHANISM_CHANNELS)
    torch.manual_seed(seed)
    module = randomize_parameters(registry.create(spec.name, channels), seed).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    example = torch.randn((2, channels, *MECHANISM_INPUT_HW), generator=generator)
    return module, example


def backbone_attention_options(model: str, attention: str | None) -> dict[str, Any]:
    """Options a mechanism needs to fit a backbone's widths (group counts that divide the
    channels); the paper defaults otherwise."""
    if attention is None:
        return {}
    key = registry.info(attention).name
    if model.startswith("cifar"):  # widths 16, 32, 64
        table: dict[str, dict[str, Any]] = {
            "sk": {"groups": 1},
            "shuffle": {"groups": 4},
            "sge": {"groups": 8},
            "ema": {"groups": 8},
            "attnpool": {"num_heads": 4},
        }
    elif model.startswith("mobilenet"):  # widths 16, 24, 32, 96, 144, ... 1280
        table = {
            "shuffle": {"groups": 4},
            "sge": {"groups": 8},
            "ema": {"groups": 8},
            "fca": {"freq_sel_method": "top8"},
        }
    else:  # ImageNet ResNets: widths 64 ... 2048
        table = {"shuffle": {"groups": 32}}
    return dict(table.get(key, {}))


def _input_size(model: str) -> int:
    for prefix, size in BACKBONE_INPUT_SIZES.items():
        if model.startswith(prefix):
            return size
    return 64


def build_backbone(
    model: str, attention: str | None, *, seed: int = 0, batch: int = 2
) -> tuple[nn.Module, torch.Tensor]:
    """A reference backbone with ``attention`` (at its paper placement, with
    :func:`backbone_attention_options`) in eval mode with :func:`randomize_parameters`, and an
    input batch at :data:`BACKBONE_INPUT_SIZES`. Raises ValueError where the mechanism has no
    placement in the backbone."""
    from convattn import models

    torch.manual_seed(seed)
    options = backbone_attention_options(model, attention)
    net = models.create_model(model, attention=attention, attention_options=options or None)
    net = randomize_parameters(net, seed).eval()
    size = _input_size(model)
    generator = torch.Generator().manual_seed(seed + 1)
    return net, torch.randn((batch, 3, size, size), generator=generator)


# --------------------------------------------------------------------------------------------
# The checks


def _guarded(check: Callable[[], str]) -> CheckResult:
    try:
        return CheckResult("pass", check())
    except Exception as exc:
        return CheckResult("fail", _first_line(exc))


def check_script(model: nn.Module, example: torch.Tensor) -> CheckResult:
    """``torch.jit.script(model)`` reproduces eager on ``example`` and on a batch of 1."""

    def run() -> str:
        with _quiet(), torch.no_grad():
            scripted = torch.jit.script(model)
            err = max(
                _max_error(scripted(x), _eager(model, x))
                for x in (example, _batch_like(example, 1))
            )
        return f"max abs error {err:.1e}"

    return _guarded(run)


def check_trace(model: nn.Module, example: torch.Tensor) -> CheckResult:
    """``torch.jit.trace(model, example)`` reproduces eager on ``example`` and on batches of 1
    and 3 (a trace that froze the batch size fails)."""

    def run() -> str:
        with _quiet(), torch.no_grad():
            traced = torch.jit.trace(model, example, check_trace=False)
            err = max(
                _max_error(traced(x), _eager(model, x))
                for x in (example, _batch_like(example, 1), _batch_like(example, 3))
            )
        return f"max abs error {err:.1e}"

    return _guarded(run)


def check_compile(
    model: nn.Module, example: torch.Tensor, backend: str = DEFAULT_COMPILE_BACKEND
) -> CheckResult:
    """``torch.compile(model, fullgraph=True, backend=backend)`` compiles without a graph
    break and reproduces eager."""

    def run() -> str:
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        with _quiet(), torch.no_grad():
            err = _max_error(compiled(example), _eager(model, example))
        torch._dynamo.reset()
        return f"max abs error {err:.1e} (backend {backend})"

    return _guarded(run)


def check_export(model: nn.Module, example: torch.Tensor) -> CheckResult:
    """``torch.export.export`` with a dynamic batch axis; the program reproduces eager on
    ``example`` and on batches of 1 and 3."""

    def run() -> str:
        program = _export_program(model, example, dynamic_batch=True).module()
        with _quiet(), torch.no_grad():
            err = max(
                _max_error(program(x), _eager(model, x))
                for x in (example, _batch_like(example, 1), _batch_like(example, 3))
            )
        return f"max abs error {err:.1e}"

    return _guarded(run)


def check_onnx(model: nn.Module, example: torch.Tensor, opset: int = DEFAULT_OPSET) -> CheckResult:
    """:func:`export_onnx` (dynamic batch axis) verified by onnxruntime at batch 1 and 3."""

    def run() -> str:
        with tempfile.TemporaryDirectory() as folder:
            report = export_onnx(model, Path(folder) / "model.onnx", example, opset=opset)
        err = max(report.max_abs_error.values())
        return f"max abs error {err:.1e} (opset {opset}, batch 1 and 3)"

    return _guarded(run)


def half_precision_inputs(example: torch.Tensor, seed: int = 0) -> list[torch.Tensor]:
    """The inputs of the half-precision checks, shaped like ``example``: std 1, std 10, and
    std 3 with every 97th value set to 300 (activation spikes that overflow float16 when
    squared or summed)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(example.shape, generator=generator)
    spiky = 3 * torch.randn(example.shape, generator=generator)
    spiky.view(-1)[::97] = _SPIKE
    return [base, 10 * base, spiky]


def half_precision_error(
    model: nn.Module, x: torch.Tensor, dtype: torch.dtype
) -> tuple[float, float]:
    """(relative RMS error, max error / max |y|) of ``model`` run in ``dtype`` against the same
    model in float32 on the same input rounded to ``dtype``. Raises ValueError on non-finite
    outputs or an output dtype other than ``dtype``."""
    rounded = x.to(dtype)
    with torch.no_grad():
        reference = copy.deepcopy(model).float()(rounded.float())
        half_model = copy.deepcopy(model).to(dtype)
        outputs = _outputs(half_model(rounded))
    rms, worst = 0.0, 0.0
    for out, ref in zip(outputs, _outputs(reference), strict=True):
        if out.dtype != dtype:
            raise ValueError(f"output dtype {out.dtype} for a {dtype} input")
        if not bool(torch.isfinite(out).all()):
            raise ValueError(f"non-finite outputs in {dtype} (overflow)")
        diff = out.float() - ref
        rms = max(rms, float(diff.norm() / ref.norm().clamp_min(1e-12)))
        worst = max(worst, float(diff.abs().max() / ref.abs().max().clamp_min(1e-12)))
    return rms, worst


def check_half(
    model: nn.Module, example: torch.Tensor, dtype: torch.dtype, *, stress: bool = True
) -> CheckResult:
    """The model in ``dtype`` (float16 or bfloat16) stays within :data:`HALF_TOLERANCES` of
    float32, with finite outputs of the same dtype, on :func:`half_precision_inputs` (feature
    maps of realistic magnitude, ``stress=True``) or on ``example`` alone (``stress=False``:
    the backbone rows, whose input is an image)."""
    if dtype not in HALF_TOLERANCES:
        raise ValueError(f"check_half: dtype must be float16 or bfloat16, got {dtype}")
    rms_tol, max_tol = HALF_TOLERANCES[dtype]

    def run() -> str:
        rms, worst = 0.0, 0.0
        for x in half_precision_inputs(example) if stress else [example]:
            r, w = half_precision_error(model, x, dtype)
            rms, worst = max(rms, r), max(worst, w)
        if rms > rms_tol or worst > max_tol:
            raise ValueError(
                f"error vs float32 too large: relative RMS {rms:.1e} (tolerance {rms_tol:g}), "
                f"max/scale {worst:.1e} (tolerance {max_tol:g})"
            )
        return f"relative RMS {rms:.1e}, max/scale {worst:.1e}"

    return _guarded(run)


def check_channels_last(model: nn.Module, example: torch.Tensor) -> CheckResult:
    """Model and input in ``torch.channels_last`` give the contiguous result."""

    def run() -> str:
        if example.dim() != 4:
            raise ValueError(f"channels_last needs a 4-D input, got {example.dim()}-D")
        reference = _eager(model, example)
        converted = copy.deepcopy(model).to(memory_format=torch.channels_last)
        x = example.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            err = _max_error(converted(x), reference)
        return f"max abs error {err:.1e}"

    return _guarded(run)


def check_deterministic(model: nn.Module, example: torch.Tensor) -> CheckResult:
    """Under ``torch.use_deterministic_algorithms(True)``, forward and backward in training
    mode, run twice from the same state, give bit-identical outputs and gradients."""

    def once() -> list[torch.Tensor]:
        net = copy.deepcopy(model).train()
        x = example.clone().requires_grad_(True)
        outputs = _outputs(net(x))
        generator = torch.Generator().manual_seed(0)
        loss = torch.zeros(())
        for o in outputs:
            loss = loss + (o * torch.randn(o.shape, generator=generator)).sum()
        params = [p for p in net.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, [x, *params], allow_unused=True)
        return [o.detach() for o in outputs] + [g for g in grads if g is not None]

    def run() -> str:
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            first, second = once(), once()
        finally:
            torch.use_deterministic_algorithms(previous)
        if len(first) != len(second) or not all(
            torch.equal(a, b) for a, b in zip(first, second, strict=True)
        ):
            raise ValueError("two runs gave different outputs or gradients")
        return f"{len(first)} tensors bit-identical"

    return _guarded(run)


def run_checks(
    model: nn.Module,
    example: torch.Tensor,
    checks: Sequence[str] = CHECKS,
    *,
    compile_backend: str = DEFAULT_COMPILE_BACKEND,
    opset: int = DEFAULT_OPSET,
    half_stress: bool = True,
) -> dict[str, CheckResult]:
    """Run the named checks (a subset of :data:`CHECKS`) on ``model`` with ``example``
    (``half_stress``: see :func:`check_half`)."""
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        raise ValueError(f"run_checks: unknown checks {unknown}; valid: {list(CHECKS)}")
    results: dict[str, CheckResult] = {}
    for check in checks:
        if check == "script":
            results[check] = check_script(model, example)
        elif check == "trace":
            results[check] = check_trace(model, example)
        elif check == "compile":
            results[check] = check_compile(model, example, compile_backend)
        elif check == "export":
            results[check] = check_export(model, example)
        elif check == "onnx":
            results[check] = check_onnx(model, example, opset)
        elif check in _HALF_DTYPES:
            results[check] = check_half(model, example, _HALF_DTYPES[check], stress=half_stress)
        elif check == "channels_last":
            results[check] = check_channels_last(model, example)
        else:
            results[check] = check_deterministic(model, example)
    return results


# --------------------------------------------------------------------------------------------
# The compatibility matrix


def _settings(
    full: bool, checks: Sequence[str], compile_backend: str, opset: int
) -> dict[str, Any]:
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:  # pragma: no cover - exercised only without the export extra
        ort_version = "not installed"
    return {
        "full": full,
        "checks": list(checks),
        "mechanism_input": f"(2, C, {MECHANISM_INPUT_HW[0]}, {MECHANISM_INPUT_HW[1]}), C = "
        f"{MECHANISM_CHANNELS} ({', '.join(f'{k}: {v}' for k, v in _MECHANISM_CHANNELS.items())})",
        "backbone_input": ", ".join(f"{k}*: {v}x{v}" for k, v in BACKBONE_INPUT_SIZES.items()),
        "compile_backend": compile_backend,
        "opset": opset,
        "fp32_tolerance": {"atol": FP32_ATOL, "rtol": FP32_RTOL},
        "half_tolerance": {
            str(dtype).removeprefix("torch."): {"relative_rms": rms, "max_over_scale": mx}
            for dtype, (rms, mx) in HALF_TOLERANCES.items()
        },
        "torch": torch.__version__.split("+")[0],
        "onnxruntime": ort_version,
    }


def compatibility_matrix(
    *,
    full: bool = False,
    mechanisms: Sequence[str] | None = None,
    models: Sequence[str] | None = None,
    checks: Sequence[str] = CHECKS,
    compile_backend: str = DEFAULT_COMPILE_BACKEND,
    opset: int = DEFAULT_OPSET,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the checks and return the matrix as JSON-able data.

    Rows are the registered mechanisms (:func:`build_mechanism`); with ``full`` also every
    reference backbone (``models``, default all) with every mechanism and without attention,
    keyed ``"model/mechanism"`` (:func:`build_backbone`; a mechanism with no placement in a
    backbone gets ``n/a`` cells with the reason).
    """
    from convattn import models as model_zoo

    names = list(mechanisms) if mechanisms is not None else registry.list_attention()
    rows: dict[str, dict[str, dict[str, str]]] = {}

    def record(
        key: str, build: Callable[[], tuple[nn.Module, torch.Tensor]], stress: bool = True
    ) -> None:
        start = time.perf_counter()
        try:
            model, example = build()
        except (ValueError, TypeError) as exc:
            reason = _first_line(exc)
            rows[key] = {c: CheckResult("n/a", reason).to_json() for c in checks}
        else:
            results = run_checks(
                model,
                example,
                checks,
                compile_backend=compile_backend,
                opset=opset,
                half_stress=stress,
            )
            rows[key] = {c: r.to_json() for c, r in results.items()}
        if progress is not None:
            failed = [c for c, r in rows[key].items() if r["status"] != "pass"]
            state = "ok" if not failed else f"not passed: {', '.join(failed)}"
            progress(f"{key}: {state} ({time.perf_counter() - start:.1f} s)")

    for name in names:
        record(name, functools.partial(build_mechanism, name))
    if full:
        for model in list(models) if models is not None else model_zoo.list_models():
            for attention in [None, *names]:
                key = f"{model}/{attention or 'none'}"
                record(key, functools.partial(build_backbone, model, attention), stress=False)
    return {"settings": _settings(full, checks, compile_backend, opset), "rows": rows}


_SYMBOLS = {"pass": "✓", "fail": "✗", "n/a": "–"}


def matrix_markdown(data: Mapping[str, Any]) -> str:
    """The Markdown table of a :func:`compatibility_matrix` result: one row per mechanism (or
    backbone/mechanism), one column per check, ✓ / ✗ / – (not applicable) cells, and a
    numbered note with the reason for every cell that is not ✓."""
    settings = data["settings"]
    rows: Mapping[str, Mapping[str, Mapping[str, str]]] = data["rows"]
    checks = list(settings["checks"])
    lines = [
        "| mechanism | " + " | ".join(f"`{c}`" for c in checks) + " |",
        "|---|" + "---|" * len(checks),
    ]
    notes: dict[str, list[str]] = {}  # reason -> the cells it explains, in order
    for key, cells in rows.items():
        row = []
        for check in checks:
            cell = cells.get(check, {"status": "n/a", "detail": "not run"})
            symbol = _SYMBOLS[cell["status"]]
            if cell["status"] != "pass":
                reason = cell["detail"].replace("|", "/")
                notes.setdefault(reason, []).append(f"`{key}` {check}")
                symbol += f" ({list(notes).index(reason) + 1})"
            row.append(symbol)
        lines.append(f"| `{key}` | " + " | ".join(row) + " |")
    half = settings["half_tolerance"]
    lines += [
        "",
        f"Checks run by `convattn matrix{' --full' if settings['full'] else ''}` with torch "
        f"{settings['torch']} and onnxruntime {settings['onnxruntime']} on the CPU. Input "
        f"{settings['mechanism_input']}, parameters and BN statistics randomised so that "
        "zero-initialised branches take part. `script`, `trace`, `export` (dynamic batch), "
        f"`onnx` (opset {settings['opset']}, dynamic batch, onnxruntime at batch 1 and 3) and "
        "`channels_last` match eager within atol "
        f"{settings['fp32_tolerance']['atol']:g} + rtol {settings['fp32_tolerance']['rtol']:g}; "
        f"`compile` is `torch.compile(fullgraph=True)` with backend `{settings['compile_backend']}` "
        "(no graph break, same outputs); `fp16` / `bf16` run the module in half precision on "
        "inputs of std 1, std 10 and std 3 with spikes of 300 (backbone rows: the image input) "
        "and stay finite within a relative "
        f"RMS error of {half['float16']['relative_rms']:g} / {half['bfloat16']['relative_rms']:g} "
        f"and a max error of {half['float16']['max_over_scale']:g} / "
        f"{half['bfloat16']['max_over_scale']:g} of the output scale against float32; "
        "`deterministic`: forward and backward under `torch.use_deterministic_algorithms(True)` "
        "are bit-identical across runs.",
    ]
    if notes:
        lines += ["", "Limitations (cells not ✓, with the reason):", ""]
        for i, (reason, where) in enumerate(notes.items(), 1):
            lines.append(f"{i}. {', '.join(where)}: {reason}")
    else:
        lines += ["", "No limitations: every mechanism passes every check."]
    return "\n".join(lines)


def load_matrix(path: str | os.PathLike[str] = MATRIX_PATH) -> dict[str, Any]:
    """The stored matrix (``src/convattn/data/compat_matrix.json`` by default)."""
    with open(path, encoding="utf-8") as handle:
        data: dict[str, Any] = json.load(handle)
    return data


def _write_text_atomic(path: Path, text: str) -> None:
    with _atomic_target(path, "convattn matrix") as tmp:
        tmp.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Command line

_FORMATS = ("onnx", "torchscript", "exported")


def cmd_export(args: argparse.Namespace) -> int:
    from convattn import models

    if args.input_size < 1:
        raise ValueError(f"convattn export: --input-size must be >= 1, got {args.input_size}")
    if args.batch < 1:
        raise ValueError(f"convattn export: --batch must be >= 1, got {args.batch}")
    options = json.loads(args.options) if args.options else None
    if options is not None and not isinstance(options, dict):
        raise ValueError("convattn export: --options must be a JSON object")
    net = models.create_model(
        args.model, attention=args.attention, attention_options=options, placement=args.placement
    ).eval()
    if args.weights:
        state = torch.load(args.weights, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        net.load_state_dict(state)
    generator = torch.Generator().manual_seed(0)
    example = torch.randn((args.batch, 3, args.input_size, args.input_size), generator=generator)
    start = time.perf_counter()
    try:
        if args.format == "onnx":
            report = export_onnx(net, args.out, example, opset=args.opset)
        elif args.format == "torchscript":
            report = export_torchscript(net, args.out, example, method=args.method)
        else:
            report = export_program(net, args.out, example)
    except ExportVerificationError as exc:
        print(f"convattn export: verification failed, nothing written: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # the exporters raise many types; report them cleanly
        if isinstance(exc, (ValueError, TypeError)):
            raise
        print(
            f"convattn export: export failed, nothing written: {_first_line(exc)}", file=sys.stderr
        )
        return 1
    name = f"{args.model}" + (f" + {args.attention}" if args.attention else "")
    print(f"{name}: {report.summary()} [{time.perf_counter() - start:.1f} s]")
    return 0


def cmd_matrix(args: argparse.Namespace) -> int:
    mechanisms = args.mechanisms.split(",") if args.mechanisms else None
    models_ = args.models.split(",") if args.models else None
    checks = args.checks.split(",") if args.checks else list(CHECKS)
    progress = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    data = compatibility_matrix(
        full=args.full,
        mechanisms=mechanisms,
        models=models_,
        checks=checks,
        compile_backend=args.compile_backend,
        opset=args.opset,
        progress=progress,
    )
    markdown = matrix_markdown(data)
    if args.json:
        _write_text_atomic(Path(args.json), json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    if args.out:
        _write_text_atomic(Path(args.out), markdown + "\n")
        print(f"wrote {args.out}")
    else:
        print(markdown)
    failed = sum(
        1 for cells in data["rows"].values() for c in cells.values() if c["status"] == "fail"
    )
    return 1 if failed and args.strict else 0


def add_parser(subparsers: Any) -> None:
    """Register ``convattn export`` and ``convattn matrix``."""
    p = subparsers.add_parser(
        "export",
        help="export a reference backbone to ONNX, TorchScript or torch.export, verified",
        description="Build a backbone (with an attention module), export it atomically and "
        "verify the file against eager (onnxruntime at batch 1 and 3 for ONNX, torch.jit.load "
        "for TorchScript, torch.export.load for exported programs).",
    )
    p.add_argument("--model", default="resnet50", help="backbone name (resnet50)")
    p.add_argument("--attention", default=None, help="registry key of the attention (none)")
    p.add_argument("--placement", default=None, help="override the paper placement")
    p.add_argument("--options", default=None, help="attention options as a JSON object")
    p.add_argument("--weights", default=None, help="state dict to load (torch.save file)")
    p.add_argument("--format", choices=_FORMATS, default="onnx")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--input-size", type=int, default=224, help="image side of the example (224)")
    p.add_argument("--batch", type=int, default=1, help="batch of the example input (1)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset ({DEFAULT_OPSET})")
    p.add_argument(
        "--method", choices=("script", "trace"), default="script", help="TorchScript method"
    )
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser(
        "matrix",
        help="run the export/precision/layout checks and print the compatibility matrix",
        description="Run every check (script, trace, compile, export, onnx, fp16, bf16, "
        "channels_last, deterministic) for every mechanism and print the Markdown matrix; "
        "--full adds every reference backbone with every mechanism (slow: hours on 2 cores).",
    )
    p.add_argument("--full", action="store_true", help="also every backbone x mechanism")
    p.add_argument("--mechanisms", default=None, help="comma-separated registry keys (all)")
    p.add_argument("--models", default=None, help="comma-separated backbones for --full (all)")
    p.add_argument("--checks", default=None, help=f"comma-separated subset of {','.join(CHECKS)}")
    p.add_argument(
        "--compile-backend",
        default=DEFAULT_COMPILE_BACKEND,
        help=f"torch.compile backend of the compile check ({DEFAULT_COMPILE_BACKEND})",
    )
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset ({DEFAULT_OPSET})")
    p.add_argument("--out", default=None, help="write the Markdown here instead of stdout")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    p.add_argument("--quiet", action="store_true", help="no per-row progress on stderr")
    p.add_argument("--strict", action="store_true", help="exit 1 when any check fails")
    p.set_defaults(func=cmd_matrix)
