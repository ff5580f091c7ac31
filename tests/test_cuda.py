"""Every mechanism and every fast path on a CUDA GPU.

Skipped where no GPU is visible (CI has none); run them on a GPU machine with
``make test-cuda``. The references are CPU computations in float64, so these tests check
the CUDA results against an independent computation, not against themselves.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convattn
from _reference import assert_training_agrees, fast_path_model
from convattn import export
from convattn.fast import block_forward, set_fast_paths
from convattn.models import create_model
from convattn.models.resnet import _Block
from convattn.profile import profile

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

MECHANISMS = convattn.list_attention()
BLOCK_MECHANISMS = [None, "se", "eca", "cbam", "gc", "scse", "sse", "cse", "spatial", "simam"]
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _exact_float32() -> Iterator[None]:
    """TF32 rounds matrix products and convolutions to 10 mantissa bits; the float32
    comparisons below are for true float32 arithmetic."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _forward_backward(
    module: nn.Module, x: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_(True)
    out = module(x)
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * weights).sum(), [x, *params])
    return (out.detach(), *grads)


def _errors(got: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...]) -> list[float]:
    """Each tensor's distance from float64, in units of the largest expected magnitude."""
    scale = max(float(b.abs().max()) for b in expected)
    return [
        float((a.double().cpu() - b.cpu()).norm()) / scale
        for a, b in zip(got, expected, strict=True)
    ]


@pytest.mark.parametrize("name", MECHANISMS)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_mechanism_on_cuda_equals_float64_cpu(name: str, mode: str) -> None:
    """Outputs and the gradients of the input and every parameter, float32 on the GPU against
    float64 on the CPU: no further from float64 than float32 on the CPU is (a train-mode
    BatchNorm over a small batch amplifies rounding), plus a small floor."""
    module, x = export.build_mechanism(name)
    module.train(mode == "train")
    with torch.no_grad():
        shape = copy.deepcopy(module)(x).shape  # (a copy: train mode updates statistics)
    weights = torch.linspace(-1, 1, shape.numel(), dtype=torch.float64).reshape(shape)
    reference_module = copy.deepcopy(module).double()
    cpu_module = copy.deepcopy(module)
    gpu_module = copy.deepcopy(module).to(CUDA)
    expected = _forward_backward(reference_module, x.double(), weights)
    cpu = _forward_backward(cpu_module, x, weights.float())
    got = _forward_backward(gpu_module, x.to(CUDA), weights.float().to(CUDA))
    assert len(got) == len(expected)
    assert all(a.device.type == CUDA.type and a.dtype == torch.float32 for a in got), name
    for index, (gpu_error, cpu_error) in enumerate(
        zip(_errors(got, expected), _errors(cpu, expected), strict=True)
    ):
        assert gpu_error <= 4 * cpu_error + 1e-5, (name, index, gpu_error, cpu_error)
    if mode == "train":  # running statistics (BatchNorm inside a mechanism) follow too
        for (key, a), (_, b) in zip(
            gpu_module.state_dict().items(), reference_module.state_dict().items(), strict=True
        ):
            if a.is_floating_point():
                torch.testing.assert_close(a.double().cpu(), b, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", MECHANISMS)
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_on_cuda_close_to_float32(name: str, precision: str) -> None:
    """The module in float16 / bfloat16 on the GPU, against float32 on the same rounded
    input, within the library's stated half-precision tolerances."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    rms_tol, max_tol = export.HALF_TOLERANCES[dtype]
    module, x = export.build_mechanism(name)
    rounded = x.to(dtype).to(CUDA)
    with torch.no_grad():
        reference = copy.deepcopy(module).double()(rounded.cpu().double())
        out = copy.deepcopy(module).to(CUDA, dtype)(rounded)
    assert out.dtype == dtype and torch.isfinite(out).all(), name
    diff = out.double().cpu() - reference
    rms = float(diff.norm() / reference.norm())
    worst = float(diff.abs().max() / reference.abs().max())
    assert rms <= rms_tol and worst <= max_tol, (name, precision, rms, worst)


@pytest.mark.parametrize("name", MECHANISMS)
def test_channels_last_on_cuda_equals_contiguous(name: str) -> None:
    module, x = export.build_mechanism(name)
    module = module.to(CUDA)
    x = x.to(CUDA)
    with torch.no_grad():
        expected = module(x)
        converted = copy.deepcopy(module).to(memory_format=torch.channels_last)
        out = converted(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def _block_model(attention: str | None, dtype: torch.dtype = torch.float64) -> nn.Module:
    return fast_path_model("cifar_resnet20", attention).to(CUDA, dtype)


@pytest.mark.parametrize("attention", BLOCK_MECHANISMS)
def test_fast_paths_on_cuda_equal_direct(attention: str | None) -> None:
    """Two training steps and an eval pass of a CIFAR ResNet-20 on the GPU in float64: the
    fast paths give the direct code's outputs, gradients and running statistics."""
    fast = _block_model(attention)
    direct = copy.deepcopy(fast)
    assert set_fast_paths(direct, False) > 0
    block = next(m for m in fast.modules() if isinstance(m, _Block))
    with torch.no_grad():
        probe = torch.zeros(1, block.conv1.in_channels, 8, 8, dtype=torch.float64, device=CUDA)
        block.eval()
        assert block_forward(block, probe) is not None  # the fast path runs on CUDA tensors
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64, device=CUDA)
    assert_training_agrees(fast, direct, x, torch.tensor([0, 3, 5, 9], device=CUDA))
    fast.eval()
    direct.eval()
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), direct(x), rtol=1e-12, atol=1e-12)


