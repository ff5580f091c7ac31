"""Shared building blocks: channel rounding, activation resolution, N-d layer factories,
input checks and the common base class of every attention module."""

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

__all__ = [
    "ActLayer",
    "AttentionModule",
    "GroupNorm",
    "SingleOutputConvMixin",
    "amax",
    "amax_backward",
    "at_least_float32",
    "batch_norm_nd",
    "check_choice",
    "check_positive_int",
    "check_spatial_dims",
    "conv_nd",
    "create_act",
    "eager_mode",
    "eca_kernel_size",
    "get_act_layer",
    "make_divisible",
    "mean",
    "mean_amax",
    "mean_amax_backward",
    "reduced_channels",
    "spatial_numel",
    "unsqueeze_spatial",
]

# An activation is given by name ("relu"), by class (nn.ReLU) or by a factory returning a module.
ActLayer = str | type[nn.Module] | Callable[[], nn.Module]

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "relu6": lambda: nn.ReLU6(inplace=True),
    "leaky_relu": lambda: nn.LeakyReLU(0.01, inplace=True),
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
    "hard_swish": nn.Hardswish,
    "sigmoid": nn.Sigmoid,
    "hard_sigmoid": nn.Hardsigmoid,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


def get_act_layer(
    act: ActLayer, *, owner: str = "convattn", option: str = "act_layer"
) -> Callable[[], nn.Module]:
    """Resolve an activation given by name, class or factory to a zero-argument factory.

    Names: ``relu, relu6, leaky_relu, silu (swish), gelu, hard_swish, sigmoid, hard_sigmoid,
    tanh, identity``. ``owner`` and ``option`` name the module and option in error messages.
    """
    if isinstance(act, str):
        key = act.lower().replace("-", "_")
        if key not in _ACTIVATIONS:
            raise ValueError(
                f"{owner}: {option} must be one of {sorted(_ACTIVATIONS)} or an nn.Module "
                f"class, got {act!r}"
            )
        return _ACTIVATIONS[key]
    if isinstance(act, type) and not issubclass(act, nn.Module):
        raise TypeError(
            f"{owner}: {option} class must be an nn.Module subclass, got {act.__name__}"
        )
    if callable(act):
        return act
    raise TypeError(
        f"{owner}: {option} must be a name, an nn.Module class or a factory, "
        f"got {type(act).__name__}"
    )


def create_act(act: ActLayer, *, owner: str = "convattn", option: str = "act_layer") -> nn.Module:
    """Instantiate an activation given by name, class or factory."""
    module = get_act_layer(act, owner=owner, option=option)()
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"{owner}: {option} factory must return an nn.Module, got {type(module).__name__}"
        )
    return module


