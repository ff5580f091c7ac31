"""convattn.fast: the fused / memory-saving paths compute what the direct code computes."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convattn
import convattn.fast as fast_module
from _reference import (
    assert_training_agrees,
    bn_eval,
    fast_path_model,
    gc_reference,
    randomize,
)
from convattn.fast import (
    BNGateResidualReLU,
    block_forward,
    gate_residual_relu,
    optimize,
    set_fast_paths,
)
from convattn.layers.channel import ChannelAttention
from convattn.models import create_model
from convattn.models.resnet import Bottleneck, _Block
from convattn.profile import TensorMemoryTracker

MECHANISMS = [None, "se", "eca", "cbam", "gc", "scse", "sse", "cse", "spatial", "simam"]


def _model(name: str, attention: str | None, **options: object) -> nn.Module:
    return fast_path_model(name, attention, **options).double()


def _pair(name: str, attention: str | None) -> tuple[nn.Module, nn.Module]:
    fast = _model(name, attention)
    direct = copy.deepcopy(fast)
    assert set_fast_paths(direct, False) > 0
    return fast, direct


def _uses_fast_path(model: nn.Module, x: torch.Tensor) -> bool:
    block = next(m for m in model.modules() if isinstance(m, _Block))
    with torch.no_grad():
        return block_forward(block, torch.zeros(1, block.conv1.in_channels, 8, 8).to(x)) is not None


@pytest.mark.parametrize("attention", MECHANISMS)
def test_eval_outputs_equal_direct(attention: str | None) -> None:
    fast, direct = _pair("cifar_resnet20", attention)
    fast.eval()
    direct.eval()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    with torch.inference_mode():
        expected = direct(x)
        got = fast(x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("attention", "options"),
    [("scse", {"fusion": "sum"}), ("gc", {"fusion_types": ("add", "mul")}), ("se", {})],
)
def test_eval_outputs_equal_direct_variants(attention: str, options: dict[str, object]) -> None:
    fast = _model("resnet18", attention, **options).eval()
    direct = copy.deepcopy(fast)
    set_fast_paths(direct, False)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), direct(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("attention", MECHANISMS)
def test_train_outputs_gradients_and_running_stats_equal_direct(attention: str | None) -> None:
    fast, direct = _pair("cifar_resnet20", attention)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    assert_training_agrees(fast, direct, x, torch.tensor([0, 3, 5, 9]))


@pytest.mark.parametrize("attention", ["se", "cbam", "gc"])
def test_bottleneck_fast_paths_float32(attention: str) -> None:
    """ImageNet bottlenecks (projection shortcut) in float32, eval and train."""
    fast = create_model("resnet50", attention=attention).float()
    blocks = [fast.layer1[0], fast.layer2[1]]
    for block in blocks:
        assert isinstance(block, Bottleneck)
        direct = copy.deepcopy(block)
        direct.fast_path = False
        x = torch.randn(2, block.conv1.in_channels, 12, 12)
        for training in (False, True):
            block.train(training)
            direct.train(training)
            xa = x.clone().requires_grad_(training)
            xb = x.clone().requires_grad_(training)
            with torch.set_grad_enabled(training):
                ya, yb = block(xa), direct(xb)
            torch.testing.assert_close(ya, yb)
            if training:
                g = torch.randn_like(ya)
                ya.backward(g)
                yb.backward(g)
                torch.testing.assert_close(xa.grad, xb.grad)
                for (name, p), (_, q) in zip(
                    block.named_parameters(), direct.named_parameters(), strict=True
                ):
                    torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_fast_path_is_taken_for_se() -> None:
    fast, _ = _pair("cifar_resnet20", "se")
    assert _uses_fast_path(fast, torch.zeros(1, dtype=torch.float64))


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("gate_shape", ["channel", "spatial"])
def test_bn_gate_residual_relu_gradcheck(inplace: bool, gate_shape: str) -> None:
    """The memory-saving function against autograd's numerical Jacobian (float64), with the
    BatchNorm in front of it so that x really is BN(c) as the function assumes; a channel
    gate takes the one-pass gate gradient, a spatial one the rebuilt BN(c). The BatchNorm's
    input has a mean far from zero so that an uncentred gate gradient would lose digits."""
    torch.manual_seed(0)
    n, c, h, w = 2, 3, 3, 3
    dt = torch.float64
    conv_out = torch.randn(n, c, h, w, dtype=dt, requires_grad=True)
    weight = torch.rand(c, dtype=dt).add(0.5).requires_grad_()
    bias = torch.randn(c, dtype=dt, requires_grad=True)
    gate_size = (n, c, 1, 1) if gate_shape == "channel" else (n, 1, h, w)
    gate_logits = torch.randn(gate_size, dtype=dt, requires_grad=True)
    identity = torch.randn(n, c, h, w, dtype=dt, requires_grad=True)

    def fused(c_, w_, b_, g_, id_):  # type: ignore[no-untyped-def]
        x, mean, invstd = torch.native_batch_norm(c_, w_, b_, None, None, True, 0.1, 1e-5)
        x = x + 0 * g_.sum()  # the gate depends on x in the blocks; keep the graphs alike
        gate = torch.sigmoid(g_)
        return BNGateResidualReLU.apply(
            x, gate, id_, c_, w_, b_, mean.detach(), invstd.detach(), inplace
        )

    def direct(c_, w_, b_, g_, id_):  # type: ignore[no-untyped-def]
        x = F.batch_norm(c_, None, None, w_, b_, training=True, momentum=0.1, eps=1e-5)
        return torch.relu(x * torch.sigmoid(g_) + id_)

    inputs = (conv_out, weight, bias, gate_logits, identity)
    torch.testing.assert_close(fused(*inputs), direct(*inputs))
    assert torch.autograd.gradcheck(fused, inputs)
    grad = torch.randn(n, c, h, w, dtype=dt)
    got = torch.autograd.grad(fused(*inputs), inputs, grad)
    expected = torch.autograd.grad(direct(*inputs), inputs, grad)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("aten", [True, False])  # False: the GPU's route
def test_channel_gate_gradient_is_centred(aten: bool) -> None:
    """The gate's gradient ``sum_hw(masked * BN(c))`` in float32 for a BatchNorm input whose
    mean is 1000 times its spread, against float64 from the definition: summing ``masked * c``
    and subtracting the mean's share afterwards would lose three digits here."""
    torch.manual_seed(0)
    n, ch, h, w = 4, 8, 16, 16
    c = torch.randn(n, ch, h, w) + 1000
    masked = torch.randn(n, ch, h, w).relu_()
    weight, bias = torch.rand(ch) + 0.5, torch.randn(ch)
    # the statistics as a float32 BatchNorm holds them; the reference uses the same values
    mean = c.double().mean((0, 2, 3)).float().double()
    invstd = (c.double().var((0, 2, 3), correction=0) + 1e-5).rsqrt().float().double()
    got = fast_module._channel_gate_grad(
        masked, c, weight, bias, mean.float(), invstd.float(), aten=aten
    )
    bn = (c.double() - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
    bn = bn * weight.double().view(1, -1, 1, 1) + bias.double().view(1, -1, 1, 1)
    expected = (masked.double() * bn).sum((2, 3), keepdim=True)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-3)


