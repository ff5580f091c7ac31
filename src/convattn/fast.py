"""Fast paths for attention inside the reference backbones, and :func:`optimize`.

Every fast path computes the same function as the plain code (outputs and gradients equal
within float32 rounding) and is taken only in eager mode: never while scripting, tracing,
exporting or compiling, never when a hook is registered on a module it bypasses (so
:func:`convattn.capture` and user hooks see what they always saw), and never for modules it
does not know. Attention gates (the ``gate*`` submodules) are always called with the gate
logits.

Inference (no autograd graph), ResNet blocks with block-end attention:

- channel / spatial attention (SE, ECA, cSE, sSE, generic channel / spatial): the gate is
  applied together with the residual add and the ReLU, ``relu(addcmul(identity, x, g))``,
  one pass over the feature map instead of three;
- CBAM: the channel gate's product, then the spatial gate fused with residual and ReLU;
- GC with ``add`` fusion: ``relu(x + identity + t)`` written into one new tensor.

Training (autograd on), ResNet blocks with SE / ECA-style attention (average-pooled channel
gate) after a training-mode BatchNorm: :class:`BNGateResidualReLU` applies
``relu(BN(c) * g + identity)`` saving only ``c`` (which the BatchNorm saves anyway), the
per-channel statistics, the small gate and the block output; ``BN(c)`` is recomputed in
backward instead of being kept, one full feature map per block less than the plain graph.

Layer files and blocks route through :func:`block_forward`; :func:`optimize` switches the
fast paths on or off, converts to channels_last and wraps in ``torch.compile`` on request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from convattn.layers._helpers import amax_backward, eager_mode
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


def _global_hooks() -> bool:
    from torch.nn.modules import module as module_mod

    return bool(
        module_mod._global_forward_hooks
        or module_mod._global_forward_pre_hooks
        or module_mod._global_backward_hooks
        or getattr(module_mod, "_global_backward_pre_hooks", None)
    )


def fast_paths_active(*modules: nn.Module, under_compile: bool = False) -> bool:
    """Whether a fast path may replace the plain calls of ``modules`` now: eager mode (not
    scripting, tracing, exporting, FX tracing or, unless ``under_compile``, compiling) and no
    hooks on any of them (nor global module hooks)."""
    if not eager_mode(under_compile=under_compile):
        return False
    if _global_hooks():
        return False
    return not any(_has_hooks(m) for m in modules)


def gate_residual_relu(x: torch.Tensor, gate: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
    """``relu(x * gate + identity)`` in one pass (``gate`` broadcasts against ``x``).

    Differentiable through autograd like the plain expression; the fused single-pass form is
    used when no gradient is recorded."""
    if torch.is_grad_enabled() and (
        x.requires_grad or gate.requires_grad or identity.requires_grad
    ):
        return torch.relu(x * gate + identity)
    out = torch.addcmul(identity, x, gate) if identity.shape == x.shape else x * gate + identity
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


class BNGateResidualReLU(torch.autograd.Function):
    """``y = relu(x * g + identity)`` where ``x = BN(c)`` (training-mode BatchNorm with batch
    statistics ``mean``, ``invstd``), saving ``c``, the statistics, ``g`` and ``y`` only.

    ``x`` is an input (its gradient flows back into the BatchNorm and into whatever else
    used it, e.g. the attention's average pool), but it is not saved: backward recomputes it
    from ``c``. ``g`` has shape ``(N, C, 1, 1)`` or ``(N, 1, H, W)``.
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
    ) -> torch.Tensor:
        y = torch.addcmul(identity, x, gate).relu_()
        ctx.save_for_backward(c, weight, bias, mean, invstd, gate, y)
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        c, weight, bias, mean, invstd, gate, y = ctx.saved_tensors
        masked = torch.ops.aten.threshold_backward(grad_y, y, 0)
        grad_x = grad_g = grad_id = None
        if ctx.needs_input_grad[1]:
            scale, shift = _bn_affine(weight, bias, mean, invstd)
            view = [1, -1] + [1] * (c.dim() - 2)
            x = torch.addcmul(shift.view(view), c, scale.view(view))
            if c.dim() == 4 and gate.shape == (c.shape[0], c.shape[1], 1, 1):
                # sum over positions of masked * x without materialising the product
                grad_g = torch.einsum("nchw,nchw->nc", masked, x).view(gate.shape)
            else:
                dims = [d for d in range(c.dim()) if gate.shape[d] == 1 and c.shape[d] != 1]
                prod = masked * x
                grad_g = prod.sum(dims, keepdim=True) if dims else prod
            del x
        if ctx.needs_input_grad[0]:
            grad_x = masked * gate
        if ctx.needs_input_grad[2]:
            grad_id = masked
        return grad_x, grad_g, grad_id, None, None, None, None, None


