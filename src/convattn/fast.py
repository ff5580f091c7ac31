"""Fast paths for attention inside the reference backbones, and :func:`optimize`.

Every fast path computes the same function as the plain code (outputs and gradients equal
within float32 rounding) and is taken only in eager mode: never while scripting, tracing,
exporting or compiling, never under autocast (whose casting policy applies to the modules'
calls), never when a hook is registered on a module it bypasses (so
:func:`convattn.capture` and user hooks see what they always saw), and never for modules it
does not know. Attention gates (the ``gate*`` submodules) are always called with the gate
logits.

Inference (no autograd graph), ResNet blocks with block-end attention:

- channel / spatial attention (SE, ECA, cSE, sSE, generic channel / spatial): the gate is
  applied together with the residual add and the ReLU, ``relu(addcmul(identity, x, g))``,
  one pass over the feature map instead of three;
- CBAM: the channel gate's product, then the spatial gate fused with residual and ReLU;
- GC with ``add`` fusion: ``relu(x + identity + t)``, and after an eval-mode BatchNorm that
  BatchNorm folded in (scores and context from its input, ``t`` added to its bias), so that
  neither the BatchNorm's output nor ``x + t`` is written out separately;
- the gates themselves without module calls (known layer types, no hooks on them), the
  result written into the last BatchNorm's output instead of a new tensor.

Training (autograd on), ResNet blocks with SE / ECA-style attention (average-pooled channel
gate) after a training-mode BatchNorm: :class:`BNGateResidualReLU` applies
``relu(BN(c) * g + identity)`` saving only ``c`` (which the BatchNorm saves anyway), the
per-channel statistics, the small gate and the block output, which it writes into the
BatchNorm's output (as the plain block adds the residual in place); the gate's gradient comes
from ``c`` and the statistics in one pass, without rebuilding ``BN(c)``: one full feature map
per block less than the plain graph keeps.

Native kernels (:mod:`convattn._native`: plain C compiled with the system's compiler on
first use, run in PyTorch's OpenMP thread pool) take over where they apply, float32
contiguous CPU maps and the standard layers: in inference the whole tail of SE, ECA, cSE,
scSE, CBAM and GC after an eval-mode BatchNorm (which they fold in) is one call per block;
in training the tails of SE / ECA (:class:`_SeTailNative`) and CBAM
(:class:`_CbamTailNative`) after a batch-statistics BatchNorm make two to four passes over
the map in each direction, recomputing ``BN(c)`` from ``c`` in registers, where the PyTorch
operations above make up to forty. Their excitation MLPs and convolutions stay the
modules' own. ``set_fast_paths(model, native=False)``, ``CONVATTN_NATIVE=0`` or a machine
without a C compiler keep the PyTorch fast paths.

Blocks without attention add the residual in place into the last BatchNorm's output (as
torchvision does) in training; in inference with the native kernels their tail is one pass
too, ``relu(BN(y) + identity)`` with the BatchNorm folded (``residual_eval.c``), so that the
plain backbone that attention's overhead is measured against ends its blocks as cheaply as
the attention kernels end theirs, and the overhead is the attention's own. Where the map
entering that BatchNorm was made by a plain unhooked convolution, every inference tail
writes its result into that map.

Layer files and blocks route through :func:`block_forward`; :func:`optimize` switches the
fast paths on or off, converts to channels_last and wraps in ``torch.compile`` on request.
"""

from __future__ import annotations

import ctypes
import itertools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
import torch.nn.functional as F
from torch import nn

from convattn import _native as _kernels
from convattn.layers._helpers import eager_mode, mean_amax_backward
from convattn.layers.cbam import CBAM
from convattn.layers.channel import ChannelAttention
from convattn.layers.gc import GlobalContext
from convattn.layers.scse import ChannelSpatialSE, SpatialSE
from convattn.layers.spatial import SpatialAttention

if TYPE_CHECKING:
    from convattn.models.resnet import _Block

__all__ = [
    "BNGateResidualReLU",
    "block_forward",
    "fast_paths_active",
    "gate_residual_relu",
    "optimize",
    "set_fast_paths",
    "single_output_conv2d",
]


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or getattr(module, "_backward_pre_hooks", None)
    )


def _any_hooks(*modules: nn.Module | None) -> bool:
    return any(m is not None and _has_hooks(m) for m in modules)


def _global_hooks() -> bool:
    from torch.nn.modules import module as module_mod

    return bool(
        module_mod._global_forward_hooks
        or module_mod._global_forward_pre_hooks
        or module_mod._global_backward_hooks
        or getattr(module_mod, "_global_backward_pre_hooks", None)
    )


def _autocast_device_types() -> tuple[str, ...] | None:
    """The device types that ``torch.is_autocast_enabled(device_type)`` answers for, or None
    for a torch before 2.4 (whose ``is_autocast_enabled()`` takes no argument)."""
    known = []
    for device_type in ("cpu", "cuda", "xpu", "mps"):
        try:
            torch.is_autocast_enabled(device_type)
        except TypeError:
            return None
        except RuntimeError:  # a device type this build does not know
            continue
        known.append(device_type)
    return tuple(known)


_AUTOCAST_DEVICE_TYPES = _autocast_device_types()


def _autocast_enabled() -> bool:
    """Whether autocast is on for any device type (the fast paths call operations directly,
    some with ``out=``, which autocast's casting policy would not treat as it treats the
    modules' calls)."""
    if _AUTOCAST_DEVICE_TYPES is None:
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()
    return any(torch.is_autocast_enabled(d) for d in _AUTOCAST_DEVICE_TYPES)


def fast_paths_active(*modules: nn.Module, under_compile: bool = False) -> bool:
    """Whether a fast path may replace the plain calls of ``modules`` now: eager mode (not
    scripting, tracing, exporting, FX tracing or, unless ``under_compile``, compiling), no
    autocast, and no hooks on any of them (nor global module hooks)."""
    if not eager_mode(under_compile=under_compile):
        return False
    if _autocast_enabled():
        return False
    if _global_hooks():
        return False
    return not _any_hooks(*modules)


def gate_residual_relu(
    x: torch.Tensor, gate: torch.Tensor, identity: torch.Tensor, *, inplace: bool = False
) -> torch.Tensor:
    """``relu(x * gate + identity)`` in one pass (``gate`` broadcasts against ``x``).

    Differentiable through autograd like the plain expression; the fused single-pass form is
    used when no gradient is recorded, written into ``x`` when ``inplace`` (for an ``x`` that
    the caller made and nothing else holds)."""
    if torch.is_grad_enabled() and (
        x.requires_grad or gate.requires_grad or identity.requires_grad
    ):
        return torch.relu(x * gate + identity)
    if identity.shape == x.shape:
        out = torch.addcmul(identity, x, gate, out=x if inplace else None)
    else:
        out = x * gate + identity
    return out.relu_()


def _bn_affine(
    weight: torch.Tensor | None, bias: torch.Tensor | None, mean: torch.Tensor, invstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``scale, shift`` with ``BN(c) = c * scale + shift``."""
    scale = invstd if weight is None else invstd * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


def _scale_shift(c: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``c * scale + shift`` for per-channel ``scale`` and ``shift`` (differentiable): a
    multiply and an in-place add, 2-3x faster on the CPU than ``addcmul(shift, c, scale)``,
    whose broadcast first operand takes a slow loop (at 128 x 16 x 32 x 32: 190 against
    610 us)."""
    return torch.mul(c, scale).add_(shift)


class BNGateResidualReLU(torch.autograd.Function):
    """``y = relu(x * g + identity)`` where ``x = BN(c)`` (training-mode BatchNorm with batch
    statistics ``mean``, ``invstd``), saving ``c``, the statistics, ``g`` and ``y`` only.

    ``x`` is an input (its gradient flows back into the BatchNorm and into whatever else
    used it, e.g. the attention's average pool), but it is not saved. ``g`` has shape
    ``(N, C, 1, 1)`` or ``(N, 1, H, W)``; the gradient of a channel gate comes from ``c`` and
    the statistics in one pass (:func:`_channel_gate_grad`), that of a spatial gate from
    ``x`` rebuilt from ``c``. With ``inplace`` (the last argument) ``y`` is written into
    ``x``, which must then be a non-leaf tensor that nothing saved for backward (a
    BatchNorm's output, read by an average pool, is one): the block's output goes into
    memory that is already in cache instead of a new map.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        gate: torch.Tensor,
        identity: torch.Tensor,
        c: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        mean: torch.Tensor,
        invstd: torch.Tensor,
        inplace: bool = False,
    ) -> torch.Tensor:
        if inplace:
            y = torch.addcmul(identity, x, gate, out=x).relu_()
            ctx.mark_dirty(x)
        else:
            y = torch.addcmul(identity, x, gate).relu_()
        ctx.save_for_backward(c, weight, bias, mean, invstd, gate, y)
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        c, weight, bias, mean, invstd, gate, y = ctx.saved_tensors
        masked = torch.ops.aten.threshold_backward(grad_y, y, 0)
        grad_x = grad_g = grad_id = None
        if ctx.needs_input_grad[1] and _is_channel_gate(gate, c, masked):
            grad_g = _channel_gate_grad(masked, c, weight, bias, mean, invstd)
        elif ctx.needs_input_grad[1]:
            scale, shift = _bn_affine(weight, bias, mean, invstd)
            view = [1, -1] + [1] * (c.dim() - 2)
            x = _scale_shift(c, scale.view(view), shift.view(view))
            # the product masked * x summed over the gate's broadcast dims, in x's memory (a
            # multiply and a sum are 2-4x faster on the CPU than einsum's batched products)
            dims = [d for d in range(c.dim()) if gate.shape[d] == 1 and c.shape[d] != 1]
            prod = x.mul_(masked)
            grad_g = prod.sum(dims, keepdim=True) if dims else prod
            del x, prod
        if ctx.needs_input_grad[0]:
            grad_x = masked * gate
        if ctx.needs_input_grad[2]:
            grad_id = masked
        return grad_x, grad_g, grad_id, None, None, None, None, None, None


def _is_channel_gate(gate: torch.Tensor, c: torch.Tensor, masked: torch.Tensor) -> bool:
    """Whether ``gate`` is ``(N, C, 1, 1)`` for contiguous ``(N, C, H, W)`` maps ``c`` and
    ``masked``."""
    return (
        c.dim() == 4
        and c.is_contiguous()
        and masked.is_contiguous()
        and gate.shape == (*c.shape[:2], 1, 1)
    )


def _channel_gate_grad(
    masked: torch.Tensor,
    c: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    *,
    aten: bool | None = None,
) -> torch.Tensor:
    """``sum_hw(masked * BN(c))`` per image and channel, ``(N, C, 1, 1)``, without rebuilding
    ``BN(c)``: with ``BN(c) = w * (c - mean) * invstd + b`` it is ``w * sum_hw(masked * (c -
    mean) * invstd) + b * sum_hw(masked)``. On the CPU (``aten`` None) or with ``aten``, those
    two sums are the weight and bias gradients of a BatchNorm over the ``N * C`` maps as
    channels of one image (ATen's backward, centred like the forward, in one pass that reads
    ``masked`` and ``c`` and writes nothing of map size, where rebuilding, multiplying and
    summing take four). ATen's CUDA backward takes no such call (it needs the weight), so
    elsewhere the sums are taken directly, centred alike."""
    n, ch, h, w = c.shape
    if aten is None:
        aten = c.device.type == "cpu"
    if aten:
        _, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            masked.view(1, n * ch, h, w),
            c.view(1, n * ch, h, w),
            None,
            None,
            None,
            mean.repeat(n),
            invstd.repeat(n),
            True,
            0.0,
            [False, True, bias is not None],
        )
    else:
        centred = (c - mean.view(1, ch, 1, 1)).mul_(invstd.view(1, ch, 1, 1))
        grad_w = (masked * centred).sum((2, 3))
        grad_b = masked.sum((2, 3)) if bias is not None else None
    grad = grad_w.view(n, ch)
    if weight is not None:
        grad = grad * weight
    if bias is not None:
        grad = grad.add_(grad_b.view(n, ch) * bias)
    return grad.view(n, ch, 1, 1)


class _Recompute:
    """How a CBAM block's fast path rebuilds ``x = c * scale + shift`` in backward (bit-exact:
    the same operation on the same tensors as in forward), and a slot to share the rebuilt
    tensor between the backward passes of one block (the last one to run clears it).

    ``gated`` hands the channel-gated map ``x * cw`` from the spatial pool to the final
    product in forward, and back from the final product to the spatial pool in backward, so
    that each direction computes it once; whoever takes it clears the slot."""

    def __init__(self, c: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> None:
        self.c = c
        self.scale = scale
        self.shift = shift
        self.x: torch.Tensor | None = None
        self.gated: torch.Tensor | None = None

    def take_gated(self, x: torch.Tensor, cw: torch.Tensor) -> torch.Tensor:
        """``x * cw``: the handed-over tensor (the caller owns it now) or a new one."""
        gated, self.gated = self.gated, None
        return x * cw if gated is None else gated

    def get(self) -> torch.Tensor:
        if self.x is None:
            self.x = _scale_shift(self.c, self.scale, self.shift)
        return self.x


class _CbamChannelPool(torch.autograd.Function):
    """``(x.mean((2, 3), keepdim=True), x.amax((2, 3), keepdim=True))`` without saving ``x``
    (rebuilt from the recipe), with the single-pass backward of ``mean_amax_backward``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, recipe: _Recompute) -> tuple[torch.Tensor, torch.Tensor]:
        mean = x.mean((2, 3), keepdim=True)
        peak = x.amax((2, 3), keepdim=True)
        ctx.recipe = recipe
        ctx.save_for_backward(peak)
        return mean, peak

    @staticmethod
    def backward(
        ctx: Any, grad_mean: torch.Tensor | None, grad_max: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, None]:
        (peak,) = ctx.saved_tensors
        x = ctx.recipe.get()
        ctx.recipe.x = None  # the last backward of the block: free the rebuilt map
        return mean_amax_backward(x, peak, grad_mean, grad_max, [2, 3]), None