class _RmsPoolSE(ChannelAttention):
    """A subclass whose pool saves its input for backward (``pow`` does)."""

    def describe(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x.pow(2).mean((2, 3)).add(1e-6).sqrt()]


def test_training_output_is_not_written_over_a_saved_input() -> None:
    """The SE training path writes the block output into BN(c) only when the module's own
    pool reads it; a subclass that saves it for backward keeps it intact."""
    fast, direct = _pair("cifar_resnet20", "se")
    for model in (fast, direct):
        for block in model.modules():
            if isinstance(block, _Block):
                block.attn.__class__ = _RmsPoolSE
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    fast(x).square().sum().backward()
    direct(x).square().sum().backward()
    for (name, p), (_, q) in zip(fast.named_parameters(), direct.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_gate_residual_relu_matches_expression() -> None:
    x = torch.randn(2, 4, 5, 5)
    identity = torch.randn(2, 4, 5, 5)
    for gate in (torch.rand(2, 4, 1, 1), torch.rand(2, 1, 5, 5)):
        with torch.no_grad():
            got = gate_residual_relu(x, gate, identity)
        torch.testing.assert_close(got, torch.relu(x * gate + identity))
        xg = x.clone().requires_grad_()
        gate_residual_relu(xg, gate, identity).sum().backward()
        torch.testing.assert_close(xg.grad, gate * (x * gate + identity > 0))


def test_hooks_and_capture_disable_the_fast_path() -> None:
    model = _model("cifar_resnet20", "se").eval()
    block = model.layer1[0]
    seen: list[torch.Tensor] = []
    handle = block.attn.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, 16, 16, dtype=torch.float64))
    finally:
        handle.remove()
    assert len(seen) == 1
    with convattn.capture(model) as maps, torch.no_grad():
        model(torch.randn(1, 3, 16, 16, dtype=torch.float64))
    assert len(maps) == 9  # one SE gate per block