def make_divisible(
    v: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9
) -> int:
    """Round ``v`` to the nearest multiple of ``divisor`` (at least ``min_value``), never going
    below ``round_limit * v`` (the rounding used by MobileNet and timm)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def reduced_channels(
    channels: int,
    rd_ratio: float,
    rd_channels: int | None = None,
    rd_divisor: int | None = None,
    *,
    min_channels: int = 1,
    owner: str = "convattn",
) -> int:
    """Width of a reduction bottleneck.

    ``rd_channels`` wins when given. Otherwise ``int(channels * rd_ratio)`` (floor, as the
    official SE/CBAM/scSE code computes ``C // r``), or ``make_divisible`` with ``rd_divisor``
    when that is set (timm's rounding). The result is at least ``min_channels``.
    """
    if rd_channels is not None:
        check_positive_int(owner, "rd_channels", rd_channels)
        return rd_channels
    if not isinstance(rd_ratio, (int, float)) or isinstance(rd_ratio, bool) or not rd_ratio > 0:
        raise ValueError(f"{owner}: rd_ratio must be a positive number, got {rd_ratio!r}")
    if rd_divisor is not None:
        check_positive_int(owner, "rd_divisor", rd_divisor)
        return max(min_channels, make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0))
    return max(min_channels, int(channels * rd_ratio))


def eca_kernel_size(channels: int, gamma: float = 2, beta: float = 1) -> int:
    """ECA's adaptive kernel size, as the official code computes it:
    ``t = int(|(log2(C) + b) / gamma|)``, then ``t`` if odd else ``t + 1``."""
    t = int(abs((math.log2(channels) + beta) / gamma))
    return t if t % 2 else t + 1


def check_positive_int(owner: str, option: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {option} must be an int, got {type(value).__name__} ({value!r})")
    if value < 1:
        raise ValueError(f"{owner}: {option} must be a positive int, got {value}")
    return value


def check_choice(owner: str, option: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        raise ValueError(f"{owner}: {option} must be one of {list(choices)}, got {value!r}")


def check_spatial_dims(
    owner: str, spatial_dims: object, supported: Sequence[int] = (1, 2, 3)
) -> int:
    if isinstance(spatial_dims, bool) or not isinstance(spatial_dims, int):
        raise TypeError(f"{owner}: spatial_dims must be an int, got {type(spatial_dims).__name__}")
    if spatial_dims not in supported:
        raise ValueError(
            f"{owner}: spatial_dims must be one of {list(supported)} for this module, "
            f"got {spatial_dims}"
        )
    return spatial_dims


def conv_nd(spatial_dims: int) -> type[nn.Module]:
    """``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d``."""
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial_dims - 1]


def batch_norm_nd(spatial_dims: int) -> type[nn.Module]:
    """``nn.BatchNorm1d``, ``nn.BatchNorm2d`` or ``nn.BatchNorm3d``."""
    return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[spatial_dims - 1]


def unsqueeze_spatial(weights: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """(N, C) -> (N, C, 1, ..., 1) with ``spatial_dims`` trailing singleton dims."""
    for _ in range(spatial_dims):
        weights = weights.unsqueeze(-1)
    return weights


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when it is float16 or bfloat16, unchanged otherwise: for reductions
    whose intermediate values overflow float16 or lose too much precision in bfloat16 (sums of
    squares, dot-product energies). The caller casts the result back to the input dtype."""
    if x.dtype == torch.float16 or x.dtype == torch.bfloat16:
        return x.float()
    return x


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that also takes a group holding a single value (batch 1, one group, a
    1x1 map), which ``F.group_norm`` refuses: it normalises to 0 and returns the bias. Same
    parameters and state-dict keys as ``nn.GroupNorm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def spatial_numel(x: torch.Tensor) -> int:
    """Number of positions of an (N, C, *spatial) tensor: the product of its spatial sizes
    (written as a loop so that TorchScript compiles it; ``math.prod`` is not supported)."""
    positions = 1
    for size in x.shape[2:]:
        positions *= size
    return positions


_DIM_NAMES = {1: "(N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}


class AttentionModule(nn.Module):
    """Base class of convattn's attention modules.

    Holds ``channels`` and ``spatial_dims`` and checks inputs against them, so that a wrong
    input raises a ``ValueError`` naming the module, what it expected and what it got, instead
    of a shape error from deep inside a layer.
    """

    channels: int
    spatial_dims: int

    def __init__(
        self, channels: int, spatial_dims: int = 2, supported_dims: Sequence[int] = (1, 2, 3)
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.channels = check_positive_int(owner, "channels", channels)
        self.spatial_dims = check_spatial_dims(owner, spatial_dims, supported_dims)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.channels:
            if torch.jit.is_scripting():
                # TorchScript cannot build the eager message (type names, dict lookups).
                raise ValueError(
                    f"expected a {self.spatial_dims + 2}-D input with {self.channels} channels "
                    f"in dim 1 (spatial_dims={self.spatial_dims}), got shape {x.shape}"
                )
            raise ValueError(self._input_error(x))

    @torch.jit.unused
    def _input_error(self, x: torch.Tensor) -> str:
        """The eager error message for an input that does not fit the module."""
        if x.dim() != self.spatial_dims + 2:
            return (
                f"{type(self).__name__}: expected a {self.spatial_dims + 2}-D input "
                f"{_DIM_NAMES[self.spatial_dims]} (spatial_dims={self.spatial_dims}), "
                f"got shape {tuple(x.shape)}"
            )
        return (
            f"{type(self).__name__}: expected {self.channels} channels in dim 1, "
            f"got shape {tuple(x.shape)}"
        )

    def extra_repr(self) -> str:
        return f"channels={self.channels}, spatial_dims={self.spatial_dims}"


def amax_backward(
    x: torch.Tensor, result: torch.Tensor, grad: torch.Tensor, dims: list[int]
) -> torch.Tensor:
    """Gradient of ``x.amax(dims, keepdim=True) == result`` for the output gradient ``grad``:
    shared equally among the elements that attain the maximum, as autograd's amax does.

    Autograd counts the maxima of every reduced slice (a boolean-to-float conversion, a sum
    and a division over the whole map); here they are counted only when some slice has
    more than one, which a single count of all maxima tells."""
    return mean_amax_backward(x, result, None, grad, dims)


def mean_amax_backward(
    x: torch.Tensor,
    result_max: torch.Tensor,
    grad_mean: torch.Tensor | None,
    grad_max: torch.Tensor | None,
    dims: list[int],
) -> torch.Tensor:
    """Gradient of the pair ``(x.mean(dims, keepdim=True), x.amax(dims, keepdim=True))``
    (CBAM's two descriptors of one map) for their output gradients, either of which may be
    None: ``where(x == max, g_max / ties + g_mean / n, g_mean / n)``, one pass over the map
    where autograd makes four (the mean's expanded division, the max's mask and selection,
    and the sum of the two). Equal to autograd's values: the same quotients and the same
    single addition per element."""
    share = None if grad_mean is None else grad_mean / math.prod(x.shape[d] for d in dims)
    if grad_max is None:
        assert share is not None  # autograd calls backward only with some gradient
        return share.expand_as(x)
    mask = x == result_max
    # Ties share the gradient. On the CPU, counting all maxima once tells whether any slice
    # has a tie; elsewhere (a GPU) reading that count back would stall the stream, so the
    # per-slice counts are always divided by (by 1 where there is no tie: the same values).
    if x.device.type != "cpu" or int(torch.count_nonzero(mask)) != result_max.numel():
        grad_max = grad_max / mask.sum(dims, keepdim=True, dtype=grad_max.dtype)
    if share is None:
        return torch.where(mask, grad_max, 0)
    return torch.where(mask, grad_max + share, share)


class _Amax(torch.autograd.Function):
    """``x.amax(dims, keepdim=True)`` with :func:`amax_backward` (``x`` is saved, as autograd's
    amax saves it)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dims: list[int]) -> torch.Tensor:
        out = x.amax(dims, keepdim=True)
        ctx.dims = dims
        ctx.save_for_backward(x, out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        x, out = ctx.saved_tensors
        return amax_backward(x, out, grad, ctx.dims), None


class _Mean(torch.autograd.Function):
    """``x.mean(dims, keepdim=True)`` whose backward returns ``grad / n`` expanded over the
    pooled dimensions as a view: autograd's own writes that quotient out as a full map, which
    the gradient from the other use of ``x`` (the gated product) is then added to; the view
    is added into that gradient directly, one pass over the map less. The values are
    autograd's (the same quotients)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dims: list[int]) -> torch.Tensor:
        ctx.shape = x.shape
        ctx.count = math.prod(x.shape[d] for d in dims)
        return x.mean(dims, keepdim=True)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return (grad / ctx.count).expand(ctx.shape), None


class _MeanAmax(torch.autograd.Function):
    """``(x.mean(dims, keepdim=True), x.amax(dims, keepdim=True))`` with
    :func:`mean_amax_backward`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dims: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        mean = x.mean(dims, keepdim=True)
        peak = x.amax(dims, keepdim=True)
        ctx.dims = dims
        ctx.save_for_backward(x, peak)
        return mean, peak

    @staticmethod
    def backward(
        ctx: Any, grad_mean: torch.Tensor | None, grad_max: torch.Tensor | None
    ) -> tuple[torch.Tensor, None]:
        x, peak = ctx.saved_tensors
        return mean_amax_backward(x, peak, grad_mean, grad_max, ctx.dims), None


def eager_mode(*, under_compile: bool = False) -> bool:
    """Whether code runs as plain eager PyTorch now: not scripting, tracing, exporting, FX
    tracing or (unless ``under_compile``) compiling. Fast paths are taken only then."""
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return False
    if torch.compiler.is_exporting():
        return False
    if torch.compiler.is_compiling() and not under_compile:
        return False
    return not torch.fx._symbolic_trace.is_fx_symbolic_tracing()


@torch.jit.unused
def _reduce_eager(x: torch.Tensor, dims: list[int], kind: str) -> torch.Tensor:
    """``x.amax`` or ``x.mean`` (``kind``) over ``dims``, keeping them; through ``_Amax`` /
    ``_Mean`` in eager autograd."""
    if torch.is_grad_enabled() and x.requires_grad and eager_mode():
        out = (_Amax if kind == "amax" else _Mean).apply(x, dims)
        assert isinstance(out, torch.Tensor)  # for mypy: apply() is untyped
        return out
    return x.amax(dims, keepdim=True) if kind == "amax" else x.mean(dims, keepdim=True)


def amax(x: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """``x.amax(dims, keepdim=True)``; in eager autograd with the faster, equal backward of
    :func:`amax_backward` (CBAM-style max pooling over a whole map or over the channels)."""
    if not torch.jit.is_scripting():
        return _reduce_eager(x, dims, "amax")
    return x.amax(dims, keepdim=True)


def mean(x: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """``x.mean(dims, keepdim=True)``; in eager autograd with a backward that hands on the
    expanded quotient as a view instead of a full map (the same values)."""
    if not torch.jit.is_scripting():
        return _reduce_eager(x, dims, "mean")
    return x.mean(dims, keepdim=True)


@torch.jit.unused
def _mean_amax_eager(x: torch.Tensor, dims: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    if torch.is_grad_enabled() and x.requires_grad and eager_mode():
        mean, peak = _MeanAmax.apply(x, dims)
        return mean, peak
    return x.mean(dims, keepdim=True), x.amax(dims, keepdim=True)


def mean_amax(x: torch.Tensor, dims: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x.mean(dims, keepdim=True), x.amax(dims, keepdim=True))``; in eager autograd with
    the single-pass, equal backward of :func:`mean_amax_backward`."""
    if not torch.jit.is_scripting():
        return _mean_amax_eager(x, dims)
    return x.mean(dims, keepdim=True), x.amax(dims, keepdim=True)


class SingleOutputConvMixin:
    """For a module whose ``self.conv`` is spatial attention's single-output k x k
    convolution: :meth:`_conv` calls it with the faster CPU backward of
    ``convattn.fast.single_output_conv2d`` where that applies, else plainly."""

    if TYPE_CHECKING:  # not a class annotation: TorchScript would read it as an attribute type
        conv: nn.Module

    def _conv(self, pooled: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            fast = self._fast_conv(pooled)
            if fast is not None:
                return fast
        return self.conv(pooled)

    @torch.jit.unused
    def _fast_conv(self, pooled: torch.Tensor) -> torch.Tensor | None:
        """The convolution with a faster CPU backward (``convattn.fast``), or None."""
        from convattn.fast import single_output_conv2d

        return single_output_conv2d(self.conv, pooled)
