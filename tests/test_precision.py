"""Half precision, memory layout and determinism for every mechanism.

float16 / bfloat16: the module run in half precision against the same module in float32 on
the same (rounded) input, on activations of realistic magnitude (std 1, std 10, and std 3 with
spikes of 300), must stay finite and within the tolerances stated once in
``convattn.export.HALF_TOLERANCES``. channels_last must give the contiguous result, and
forward + backward under ``torch.use_deterministic_algorithms(True)`` must be bit-identical.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import convattn
from convattn import export

MECHANISMS = convattn.list_attention()
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def realistic_inputs(shape: tuple[int, ...]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(123)
    base = torch.randn(shape, generator=generator)
    spiky = 3 * torch.randn(shape, generator=generator)
    spiky.view(-1)[::89] = 300.0
    return [base, 10 * base, spiky]


def half_vs_float(module: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> tuple[float, float]:
    rounded = x.to(dtype)
    with torch.no_grad():
        reference = module(rounded.float())
        out = copy.deepcopy(module).to(dtype)(rounded)
    assert out.dtype == dtype
    assert torch.isfinite(out).all(), f"{dtype} overflow"
    diff = out.float() - reference
    return float(diff.norm() / reference.norm()), float(diff.abs().max() / reference.abs().max())


@pytest.mark.parametrize("name", MECHANISMS)
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_close_to_float32(name: str, precision: str) -> None:
    dtype = HALF[precision]
    rms_tol, max_tol = export.HALF_TOLERANCES[dtype]
    module, example = export.build_mechanism(name)
    for x in realistic_inputs(tuple(example.shape)):
        rms, worst = half_vs_float(module, x, dtype)
        assert rms <= rms_tol and worst <= max_tol, (name, precision, rms, worst)
    assert export.load_matrix()["rows"][name][precision]["status"] == "pass"


@pytest.mark.parametrize("name", MECHANISMS)
def test_channels_last_equals_contiguous(name: str) -> None:
    module, x = export.build_mechanism(name)
    with torch.no_grad():
        expected = module(x)
        converted = copy.deepcopy(module).to(memory_format=torch.channels_last)
        out = converted(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    assert export.load_matrix()["rows"][name]["channels_last"]["status"] == "pass"


@pytest.mark.parametrize("name", MECHANISMS)
def test_deterministic_forward_backward(name: str) -> None:
    module, x = export.build_mechanism(name)

    def run() -> list[torch.Tensor]:
        net = copy.deepcopy(module).train()
        inputs = x.clone().requires_grad_(True)
        out = net(inputs)
        weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
        grads = torch.autograd.grad((out * weights).sum(), [inputs, *net.parameters()])
        return [out.detach(), *grads]

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = run(), run()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert len(first) == len(second)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert export.load_matrix()["rows"][name]["deterministic"]["status"] == "pass"


# Regressions for the reductions computed in float32: the naive float16 computation of each
# of these intermediate values overflows on the spiky input, the module's output does not.
@pytest.mark.parametrize(
    ("name", "naive"),
    [
        ("da_channel", lambda x: torch.bmm(x.flatten(2), x.flatten(2).transpose(1, 2))),
        ("gct", lambda x: x.pow(2).sum((2, 3))),
        ("simam", lambda x: (x - x.mean((2, 3), keepdim=True)).pow(2)),
    ],
)
def test_float16_overflow_is_avoided(name: str, naive: object) -> None:
    module, example = export.build_mechanism(name)
    spiky = realistic_inputs(tuple(example.shape))[2].half()
    assert not torch.isfinite(naive(spiky)).all()  # type: ignore[operator]
    with torch.no_grad():
        out = copy.deepcopy(module).half()(spiky)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_check_half_flags_overflow_and_dtype_changes() -> None:
    class Energy(nn.Module):  # x * mean(x^2): the square overflows float16 at 300
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * x.pow(2).mean((2, 3), keepdim=True)

    class Upcast(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.float()

    x = torch.randn(2, 8, 5, 5)
    result = export.check_half(Energy(), x, torch.float16)
    assert not result.ok and "non-finite" in result.detail
    result = export.check_half(Upcast(), x, torch.bfloat16)
    assert not result.ok and "dtype" in result.detail
    assert export.check_half(nn.Identity(), x, torch.float16).ok
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        export.check_half(nn.Identity(), x, torch.float64)


@pytest.mark.parametrize("name", ["se", "cbam", "simam", "gct", "attnpool"])
def test_backbone_half_precision_and_channels_last(name: str) -> None:
    net, x = export.build_backbone("cifar_resnet20", name)
    for check in ("fp16", "bf16", "channels_last"):
        result = export.run_checks(net, x, [check])[check]
        assert result.ok, (name, check, result.detail)