def test_scripting_and_tracing_use_the_plain_path() -> None:
    model = _model("cifar_resnet20", "cbam").eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        scripted = torch.jit.script(model)
        traced = torch.jit.trace(model, x)
        torch.testing.assert_close(scripted(x), expected)
        torch.testing.assert_close(traced(x), expected)
    assert "addcmul" not in str(traced.inlined_graph)


@pytest.mark.parametrize("attention", ["se", "eca", "cbam", "gc", "scse"])
def test_autocast_uses_the_plain_path(attention: str) -> None:
    """Under autocast the fast paths stand aside (they call operations directly, some with
    ``out=``, outside autocast's casting policy): inference and training run, in bfloat16, with
    exactly the direct code's outputs and gradients."""
    fast, direct = _pair("resnet18", attention)
    fast, direct = fast.float(), direct.float()
    x = torch.randn(2, 3, 32, 32)
    for training in (False, True):
        fast.train(training)
        direct.train(training)
        with torch.set_grad_enabled(training), torch.autocast("cpu", dtype=torch.bfloat16):
            got, expected = fast(x), direct(x)
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, expected)
        if training:
            got.float().sum().backward()
            expected.float().sum().backward()
            for (name, p), (_, q) in zip(
                fast.named_parameters(), direct.named_parameters(), strict=True
            ):
                assert p.grad is not None and q.grad is not None
                assert torch.equal(p.grad, q.grad), name


def test_torch_export_uses_the_plain_path() -> None:
    model = _model("cifar_resnet20", "se").float().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        exported = torch.export.export(model, (x,))
    assert "addcmul" not in str(exported.graph)
    torch.testing.assert_close(exported.module()(x), expected)


@pytest.mark.parametrize(("attention", "bound"), [("se", 0.88), ("cbam", 0.8)])
def test_training_path_saves_memory(attention: str, bound: float) -> None:
    """Deterministic byte count of one training step: the fast paths keep fewer feature maps
    per block than the direct graph (every block of a CIFAR ResNet-20 has attention)."""
    fast, direct = _pair("cifar_resnet20", attention)
    x = torch.randn(16, 3, 32, 32, dtype=torch.float64)
    target = torch.randint(10, (16,))
    peaks = []
    for model in (fast, direct):
        model.train()
        model.zero_grad(set_to_none=True)
        with TensorMemoryTracker() as tracker:
            F.cross_entropy(model(x), target).backward()
        peaks.append(tracker.peak_bytes)
    # Saved feature maps of the direct graph per basic block: conv1 out, relu out, conv2 out,
    # bn2 out (the attention input) and the block output, and for CBAM also the channel-gated
    # map; the fast paths keep neither bn2 out nor the gated map.
    assert peaks[0] < bound * peaks[1], peaks