class _CbamSpatialPool(torch.autograd.Function):
    """``[amax_c(x * cw); mean_c(x * cw)]`` (CBAM's spatial descriptor of the channel-gated
    map) without saving ``x`` or ``x * cw``.

    ``x * cw`` is written into ``x``: the block made ``x`` (the BatchNorm output), nothing
    saved it and nothing reads it after this (the backward passes rebuild it from the recipe),
    so its memory, still in cache, is reused instead of a new map. ``x`` stays the input of
    the functions that follow only as the node their gradients flow to."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cw: torch.Tensor, recipe: _Recompute) -> torch.Tensor:
        x1 = x.mul_(cw)
        out = torch.cat([x1.amax(1, keepdim=True), x1.mean(1, keepdim=True)], dim=1)
        recipe.gated = x1  # for _CbamApply's forward
        ctx.recipe = recipe
        ctx.save_for_backward(cw, out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        cw, out = ctx.saved_tensors
        x = ctx.recipe.get()
        x1 = ctx.recipe.take_gated(x, cw)  # from _CbamApply's backward
        grad_x1 = mean_amax_backward(x1, out[:, :1], grad[:, 1:], grad[:, :1], [1])
        grad_cw = torch.mul(grad_x1, x, out=x1).sum((2, 3), keepdim=True)  # x1's memory
        del x1
        return grad_x1.mul_(cw), grad_cw, None


class _CbamApply(torch.autograd.Function):
    """``relu(x * cw * sw + identity)`` saving the two small gates and the output only."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        cw: torch.Tensor,
        sw: torch.Tensor,
        identity: torch.Tensor,
        recipe: _Recompute,
    ) -> torch.Tensor:
        gated = recipe.take_gated(x, cw)  # from _CbamSpatialPool's forward
        y = torch.addcmul(identity, gated, sw, out=gated).relu_()
        ctx.recipe = recipe
        ctx.save_for_backward(cw, sw, y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        cw, sw, y = ctx.saved_tensors
        x = ctx.recipe.get()
        masked = torch.ops.aten.threshold_backward(grad, y, 0)
        gated = x * cw
        ctx.recipe.gated = gated  # for _CbamSpatialPool's backward
        prod = masked * gated
        grad_sw = prod.sum(1, keepdim=True)
        t = masked * sw
        grad_cw = torch.mul(t, x, out=prod).sum((2, 3), keepdim=True)
        del prod
        return t.mul_(cw), grad_cw, grad_sw, masked, None


def _padded_rows(x: torch.Tensor, padding: tuple[int, int], ho: int) -> torch.Tensor:
    """The zero-padded ``x`` ``(N, C, H, W)`` as ``(N, C, kh, Wp, Ho)`` (a view of the padded
    copy): row ``h + i`` of channel ``c`` at ``[n, c, i, :, h]``, for the ``Ho`` output rows of
    a stride-1 convolution with ``kh = H + 2 * ph - Ho + 1`` kernel rows."""
    ph, pw = padding
    return F.pad(x, (pw, pw, ph, ph)).unfold(2, ho, 1)


def _single_output_conv_rows(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: tuple[int, int]
) -> torch.Tensor:
    """``conv2d(x, weight, bias, padding=padding)`` for one output channel and stride 1 as one
    matrix product: the ``kh`` row-shifted copies of every padded input channel side by side,
    ``(N * Ho, C * kh * Wp)``, times a banded ``(C * kh * Wp, Wo)`` matrix that holds each
    kernel row on its diagonals. About 1.7x faster than oneDNN's convolution for CBAM's
    2-channel 7 x 7 at batch 128 and 16-32 px (1.0 against 1.75 ms at 32 px on this project's
    2-core CPU), slower below 16 px."""
    n, c, h, w = x.shape
    kh, kw = weight.shape[2], weight.shape[3]
    ho, wo = h + 2 * padding[0] - kh + 1, w + 2 * padding[1] - kw + 1
    rows = _padded_rows(x, padding, ho)
    wp = rows.shape[3]
    lhs = rows.permute(0, 4, 1, 2, 3).reshape(n * ho, c * kh * wp)
    band = x.new_zeros(c * kh, wp, wo)  # band[(c, i), o + j, o] = weight[0, c, i, j]
    band.as_strided((c * kh, kw, wo), (wp * wo, wo, wo + 1)).copy_(
        weight.reshape(c * kh, kw, 1).expand(c * kh, kw, wo)
    )
    out = torch.mm(lhs, band.view(c * kh * wp, wo))
    if bias is not None:
        out.add_(bias)
    return out.view(n, 1, ho, wo)


def _single_output_weight_grad(
    x: torch.Tensor, grad: torch.Tensor, padding: tuple[int, int], kernel: tuple[int, int]
) -> torch.Tensor:
    """The weight gradient ``(1, C, kh, kw)`` of a stride-1 convolution of ``x`` ``(N, C, H,
    W)`` to one channel, for its output gradient ``grad`` ``(N, 1, Ho, Wo)``:
    ``dw[c, i, j] = sum_{n, h, w} grad[n, h, w] * xpad[n, c, h + i, w + j]``.

    For a k x k kernel (k > 1) as one batched matrix product: the ``kh`` row-shifted copies
    of every padded input channel, ``B`` ``(C * kh, N * Ho, Wp)``, multiplied by the output
    gradient's rows, ``R = grad^T B`` ``(C * kh, Wo, Wp)``, whose ``j``-th superdiagonals
    summed give ``dw[c, i, j]``. About 1.5x faster on the CPU than the convolution of the
    input by the output gradient (a kernel the size of the map, which oneDNN runs slowly),
    at a few times its FLOPs. 1 x 1 kernels keep that convolution."""
    (kh, kw) = kernel
    n, c = x.shape[0], x.shape[1]
    ho, wo = grad.shape[2], grad.shape[3]
    if kh * kw == 1:
        return F.conv2d(x.transpose(0, 1), grad.transpose(0, 1), None, 1, padding).transpose(0, 1)
    rows = _padded_rows(x, padding, ho)
    wp = rows.shape[3]
    shifted = rows.permute(1, 2, 0, 4, 3).reshape(c * kh, n * ho, wp)
    r = torch.matmul(grad.reshape(n * ho, wo).t(), shifted).contiguous()  # (C * kh, Wo, Wp)
    diagonals = r.as_strided((c * kh, kw, wo), (wo * wp, 1, wp + 1))  # r's own offset
    return diagonals.sum(2).view(1, c, kh, kw)


class _SingleOutputConv2d(torch.autograd.Function):
    """``conv2d(x, weight, bias, padding=padding)`` with stride 1, no dilation or groups and
    one output channel (the k x k convolution of spatial attention), faster on the CPU: in
    eager mode, from 16 px output width, the forward is :func:`_single_output_conv_rows`; in
    backward, oneDNN's transposed convolution (autograd's input gradient) is about 20x slower
    than a forward convolution for one output channel, so the input gradient is computed as
    a convolution with the flipped, transposed kernel, and the weight gradient by
    :func:`_single_output_weight_grad`. Same values up to rounding; twice
    differentiable (backward is made of differentiable operations)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        padding: tuple[int, int],
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        ctx.has_bias = bias is not None
        wo = x.shape[3] + 2 * padding[1] - weight.shape[3] + 1
        if wo >= 16 and weight.shape[2] * weight.shape[3] > 1 and eager_mode():
            return _single_output_conv_rows(x, weight, bias, padding)
        return F.conv2d(x, weight, bias, 1, padding)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        (ph, pw), (kh, kw) = ctx.padding, weight.shape[2:]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            flipped = weight.flip(2, 3).transpose(0, 1)
            grad_x = F.conv2d(grad, flipped, None, 1, (kh - 1 - ph, kw - 1 - pw))
        if ctx.needs_input_grad[1]:
            grad_w = _single_output_weight_grad(x, grad, ctx.padding, (kh, kw))
        if ctx.needs_input_grad[2] and ctx.has_bias:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None


def _is_plain_conv_to_one(conv: nn.Module) -> TypeGuard[nn.Conv2d]:
    """Whether ``conv`` is exactly an ``nn.Conv2d`` to one output channel with stride 1, no
    dilation or groups and explicit zero padding (spatial attention's and sSE's convolution)."""
    return (
        type(conv) is nn.Conv2d
        and conv.out_channels == 1
        and conv.groups == 1
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    )


def single_output_conv2d(conv: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``conv(x)`` through :class:`_SingleOutputConv2d` when a gradient will be computed on the
    CPU and ``conv`` is a plain, unhooked ``nn.Conv2d`` with one output channel, stride 1, no
    dilation or groups and zero padding of at most ``k - 1``; None otherwise (call ``conv``).
    Taken under ``torch.compile`` too (the compiler's own convolution backward is the slow
    one), never while scripting, tracing or exporting."""
    if not (
        torch.is_grad_enabled()
        and _is_plain_conv_to_one(conv)
        and x.device.type == "cpu"
        and x.dim() == 4
        and not isinstance(conv.padding, str)  # (checked in the helper; narrows the type)
        and all(0 <= p < k for p, k in zip(conv.padding, conv.kernel_size, strict=True))
        and (x.requires_grad or conv.weight.requires_grad)
        and fast_paths_active(conv, under_compile=True)
    ):
        return None
    padding = (int(conv.padding[0]), int(conv.padding[1]))
    y = _SingleOutputConv2d.apply(x, conv.weight, conv.bias, padding)
    assert isinstance(y, torch.Tensor)  # for mypy: apply() is untyped
    return y


def _bn_momentum(bn: nn.BatchNorm2d) -> float:
    """The running-statistics factor of one training step of ``bn``, counting the step in
    ``num_batches_tracked`` as ``nn.BatchNorm2d.forward`` does."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = 1.0 / float(bn.num_batches_tracked)
    return factor


def _bn_train_forward(bn: nn.BatchNorm2d, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``bn(c)`` in training mode, exactly as ``nn.BatchNorm2d.forward`` (running-stat update
    included), also returning the batch mean and inverse std it normalised with."""
    out, mean, invstd = torch.native_batch_norm(
        c, bn.weight, bn.bias, bn.running_mean, bn.running_var, True, _bn_momentum(bn), bn.eps
    )
    return out, mean.detach(), invstd.detach()


def _channel_weights(attn: ChannelAttention, x: torch.Tensor) -> torch.Tensor:
    weights = attn.attention(x)
    return weights.reshape(weights.shape + (1,) * (x.dim() - 2))


# Inference gates without module calls. At batch 1 on a CPU every small operation inside a
# network costs tens of microseconds (its code and data are cold after the convolutions), so
# the dozen module calls of a gate and oneDNN's slow 1x1 convolution to one channel are a
# large part of what attention adds. The functions below compute the same gates as the
# modules' ``attention`` methods with plain tensor operations, for the exact layer types they
# know and only while none of a gate's layers carries a hook (a hook may keep a tensor that
# the in-place steps below would overwrite); otherwise the module's own method runs.


def _overrides(module: nn.Module, base: type, *names: str) -> bool:
    """Whether ``module``'s class replaces any of ``base``'s methods ``names``."""
    return any(getattr(type(module), name) is not getattr(base, name) for name in names)


def _linear(fc: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """``fc(z)`` for a 2-D ``z``: one ``addmm`` for an ``nn.Linear`` or 1x1 ``nn.Conv2d`` (the
    latter as if applied to ``z`` viewed as ``(N, C, 1, 1)``)."""
    weight = None
    if type(fc) is nn.Linear:
        weight = fc.weight
    elif (
        type(fc) is nn.Conv2d
        and fc.kernel_size == (1, 1)
        and fc.padding == (0, 0)
        and fc.groups == 1
    ):
        weight = fc.weight.flatten(1)
    if weight is not None:
        bias = fc.bias
        if not isinstance(bias, torch.Tensor):
            return torch.mm(z, weight.t())
        return torch.addmm(bias, z, weight.t())
    if isinstance(fc, nn.Conv2d):
        return fc(z.view(*z.shape, 1, 1)).flatten(1)
    return fc(z)


def _activation(act: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``act(t)``, in place on ``t`` (a fresh tensor of the caller's) for ReLU, Sigmoid and
    Hardsigmoid."""
    kind = type(act)
    if kind is nn.ReLU:
        return t.relu_()
    if kind is nn.Sigmoid:
        return t.sigmoid_()
    if kind is nn.Hardsigmoid:
        return F.hardsigmoid(t, inplace=True)
    return act(t)


def _matmul_images(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.matmul(a, b)`` for a batch ``b`` of ``(K, M)`` matrices and ``a`` either one
    ``(P, K)`` matrix or a batch: one 2-D product per image, written into one output. Inside
    ResNet-50 at batch 8 the batched product was about 6x slower (it page-faulted a buffer the
    size of the feature map on every call). Elsewhere (a GPU) one batched product: a launch
    per image would cost more than the products."""
    if b.device.type != "cpu":
        return torch.matmul(a, b)
    if a.dim() == 2:
        a = a.expand(b.shape[0], *a.shape)
    out = torch.empty(b.shape[0], a.shape[1], b.shape[2], dtype=b.dtype, device=b.device)
    for i in range(b.shape[0]):
        torch.mm(a[i], b[i], out=out[i])
    return out


def _project_to_one(
    flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``w . x_j + b`` at every position of ``flat`` ``(N, C, L)``: ``(N, 1, L)``, one matrix
    product per image (a 1x1 convolution to one channel)."""
    out = _matmul_images(weight.view(1, flat.shape[1]), flat)
    if bias is not None:
        out.add_(bias.view(1, 1, 1))
    return out


def _conv_to_one(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for an inference convolution to one channel: a 1x1 one (sSE's squeeze,
    GC's context mask) as one matrix product over the channels, a k x k one (spatial
    attention's) on the CPU through ATen's own unfold-and-multiply convolution. oneDNN's
    convolution is slower for one output channel (on this project's 2-core CPU: 100-180 us a
    call against 60-130 us for CBAM's 7 x 7 inside ResNet-50 at batch 1; 100-220 us against
    10-60 us for the 1 x 1 over 256-2048 channels). Other convolutions go through the module."""
    if not (_is_plain_conv_to_one(conv) and x.dim() == 4 and x.is_contiguous()):
        return conv(x)
    n, c, h, w = x.shape
    if conv.kernel_size == (1, 1) and conv.padding == (0, 0):
        return _project_to_one(x.view(n, c, h * w), conv.weight, conv.bias).view(n, 1, h, w)
    if x.device.type != "cpu":
        return conv(x)
    kernel, padding = list(conv.kernel_size), [int(p) for p in conv.padding]
    return torch.ops.aten.thnn_conv2d(x, conv.weight, kernel, conv.bias, [1, 1], padding)


def _is_eval_batch_norm(bn: nn.Module) -> TypeGuard[nn.BatchNorm2d]:
    """Whether ``bn`` is exactly an ``nn.BatchNorm2d`` in eval mode with running statistics
    (so that it normalises with them)."""
    return (
        type(bn) is nn.BatchNorm2d
        and not bn.training
        and bn.running_mean is not None
        and bn.running_var is not None
    )


def _batch_norm_eval(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``bn(x)`` for an eval-mode ``nn.BatchNorm2d`` with running statistics, functionally."""
    if _is_eval_batch_norm(bn):
        return F.batch_norm(
            x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
        )
    return bn(x)


def _channel_gate(attn: ChannelAttention, x: torch.Tensor) -> torch.Tensor:
    """``attn``'s channel weights for ``x``, shaped ``(N, C, 1, ...)``: average, max or
    average + max pooling (both descriptors through one pass of the excitation), the MLP as
    matrix products and ECA's 1-D convolution as one call, without the module methods in
    between; the std pool and subclasses that change those methods through
    ``attn.attention``."""
    excitation = (attn.fc1, attn.act, attn.fc2) if hasattr(attn, "fc1") else (attn.conv,)
    if (
        attn.pool == "std"
        or _overrides(attn, ChannelAttention, "attention", "describe", "excite")
        or _any_hooks(*excitation, attn.gate)
    ):
        return _channel_weights(attn, x)
    n, c = x.shape[0], x.shape[1]
    dims = list(range(2, x.dim()))
    if attn.pool == "avg":
        z = x.mean(dims)
    elif attn.pool == "max":
        z = x.amax(dims)
    else:
        z = torch.cat([x.mean(dims), x.amax(dims)])
    if hasattr(attn, "fc1"):
        logits = _linear(attn.fc2, _activation(attn.act, _linear(attn.fc1, z)))
    else:
        logits = attn.conv(z.unsqueeze(1)).squeeze(1)
    if attn.pool == "avg+max":
        logits = logits[:n] + logits[n:]  # excite(avg) + excite(max)
    return _activation(attn.gate, logits).view((n, c) + (1,) * (x.dim() - 2))


def _spatial_gate(attn: SpatialAttention | SpatialSE, x: torch.Tensor) -> torch.Tensor:
    """``attn.attention(x)`` (spatial weights, ``(N, 1, H, W)``) without module calls."""
    if isinstance(attn, SpatialSE):
        if _overrides(attn, SpatialSE, "attention") or _any_hooks(attn.conv, attn.gate):
            return attn.attention(x)
        return _activation(attn.gate, _conv_to_one(attn.conv, x))
    if _overrides(attn, SpatialAttention, "attention", "describe") or _any_hooks(
        attn.conv, attn.bn, attn.gate
    ):
        return attn.attention(x)
    logits = _conv_to_one(attn.conv, attn.describe(x))
    if attn.bn is not None:
        logits = _batch_norm_eval(attn.bn, logits)
    return _activation(attn.gate, logits)


def _gc_standard_context(attn: GlobalContext) -> bool:
    """Whether GC's context is the standard softmax attention pooling through plain,
    unhooked layers (so that it can be computed without them)."""
    gate = attn.gate
    return (
        not _overrides(attn, GlobalContext, "context")
        and attn.conv_mask is not None
        and type(gate) is nn.Softmax
        and gate.dim == 2
        and not _any_hooks(attn.conv_mask, gate)
    )


def _gc_pool(
    x: torch.Tensor, mask_weight: torch.Tensor, mask_bias: torch.Tensor | None
) -> torch.Tensor:
    """GC's attention pooling ``sum_j softmax_j(w . x_j + b) x_j`` for ``x`` ``(N, C, ...)``:
    ``(N, C)``, two matrix products per image."""
    n, c = x.shape[0], x.shape[1]
    flat = x.reshape(n, c, -1)
    weights = torch.softmax(_project_to_one(flat, mask_weight, mask_bias), 2)
    return _matmul_images(flat, weights.transpose(1, 2)).view(n, c)


def _gc_transform(attn: GlobalContext, context: torch.Tensor) -> torch.Tensor:
    """GC's ``T_add(c)`` for the context ``(N, C)``, shaped ``(N, C)``: the standard
    transform (1x1 conv, LayerNorm over ``(C/r, 1, 1)``, activation, 1x1 conv) as matrix
    products, anything else through the module."""
    transform = attn.channel_add_conv
    assert transform is not None  # checked by the caller
    layers: list[nn.Module] = list(transform)
    norm = layers[1] if len(layers) == 4 else None
    if (
        type(transform) is nn.Sequential
        and isinstance(norm, nn.LayerNorm)
        and type(norm) is nn.LayerNorm
        and norm.normalized_shape == (attn.rd_channels, 1, 1)
        and not _any_hooks(transform, *layers)
    ):
        conv1, _, act, conv2 = layers
        h = _linear(conv1, context)
        weight = None if norm.weight is None else norm.weight.view(-1)
        bias = None if norm.bias is None else norm.bias.view(-1)
        h = F.layer_norm(h, (h.shape[1],), weight, bias, norm.eps)
        return _linear(conv2, _activation(act, h))
    shape = list(context.shape) + [1] * attn.spatial_dims
    return transform(context.view(shape)).flatten(1)


def _gc_add_term(attn: GlobalContext, x: torch.Tensor) -> torch.Tensor:
    """GC's ``T_add(c)`` for ``x``, ``(N, C, 1, 1)``, without module calls where the context
    pooling and the transform are the standard layers."""
    if _gc_standard_context(attn):
        mask = attn.conv_mask
        assert isinstance(mask, nn.Conv2d)  # _gc_standard_context checked it is there
        context = _gc_pool(x, mask.weight, mask.bias)
    else:
        context = attn.context(x).flatten(1)
    return _gc_transform(attn, context).view(context.shape + (1,) * (x.dim() - 2))


class _EvalBNFold:
    """An eval-mode BatchNorm's per-channel ``scale`` and ``shift`` (``bn(y) = y * scale +
    shift``), ``extra * scale`` for a weight vector folded with it, and its statistics and
    weight repeated per batch size (to normalise ``(N, C, ...)`` as ``(1, N * C, ...)``)."""

    def __init__(self, bn: nn.BatchNorm2d, extra: torch.Tensor | None) -> None:
        assert bn.running_mean is not None and bn.running_var is not None  # checked by caller
        self.bn = bn
        invstd = torch.rsqrt(bn.running_var + bn.eps)
        scale, shift = _bn_affine(bn.weight, bn.bias, bn.running_mean, invstd)
        self.scale, self.shift = scale.contiguous(), shift.contiguous()
        self.folded = None if extra is None else extra.reshape(-1) * self.scale
        self._repeats: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}

    def repeated(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Running mean, running variance and weight, each repeated ``n`` times."""
        if n not in self._repeats:
            bn = self.bn
            assert bn.running_mean is not None and bn.running_var is not None
            with torch.no_grad():
                weight = None if bn.weight is None else bn.weight.repeat(n)
                self._repeats[n] = (bn.running_mean.repeat(n), bn.running_var.repeat(n), weight)
        return self._repeats[n]


def _eval_bn_fold(bn: nn.Module, owner: nn.Module, extra: torch.Tensor) -> _EvalBNFold | None:
    """The :class:`_EvalBNFold` of an eval-mode ``nn.BatchNorm2d`` with running statistics
    (None for anything else), kept on ``owner`` while none of the tensors it comes from changes
    (same objects, same versions): at batch 1 its half-dozen small operations cost about 1 %
    of a ResNet-50 when run on every call."""
    if not _is_eval_batch_norm(bn) or _has_hooks(bn):
        return None
    sources = (bn.running_mean, bn.running_var, bn.weight, bn.bias, extra)
    tensors = [t for t in sources if t is not None]
    cacheable = not any(t.is_inference() for t in tensors)
    if cacheable:
        versions = tuple(t._version for t in tensors)
        cached = owner.__dict__.get("_convattn_bn_fold")
        if (
            cached is not None
            and cached[2] == bn.eps
            and cached[1] == versions
            and all(a is b for a, b in zip(cached[0], sources, strict=True))
        ):
            fold: _EvalBNFold = cached[3]
            return fold
    with torch.no_grad():
        fold = _EvalBNFold(bn, extra)
    if cacheable:
        owner.__dict__["_convattn_bn_fold"] = (sources, versions, bn.eps, fold)
    return fold


def _gc_folded_tail(
    attn: GlobalContext, bn: nn.Module, y: torch.Tensor, identity: torch.Tensor
) -> torch.Tensor | None:
    """``relu(GC(bn(y)) + identity)`` for GC with add fusion after an eval-mode BatchNorm,
    with the BatchNorm folded into the block's arithmetic (None where that does not apply).

    With ``bn(y) = a y + b`` per channel: the scores ``w . (a y_j + b) + w_0`` differ from
    ``(w a) . y_j`` by a constant, which the softmax over positions removes; the weights sum
    to one, so the context is ``a (sum_j p_j y_j) + b``; and ``bn(y) + T_add(c)`` is one
    BatchNorm of ``y`` with ``T_add(c)`` added to its bias (per image: the batch is normalised
    as one image of ``N * C`` channels), so the separate pass that adds ``T_add(c)`` goes."""
    if not (
        attn.fusion_types == ("add",)
        and attn.channel_add_conv is not None
        and _gc_standard_context(attn)
        and y.dim() == 4
        and y.is_contiguous()
        and identity.shape == y.shape
    ):
        return None
    mask = attn.conv_mask
    assert isinstance(mask, nn.Conv2d)  # _gc_standard_context checked it is there
    if not (_is_plain_conv_to_one(mask) and mask.kernel_size == (1, 1)):
        return None
    fold = _eval_bn_fold(bn, attn, mask.weight)
    if fold is None:
        return None
    attn._check_input(y)
    norm = fold.bn
    assert fold.folded is not None  # (made with the mask weight)
    context = torch.addcmul(fold.shift, _gc_pool(y, fold.folded, None), fold.scale)
    bias = _gc_transform(attn, context)
    if norm.bias is not None:
        bias.add_(norm.bias)
    n, c, h, w = y.shape
    stats: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] = (
        (norm.running_mean, norm.running_var, norm.weight) if n == 1 else fold.repeated(n)
    )
    mean, var, weight = stats
    out = F.batch_norm(
        y.view(1, n * c, h, w), mean, var, weight, bias.view(-1), False, 0.0, norm.eps
    )
    return out.view(n, c, h, w).add_(identity).relu_()


def _scse_fuse(
    x: torch.Tensor,
    channel_weights: torch.Tensor,
    spatial_weights: torch.Tensor,
    fusion: str,
    out: torch.Tensor,
) -> None:
    """``out = max(x * cw, x * sw)`` (or the sum) for one image; ``out`` may be ``x``."""
    recalibrated = x * channel_weights
    spatial = torch.mul(x, spatial_weights, out=out)
    if fusion == "max":
        torch.maximum(spatial, recalibrated, out=out)
    else:
        out.add_(recalibrated)


def _float32_weights(*tensors: torch.Tensor | None) -> bool:
    return all(
        t is None or (t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous())
        for t in tensors
    )


def _native_gate_kind(gate: nn.Module) -> int | None:
    """The kernels' code for a gate: 0 for ``nn.Sigmoid``, 1 for ``nn.Hardsigmoid``."""
    return {nn.Sigmoid: 0, nn.Hardsigmoid: 1}.get(type(gate))


def _native_excitation(attn: ChannelAttention, pool: str = "avg") -> dict[str, Any] | None:
    """The arguments of the native kernels that describe ``attn``'s excitation and gate, or
    None when they do not know them: the ``pool`` descriptor, an MLP of two ``nn.Linear`` (or
    1x1 ``nn.Conv2d``) layers with ``nn.ReLU`` between, or ECA's ``nn.Conv1d(1, 1, k)`` with
    zero padding ``(k - 1) / 2``, and a Sigmoid or Hardsigmoid gate; no overridden methods
    and no hooks on any of its layers."""
    gate = _native_gate_kind(attn.gate)
    if attn.pool != pool or gate is None:
        return None
    if _overrides(attn, ChannelAttention, "attention", "describe", "excite"):
        return None
    if hasattr(attn, "fc1"):
        fc1, act, fc2 = attn.fc1, attn.act, attn.fc2
        if type(act) is not nn.ReLU or _any_hooks(fc1, act, fc2, attn.gate):
            return None
        weights = []
        for fc in (fc1, fc2):
            if type(fc) is nn.Linear:
                weights.append(fc.weight)
            elif type(fc) is nn.Conv2d and fc.kernel_size == (1, 1) and fc.groups == 1:
                weights.append(fc.weight.flatten(1))
            else:
                return None
        if not _float32_weights(*weights, fc1.bias, fc2.bias):
            return None
        return {
            "excitation": 0,
            "mlp": (weights[0], fc1.bias, weights[1], fc2.bias, weights[0].shape[0]),
            "conv": (None, 0, None),
            "gate": gate,
        }
    conv = attn.conv
    if (
        type(conv) is not nn.Conv1d
        or _any_hooks(conv, attn.gate)
        or conv.in_channels != 1
        or conv.out_channels != 1
        or conv.stride != (1,)
        or conv.dilation != (1,)
        or conv.padding_mode != "zeros"
        or conv.padding != ((conv.kernel_size[0] - 1) // 2,)
        or conv.kernel_size[0] % 2 != 1
        or not _float32_weights(conv.weight, conv.bias)
    ):
        return None
    return {
        "excitation": 1,
        "mlp": (None, None, None, None, 0),
        "conv": (conv.weight, conv.kernel_size[0], conv.bias),
        "gate": gate,
    }


# Native inference tails. Each kernel takes a *plan*: a C struct of pointers to the layers' own
# tensors (and their sizes and options), built once per module and kept on it, so that a call
# passes only the maps. The kernels read the weights, and fold the BatchNorms, at every call:
# in-place updates (an optimizer step, ``load_state_dict``) need no refresh. What the plan
# depends on beyond those values is checked on every call, cheaply (at batch 1 inside a
# network every Python object is cold, and a check of each tensor's version, pointer and
# module's hooks cost as much as the kernel): the identity of every submodule, parameter,
# buffer and hook of the modules (and every attribute of their norm layers, whose mode and
# eps the kernels read), and the storage of every tensor.

_PTR = ctypes.c_void_p
_LONG = ctypes.c_long


class _EvalNorm(ctypes.Structure):
    """``eval_norm`` of ``_native/kernels.h``: an eval-mode BatchNorm (``mean`` NULL: none)."""

    _fields_ = [
        ("weight", _PTR),
        ("bias", _PTR),
        ("mean", _PTR),
        ("var", _PTR),
        ("eps", ctypes.c_double),
    ]


class _ChannelPlan(ctypes.Structure):
    """``channel_plan`` of ``_native/channel_eval.c`` (SE, ECA, cSE, scSE)."""

    _fields_ = [
        ("bn", _EvalNorm),
        ("C", _LONG),
        ("excitation", _LONG),
        ("w1", _PTR),
        ("b1", _PTR),
        ("w2", _PTR),
        ("b2", _PTR),
        ("R", _LONG),
        ("kernel", _PTR),
        ("kernel_bias", _PTR),
        ("K", _LONG),
        ("gate", _LONG),
        ("sse_w", _PTR),
        ("sse_b", _PTR),
        ("fusion", _LONG),
    ]


class _CbamPlan(ctypes.Structure):
    """``cbam_plan`` of ``_native/cbam_eval.c``."""

    _fields_ = [
        ("bn", _EvalNorm),
        ("C", _LONG),
        ("w1", _PTR),
        ("b1", _PTR),
        ("w2", _PTR),
        ("b2", _PTR),
        ("R", _LONG),
        ("gate", _LONG),
        ("kernel", _PTR),
        ("conv_bias", _PTR),
        ("KH", _LONG),
        ("KW", _LONG),
        ("PH", _LONG),
        ("PW", _LONG),
        ("spatial_bn", _EvalNorm),
    ]


class _ResidualPlan(ctypes.Structure):
    """``residual_plan`` of ``_native/residual_eval.c`` (a block without attention)."""

    _fields_ = [("bn", _EvalNorm), ("C", _LONG)]


class _GcPlan(ctypes.Structure):
    """``gc_plan`` of ``_native/gc_eval.c``."""

    _fields_ = [
        ("bn", _EvalNorm),
        ("C", _LONG),
        ("mask", _PTR),
        ("w1", _PTR),
        ("b1", _PTR),
        ("ln_w", _PTR),
        ("ln_b", _PTR),
        ("ln_eps", ctypes.c_double),
        ("w2", _PTR),
        ("b2", _PTR),
        ("R", _LONG),
    ]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _eval_norm(bn: nn.Module | None) -> _EvalNorm | None:
    """The kernels' view of ``bn`` (no BatchNorm for None); None unless it is an unhooked
    eval-mode ``nn.BatchNorm2d`` with running statistics and float32 CPU tensors."""
    if bn is None:
        return _EvalNorm()
    if not _is_eval_batch_norm(bn) or _has_hooks(bn):
        return None
    if not _float32_weights(bn.weight, bn.bias, bn.running_mean, bn.running_var):
        return None
    tensors = (bn.weight, bn.bias, bn.running_mean, bn.running_var)
    return _EvalNorm(*(_ptr(t) for t in tensors), float(bn.eps))


# builds a kernel's plan from (attention module, block BatchNorm or None, that BatchNorm's
# view): (the C struct, facts the call checks: the channels first); None: no kernel applies
_PlanBuilder = Callable[
    [nn.Module, "nn.Module | None", _EvalNorm], "tuple[ctypes.Structure, tuple[Any, ...]] | None"
]

# the per-module dictionaries whose contents a plan depends on (backward hooks do not matter:
# the inference tails run without autograd)
_WATCHED = ("_modules", "_parameters", "_buffers", "_forward_hooks", "_forward_pre_hooks")
_NORMS = (nn.BatchNorm2d, nn.LayerNorm)
_data_ptr = torch.Tensor.data_ptr
_chain = itertools.chain.from_iterable


class _NativePlan:
    """A native inference kernel's plan for one attention module (with the block's BatchNorm
    ``bn`` folded in, or None) and what it was built from: the modules' watched dictionaries
    with the identities of their values (held, so that no other object can take an identity)
    and every tensor with its data pointer (its storage held, so that no other storage can
    take the address). ``struct`` is None where no kernel applies. Not copied with the module
    (a copy or an unpickled model builds its own)."""

    __slots__ = (
        "address",
        "bn",
        "dicts",
        "held",
        "ids",
        "info",
        "kernel",
        "ptrs",
        "storages",
        "struct",
        "tensors",
    )

    def __init__(
        self,
        attn: nn.Module,
        bn: nn.Module | None,
        build: _PlanBuilder,
        kernel: str,
    ) -> None:
        modules = [attn]
        i = 0
        while i < len(modules):
            modules.extend(m for m in modules[i]._modules.values() if m is not None)
            i += 1
        if bn is not None:
            modules.append(bn)
        self.bn = bn
        self.dicts = (
            *(m.__dict__ for m in modules if isinstance(m, _NORMS)),
            *(m.__dict__[name] for m in modules for name in _WATCHED),
        )
        self.held = [*_chain(map(dict.values, self.dicts))]
        self.ids = [*map(id, self.held)]
        self.tensors = tuple(
            t
            for m in modules
            for t in (*m._parameters.values(), *m._buffers.values())
            if t is not None
        )
        self.ptrs = [*map(_data_ptr, self.tensors)]
        with torch.no_grad():
            self.storages = tuple(t.detach() for t in self.tensors)
        self.struct: ctypes.Structure | None = None
        self.info: tuple[Any, ...] = ()
        self.address = 0
        self.kernel: Any = None
        lib = _kernels.library()
        norm = _eval_norm(bn)
        if lib is None or norm is None or _any_hooks(*modules[1:]):
            return
        built = build(attn, bn, norm)
        if built is not None:
            self.struct, self.info = built
            self.address = ctypes.addressof(self.struct)
            self.kernel = getattr(lib, kernel)

    def holds(self, bn: nn.Module | None) -> bool:
        """Whether nothing the plan was built from has changed (values aside)."""
        return (
            self.bn is bn
            and [*map(id, _chain(map(dict.values, self.dicts)))] == self.ids
            and [*map(_data_ptr, self.tensors)] == self.ptrs
        )

    def __reduce__(self) -> tuple[Callable[[], None], tuple[()]]:
        return _no_plan, ()


def _no_plan() -> None:
    return None


def _native_plan(
    attn: nn.Module,
    bn: nn.Module | None,
    build: _PlanBuilder,
    kernel: str,
) -> _NativePlan | None:
    """``attn``'s plan for ``kernel`` (kept on it while it holds), or None where no kernel
    applies: layers it does not know, hooks, a BatchNorm not in eval mode."""
    key = "_convattn_plan" if bn is None else "_convattn_plan_bn"
    plan: _NativePlan | None = attn.__dict__.get(key)
    if plan is None or not plan.holds(bn):
        plan = _NativePlan(attn, bn, build, kernel)
        attn.__dict__[key] = plan
    return plan if plan.struct is not None else None


def _run_tail(
    plan: _NativePlan,
    y: torch.Tensor,
    identity: torch.Tensor,
    sizes: tuple[int, ...],
    out: torch.Tensor,
) -> torch.Tensor:
    """Call the plan's inference-tail kernel as ``(plan, y, identity, *sizes, out,
    threads)`` and return ``out``; MemoryError when the kernel could not allocate its
    workspace (it returns -1)."""
    status = plan.kernel(
        plan.address,
        _data_ptr(y),
        _data_ptr(identity),
        *sizes,
        _data_ptr(out),
        torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError(
            f"convattn: the native kernel {plan.kernel.__name__} could not allocate its workspace"
        )
    return out


def _float32_maps(x: torch.Tensor, identity: torch.Tensor) -> bool:
    """Whether the kernels can take these maps: float32, contiguous, CPU, same shape, not
    empty (the modules' own code handles empty maps)."""
    return (
        x.numel() > 0
        and x.is_cpu
        and x.dtype == torch.float32
        and identity.dtype == torch.float32
        and x.dim() >= 3
        and x.is_contiguous()
        and identity.is_contiguous()
        and identity.shape == x.shape
    )


def _channel_plan(
    attn: nn.Module, bn: nn.Module | None, norm: _EvalNorm
) -> tuple[_ChannelPlan, tuple[Any, ...]] | None:
    """``channel_eval_tail``'s plan for SE / ECA-style channel attention or scSE, with its
    channels; None where the kernel does not know the layers."""
    sse_w: torch.Tensor | None = None
    sse_b: torch.Tensor | None = None
    channel: nn.Module = attn
    fusion = "max"
    if isinstance(attn, ChannelSpatialSE):
        channel, sse, fusion = attn.cse, attn.sse, attn.fusion
        conv = sse.conv
        if (
            fusion not in ("max", "sum")
            or type(sse.gate) is not nn.Sigmoid
            or _overrides(sse, SpatialSE, "attention")
            or not _is_plain_conv_to_one(conv)
            or conv.kernel_size != (1, 1)
            or conv.padding != (0, 0)
            or not _float32_weights(conv.weight, conv.bias)
        ):
            return None
        assert isinstance(conv, nn.Conv2d)  # (checked above)
        sse_w, sse_b = conv.weight, conv.bias
    if not isinstance(channel, ChannelAttention):
        return None
    spec = _native_excitation(channel)
    if spec is None:
        return None
    w1, b1, w2, b2, rd = spec["mlp"]
    kernel, k, kernel_bias = spec["conv"]
    plan = _ChannelPlan(
        norm,
        channel.channels,
        spec["excitation"],
        *(_ptr(t) for t in (w1, b1, w2, b2)),
        rd,
        _ptr(kernel),
        _ptr(kernel_bias),
        k,
        spec["gate"],
        _ptr(sse_w),
        _ptr(sse_b),
        0 if fusion == "max" else 1,
    )
    return plan, (channel.channels,)


def _native_channel_tail(
    attn: nn.Module,
    out: torch.Tensor,
    identity: torch.Tensor,
    owned: bool,
    bn: nn.Module | None = None,
) -> torch.Tensor | None:
    """``relu(attn(out) + identity)`` in one call of :mod:`convattn._native`'s
    ``channel_eval_tail`` for SE / ECA-style channel attention and scSE (float32 contiguous
    CPU maps, known layers); None when it does not apply. With ``bn`` (an eval-mode
    ``nn.BatchNorm2d``), ``out`` is its input and ``relu(attn(bn(out)) + identity)`` is
    computed with the BatchNorm folded into the kernel. The result goes into ``out`` when
    ``owned``."""
    if not _float32_maps(out, identity):
        return None
    plan = _native_plan(attn, bn, _channel_plan, "channel_eval_tail")
    if plan is None or out.shape[1] != plan.info[0]:
        return None  # (a map of the wrong size: the module's own path raises its error)
    result = out if owned else torch.empty_like(out)
    return _run_tail(plan, out, identity, (out.shape[0], math.prod(out.shape[2:])), result)


def _cbam_plan(
    attn: nn.Module, bn: nn.Module | None, norm: _EvalNorm
) -> tuple[_CbamPlan, tuple[Any, ...]] | None:
    """``cbam_eval_tail``'s plan, with CBAM's channels; None where the kernel does not know
    the layers."""
    assert isinstance(attn, CBAM)
    cg, sg = attn.channel_gate, attn.spatial_gate
    if not (
        isinstance(cg, ChannelAttention)
        and isinstance(sg, SpatialAttention)
        and sg.pool == "both"
        and not _overrides(sg, SpatialAttention, "attention", "describe")
    ):
        return None
    spec = _native_excitation(cg, "avg+max")
    conv = sg.conv
    spatial_norm = _eval_norm(sg.bn)
    if (
        spec is None
        or spec["excitation"] != 0
        or _native_gate_kind(sg.gate) != spec["gate"]
        or not _is_plain_conv_to_one(conv)
        or conv.in_channels != 2
        or not _float32_weights(conv.weight, conv.bias)
        or spatial_norm is None
    ):
        return None
    w1, b1, w2, b2, rd = spec["mlp"]
    kh, kw = conv.kernel_size
    ph, pw = (int(q) for q in conv.padding)
    plan = _CbamPlan(
        norm,
        attn.channels,
        *(_ptr(t) for t in (w1, b1, w2, b2)),
        rd,
        spec["gate"],
        _ptr(conv.weight),
        _ptr(conv.bias),
        kh,
        kw,
        ph,
        pw,
        spatial_norm,
    )
    return plan, (attn.channels,)


def _native_cbam_tail(
    attn: CBAM,
    out: torch.Tensor,
    identity: torch.Tensor,
    owned: bool,
    bn: nn.Module | None = None,
) -> torch.Tensor | None:
    """``relu(attn(out) + identity)`` for CBAM in one call of :mod:`convattn._native`'s
    ``cbam_eval_tail`` (float32 contiguous CPU maps; the channel gate's shared MLP with ReLU,
    average + max pools; the spatial gate's [max; mean] descriptor, a plain k x k convolution
    to one map, an eval-mode BatchNorm or none; one gate kind for both); None otherwise.
    With ``bn``, as :func:`_native_channel_tail`: the block's BatchNorm folded in."""
    if not (_float32_maps(out, identity) and out.dim() == 4):
        return None
    plan = _native_plan(attn, bn, _cbam_plan, "cbam_eval_tail")
    if plan is None or out.shape[1] != plan.info[0]:
        return None
    n, _, h, w = out.shape
    result = out if owned else torch.empty_like(out)
    return _run_tail(plan, out, identity, (n, h, w), result)


def _gc_plan(
    attn: nn.Module, bn: nn.Module | None, norm: _EvalNorm
) -> tuple[_GcPlan, tuple[Any, ...]] | None:
    """``gc_eval_tail``'s plan, with GC's channels: GC with add fusion, the standard softmax
    context through a plain 1x1 mask convolution and the standard transform (1x1
    convolution, LayerNorm over ``(C/r, 1, 1)``, ReLU, 1x1 convolution); None otherwise."""
    assert isinstance(attn, GlobalContext)
    transform = attn.channel_add_conv
    if not (
        norm.mean is not None  # (the block's BatchNorm is part of the fold)
        and attn.fusion_types == ("add",)
        and type(transform) is nn.Sequential
        and len(transform) == 4
        and _gc_standard_context(attn)
    ):
        return None
    conv1, layer_norm, act, conv2 = list(transform)
    mask = attn.conv_mask
    if not (
        isinstance(conv1, nn.Conv2d)
        and isinstance(conv2, nn.Conv2d)
        and isinstance(layer_norm, nn.LayerNorm)
        and isinstance(mask, nn.Conv2d)
    ):
        return None
    weights = []
    for conv in (conv1, conv2):
        if not (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.groups == 1):
            return None
        weights.append(conv.weight)
    if (
        not (_is_plain_conv_to_one(mask) and mask.kernel_size == (1, 1))
        or type(layer_norm) is not nn.LayerNorm
        or layer_norm.normalized_shape != (attn.rd_channels, 1, 1)
        or type(act) is not nn.ReLU
        or not _float32_weights(
            *weights, conv1.bias, conv2.bias, layer_norm.weight, layer_norm.bias, mask.weight
        )
    ):
        return None
    plan = _GcPlan(
        norm,
        attn.channels,
        _ptr(mask.weight),
        *(_ptr(t) for t in (weights[0], conv1.bias, layer_norm.weight, layer_norm.bias)),
        float(layer_norm.eps),
        *(_ptr(t) for t in (weights[1], conv2.bias)),
        attn.rd_channels,
    )
    return plan, (attn.channels,)


def _native_gc_tail(
    attn: GlobalContext,
    bn: nn.Module,
    y: torch.Tensor,
    identity: torch.Tensor,
    inplace: bool = False,
) -> torch.Tensor | None:
    """``relu(GC(bn(y)) + identity)`` in one call of :mod:`convattn._native`'s
    ``gc_eval_tail``, with the eval-mode BatchNorm folded as in :func:`_gc_folded_tail` (GC
    as :func:`_gc_plan` describes it); float32 contiguous CPU maps. None otherwise. The
    result goes into ``y`` when ``inplace``."""
    if not (_float32_maps(y, identity) and y.dim() == 4):
        return None
    plan = _native_plan(attn, bn, _gc_plan, "gc_eval_tail")
    if plan is None or y.shape[1] != plan.info[0]:
        return None
    n, _, h, w = y.shape
    out = y if inplace else torch.empty_like(y)
    return _run_tail(plan, y, identity, (n, h * w), out)


def _residual_plan(
    attn: nn.Module, bn: nn.Module | None, norm: _EvalNorm
) -> tuple[_ResidualPlan, tuple[Any, ...]] | None:
    """``residual_eval_tail``'s plan, for a block whose attention slot is ``nn.Identity``."""
    if type(attn) is not nn.Identity or not isinstance(bn, nn.BatchNorm2d):
        return None
    return _ResidualPlan(norm, bn.num_features), (bn.num_features,)


def _native_residual_tail(
    attn: nn.Module, bn: nn.Module, y: torch.Tensor, identity: torch.Tensor, inplace: bool
) -> torch.Tensor | None:
    """``relu(bn(y) + identity)`` for a block without attention (``attn`` is its
    ``nn.Identity``, which keeps the plan) in one pass of :mod:`convattn._native`'s
    ``residual_eval_tail``: the plain network's blocks end as the attention kernels end
    theirs, so that what separates the two is the attention's own cost. None where it does
    not apply (the eager ``bn`` then runs, and says what it expected of a wrong map)."""
    if not _float32_maps(y, identity):
        return None
    plan = _native_plan(attn, bn, _residual_plan, "residual_eval_tail")
    if plan is None or y.shape[1] != plan.info[0]:
        return None
    out = y if inplace else torch.empty_like(y)
    return _run_tail(plan, y, identity, (y.shape[0], math.prod(y.shape[2:])), out)


def _native_folded_tail(
    attn: nn.Module,
    bn: nn.Module,
    y: torch.Tensor,
    identity: torch.Tensor,
    inplace: bool = False,
) -> torch.Tensor | None:
    """``relu(attn(bn(y)) + identity)`` for an eval-mode BatchNorm ``bn`` folded into the
    native kernel of SE / ECA / scSE, CBAM or GC (see :func:`_native_channel_tail`); None
    where no kernel applies (a map of the wrong size among them: the module's own path then
    says what it expected). The result goes into ``y`` when ``inplace`` (``y`` is a map
    nobody else holds), else into a new tensor."""
    if isinstance(attn, (ChannelAttention, ChannelSpatialSE)):
        return _native_channel_tail(attn, y, identity, inplace, bn)
    if isinstance(attn, CBAM):
        return _native_cbam_tail(attn, y, identity, inplace, bn)
    if isinstance(attn, GlobalContext):
        return _native_gc_tail(attn, bn, y, identity, inplace)
    return None


def _fresh_map(block: _Block) -> bool:
    """Whether the map that enters the block's last BatchNorm is a new tensor that nobody
    else holds (made by a plain, unhooked ``nn.Conv2d``), so that a tail may overwrite it:
    the kernels then write their result where the map is, hot in the cache, instead of into
    megabytes of fresh memory (at batch 1, a third of their time in the first stage)."""
    if block.conv3 is not None:
        producer = block.conv3
    else:
        after = block.attn_conv2
        if type(after) is not nn.Identity or _has_hooks(after):
            return False
        producer = block.conv2
    return type(producer) is nn.Conv2d and not _has_hooks(producer)


def _eval_attention_tail(
    attn: nn.Module,
    out: torch.Tensor,
    identity: torch.Tensor,
    owned: bool = False,
    native: bool = True,
) -> torch.Tensor | None:
    """``relu(attn(out) + identity)`` fused, for known attention types; None otherwise.
    ``owned``: ``out`` is a fresh tensor of the block's, free to be overwritten. ``native``:
    SE / ECA-style channel attention and scSE may run in one native kernel call."""
    if identity.shape != out.shape:
        return None
    if native and isinstance(attn, (ChannelAttention, ChannelSpatialSE)):
        result = _native_channel_tail(attn, out, identity, owned)
        if result is not None:
            return result
    if isinstance(attn, ChannelAttention):
        attn._check_input(out)
        return gate_residual_relu(out, _channel_gate(attn, out), identity, inplace=owned)
    if isinstance(attn, (SpatialAttention, SpatialSE)):
        attn._check_input(out)
        return gate_residual_relu(out, _spatial_gate(attn, out), identity, inplace=owned)
    if isinstance(attn, CBAM):
        cg, sg = attn.channel_gate, attn.spatial_gate
        if _any_hooks(cg, sg):
            return None
        attn._check_input(out)
        if native:
            result = _native_cbam_tail(attn, out, identity, owned)
            if result is not None:
                return result
        weights = _channel_gate(cg, out)
        gated = out.mul_(weights) if owned else out * weights
        return gate_residual_relu(gated, _spatial_gate(sg, gated), identity, inplace=True)
    if isinstance(attn, ChannelSpatialSE):
        if _any_hooks(attn.cse, attn.sse):
            return None
        attn._check_input(out)
        channel_weights = _channel_gate(attn.cse, out)
        spatial_weights = _spatial_gate(attn.sse, out)
        fused = out if owned else torch.empty_like(out)
        if out.device.type != "cpu":  # one launch per step for the batch (a GPU)
            _scse_fuse(out, channel_weights, spatial_weights, attn.fusion, fused)
        else:  # one image's temporary at a time, not the batch's
            for i in range(out.shape[0]):
                _scse_fuse(out[i], channel_weights[i], spatial_weights[i], attn.fusion, fused[i])
        return fused.add_(identity).relu_()
    if (
        isinstance(attn, GlobalContext)
        and attn.fusion_types == ("add",)
        and attn.channel_add_conv is not None
    ):
        attn._check_input(out)
        term = _gc_add_term(attn, out)
        summed = out.add_(identity) if owned else torch.add(out, identity)
        return summed.add_(term).relu_()
    return None


def _train_attention_tail(
    block: nn.Module,
    c: torch.Tensor,
    identity: torch.Tensor,
    bn: nn.Module,
    attn: nn.Module,
    native: bool = True,
) -> torch.Tensor | None:
    """Training path for SE / ECA-style attention after a batch-statistics BatchNorm: with
    ``native`` (float32 CPU maps, the module's own average pool) :class:`_SeTailNative`,
    else :class:`BNGateResidualReLU`."""
    if not (
        isinstance(bn, nn.BatchNorm2d)
        and type(bn).forward is nn.BatchNorm2d.forward
        and bn.training
        and isinstance(attn, ChannelAttention)
        and attn.pool == "avg"
        and identity.shape == c.shape
        and c.dim() == 4
        and fast_paths_active(bn)
    ):
        return None
    attn._check_input(c)
    lib = _native_library(c, identity, bn) if native else None
    if lib is not None and not _overrides(attn, ChannelAttention, "attention", "describe"):
        params = list(attn.parameters())
        out = _SeTailNative.apply(c, identity, bn.weight, bn.bias, bn, attn, lib, *params)
        assert isinstance(out, torch.Tensor)  # for mypy: apply() is untyped
        return out
    x, mean, invstd = _bn_train_forward(bn, c)
    gate = _channel_weights(attn, x)
    # the module's own average pool saves nothing of x; an overriding subclass might
    inplace = not _overrides(attn, ChannelAttention, "attention", "describe")
    y = BNGateResidualReLU.apply(x, gate, identity, c, bn.weight, bn.bias, mean, invstd, inplace)
    assert isinstance(y, torch.Tensor)  # for mypy: apply() is untyped
    return y


class _BatchMeanVar(torch.autograd.Function):
    """Per-channel batch mean and (biased) variance of ``c`` ``(N, C, H, W)``, each shaped
    ``(1, C, 1, 1)``: the variance in two passes around the mean (as accurate as
    ``torch.var_mean``, whose one-pass Welford kernel is about 4x slower on the CPU here),
    and the backward in one pass, ``dc = g_mean / M + 2 g_var (c - mean) / M``."""

    @staticmethod
    def forward(ctx: Any, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = c.mean((0, 2, 3), keepdim=True)
        var = (c - mean).square_().mean((0, 2, 3), keepdim=True)
        ctx.save_for_backward(c, mean)
        return mean, var

    @staticmethod
    def backward(
        ctx: Any, grad_mean: torch.Tensor | None, grad_var: torch.Tensor | None
    ) -> torch.Tensor:
        c, mean = ctx.saved_tensors
        count = c.numel() // c.shape[1]
        shift = torch.zeros_like(mean) if grad_mean is None else grad_mean / count
        if grad_var is None:
            return shift.expand_as(c)
        slope = grad_var * (2 / count)
        return _scale_shift(c, slope, shift - slope * mean)


def _update_running_stats(
    bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, count: int
) -> None:
    """One training step's update of ``bn``'s running statistics from the batch ``mean`` and
    biased ``var`` over ``count`` values per channel, as ``nn.BatchNorm2d`` makes it."""
    if bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None:
        factor = _bn_momentum(bn)
        with torch.no_grad():
            unbiased = var * (count / max(count - 1, 1))
            bn.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
            bn.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)


def _bn_train_affine(bn: nn.BatchNorm2d, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable per-channel ``scale, shift`` of a training-mode BatchNorm on ``c``
    (batch statistics), updating the running statistics as ``nn.BatchNorm2d`` does."""
    mean, var = _BatchMeanVar.apply(c)
    mean, var = mean.view(-1), var.view(-1)
    _update_running_stats(bn, mean, var, c.numel() // c.shape[1])
    scale, shift = _bn_affine(bn.weight, bn.bias, mean, torch.rsqrt(var + bn.eps))
    return scale.view(1, -1, 1, 1), shift.view(1, -1, 1, 1)


def _native(kernel: Any, *args: torch.Tensor | int) -> None:
    """Call one of :mod:`convattn._native`'s kernels: tensors as their data addresses (the
    callers pass contiguous float32 / float64 CPU tensors), then PyTorch's thread count."""
    kernel(*(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args))


def _native_batch_norm(
    lib: Any,
    c: torch.Tensor,
    bn: nn.BatchNorm2d,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """A training-mode BatchNorm's batch statistics of ``c`` ``(N, C, H, W)`` from the native
    ``cbam_row_stats`` (one pass; the running statistics updated as ``nn.BatchNorm2d`` does):
    ``rows`` ``(3, N, C)`` (mean, max and min of ``c`` per image and channel), the float64
    batch mean, the inverse std and the per-channel ``scale, shift`` with ``BN(c) = c *
    scale + shift``."""
    n, ch, h, w = c.shape
    mean64 = torch.empty(ch, dtype=torch.float64)
    var64 = torch.empty(ch, dtype=torch.float64)
    rows = torch.empty(3, n, ch)
    work = torch.empty(2 * n * ch, dtype=torch.float64)
    threads = torch.get_num_threads()
    _native(lib.cbam_row_stats, c, n, ch, h * w, mean64, var64, *rows, work, threads)
    mean, var = mean64.float(), var64.float()
    _update_running_stats(bn, mean, var, n * h * w)
    invstd = torch.rsqrt(var + bn.eps)
    weight = None if weight is None else weight.detach()
    bias = None if bias is None else bias.detach()
    scale, shift = (t.contiguous() for t in _bn_affine(weight, bias, mean, invstd))
    return rows, mean64, invstd, scale, shift


class _CbamTailNative(torch.autograd.Function):
    """CBAM's training tail ``relu(CBAM(BN(c)) + identity)`` after a batch-statistics
    BatchNorm, through convattn's native kernels (:mod:`convattn._native`): three passes over
    the feature map forward and four backward, where the eager tail makes about forty, and
    nothing of map size saved but ``c`` and the output.

    The BatchNorm (batch statistics and running-statistics update), both pools, both gate
    products, the residual add and the ReLU are the kernels', with their gradients (the
    BatchNorm's as ATen computes it for batch statistics). The channel MLP and the spatial
    convolution with its BatchNorm and gate are the modules' own calls, made in forward on
    detached leaves and differentiated in backward by ``torch.autograd.grad``; their
    parameters are inputs of this function, so their gradients go wherever autograd sends
    them (``.grad``, or ``torch.autograd.grad``'s result)."""

    @staticmethod
    def forward(
        ctx: Any,
        c: torch.Tensor,
        identity: torch.Tensor,
        bn_weight: torch.Tensor | None,
        bn_bias: torch.Tensor | None,
        bn: nn.BatchNorm2d,
        attn: CBAM,
        lib: Any,
        n_channel_params: int,
        *params: torch.Tensor,
    ) -> torch.Tensor:
        n, ch, h, w = c.shape
        p, threads = h * w, torch.get_num_threads()
        rows, mean64, invstd, scale, shift = _native_batch_norm(lib, c, bn, bn_weight, bn_bias)
        # the channel pools of x = c * scale + shift: the mean is affine in c's mean, and the
        # maximum is x at c's maximum (or minimum, for a negative scale), rounded as the
        # kernels round x, so that backward finds it again by equality
        avg = rows[0] * scale + shift
        peak = torch.where(scale >= 0, rows[1], rows[2]) * scale + shift
        cg, sg = attn.channel_gate, attn.spatial_gate
        with torch.enable_grad():
            avg_leaf = avg.requires_grad_()
            peak_leaf = peak.requires_grad_()
            cw_graph = cg.gate(cg.excite(avg_leaf) + cg.excite(peak_leaf))
        cw = cw_graph.detach().reshape(n, ch).contiguous()
        pooled = torch.empty(n, 2, h, w)  # [max; mean] over channels of x * cw
        ties = torch.empty(n, h, w)  # how many channels reach that maximum
        _native(lib.cbam_spatial_pool, c, scale, shift, cw, n, ch, p, pooled, ties, threads)
        with torch.enable_grad():
            pooled_leaf = pooled.requires_grad_()
            logits = sg._conv(pooled_leaf)
            if sg.bn is not None:
                logits = sg.bn(logits)
            sw_graph = sg.gate(logits)
        sw = sw_graph.detach().contiguous()
        y = torch.empty_like(c)
        _native(lib.cbam_apply, c, scale, shift, cw, sw, identity, n, ch, p, y, threads)
        ctx.save_for_backward(c, y, scale, shift, cw, sw, pooled, ties, peak, mean64, invstd)
        ctx.graphs = (avg_leaf, peak_leaf, cw_graph, pooled_leaf, sw_graph)
        ctx.lib = lib
        ctx.params = params
        ctx.n_channel_params = n_channel_params
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        c, y, scale, shift, cw, sw, pooled, ties, peak, mean64, invstd = ctx.saved_tensors
        avg_leaf, peak_leaf, cw_graph, pooled_leaf, sw_graph = ctx.graphs
        ctx.graphs = None
        lib, threads = ctx.lib, torch.get_num_threads()
        n, ch, h, w = c.shape
        p = h * w
        grad_y = grad_y.contiguous()
        # ReLU mask (identity's gradient) and the spatial gate's gradient
        masked = torch.empty_like(c)
        grad_sw = torch.empty(n, 1, h, w)
        gate = (scale, shift, cw, sw)
        _native(lib.cbam_backward_mask, grad_y, y, c, *gate, n, ch, p, masked, grad_sw, threads)
        split = ctx.n_channel_params
        wanted = ctx.needs_input_grad[8:]
        cg_params, sg_params = (
            [q for q, want in zip(part, flags, strict=True) if want]
            for part, flags in (
                (ctx.params[:split], wanted[:split]),
                (ctx.params[split:], wanted[split:]),
            )
        )
        grads = torch.autograd.grad(
            sw_graph, [pooled_leaf, *sg_params], grad_sw.view_as(sw_graph), allow_unused=True
        )
        grad_pooled = grads[0].contiguous()
        sg_grads = iter(grads[1:])
        # the channel gate's gradient, and how many positions reach each channel maximum
        grad_cw = torch.empty(n, ch)
        peak_ties = torch.empty(n, ch)
        maps = (masked, c, *gate, grad_pooled, pooled, ties, peak)
        _native(lib.cbam_backward_gate, *maps, n, ch, p, grad_cw, peak_ties, threads)
        grads = torch.autograd.grad(
            cw_graph,
            [avg_leaf, peak_leaf, *cg_params],
            grad_cw.view_as(cw_graph),
            allow_unused=True,
        )
        pools = (grads[0].contiguous(), grads[1].contiguous(), peak_ties, mean64)
        cg_grads = iter(grads[2:])
        # BatchNorm's backward: sums of g_x and g_x * (c - mean) per image and channel, then
        # g_c = scale * g_x + alpha * (c - mean) + beta
        sums = torch.empty(2, n, ch, dtype=torch.float64)
        _native(lib.cbam_backward_sums, *maps, *pools, n, ch, p, *sums, threads)
        total = sums.sum(1)
        count = n * p
        grad_bias = total[0].float()
        grad_weight = (total[1] * invstd.double()).float()  # the sum of g_x * x_hat
        alpha = (-scale * invstd * grad_weight / count).contiguous()
        beta = (-scale * grad_bias / count).contiguous()
        grad_c = torch.empty_like(c)
        _native(lib.cbam_backward_input, *maps, *pools, alpha, beta, n, ch, p, grad_c, threads)
        param_grads = [next(cg_grads) if want else None for want in wanted[:split]]
        param_grads += [next(sg_grads) if want else None for want in wanted[split:]]
        return (
            grad_c,
            masked,
            grad_weight if ctx.needs_input_grad[2] else None,
            grad_bias if ctx.needs_input_grad[3] else None,
            None,
            None,
            None,
            None,
            *param_grads,
        )


class _SeTailNative(torch.autograd.Function):
    """``relu(x * gate(excite(mean_hw x)) + identity)`` with ``x = BN(c)`` (batch statistics):
    SE / ECA-style channel attention's training tail through :mod:`convattn._native`'s
    kernels: one pass over the feature map for the statistics and the pooled descriptor, one
    for the output; backward, one for the ReLU mask with the sums that give the gate's and
    BatchNorm's reductions, one for BatchNorm's input gradient. The excitation is the
    module's own (``attn.excite``, ``attn.gate``), run on a detached leaf and differentiated
    with ``torch.autograd.grad``; its parameters are inputs of this function. Saves ``c``,
    the output and small tensors."""

    @staticmethod
    def forward(
        ctx: Any,
        c: torch.Tensor,
        identity: torch.Tensor,
        bn_weight: torch.Tensor | None,
        bn_bias: torch.Tensor | None,
        bn: nn.BatchNorm2d,
        attn: ChannelAttention,
        lib: Any,
        *params: torch.Tensor,
    ) -> torch.Tensor:
        n, ch, h, w = c.shape
        rows, mean64, invstd, scale, shift = _native_batch_norm(lib, c, bn, bn_weight, bn_bias)
        with torch.enable_grad():
            avg_leaf = (rows[0] * scale + shift).requires_grad_()
            gate_graph = attn.gate(attn.excite(avg_leaf))
        gate = gate_graph.detach().reshape(n, ch).contiguous()
        y = torch.empty_like(c)
        threads = torch.get_num_threads()
        _native(lib.se_apply, c, scale, shift, gate, identity, n, ch, h * w, y, threads)
        ctx.save_for_backward(c, y, scale, gate, mean64, invstd, bn_bias)
        ctx.graph = (avg_leaf, gate_graph)
        ctx.lib = lib
        ctx.params = params
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        c, y, scale, gate, mean64, invstd, bn_bias = ctx.saved_tensors
        avg_leaf, gate_graph = ctx.graph
        ctx.graph = None
        lib, threads = ctx.lib, torch.get_num_threads()
        n, ch, h, w = c.shape
        p = h * w
        masked = torch.empty_like(c)
        sums = torch.empty(n, ch, 3, dtype=torch.float64)
        args = (grad_y.contiguous(), y, c, mean64, n, ch, p, masked, sums, threads)
        _native(lib.se_backward_mask, *args)
        sum_m, sum_mc, sum_c = sums.unbind(2)  # m, m * (c - mean), (c - mean) per row
        # x = scale * (c - mean) + bias: the gate's gradient sum_hw(m * x) from the sums
        grad_gate = sum_mc * scale.double()
        if bn_bias is not None:
            grad_gate = grad_gate + sum_m * bn_bias.detach().double()
        wanted = ctx.needs_input_grad[7:]
        inputs = [q for q, want in zip(ctx.params, wanted, strict=True) if want]
        grads = torch.autograd.grad(
            gate_graph,
            [avg_leaf, *inputs],
            grad_gate.float().view_as(gate_graph),
            allow_unused=True,
        )
        grad_avg = grads[0].reshape(n, ch).double()
        param_grads = iter(grads[1:])
        # BatchNorm's reductions over g_x = m * g + grad_avg / P, per channel
        gate64 = gate.double()
        sum_gx = (gate64 * sum_m + grad_avg).sum(0)
        sum_gxc = (gate64 * sum_mc + grad_avg / p * sum_c).sum(0)
        count = n * p
        grad_bias = sum_gx.float()
        grad_weight = (sum_gxc * invstd.double()).float()  # sum of g_x * x_hat
        alpha = (-scale * invstd * grad_weight / count).contiguous()
        beta = (-scale * grad_bias / count).contiguous()
        share = (grad_avg / p).float().contiguous()
        grad_c = torch.empty_like(c)
        args2 = (masked, c, scale, gate, share, alpha, beta, mean64, n, ch, p, grad_c, threads)
        _native(lib.se_backward_input, *args2)
        return (
            grad_c,
            masked,
            grad_weight if ctx.needs_input_grad[2] else None,
            grad_bias if ctx.needs_input_grad[3] else None,
            None,
            None,
            None,
            *(next(param_grads) if want else None for want in wanted),
        )


def _native_library(c: torch.Tensor, identity: torch.Tensor, bn: nn.BatchNorm2d) -> Any:
    """:mod:`convattn._native`'s kernels when they apply to this CBAM tail (float32 contiguous
    CPU maps of the same shape, a float32 BatchNorm) and can be built, else None."""
    if not (
        c.device.type == "cpu"
        and identity.shape == c.shape
        and c.dtype == torch.float32
        and identity.dtype == torch.float32
        and c.is_contiguous()
        and identity.is_contiguous()
        and all(t is None or t.dtype == torch.float32 for t in (bn.weight, bn.bias))
    ):
        return None
    return _kernels.library()


def _train_cbam_tail(
    c: torch.Tensor, identity: torch.Tensor, bn: nn.Module, attn: CBAM, native: bool = True
) -> torch.Tensor | None:
    """Training path for CBAM after a batch-statistics BatchNorm: saves ``c`` and small
    tensors only; ``BN(c)`` and the channel-gated map are rebuilt in backward. With
    ``native`` (and float32 CPU maps) the whole tail runs in :class:`_CbamTailNative`'s
    kernels, else in the eager functions below."""
    cg, sg = attn.channel_gate, attn.spatial_gate
    if not (
        isinstance(bn, nn.BatchNorm2d)
        and type(bn).forward is nn.BatchNorm2d.forward
        and bn.training
        and cg.pool == "avg+max"
        and sg.pool == "both"
        and identity.shape == c.shape
        and c.dim() == 4
        and fast_paths_active(bn, cg, sg)
    ):
        return None
    attn._check_input(c)
    lib = _native_library(c, identity, bn) if native else None
    if lib is not None:
        params = [*cg.parameters(), *sg.parameters()]
        n_channel = len(list(cg.parameters()))
        out = _CbamTailNative.apply(
            c, identity, bn.weight, bn.bias, bn, attn, lib, n_channel, *params
        )
        assert isinstance(out, torch.Tensor)  # for mypy: apply() is untyped
        return out
    scale, shift = _bn_train_affine(bn, c)
    x = _scale_shift(c, scale, shift)
    recipe = _Recompute(c.detach(), scale.detach(), shift.detach())
    avg, peak = _CbamChannelPool.apply(x, recipe)
    cw = cg.gate(cg.excite(avg.flatten(1)) + cg.excite(peak.flatten(1)))
    cw = cw.view(x.shape[0], -1, 1, 1)
    pooled = _CbamSpatialPool.apply(x, cw, recipe)
    logits = sg._conv(pooled)
    if sg.bn is not None:
        logits = sg.bn(logits)
    sw = sg.gate(logits)
    y = _CbamApply.apply(x, cw, sw, identity, recipe)
    assert isinstance(y, torch.Tensor)  # for mypy: apply() is untyped
    return y


def block_forward(block: _Block, x: torch.Tensor) -> torch.Tensor | None:
    """Fast forward of a reference ResNet block (``convattn.models.resnet._Block``), or None
    when no fast path applies (the caller then runs its plain forward)."""
    if not getattr(block, "fast_path", True):
        return None
    attn: nn.Module = block.attn
    if not fast_paths_active(block, attn, block.relu):
        return None
    grad = torch.is_grad_enabled()
    if grad and not block.training:
        return None
    last_bn: nn.Module = block.bn2
    if block.conv3 is not None and block.bn3 is not None:
        last_bn = block.bn3
    # A BatchNorm's output is a new tensor that nobody else holds (unless a hook kept it) and
    # that its backward does not need: the residual can be added into it in place.
    owned = type(last_bn) is nn.BatchNorm2d and not _has_hooks(last_bn)
    plain = isinstance(attn, nn.Identity)
    if plain and not owned:
        return None
    if (
        grad
        and not plain
        and (
            not isinstance(last_bn, nn.BatchNorm2d)
            or not (
                (isinstance(attn, ChannelAttention) and attn.pool == "avg")
                or (isinstance(attn, CBAM) and getattr(block, "fast_recompute", True))
            )
        )
    ):
        return None  # the training fast path knows only these; decide before any compute
    identity = x
    out = block.relu(block.bn1(block.conv1(block.pre_conv1(x))))
    out = block.attn_conv2(block.conv2(block.pre_conv2(out)))
    if block.conv3 is not None and block.bn3 is not None:
        out = block.conv3(block.pre_conv3(block.relu(block.bn2(out))))
    if block.downsample is not None:
        identity = block.downsample(block.pre_downsample(x))
    native = getattr(block, "fast_native", True)
    if plain:  # no attention
        if native and not grad:
            result = _native_residual_tail(attn, last_bn, out, identity, _fresh_map(block))
            if result is not None:
                return result
        out = last_bn(out)  # torchvision's in-place residual add
        out += identity
        return block.relu(out)
    if grad:
        if isinstance(attn, CBAM):
            result = None
            if getattr(block, "fast_recompute", True):
                result = _train_cbam_tail(out, identity, last_bn, attn, native)
        else:
            result = _train_attention_tail(block, out, identity, last_bn, attn, native)
        if result is None:  # BN in eval mode or hooked: finish the plain way
            result = block.relu(attn(last_bn(out)) + identity)
        return result
    if native and owned:
        # the last BatchNorm (exactly nn.BatchNorm2d, unhooked) folded into a native kernel
        result = _native_folded_tail(attn, last_bn, out, identity, _fresh_map(block))
        if result is not None:
            return result
    if isinstance(attn, GlobalContext):
        result = _gc_folded_tail(attn, last_bn, out, identity)
        if result is not None:
            return result
    out = last_bn(out)
    result = _eval_attention_tail(attn, out, identity, owned, native)
    if result is None:
        result = block.relu(attn(out) + identity)
    return result


def set_fast_paths(
    model: nn.Module, enabled: bool = True, *, recompute: bool = True, native: bool = True
) -> int:
    """Switch the fast paths of every reference block in ``model`` on or off; returns how many
    blocks were set.

    ``recompute`` (with ``enabled``) keeps CBAM's memory-saving training path, which rebuilds
    the gated maps in backward: about 30 % less training memory for CBAM blocks; False trains
    CBAM blocks the direct way (SE / ECA's memory-saving path costs no speed and stays on).
    ``native`` lets the fast paths run in convattn's compiled CPU kernels
    (:mod:`convattn._native`, built with the system's C compiler on first use) for float32
    contiguous maps on the CPU: the training tails of SE / ECA and CBAM (with ``recompute``)
    and the inference tails of SE, ECA, scSE, CBAM and GC, each one call per block with the
    block's eval-mode BatchNorm folded in; False keeps them in PyTorch operations (as does a
    machine without a C compiler, or ``CONVATTN_NATIVE=0`` in the environment).
    """
    for option, value in (("enabled", enabled), ("recompute", recompute), ("native", native)):
        if not isinstance(value, bool):
            raise TypeError(f"set_fast_paths: {option} must be a bool, got {type(value).__name__}")
    from convattn.models.resnet import _Block

    count = 0
    for module in model.modules():
        if isinstance(module, _Block):
            setattr(module, "fast_path", enabled)  # noqa: B010 (not a declared attribute)
            setattr(module, "fast_recompute", recompute)  # noqa: B010
            setattr(module, "fast_native", native)  # noqa: B010
            count += 1
    return count


def optimize(
    model: nn.Module,
    *,
    compile: bool = False,
    channels_last: bool = False,
    fuse: bool = True,
    recompute: bool = True,
    native: bool = True,
    compile_options: dict[str, Any] | None = None,
) -> nn.Module:
    """Make ``model`` cheaper to run without changing what it computes.

    Args:
        model: any module; the fast paths apply to convattn's reference ResNet blocks.
        compile: wrap the result in ``torch.compile`` (``compile_options`` are passed on);
            the compiled graph uses the plain code, which the compiler fuses itself.
        channels_last: convert parameters and buffers to ``torch.channels_last`` (inputs
            should then be given in that layout too).
        fuse: turn the eager fast paths of the reference blocks on (the default of a freshly
            built model) or off.
        recompute: keep CBAM's memory-saving training path (see :func:`set_fast_paths`);
            False trains CBAM blocks the direct way (more memory; slower than the native
            kernels).
        native: let the fast paths run in convattn's compiled CPU kernels
            (:mod:`convattn._native`) where they apply; False keeps them in PyTorch
            operations.

    Returns:
        ``model`` (changed in place), or the ``torch.compile`` wrapper around it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize: model must be an nn.Module, got {type(model).__name__}")
    flags = {"compile": compile, "channels_last": channels_last, "fuse": fuse}
    flags["recompute"] = recompute
    flags["native"] = native
    for option, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"optimize: {option} must be a bool, got {type(value).__name__}")
    if compile_options is not None and not isinstance(compile_options, dict):
        raise TypeError(
            f"optimize: compile_options must be a dict, got {type(compile_options).__name__}"
        )
    set_fast_paths(model, fuse, recompute=recompute, native=native)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        return torch.compile(model, **(compile_options or {}))  # type: ignore[return-value]
    return model