def _train_pass(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Output, input gradient and parameter gradients of one training-mode pass."""
    model.train()
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = model(x)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out.backward(grad.to(out))
    assert x.grad is not None
    return (out.detach(), x.grad, *[p.grad for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("attention", ["se", "eca", "cbam", "gc", "scse"])
def test_resnet50_fast_paths_on_cuda(attention: str) -> None:
    """An SE / ECA / CBAM / GC / scSE ResNet-50 on the GPU, fast paths against the direct code:
    equal in float64 (training pass: output and every gradient); in float32, equal in eval
    mode, and in training mode no further from float64 than the direct code (the input
    gradient through 50 train-mode BatchNorms at batch 2 is only good to about 1 % in
    float32, fast path or not)."""
    torch.manual_seed(0)
    fast = create_model("resnet50", attention=attention).to(CUDA)
    for module in fast.modules():  # non-trivial statistics, so eval differs from train
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.running_var, 0.5, 2.0)
            nn.init.uniform_(module.running_mean, -0.2, 0.2)
    direct = copy.deepcopy(fast)
    set_fast_paths(direct, False)
    x = torch.randn(2, 3, 96, 96, device=CUDA)
    fast.eval()
    direct.eval()
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), direct(x), rtol=1e-4, atol=1e-4)
    fast64, direct64 = copy.deepcopy(fast).double(), copy.deepcopy(direct).double()
    exact = _train_pass(direct64, x.double())
    for a, b in zip(_train_pass(fast64, x.double()), exact, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    fast_errors = _errors(_train_pass(fast, x)[:2], exact[:2])
    direct_errors = _errors(_train_pass(direct, x)[:2], exact[:2])
    for what, fast_error, direct_error in zip(
        ("output", "input gradient"), fast_errors, direct_errors, strict=True
    ):
        assert fast_error <= 2 * direct_error + 1e-5, (what, fast_error, direct_error)


@pytest.mark.parametrize("attention", ["se", "cbam"])
def test_training_step_on_cuda_uses_less_memory(attention: str) -> None:
    """The fast training paths' saving holds on the GPU's own allocator (the CPU test counts
    tensor bytes): peak memory of a CIFAR ResNet-20 step with fast paths against without."""
    fast = _block_model(attention, torch.float32)
    direct = copy.deepcopy(fast)
    set_fast_paths(direct, False)
    x = torch.randn(64, 3, 32, 32, device=CUDA)
    target = torch.randint(10, (64,), device=CUDA)
    peaks = []
    for model in (fast, direct):
        model.train()
        F.cross_entropy(model(x), target).backward()  # warm-up: gradients and cuDNN state
        model.zero_grad(set_to_none=False)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        F.cross_entropy(model(x), target).backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
    assert peaks[0] < 0.95 * peaks[1], peaks


@pytest.mark.parametrize("precision", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("attention", ["se", "cbam", "gc"])
def test_autocast_training_on_cuda(attention: str, precision: torch.dtype) -> None:
    """Mixed precision on the GPU: the fast model's loss and gradients equal the direct
    model's under the same autocast, and stay near float32."""
    fast = _block_model(attention, torch.float32)
    direct = copy.deepcopy(fast)
    set_fast_paths(direct, False)
    x = torch.randn(8, 3, 32, 32, device=CUDA)
    target = torch.randint(10, (8,), device=CUDA)
    losses, grads = [], []
    for model in (fast, direct):
        model.train()
        with torch.autocast("cuda", dtype=precision):
            loss = F.cross_entropy(model(x), target)
        loss.backward()
        losses.append(loss.detach().float())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1])
    reference = copy.deepcopy(fast)
    reference.zero_grad(set_to_none=True)
    full = F.cross_entropy(reference(x), target).detach()
    assert torch.isfinite(grads[0]).all()
    assert abs(float(losses[0]) - float(full)) < 0.05 * max(1.0, float(full))


def test_compiled_training_step_on_cuda_equals_eager() -> None:
    """``convattn.optimize(model, compile=True)`` on the GPU (Inductor's Triton kernels):
    the loss and gradients of a CBAM ResNet-20 step equal eager ones."""
    eager = _block_model("cbam", torch.float32).train()
    compiled_source = copy.deepcopy(eager)
    compiled = convattn.optimize(compiled_source, compile=True)
    x = torch.randn(16, 3, 32, 32, device=CUDA)
    target = torch.randint(10, (16,), device=CUDA)
    losses = []
    for model, owner in ((eager, eager), (compiled, compiled_source)):
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        losses.append((loss.detach(), [p.grad for p in owner.parameters()]))
    torch.testing.assert_close(losses[0][0], losses[1][0], rtol=1e-4, atol=1e-5)
    for a, b in zip(losses[0][1], losses[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_profile_on_cuda_measures_latency_and_memory() -> None:
    """``convattn.profile`` on a GPU: CUDA-synchronised latencies and the allocator's peaks
    (weights included, so at least the parameters' bytes)."""
    model = create_model("cifar_resnet20", attention="se").to(CUDA)
    result = profile(
        model, (8, 3, 32, 32), device=CUDA.type, warmup=2, repeats=5, train=True, train_repeats=2
    )
    assert result.device.startswith(CUDA.type)
    assert result.latency_ms is not None and result.latency_ms > 0
    assert result.train_latency_ms is not None and result.train_latency_ms > 0
    weight_bytes = 4 * result.params
    assert result.peak_memory_bytes is not None and result.peak_memory_bytes > weight_bytes
    assert result.train_peak_memory_bytes is not None
    assert result.train_peak_memory_bytes > result.peak_memory_bytes