def test_optimize() -> None:
    model = _model("cifar_resnet20", "se").eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        assert optimize(model, fuse=False) is model
        assert not any(m.fast_path for m in model.modules() if isinstance(m, _Block))
        torch.testing.assert_close(model(x), expected)
        optimized = optimize(model, channels_last=True)
        assert optimized.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        assert all(m.fast_path for m in model.modules() if isinstance(m, _Block))
        got = optimized(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(got, expected)
    with pytest.raises(TypeError, match="optimize: model"):
        optimize("resnet")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="optimize: fuse must be a bool"):
        optimize(model, fuse=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="set_fast_paths: enabled"):
        set_fast_paths(model, "yes")  # type: ignore[arg-type]


@pytest.mark.slow
def test_optimize_compile_keeps_outputs() -> None:
    model = _model("cifar_resnet20", "cbam").float().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        compiled = optimize(model, compile=True, compile_options={"fullgraph": True})
        torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attention", [None, "se", "cbam"])
def test_training_forward_compiles_without_graph_breaks(attention: str | None) -> None:
    """What ``optimize(compile=True)`` traces for training (including CBAM's spatial
    convolution, whose faster backward stays on under the compiler) is one graph: a break
    inside a block makes Dynamo compile every block's forward on its own and, past its
    recompile limit, run the rest eagerly."""
    import torch._dynamo

    torch._dynamo.reset()
    model = create_model("cifar_resnet20", attention=attention).train()
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 16, 16))
    torch._dynamo.reset()
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("attention", ["se", "cbam"])
def test_block_training_path_gradcheck(attention: str) -> None:
    """A whole basic block in training mode (fast path taken) against the numerical
    Jacobian in float64, for the input and the attention / BatchNorm parameters."""
    model = _model("cifar_resnet20", attention).train()
    block = model.layer1[1]
    x = torch.randn(2, 16, 3, 3, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        assert block_forward(block, x) is not None
    params = [block.bn2.weight, block.bn2.bias, *list(block.attn.parameters())[:2]]

    def run(inp: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        return block(inp)

    assert torch.autograd.gradcheck(run, (x, *params), nondet_tol=1e-12)


def test_recompute_off_trains_cbam_the_direct_way() -> None:
    model = _model("cifar_resnet20", "cbam").train()
    optimize(model, recompute=False)
    block = model.layer1[0]
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    assert block_forward(block, x) is None
    with torch.no_grad():
        assert block_forward(block, x) is not None  # inference fast path still on
    with pytest.raises(TypeError, match="set_fast_paths: recompute"):
        set_fast_paths(model, recompute=None)  # type: ignore[arg-type]


@pytest.mark.parametrize("dims", [[1], [2, 3], [2]])
def test_amax_backward_equals_autograd_including_ties(dims: list[int]) -> None:
    """convattn's amax (CBAM's max pools) has the gradient of torch.amax exactly: shared
    equally among tied maxima, and the fast branch without ties."""
    from convattn.layers._helpers import amax

    torch.manual_seed(0)
    for ties in (False, True):
        x = torch.randn(3, 5, 4, 4, dtype=torch.float64)
        if ties:
            x[:, :, 0, 0] = 5.0  # every channel ties at one position; whole maps tie too
            x[0, :, 1, :] = 0.0
            x[1] = 0.0
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        out = amax(a, dims)
        expected = b.amax(dims, keepdim=True)
        assert torch.equal(out, expected)
        grad = torch.randn_like(expected)
        out.backward(grad)
        expected.backward(grad)
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-15)
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: amax(t, dims), (x,))