class _Recompute:
    """How a CBAM block's fast path rebuilds ``x = c * scale + shift`` in backward (bit-exact:
    the same operation on the same tensors as in forward), and a slot to share the rebuilt
    tensor between the backward passes of one block (the last one to run clears it)."""

    def __init__(self, c: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> None:
        self.c = c
        self.scale = scale
        self.shift = shift
        self.x: torch.Tensor | None = None

    def get(self) -> torch.Tensor:
        if self.x is None:
            self.x = torch.addcmul(self.shift, self.c, self.scale)
        return self.x


class _CbamChannelMax(torch.autograd.Function):
    """``x.amax((2, 3), keepdim=True)`` without saving ``x`` (rebuilt from the recipe)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, recipe: _Recompute) -> torch.Tensor:
        out = x.amax((2, 3), keepdim=True)
        ctx.recipe = recipe
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        (out,) = ctx.saved_tensors
        x = ctx.recipe.get()
        ctx.recipe.x = None  # the last backward of the block: free the rebuilt map
        return amax_backward(x, out, grad, [2, 3]), None


class _CbamSpatialPool(torch.autograd.Function):
    """``[amax_c(x * cw); mean_c(x * cw)]`` (CBAM's spatial descriptor of the channel-gated
    map) without saving ``x`` or ``x * cw``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cw: torch.Tensor, recipe: _Recompute) -> torch.Tensor:
        x1 = x * cw
        out = torch.cat([x1.amax(1, keepdim=True), x1.mean(1, keepdim=True)], dim=1)
        ctx.recipe = recipe
        ctx.save_for_backward(cw, out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        cw, out = ctx.saved_tensors
        x = ctx.recipe.get()
        x1 = x * cw
        grad_x1 = amax_backward(x1, out[:, :1], grad[:, :1], [1])
        grad_x1 += grad[:, 1:] / x1.shape[1]
        del x1
        grad_cw = torch.einsum("nchw,nchw->nc", grad_x1, x).view(cw.shape)
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
        y = torch.addcmul(identity, x * cw, sw).relu_()
        ctx.recipe = recipe
        ctx.save_for_backward(cw, sw, y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        cw, sw, y = ctx.saved_tensors
        x = ctx.recipe.get()
        masked = torch.ops.aten.threshold_backward(grad, y, 0)
        x1 = x * cw
        grad_sw = torch.einsum("nchw,nchw->nhw", masked, x1).unsqueeze(1)
        del x1
        t = masked * sw
        grad_cw = torch.einsum("nchw,nchw->nc", t, x).view(cw.shape)
        return t.mul_(cw), grad_cw, grad_sw, masked, None


class _SingleOutputConv2d(torch.autograd.Function):
    """``conv2d(x, weight, bias, padding=padding)`` with stride 1, no dilation or groups and
    one output channel (the k x k convolution of spatial attention), with a faster backward on
    the CPU: oneDNN's transposed convolution (autograd's input gradient) is about 20x slower
    than a forward convolution for one output channel, so the input gradient is computed as
    a convolution with the flipped, transposed kernel, and the weight gradient as a
    convolution of the input by the output gradient. Same values up to rounding; twice
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
            grad_w = F.conv2d(x.transpose(0, 1), grad.transpose(0, 1), None, 1, ctx.padding)
            grad_w = grad_w.transpose(0, 1)
        if ctx.needs_input_grad[2] and ctx.has_bias:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None


def single_output_conv2d(conv: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``conv(x)`` through :class:`_SingleOutputConv2d` when a gradient will be computed on the
    CPU and ``conv`` is a plain, unhooked ``nn.Conv2d`` with one output channel, stride 1, no
    dilation or groups and zero padding of at most ``k - 1``; None otherwise (call ``conv``).
    Taken under ``torch.compile`` too (the compiler's own convolution backward is the slow
    one), never while scripting, tracing or exporting."""
    if not (
        torch.is_grad_enabled()
        and type(conv) is nn.Conv2d
        and x.device.type == "cpu"
        and x.dim() == 4
        and conv.out_channels == 1
        and conv.groups == 1
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and all(0 <= p < k for p, k in zip(conv.padding, conv.kernel_size, strict=True))
        and (x.requires_grad or conv.weight.requires_grad)
        and fast_paths_active(conv, under_compile=True)
    ):
        return None
    padding = (int(conv.padding[0]), int(conv.padding[1]))
    y = _SingleOutputConv2d.apply(x, conv.weight, conv.bias, padding)
    assert isinstance(y, torch.Tensor)  # for mypy: apply() is untyped
    return y


def _bn_train_forward(bn: nn.BatchNorm2d, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``bn(c)`` in training mode, exactly as ``nn.BatchNorm2d.forward`` (running-stat update
    included), also returning the batch mean and inverse std it normalised with."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = 1.0 / float(bn.num_batches_tracked)
    out, mean, invstd = torch.native_batch_norm(
        c, bn.weight, bn.bias, bn.running_mean, bn.running_var, True, factor, bn.eps
    )
    return out, mean.detach(), invstd.detach()


def _channel_weights(attn: ChannelAttention, x: torch.Tensor) -> torch.Tensor:
    weights = attn.attention(x)
    return weights.reshape(weights.shape + (1,) * (x.dim() - 2))


def _eval_attention_tail(
    attn: nn.Module, out: torch.Tensor, identity: torch.Tensor
) -> torch.Tensor | None:
    """``relu(attn(out) + identity)`` fused, for known attention types; None otherwise."""
    if identity.shape != out.shape:
        return None
    if isinstance(attn, ChannelAttention):
        attn._check_input(out)
        return gate_residual_relu(out, _channel_weights(attn, out), identity)
    if isinstance(attn, (SpatialAttention, SpatialSE)):
        attn._check_input(out)
        return gate_residual_relu(out, attn.attention(out), identity)
    if isinstance(attn, CBAM):
        cg, sg = attn.channel_gate, attn.spatial_gate
        if not fast_paths_active(cg, sg):
            return None
        attn._check_input(out)
        x1 = out * _channel_weights(cg, out)
        return gate_residual_relu(x1, sg.attention(x1), identity)
    if isinstance(attn, ChannelSpatialSE):
        if not fast_paths_active(attn.cse, attn.sse):
            return None
        attn._check_input(out)
        fused = out * _channel_weights(attn.cse, out)
        spatial_weights = attn.sse.attention(out)
        if attn.fusion == "max":
            torch.maximum(fused, out * spatial_weights, out=fused)
        else:
            fused.addcmul_(out, spatial_weights)
        return fused.add_(identity).relu_()
    if (
        isinstance(attn, GlobalContext)
        and attn.fusion_types == ("add",)
        and attn.channel_add_conv is not None
    ):
        if not fast_paths_active(attn.channel_add_conv):
            return None
        attn._check_input(out)
        term = attn.channel_add_conv(attn.context(out))
        return torch.add(out, identity).add_(term).relu_()
    return None


def _train_attention_tail(
    block: nn.Module, c: torch.Tensor, identity: torch.Tensor, bn: nn.Module, attn: nn.Module
) -> torch.Tensor | None:
    """Training path for SE / ECA-style attention after a batch-statistics BatchNorm."""
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
    x, mean, invstd = _bn_train_forward(bn, c)
    attn._check_input(x)
    gate = _channel_weights(attn, x)
    y = BNGateResidualReLU.apply(x, gate, identity, c, bn.weight, bn.bias, mean, invstd)
    assert isinstance(y, torch.Tensor)  # for mypy: apply() is untyped
    return y


def _bn_train_affine(bn: nn.BatchNorm2d, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable per-channel ``scale, shift`` of a training-mode BatchNorm on ``c``
    (batch statistics), updating the running statistics as ``nn.BatchNorm2d`` does."""
    var, mean = torch.var_mean(c, (0, 2, 3), correction=0)
    if bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None:
        factor = 0.0 if bn.momentum is None else bn.momentum
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                factor = 1.0 / float(bn.num_batches_tracked)
        count = c.numel() // c.shape[1]
        with torch.no_grad():
            unbiased = var * (count / max(count - 1, 1))
            bn.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
            bn.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale.view(1, -1, 1, 1), shift.view(1, -1, 1, 1)


def _train_cbam_tail(
    c: torch.Tensor, identity: torch.Tensor, bn: nn.Module, attn: CBAM
) -> torch.Tensor | None:
    """Training path for CBAM after a batch-statistics BatchNorm: saves ``c`` and small
    tensors only; ``BN(c)`` and the channel-gated map are rebuilt in backward."""
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
    scale, shift = _bn_train_affine(bn, c)
    x = torch.addcmul(shift, c, scale)
    attn._check_input(x)
    recipe = _Recompute(c.detach(), scale.detach(), shift.detach())
    avg = x.mean((2, 3))
    peak = _CbamChannelMax.apply(x, recipe).flatten(1)
    cw = cg.gate(cg.excite(avg) + cg.excite(peak)).view(x.shape[0], -1, 1, 1)
    pooled = _CbamSpatialPool.apply(x, cw, recipe)
    logits = sg.conv(pooled) if (fast := single_output_conv2d(sg.conv, pooled)) is None else fast
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
    if isinstance(attn, nn.Identity) or not fast_paths_active(block, attn, block.relu):
        return None
    grad = torch.is_grad_enabled()
    if grad and not block.training:
        return None
    last_bn: nn.Module = block.bn2
    if block.conv3 is not None and block.bn3 is not None:
        last_bn = block.bn3
    if grad and (
        not isinstance(last_bn, nn.BatchNorm2d)
        or not (
            (isinstance(attn, ChannelAttention) and attn.pool == "avg")
            or (isinstance(attn, CBAM) and getattr(block, "fast_recompute", True))
        )
    ):
        return None  # the training fast path knows only these; decide before any compute
    identity = x
    out = block.relu(block.bn1(block.conv1(block.pre_conv1(x))))
    out = block.attn_conv2(block.conv2(block.pre_conv2(out)))
    if block.conv3 is not None and block.bn3 is not None:
        out = block.conv3(block.pre_conv3(block.relu(block.bn2(out))))
    elif not grad:
        out = block.bn2(out)
    if block.downsample is not None:
        identity = block.downsample(block.pre_downsample(x))
    if grad:
        if isinstance(attn, CBAM):
            result = None
            if getattr(block, "fast_recompute", True):
                result = _train_cbam_tail(out, identity, last_bn, attn)
        else:
            result = _train_attention_tail(block, out, identity, last_bn, attn)
        if result is None:  # BN in eval mode or hooked: finish the plain way
            result = block.relu(attn(last_bn(out)) + identity)
        return result
    if block.conv3 is not None and block.bn3 is not None:
        out = block.bn3(out)
    result = _eval_attention_tail(attn, out, identity)
    if result is None:
        result = block.relu(attn(out) + identity)
    return result


def set_fast_paths(model: nn.Module, enabled: bool = True, *, recompute: bool = True) -> int:
    """Switch the fast paths of every reference block in ``model`` on or off; returns how many
    blocks were set.

    ``recompute`` (with ``enabled``) keeps CBAM's memory-saving training path, which rebuilds
    the gated maps in backward: about 30 % less training memory for CBAM blocks at some
    training speed; False trains CBAM blocks the direct way (SE / ECA's memory-saving path
    costs no speed and stays on).
    """
    for option, value in (("enabled", enabled), ("recompute", recompute)):
        if not isinstance(value, bool):
            raise TypeError(f"set_fast_paths: {option} must be a bool, got {type(value).__name__}")
    from convattn.models.resnet import _Block

    count = 0
    for module in model.modules():
        if isinstance(module, _Block):
            setattr(module, "fast_path", enabled)  # noqa: B010 (not a declared attribute)
            setattr(module, "fast_recompute", recompute)  # noqa: B010
            count += 1
    return count


def optimize(
    model: nn.Module,
    *,
    compile: bool = False,
    channels_last: bool = False,
    fuse: bool = True,
    recompute: bool = True,
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
            False favours training speed over memory for CBAM blocks.

    Returns:
        ``model`` (changed in place), or the ``torch.compile`` wrapper around it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize: model must be an nn.Module, got {type(model).__name__}")
    flags = {"compile": compile, "channels_last": channels_last, "fuse": fuse}
    flags["recompute"] = recompute
    for option, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"optimize: {option} must be a bool, got {type(value).__name__}")
    if compile_options is not None and not isinstance(compile_options, dict):
        raise TypeError(
            f"optimize: compile_options must be a dict, got {type(compile_options).__name__}"
        )
    set_fast_paths(model, fuse, recompute=recompute)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        return torch.compile(model, **(compile_options or {}))  # type: ignore[return-value]
    return model