@pytest.mark.parametrize("dims", [[1], [2, 3]])
@pytest.mark.parametrize("used", ["both", "mean", "max"])
def test_mean_amax_backward_equals_autograd_including_ties(dims: list[int], used: str) -> None:
    """convattn's (mean, amax) pair (CBAM's two descriptors) has autograd's gradient of the
    two separate reductions, with ties, and when only one of the two is used."""
    from convattn.layers._helpers import mean_amax

    torch.manual_seed(0)
    for ties in (False, True):
        x = torch.randn(3, 5, 4, 4, dtype=torch.float64)
        if ties:
            x[:, :, 0, 0] = 5.0
            x[0, :, 1, :] = 0.0
            x[1] = 0.0
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        mean, peak = mean_amax(a, dims)
        expected = (b.mean(dims, keepdim=True), b.amax(dims, keepdim=True))
        assert torch.equal(mean, expected[0]) and torch.equal(peak, expected[1])
        g_mean, g_max = torch.randn_like(mean), torch.randn_like(peak)
        if used == "both":
            (mean * g_mean).sum().add((peak * g_max).sum()).backward()
            (expected[0] * g_mean).sum().add((expected[1] * g_max).sum()).backward()
        else:
            index, g = (0, g_mean) if used == "mean" else (1, g_max)
            ((mean, peak)[index] * g).sum().backward()
            (expected[index] * g).sum().backward()
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-15)
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: mean_amax(t, dims), (x,))


@pytest.mark.parametrize("dims", [[1], [2, 3]])
def test_mean_backward_is_the_expanded_quotient(dims: list[int]) -> None:
    """convattn's mean (SE's squeeze in training) hands back ``g / n`` as an expanded view,
    with the values of autograd's mean; a second use of the input adds to it, and the
    gradient is differentiable again (double backward)."""
    from convattn.layers._helpers import mean

    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, 6, dtype=torch.float64)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    pooled = mean(a, dims)
    expected = b.mean(dims, keepdim=True)
    assert torch.equal(pooled, expected)
    g = torch.randn_like(pooled)
    (grad,) = torch.autograd.grad(pooled, a, g, retain_graph=True)
    assert 0 in grad.stride()  # a view, not a written-out map
    (reference,) = torch.autograd.grad(expected, b, g, retain_graph=True)
    assert torch.equal(grad, reference)
    other = torch.randn_like(x)
    ((pooled * g).sum() + (a * other).sum()).backward()
    ((expected * g).sum() + (b * other).sum()).backward()
    assert a.grad is not None and b.grad is not None
    assert torch.equal(a.grad, b.grad)
    small = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: mean(t, dims), (small,))
    assert torch.autograd.gradgradcheck(lambda t: mean(t, dims) ** 2, (small,))


@pytest.mark.parametrize("width", [11, 21])  # output widths below 16 and from 16 on
@pytest.mark.parametrize("padding", [(3, 2), (0, 0), (6, 4), (1, 3)])
def test_single_output_conv2d_gradients(padding: tuple[int, int], width: int) -> None:
    """The faster forward and backward of spatial attention's k x k convolution against the
    numerical Jacobian, twice differentiable, and equal to autograd's conv2d."""
    from convattn.fast import _SingleOutputConv2d

    torch.manual_seed(0)
    x = torch.randn(3, 2, 9, width, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(1, 2, 7, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, dtype=torch.float64, requires_grad=True)

    def fast(*args: torch.Tensor) -> torch.Tensor:
        return _SingleOutputConv2d.apply(*args, padding)  # type: ignore[no-any-return]

    assert torch.autograd.gradcheck(fast, (x, weight, bias))
    assert torch.autograd.gradgradcheck(fast, (x, weight, bias))
    out = fast(x, weight, bias)
    expected = F.conv2d(x, weight, bias, padding=padding)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, weight, bias), grad)
    want = torch.autograd.grad(expected, (x, weight, bias), grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("kernel", "padding", "bias"),
    [
        ((7, 7), (3, 3), True),
        ((3, 5), (0, 2), False),
        ((1, 1), (0, 0), True),
        ((5, 3), (4, 0), True),
    ],
)
def test_single_output_conv_rows_equals_conv2d(
    kernel: tuple[int, int], padding: tuple[int, int], bias: bool
) -> None:
    """The banded-matrix convolution to one channel against oneDNN's / ATen's conv2d, in
    float32 at CBAM's training sizes and in float64 on odd ones."""
    from convattn.fast import _single_output_conv_rows

    torch.manual_seed(0)
    for shape, dtype, tol in (
        ((16, 2, 32, 32), torch.float32, 1e-5),
        ((3, 4, 7, 19), torch.float64, 1e-12),
    ):
        x = torch.randn(shape, dtype=dtype)
        weight = torch.randn(1, shape[1], *kernel, dtype=dtype)
        b = torch.randn(1, dtype=dtype) if bias else None
        got = _single_output_conv_rows(x, weight, b, padding)
        torch.testing.assert_close(got, F.conv2d(x, weight, b, padding=padding), rtol=tol, atol=tol)


def test_single_output_conv2d_applies_only_where_it_knows_how() -> None:
    from convattn.fast import single_output_conv2d

    x = torch.randn(2, 2, 8, 8, requires_grad=True)
    conv = nn.Conv2d(2, 1, 7, padding=3, bias=False)
    assert single_output_conv2d(conv, x) is not None
    with torch.no_grad():
        assert single_output_conv2d(conv, x) is None  # no gradient: the module's own call
    for other in (
        nn.Conv2d(2, 2, 7, padding=3),
        nn.Conv2d(2, 1, 7, padding=3, stride=2),
        nn.Conv2d(2, 1, 3, padding=2, dilation=2),
        nn.Conv2d(2, 1, 7, padding="same"),
        nn.Conv2d(2, 1, 7, padding=3, padding_mode="reflect"),
    ):
        assert single_output_conv2d(other, x) is None
    handle = conv.register_forward_hook(lambda *args: None)
    try:
        assert single_output_conv2d(conv, x) is None  # hooks see the module called
    finally:
        handle.remove()


@pytest.mark.parametrize("name", ["cbam", "spatial", "triplet", "cbam_channel"])
def test_spatial_modules_train_alike_with_and_without_fast_backward(name: str) -> None:
    """Modules whose max pools and k x k convolution take the faster backward give the
    gradients of the plain calls (forced by a hook on every submodule) in float32."""
    torch.manual_seed(0)
    fast = convattn.create(name, 16).train()
    plain = copy.deepcopy(fast)
    handles = [m.register_forward_hook(lambda *args: None) for m in plain.modules()]
    xa = torch.randn(4, 16, 12, 12, requires_grad=True)
    xb = xa.detach().clone().requires_grad_()
    ya, yb = fast(xa), plain(xb)
    torch.testing.assert_close(ya, yb)
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad)
    for (label, p), (_, q) in zip(fast.named_parameters(), plain.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=label)
    for handle in handles:
        handle.remove()


# Inference gates without module calls (convattn.fast._channel_gate and friends): each is
# checked against the module's own attention method, the plain reference of the layer files.

EVAL_GATES = [
    ("se", {}),
    ("channel", {"pool": "max"}),
    ("channel", {"pool": "avg+max", "gate_layer": "hard_sigmoid"}),
    ("cbam_channel", {}),
    ("eca", {}),
    ("channel", {"pool": "std"}),
    ("channel", {"excitation": "conv1d", "pool": "avg+max", "kernel_size": 5}),
]


@pytest.mark.parametrize(("name", "options"), EVAL_GATES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eval_channel_gate_equals_module_attention(
    name: str, options: dict[str, object], dtype: torch.dtype
) -> None:
    from convattn.fast import _channel_gate

    torch.manual_seed(0)
    attn = randomize(convattn.create(name, 32, **options)).to(dtype).eval()
    x = torch.randn(3, 32, 9, 7, dtype=dtype)
    with torch.no_grad():
        expected = attn.attention(x).reshape(3, 32, 1, 1)
        torch.testing.assert_close(_channel_gate(attn, x), expected)


@pytest.mark.parametrize(
    ("name", "options"),
    [("spatial", {}), ("spatial", {"pool": "max", "kernel_size": 3, "bias": True}), ("sse", {})],
)
def test_eval_spatial_gate_equals_module_attention(name: str, options: dict[str, object]) -> None:
    from convattn.fast import _spatial_gate

    torch.manual_seed(0)
    attn = randomize(convattn.create(name, 16, **options)).eval()
    x = torch.randn(2, 16, 11, 9)
    with torch.no_grad():
        torch.testing.assert_close(_spatial_gate(attn, x), attn.attention(x))


@pytest.mark.parametrize("pooling_type", ["att", "avg"])
def test_eval_gc_term_equals_module(pooling_type: str) -> None:
    from convattn.fast import _gc_add_term

    torch.manual_seed(0)
    attn = randomize(convattn.create("gc", 64, pooling_type=pooling_type)).eval()
    x = torch.randn(2, 64, 6, 5)
    with torch.no_grad():
        expected = attn.channel_add_conv(attn.context(x))
        torch.testing.assert_close(_gc_add_term(attn, x), expected)


def test_conv_to_one_equals_the_convolution() -> None:
    from convattn.fast import _conv_to_one

    torch.manual_seed(0)
    x = torch.randn(3, 8, 10, 12)
    for conv in (
        nn.Conv2d(8, 1, 1),
        nn.Conv2d(8, 1, 1, bias=False),
        nn.Conv2d(8, 1, 7, padding=3, bias=False),
        nn.Conv2d(8, 1, (3, 5), padding=(1, 0)),
        nn.Conv2d(8, 2, 1),  # not to one channel: the module's own call
        nn.Conv2d(8, 1, 3, stride=2),
    ):
        with torch.no_grad():
            torch.testing.assert_close(_conv_to_one(conv, x), conv(x))
    channels_last = x.contiguous(memory_format=torch.channels_last)
    conv = nn.Conv2d(8, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(_conv_to_one(conv, channels_last), conv(x))


@pytest.mark.parametrize(
    ("attention", "inner"),
    [
        ("se", "fc1"),
        ("se", "gate"),
        ("eca", "conv"),
        ("cbam", "spatial_gate.conv"),
        ("cbam", "channel_gate.fc2"),
        ("gc", "conv_mask"),
        ("gc", "channel_add_conv.1"),
        ("scse", "sse.conv"),
        ("cbam", "spatial_gate.bn"),
    ],
)
def test_eval_fast_path_calls_hooked_inner_modules(attention: str, inner: str) -> None:
    """A hook on a layer inside the attention still fires on the fast path, once per block,
    and what it kept ends up as on the direct path (which may itself overwrite it in place,
    e.g. SE's in-place ReLU after fc1); the outputs stay those of the direct code."""
    fast, direct = _pair("resnet18", attention)
    kept: dict[str, list[torch.Tensor]] = {"fast": [], "direct": []}
    handles = []
    for label, model in (("fast", fast), ("direct", direct)):
        model.eval()
        for block in (b for b in model.modules() if isinstance(b, _Block)):
            hook = functools.partial(lambda store, m, a, out: store.append(out), kept[label])
            handles.append(block.attn.get_submodule(inner).register_forward_hook(hook))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    try:
        with torch.inference_mode():
            torch.testing.assert_close(fast(x), direct(x), rtol=1e-12, atol=1e-12)
    finally:
        for handle in handles:
            handle.remove()
    assert len(kept["fast"]) == len(kept["direct"]) >= 8  # CBAM calls fc2 twice a block
    for got, expected in zip(kept["fast"], kept["direct"], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("attention", ["se", "cbam", "gc", "scse"])
def test_eval_fast_path_leaves_a_hooked_batchnorm_output_alone(attention: str) -> None:
    """The fast path writes the gated result into the last BatchNorm's output, except when a
    hook on that BatchNorm may have kept it."""
    fast, direct = _pair("resnet18", attention)
    fast.eval()
    direct.eval()
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    fast.layer1[0].bn2.register_forward_hook(lambda m, a, out: kept.append((out, out.clone())))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), direct(x), rtol=1e-12, atol=1e-12)
    assert len(kept) == 1
    assert torch.equal(kept[0][0], kept[0][1])


def test_batch_mean_var_equals_var_mean_with_its_gradient() -> None:
    """CBAM's training path takes BatchNorm's batch statistics from a two-pass mean and
    variance with a one-pass backward: equal to torch.var_mean and its autograd gradient."""
    from convattn.fast import _BatchMeanVar

    torch.manual_seed(0)
    c = (torch.randn(4, 3, 5, 6, dtype=torch.float64) * 3 + 7).requires_grad_()
    mean, var = _BatchMeanVar.apply(c)
    ref_var, ref_mean = torch.var_mean(c, (0, 2, 3), correction=0, keepdim=True)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-14, atol=0)
    torch.testing.assert_close(var, ref_var, rtol=1e-12, atol=0)
    for weights in ((1.0, 1.0), (0.0, 1.0), (1.0, 0.0)):
        g_mean, g_var = (torch.randn_like(mean) * w for w in weights)
        loss = (mean * g_mean).sum() + (var * g_var).sum()
        ref_loss = (ref_mean * g_mean).sum() + (ref_var * g_var).sum()
        got = torch.autograd.grad(loss, c, retain_graph=True)[0]
        want = torch.autograd.grad(ref_loss, c, retain_graph=True)[0]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(_BatchMeanVar.apply, (c.detach()[:2, :, :3].requires_grad_(),))
    (grad,) = torch.autograd.grad(_BatchMeanVar.apply(c)[0].sum(), c)  # variance unused
    torch.testing.assert_close(grad, torch.full_like(c, 1 / 120))


def _gc_block_reference(block: Bottleneck, x: torch.Tensor) -> torch.Tensor:
    """A GC bottleneck in eval mode written from the equations: BatchNorm with running
    statistics, eq. 4 of the GCNet paper (softmax pooling, transform, add), residual, ReLU."""

    assert block.bn3 is not None and block.conv3 is not None
    out = torch.relu(bn_eval(block.conv1(x), block.bn1))
    out = torch.relu(bn_eval(block.conv2(out), block.bn2))
    y = bn_eval(block.conv3(out), block.bn3)
    gc_out = gc_reference(y, block.attn.state_dict(), pooling="att", fusions=("add",))
    identity = x if block.downsample is None else block.downsample(x)
    return torch.relu(gc_out + identity)


def test_eval_gc_folds_batchnorm_into_the_tail() -> None:
    """GC's inference path folds the last BatchNorm into its arithmetic (scores from the
    un-normalised map, context rescaled, one addcmul for BN + T_add): the block equals the
    equations with any running statistics, negative scales included, and follows changes to
    the statistics, the BN parameters and the scoring weights made after a first call."""
    torch.manual_seed(0)
    block = create_model("resnet50", attention="gc").layer2[0].double().eval()
    assert isinstance(block, Bottleneck) and block.bn3 is not None
    for module in block.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.3, 2.0)
            nn.init.uniform_(module.weight, -1.5, 1.5)
            nn.init.uniform_(module.bias, -0.3, 0.3)
    nn.init.normal_(block.attn.channel_add_conv[-1].weight, 0, 0.05)
    nn.init.uniform_(block.attn.conv_mask.bias, 1.0, 2.0)
    x = torch.randn(2, block.conv1.in_channels, 9, 7, dtype=torch.float64)
    with torch.inference_mode():
        assert block_forward(block, x) is not None
        torch.testing.assert_close(block(x), _gc_block_reference(block, x))
    with torch.no_grad():  # in place (new versions) and new objects: the fold is redone
        block.bn3.running_mean.add_(0.25)
        block.bn3.weight.mul_(-1.0)
        block.attn.conv_mask.weight.mul_(3.0)
    with torch.inference_mode():
        torch.testing.assert_close(block(x), _gc_block_reference(block, x))
    block.bn3.bias = nn.Parameter(torch.linspace(-1, 1, block.bn3.num_features).double())
    with torch.inference_mode():
        torch.testing.assert_close(block(x), _gc_block_reference(block, x))
