"""convattn's native CPU kernels (``convattn._native``) and the fast paths built on them
(CBAM training; SE, ECA and scSE inference), checked against the mechanisms written from
their papers' equations in float64."""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _reference import bn_eval, gc_reference
from convattn import _native
from convattn.fast import (
    _CbamTailNative,
    _native_cbam_tail,
    _native_channel_tail,
    _native_folded_tail,
    _native_gc_tail,
    _native_residual_tail,
    _SeTailNative,
    _train_attention_tail,
    _train_cbam_tail,
    set_fast_paths,
)
from convattn.layers.cbam import CBAM
from convattn.layers.channel import ChannelAttention
from convattn.layers.scse import ChannelSpatialSE
from convattn.layers.se import SEModule
from convattn.models import create_model
from convattn.profile import TensorMemoryTracker, _num_threads
from convattn.registry import create


def _batch_norm(bn: nn.BatchNorm2d, c: torch.Tensor) -> torch.Tensor:
    """Training-mode BatchNorm from its definition: batch mean and biased variance."""
    mean = c.mean((0, 2, 3), keepdim=True)
    var = ((c - mean) ** 2).mean((0, 2, 3), keepdim=True)
    x = (c - mean) / torch.sqrt(var + bn.eps)
    if bn.weight is not None:
        x = x * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    return x


def _cbam_tail_reference(
    c: torch.Tensor, identity: torch.Tensor, bn: nn.BatchNorm2d, attn: CBAM
) -> torch.Tensor:
    """relu(CBAM(BN(c)) + identity) from the CBAM paper's eqs. 2-3 (official layout: the
    spatial descriptor is [max; mean] over channels, a BatchNorm after the 7x7 convolution).
    Max pools are torch.amax, whose gradient is shared between tied maxima."""
    x = _batch_norm(bn, c)
    cg, sg = attn.channel_gate, attn.spatial_gate

    def mlp(z: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(z @ cg.fc1.weight.t() + cg.fc1.bias)
        return hidden @ cg.fc2.weight.t() + cg.fc2.bias

    m_c = torch.sigmoid(mlp(x.mean((2, 3))) + mlp(x.amax((2, 3))))  # eq. 2
    x1 = x * m_c[:, :, None, None]
    desc = torch.cat([x1.amax(1, keepdim=True), x1.mean(1, keepdim=True)], dim=1)
    conv = sg.conv
    logits = F.conv2d(desc, conv.weight, conv.bias, padding=conv.padding)
    m_s = torch.sigmoid(_batch_norm(sg.bn, logits))  # eq. 3
    return torch.relu(x1 * m_s + identity)


def _tail_parts(channels: int, seed: int) -> tuple[nn.BatchNorm2d, CBAM]:
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(channels)
    attn = CBAM(channels, rd_channels=4)
    with torch.no_grad():
        bn.weight.uniform_(-1.5, 1.5)  # negative scales: the channel maximum is BN(min c)
        bn.bias.uniform_(-0.5, 0.5)
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return bn.train(), attn.train()


def _grads(
    fn: object,
    c: torch.Tensor,
    identity: torch.Tensor,
    bn: nn.BatchNorm2d,
    attn: CBAM,
    grad: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    c = c.clone().requires_grad_()
    identity = identity.clone().requires_grad_()
    y = fn(c, identity, bn, attn)  # type: ignore[operator]
    params = dict(bn.named_parameters(prefix="bn")) | dict(attn.named_parameters(prefix="attn"))
    names = list(params)
    got = torch.autograd.grad(y, [c, identity, *params.values()], grad.to(y.dtype))
    return y.detach(), {"c": got[0], "identity": got[1]} | dict(zip(names, got[2:], strict=True))


def _native_tail(
    c: torch.Tensor, identity: torch.Tensor, bn: nn.BatchNorm2d, attn: CBAM
) -> torch.Tensor:
    y = _train_cbam_tail(c, identity, bn, attn)
    assert y is not None and _is_native(y)
    return y


def _is_native(y: torch.Tensor) -> bool:
    return type(y.grad_fn).__name__ == f"{_CbamTailNative.__name__}Backward"


requires_native = pytest.mark.skipif(
    _native.library() is None, reason="no C compiler: the native kernels cannot be built"
)


def test_kernels_build_on_this_machine() -> None:
    """CI and development machines have a C compiler: the kernels must build here (a missing
    compiler would otherwise skip every test below silently)."""
    assert _native.library() is not None


@requires_native
@pytest.mark.parametrize(
    ("shape", "case"),
    [
        ((8, 16, 12, 12), "random"),
        ((3, 5, 7, 9), "random"),
        ((4, 32, 32, 32), "random"),
        ((6, 16, 10, 10), "zero_init"),  # BN weight 0: every value tied, in both pools
        ((6, 16, 10, 10), "constant_channels"),  # some BN weights 0: whole rows tied
        ((5, 8, 6, 6), "no_affine"),
    ],
)
def test_native_cbam_tail_matches_the_equations(shape: tuple[int, ...], case: str) -> None:
    n, ch, h, w = shape
    bn, attn = _tail_parts(ch, seed=sum(shape))
    if case == "no_affine":
        bn = nn.BatchNorm2d(ch, affine=False).train()
    with torch.no_grad():
        if case == "zero_init":
            bn.weight.zero_()
            bn.bias.zero_()
        elif case == "constant_channels":
            bn.weight[::3] = 0.0
    c = torch.randn(n, ch, h, w) * 2 + 0.5
    identity = torch.randn(n, ch, h, w)
    grad = torch.randn(n, ch, h, w)
    ref_bn, ref_attn = copy.deepcopy(bn).double(), copy.deepcopy(attn).double()
    y, got = _grads(_native_tail, c, identity, bn, attn, grad)
    y_ref, want = _grads(
        _cbam_tail_reference, c.double(), identity.double(), ref_bn, ref_attn, grad
    )
    torch.testing.assert_close(y, y_ref.float(), rtol=1e-4, atol=1e-5)
    for name, value in want.items():
        scale = value.abs().max().item() + 1e-6
        torch.testing.assert_close(
            got[name].double() / scale, value / scale, rtol=0, atol=2e-5, msg=name
        )
    # running statistics as nn.BatchNorm2d updates them (float64 module on the same input),
    # once per step, the spatial gate's BatchNorm's too
    reference = nn.BatchNorm2d(ch, affine=False).double().train()
    reference(c.double())
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(
            getattr(bn, name).double(), getattr(reference, name).double(), msg=name
        )
    assert int(attn.spatial_gate.bn.num_batches_tracked) == 1


@requires_native
def test_native_results_agree_across_thread_counts() -> None:
    bn, attn = _tail_parts(16, seed=3)
    c, identity, grad = (torch.randn(6, 16, 20, 20) for _ in range(3))
    results = []
    for count in (1, 2, 3):
        with _num_threads(count):
            results.append(
                _grads(_native_tail, c, identity, copy.deepcopy(bn), copy.deepcopy(attn), grad)
            )
    # the kernels split images between threads; PyTorch's own parts (the convolution) may
    # round differently with another thread count
    for y, got in results[1:]:
        torch.testing.assert_close(y, results[0][0], rtol=1e-5, atol=1e-6)
        for name, value in got.items():
            torch.testing.assert_close(value, results[0][1][name], rtol=1e-4, atol=1e-6)


@requires_native
def test_resnet_training_native_matches_the_torch_path_and_saves_memory() -> None:
    """A float32 CBAM-ResNet-20 training step: the native kernels, the PyTorch fast path and
    the direct graph agree; the native path keeps no more memory than the PyTorch one."""
    torch.manual_seed(0)
    native = create_model("cifar_resnet20", attention="cbam").train()
    torch_path = copy.deepcopy(native)
    direct = copy.deepcopy(native)
    set_fast_paths(torch_path, native=False)
    set_fast_paths(direct, False)
    x = torch.randn(16, 3, 32, 32)
    target = torch.randint(10, (16,))
    peaks, grads = [], []
    for model in (native, torch_path, direct):
        model.zero_grad(set_to_none=True)
        with TensorMemoryTracker() as tracker:
            loss = F.cross_entropy(model(x), target)
            loss.backward()
        peaks.append(tracker.peak_bytes)
        grads.append({k: p.grad for k, p in model.named_parameters()})
    for name, value in grads[2].items():
        scale = value.abs().max().item() + 1e-6
        for got in grads[:2]:
            torch.testing.assert_close(got[name] / scale, value / scale, rtol=0, atol=1e-4)
    assert peaks[0] <= peaks[1] < 0.85 * peaks[2], peaks


@requires_native
def test_native_path_steps_aside() -> None:
    """float64, channels_last and native=False take the PyTorch path."""
    bn, attn = _tail_parts(16, seed=1)
    c = torch.randn(2, 16, 8, 8)
    identity = torch.randn(2, 16, 8, 8)
    for args in (
        (c.double(), identity.double(), copy.deepcopy(bn).double(), copy.deepcopy(attn).double()),
        (
            c.contiguous(memory_format=torch.channels_last),
            identity.contiguous(memory_format=torch.channels_last),
            bn,
            attn,
        ),
    ):
        y = _train_cbam_tail(*args)
        assert y is not None and not _is_native(y)
    y = _train_cbam_tail(c, identity, bn, attn, native=False)
    assert y is not None and not _is_native(y)
    y = _train_cbam_tail(c, identity, bn, attn)
    assert y is not None and _is_native(y)
    with pytest.raises(TypeError, match="set_fast_paths: native must be a bool"):
        set_fast_paths(nn.Sequential(), native="no")  # type: ignore[arg-type]


@requires_native
def test_native_backward_is_once_differentiable() -> None:
    bn, attn = _tail_parts(16, seed=2)
    c = torch.randn(2, 16, 8, 8, requires_grad=True)
    y = _train_cbam_tail(c, torch.randn(2, 16, 8, 8), bn, attn)
    assert y is not None
    (g,) = torch.autograd.grad(y.square().sum(), c, create_graph=True)
    with pytest.raises(RuntimeError, match=r"once_differentiable|twice"):
        g.sum().backward()


def test_build_caches_and_writes_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if _native._compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("CONVATTN_CACHE_DIR", str(tmp_path / "cache"))
    assert _native.cache_dir() == tmp_path / "cache"
    path = _native.build()
    assert path.parent == tmp_path / "cache" and path.suffix == ".so"
    stamp = path.stat().st_mtime_ns
    assert _native.build() == path and path.stat().st_mtime_ns == stamp  # cached
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    # a compiler failure raises with the compiler's message and leaves nothing behind
    monkeypatch.setattr(_native, "FLAGS", [*_native.FLAGS, "-fno-such-convattn-flag"])
    with pytest.raises(_native.NativeBuildError, match=r"(?s)failed.*no-such-convattn-flag"):
        _native.build()
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_without_a_compiler_the_library_warns_once_and_falls_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_native, "_compiler", lambda: None)
    monkeypatch.setattr(_native, "_loaded", None)
    monkeypatch.setattr(_native, "_failed", False)
    with pytest.raises(_native.NativeBuildError, match="no C compiler found"):
        _native.build()
    with pytest.warns(RuntimeWarning, match="falls back to its PyTorch fast paths"):
        assert _native.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: no second warning
        assert _native.library() is None
        bn, attn = _tail_parts(16, seed=4)
        y = _train_cbam_tail(torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8), bn, attn)
    assert y is not None and not _is_native(y)


def test_environment_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_native, "_loaded", None)  # as in a new process
    monkeypatch.setenv("CONVATTN_NATIVE", "0")
    assert _native.library() is None
    monkeypatch.setenv("CONVATTN_NATIVE", "1")
    assert (_native.library() is None) == (_native._compiler() is None)


# Inference: SE / ECA / scSE tails in one native call


def _channel_weights_reference(attn: ChannelAttention, x: torch.Tensor) -> torch.Tensor:
    """SE (eq. 2-3 of Hu et al.) or ECA (eq. 5 with a 1-D convolution across channels)."""
    z = x.mean((2, 3))
    if hasattr(attn, "fc1"):
        hidden = torch.relu(z @ attn.fc1.weight.t() + attn.fc1.bias)
        logits = hidden @ attn.fc2.weight.t() + attn.fc2.bias
    else:
        k = attn.conv.kernel_size[0]
        padded = F.pad(z, ((k - 1) // 2, (k - 1) // 2))
        logits = sum(
            attn.conv.weight.flatten()[i] * padded[:, i : i + z.shape[1]] for i in range(k)
        )
    if isinstance(attn.gate, nn.Hardsigmoid):
        return torch.clamp(logits / 6 + 0.5, 0, 1)[:, :, None, None]
    return torch.sigmoid(logits)[:, :, None, None]


def _eval_tail_reference(attn: nn.Module, x: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
    if isinstance(attn, ChannelSpatialSE):
        cse = x * _channel_weights_reference(attn.cse, x)
        conv = attn.sse.conv
        sse = (
            x
            * torch.sigmoid(torch.einsum("c,nchw->nhw", conv.weight.flatten(), x) + conv.bias)[
                :, None
            ]
        )
        fused = torch.maximum(cse, sse) if attn.fusion == "max" else cse + sse
    else:
        fused = x * _channel_weights_reference(attn, x)
    return torch.relu(fused + identity)


@requires_native
@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("se", {}),
        ("se", {"gate_layer": "hard_sigmoid"}),
        ("eca", {}),
        ("eca", {"kernel_size": 5}),
        ("scse", {}),
        ("scse", {"fusion": "sum"}),
        ("cse", {}),
    ],
)
@pytest.mark.parametrize("shape", [(1, 32, 9, 7), (3, 64, 14, 14)])
def test_native_eval_tail_matches_the_equations(
    name: str, options: dict[str, object], shape: tuple[int, ...]
) -> None:
    torch.manual_seed(len(name) + shape[1])
    attn = create(name, channels=shape[1], **options).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    x, identity = torch.randn(shape), torch.randn(shape)
    with torch.no_grad():
        want = _eval_tail_reference(copy.deepcopy(attn).double(), x.double(), identity.double())
        got = _native_channel_tail(attn, x, identity, owned=False)
        assert got is not None
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        owned = x.clone()
        got_inplace = _native_channel_tail(attn, owned, identity, owned=True)
        assert got_inplace is owned  # written into the block's own map
        torch.testing.assert_close(got_inplace, got, rtol=0, atol=0)


@requires_native
@pytest.mark.parametrize("threads", [1, 2, 3, 5, 7])
@pytest.mark.parametrize(("shape", "kernel_size"), [((3, 32, 5, 4), 3), ((2, 6, 3, 3), 9)])
def test_native_eca_pipeline_across_threads(
    threads: int, shape: tuple[int, ...], kernel_size: int
) -> None:
    """ECA's tail squeezes and applies channel by channel, each thread over its share of the
    (image, channel) rows and the (K - 1) / 2 rows beside it, which its neighbours overwrite
    in place: every split (shares ending inside an image, windows wider than the image's
    channels, threads without rows) equals the equations, and in place equals out of place."""
    torch.manual_seed(threads + kernel_size)
    attn = create("eca", channels=shape[1], kernel_size=kernel_size).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    x, identity = torch.randn(shape), torch.randn(shape)
    with _num_threads(threads), torch.no_grad():
        got = _native_channel_tail(attn, x, identity, owned=False)
        owned = x.clone()
        got_inplace = _native_channel_tail(attn, owned, identity, owned=True)
    assert got is not None and got_inplace is owned
    with torch.no_grad():
        want = _eval_tail_reference(copy.deepcopy(attn).double(), x.double(), identity.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_inplace, got, rtol=0, atol=0)


@requires_native
def test_native_eval_tail_steps_aside() -> None:
    """Layers the kernel does not know, float64, non-contiguous maps and hooks: None."""
    x, identity = torch.randn(2, 32, 5, 5), torch.randn(2, 32, 5, 5)
    se = create("se", channels=32).eval()
    assert _native_channel_tail(se, x, identity, False) is not None
    assert _native_channel_tail(se, x.double(), identity.double(), False) is None
    assert _native_channel_tail(se, x.transpose(2, 3), identity, False) is None
    gelu = create("se", channels=32, act_layer="gelu").eval()
    assert _native_channel_tail(gelu, x, identity, False) is None
    handle = se.fc1.register_forward_hook(lambda *args: None)
    assert _native_channel_tail(se, x, identity, False) is None
    handle.remove()
    assert _native_channel_tail(create("cbam", channels=32).eval(), x, identity, False) is None
    assert (
        _native_cbam_tail(create("cbam", channels=32).eval(), x.double(), identity, False) is None
    )


@requires_native
@pytest.mark.parametrize("attention", [None, "se", "eca", "scse", "cbam", "gc"])
def test_resnet_inference_native_matches_the_torch_path(attention: str | None) -> None:
    torch.manual_seed(0)
    native = create_model("resnet50", attention=attention).eval()
    torch_path = copy.deepcopy(native)
    set_fast_paths(torch_path, native=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(native(x), torch_path(x), rtol=1e-4, atol=1e-5)


def _cbam_eval_reference(attn: CBAM, x: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
    """relu(CBAM(x) + identity) in eval mode from eqs. 2-3 (the spatial gate's BatchNorm
    with its running statistics)."""
    cg, sg = attn.channel_gate, attn.spatial_gate

    def mlp(z: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(z @ cg.fc1.weight.t() + cg.fc1.bias)
        return hidden @ cg.fc2.weight.t() + cg.fc2.bias

    def gate(t: torch.Tensor) -> torch.Tensor:
        if isinstance(cg.gate, nn.Hardsigmoid):
            return torch.clamp(t / 6 + 0.5, 0, 1)
        return torch.sigmoid(t)

    x1 = x * gate(mlp(x.mean((2, 3))) + mlp(x.amax((2, 3))))[:, :, None, None]
    desc = torch.cat([x1.amax(1, keepdim=True), x1.mean(1, keepdim=True)], dim=1)
    logits = F.conv2d(desc, sg.conv.weight, sg.conv.bias, padding=sg.conv.padding)
    bn = sg.bn
    logits = (logits - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
    logits = logits * bn.weight + bn.bias
    return torch.relu(x1 * gate(logits) + identity)


@requires_native
@pytest.mark.parametrize("options", [{}, {"kernel_size": 3}, {"gate_layer": "hard_sigmoid"}])
@pytest.mark.parametrize("shape", [(1, 32, 9, 7), (3, 64, 14, 14), (2, 32, 30, 20)])
def test_native_cbam_eval_tail_matches_the_equations(
    options: dict[str, object], shape: tuple[int, ...]
) -> None:
    torch.manual_seed(shape[1] + shape[2])
    attn = create("cbam", channels=shape[1], **options).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        attn.spatial_gate.bn.running_mean.fill_(0.2)
        attn.spatial_gate.bn.running_var.fill_(1.7)
    x, identity = torch.randn(shape), torch.randn(shape)
    with torch.no_grad():
        want = _cbam_eval_reference(copy.deepcopy(attn).double(), x.double(), identity.double())
        got = _native_cbam_tail(attn, x, identity, owned=False)
        assert got is not None
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        owned = x.clone()
        assert _native_cbam_tail(attn, owned, identity, owned=True) is owned
        torch.testing.assert_close(owned, got, rtol=0, atol=0)
        attn.spatial_gate.bn.train()  # batch statistics: not the kernel's
        assert _native_cbam_tail(attn, x, identity, owned=False) is None


# Training: SE / ECA tails after a batch-statistics BatchNorm


def _se_train_reference(
    c: torch.Tensor, identity: torch.Tensor, bn: nn.BatchNorm2d, attn: ChannelAttention
) -> torch.Tensor:
    x = _batch_norm(bn, c)
    return torch.relu(x * _channel_weights_reference(attn, x) + identity)


def _se_native_tail(
    c: torch.Tensor, identity: torch.Tensor, bn: nn.BatchNorm2d, attn: ChannelAttention
) -> torch.Tensor:
    block = nn.Module()  # _train_attention_tail reads nothing of the block
    y = _train_attention_tail(block, c, identity, bn, attn)
    assert y is not None and type(y.grad_fn).__name__ == f"{_SeTailNative.__name__}Backward"
    return y


@requires_native
@pytest.mark.parametrize(
    ("name", "options", "case"),
    [
        ("se", {}, "random"),
        ("se", {"gate_layer": "hard_sigmoid"}, "random"),
        ("eca", {}, "random"),
        ("eca", {"kernel_size": 5}, "zero_init"),
        ("se", {}, "no_affine"),
    ],
)
@pytest.mark.parametrize("shape", [(8, 32, 12, 12), (3, 32, 7, 9)])
def test_native_se_tail_matches_the_equations(
    name: str, options: dict[str, object], case: str, shape: tuple[int, ...]
) -> None:
    ch, h = shape[1:3]
    torch.manual_seed(ch + h + len(name))
    bn = nn.BatchNorm2d(ch, affine=case != "no_affine").train()
    attn = create(name, channels=ch, **options).train()
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.uniform_(-1.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            if case == "zero_init":
                bn.weight.zero_()
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    c = torch.randn(shape) * 3 + 1.0
    identity, grad = torch.randn(shape), torch.randn(shape)
    ref_bn, ref_attn = copy.deepcopy(bn).double(), copy.deepcopy(attn).double()
    y, got = _grads(_se_native_tail, c, identity, bn, attn, grad)
    y_ref, want = _grads(_se_train_reference, c.double(), identity.double(), ref_bn, ref_attn, grad)
    torch.testing.assert_close(y, y_ref.float(), rtol=1e-4, atol=1e-5)
    for key, value in want.items():
        scale = value.abs().max().item() + 1e-6
        torch.testing.assert_close(
            got[key].double() / scale, value / scale, rtol=0, atol=2e-5, msg=key
        )
    reference = nn.BatchNorm2d(ch, affine=False).double().train()
    reference(c.double())
    torch.testing.assert_close(bn.running_mean.double(), reference.running_mean)
    torch.testing.assert_close(bn.running_var.double(), reference.running_var)


@requires_native
def test_se_native_steps_aside_for_an_overridden_pool() -> None:
    """A subclass with its own ``describe`` keeps the PyTorch path (the kernel pools itself)."""

    class MaxSE(SEModule):
        def describe(self, x: torch.Tensor) -> list[torch.Tensor]:
            return [x.amax((2, 3))]

    bn = nn.BatchNorm2d(32).train()
    c, identity = torch.randn(2, 32, 6, 6), torch.randn(2, 32, 6, 6)
    y = _train_attention_tail(nn.Module(), c, identity, bn, MaxSE(32).train())
    assert y is not None and type(y.grad_fn).__name__ == "BNGateResidualReLUBackward"
    y = _train_attention_tail(nn.Module(), c, identity, bn, SEModule(32).train(), native=False)
    assert y is not None and type(y.grad_fn).__name__ == "BNGateResidualReLUBackward"


@requires_native
def test_resnet_training_se_native_matches_the_torch_path_and_saves_memory() -> None:
    torch.manual_seed(0)
    native = create_model("cifar_resnet20", attention="se").train()
    torch_path = copy.deepcopy(native)
    set_fast_paths(torch_path, native=False)
    x = torch.randn(16, 3, 32, 32)
    target = torch.randint(10, (16,))
    peaks, grads = [], []
    for model in (native, torch_path):
        model.zero_grad(set_to_none=True)
        with TensorMemoryTracker() as tracker:
            F.cross_entropy(model(x), target).backward()
        peaks.append(tracker.peak_bytes)
        grads.append({k: p.grad for k, p in model.named_parameters()})
    for name, value in grads[1].items():
        scale = value.abs().max().item() + 1e-6
        torch.testing.assert_close(grads[0][name] / scale, value / scale, rtol=0, atol=1e-4)
    # the same feature maps kept (c and the output); per-block vectors differ slightly
    assert peaks[0] <= 1.01 * peaks[1], peaks


def _gc_eval_reference(
    attn: nn.Module, bn: nn.BatchNorm2d, y: torch.Tensor, identity: torch.Tensor
) -> torch.Tensor:
    """relu(GC(BN(y)) + identity), eval mode, from the GCNet paper's eq. 4 (add fusion)."""
    x = bn_eval(y, bn)
    return torch.relu(
        gc_reference(x, attn.state_dict(), pooling="att", fusions=("add",)) + identity
    )


@requires_native
@pytest.mark.parametrize("shape", [(1, 64, 9, 7), (3, 64, 14, 14), (2, 128, 30, 20)])
def test_native_gc_eval_tail_matches_the_equations(shape: tuple[int, ...]) -> None:
    torch.manual_seed(shape[1] + shape[2])
    attn = create("gc", channels=shape[1]).eval()
    bn = nn.BatchNorm2d(shape[1]).eval()
    with torch.no_grad():
        for p in [*attn.parameters(), bn.weight, bn.bias]:
            p.add_(torch.randn_like(p) * 0.3)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    y, identity = torch.randn(shape) * 2, torch.randn(shape)
    with torch.no_grad():
        want = _gc_eval_reference(
            copy.deepcopy(attn).double(), copy.deepcopy(bn).double(), y.double(), identity.double()
        )
        got = _native_gc_tail(attn, bn, y, identity)
        assert got is not None
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
        # the fold follows in-place changes of the BatchNorm (cached by tensor versions)
        bn.running_mean.add_(0.25)
        want = _gc_eval_reference(
            copy.deepcopy(attn).double(), copy.deepcopy(bn).double(), y.double(), identity.double()
        )
        got = _native_gc_tail(attn, bn, y, identity)
        assert got is not None
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
        bn.train()
        assert _native_gc_tail(attn, bn, y, identity) is None
        assert _native_gc_tail(attn, bn.eval(), y.double(), identity.double()) is None


@requires_native
@pytest.mark.parametrize("name", ["se", "scse", "cbam", "gc"])
def test_native_tails_split_large_batches_into_chunks(name: str) -> None:
    """Maps of more than 4 MB an image run one image per pass (so that the last pass finds
    the map in cache); the result is the whole batch's."""
    torch.manual_seed(2)
    shape = (3, 16, 260, 260)  # 4.3 MB an image
    attn = create(name, channels=16).eval()
    bn = nn.BatchNorm2d(16).eval()
    with torch.no_grad():
        for p in [*attn.parameters(), bn.weight, bn.bias]:
            p.add_(torch.randn_like(p) * 0.3)
        bn.running_var.uniform_(0.5, 2.0)
    y, identity = torch.randn(shape), torch.randn(shape)
    with torch.no_grad():
        got = _native_folded_tail(attn, bn, y, identity)
        assert got is not None
        for i in range(shape[0]):  # each image alone: a batch of one
            one = _native_folded_tail(attn, bn, y[i : i + 1], identity[i : i + 1])
            assert one is not None
            torch.testing.assert_close(got[i : i + 1], one, rtol=0, atol=0)
        if name == "gc":
            want = _gc_eval_reference(
                copy.deepcopy(attn).double(),
                copy.deepcopy(bn).double(),
                y[:1].double(),
                identity[:1].double(),
            )
        else:
            want = _folded_reference(attn, bn, y[:1], identity[:1])
        torch.testing.assert_close(got[:1].double(), want, rtol=1e-5, atol=1e-4)


@requires_native
def test_native_residual_tail_of_a_block_without_attention() -> None:
    """relu(BN(y) + identity) for the plain block, the eval BatchNorm from its definition."""
    torch.manual_seed(5)
    bn = nn.BatchNorm2d(24).eval()
    with torch.no_grad():
        bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3)
    y, identity = torch.randn(3, 24, 7, 9), torch.randn(3, 24, 7, 9)
    slot = nn.Identity()
    want = torch.relu(bn_eval(y.double(), copy.deepcopy(bn).double()) + identity.double())
    with torch.no_grad():
        got = _native_residual_tail(slot, bn, y, identity, inplace=False)
        assert got is not None and got.data_ptr() != y.data_ptr()
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
        owned = y.clone()
        assert _native_residual_tail(slot, bn, owned, identity, inplace=True) is owned
        torch.testing.assert_close(owned, got, rtol=0, atol=0)
        assert (
            _native_residual_tail(
                slot, bn, y[:, :12].contiguous(), identity[:, :12].contiguous(), False
            )
            is None
        )
        assert _native_residual_tail(nn.ReLU(), bn, y, identity, inplace=False) is None
        bn.train()
        assert _native_residual_tail(slot, bn, y, identity, inplace=False) is None


@requires_native
@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize("shape", [(2, 64, 1, 1), (1, 32, 40, 40), (3, 32, 17, 23)])
def test_native_gc_tail_across_threads(threads: int, shape: tuple[int, ...]) -> None:
    """GC's kernel splits channel rows between threads, each summing its rows' scores into
    a partial score map of its own, and the softmax context comes from their sum: every
    split (threads without rows among them, peaked scores) gives the paper's softmax
    context."""
    torch.manual_seed(threads + shape[2])
    attn = create("gc", channels=shape[1]).eval()
    bn = nn.BatchNorm2d(shape[1]).eval()
    with torch.no_grad():
        for p in [*attn.parameters(), bn.weight, bn.bias]:
            p.add_(torch.randn_like(p) * 0.3)
        attn.conv_mask.weight.mul_(8.0)  # peaked scores: the running maximum moves
        bn.running_var.uniform_(0.5, 2.0)
    y, identity = torch.randn(shape) * 2, torch.randn(shape)
    want = _gc_eval_reference(
        copy.deepcopy(attn).double(), copy.deepcopy(bn).double(), y.double(), identity.double()
    )
    with _num_threads(threads), torch.no_grad():
        got = _native_gc_tail(attn, bn, y, identity)
    assert got is not None
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


@requires_native
@pytest.mark.parametrize("name", ["se", "eca", "scse", "cbam"])
def test_native_eval_tails_fold_the_blocks_batchnorm(name: str) -> None:
    """With the block's eval-mode BatchNorm folded into the kernel: relu(attn(bn(y)) + id)."""
    torch.manual_seed(len(name))
    shape = (2, 32, 11, 13)
    attn = create(name, channels=32).eval()
    bn = nn.BatchNorm2d(32).eval()
    with torch.no_grad():
        for p in [*attn.parameters(), bn.weight, bn.bias]:
            p.add_(torch.randn_like(p) * 0.3)
        bn.weight[::4] *= -1  # negative scales too
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    y, identity = torch.randn(shape) * 2, torch.randn(shape)
    ref_attn, ref_bn = copy.deepcopy(attn).double(), copy.deepcopy(bn).double()
    with torch.no_grad():
        x = ref_bn(y.double())
        if name == "cbam":
            ref_attn.spatial_gate.bn.running_var.fill_(1.3)
            attn.spatial_gate.bn.running_var.fill_(1.3)
            want = _cbam_eval_reference(ref_attn, x, identity.double())
        else:
            want = _eval_tail_reference(ref_attn, x, identity.double())
        got = _native_folded_tail(attn, bn, y, identity)
        assert got is not None and got.data_ptr() != y.data_ptr()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        bn.train()
        assert _native_folded_tail(attn, bn, y, identity) is None  # batch statistics


@requires_native
@pytest.mark.parametrize("name", ["se", "eca", "scse", "cbam"])
def test_native_eval_arguments_follow_parameter_changes(name: str) -> None:
    """The kernels' arguments are kept on the module between calls: in-place updates,
    reassigned ``.data``, replaced submodules and new hooks must all be seen."""
    torch.manual_seed(1)
    attn = create(name, channels=32).eval()
    x, identity = torch.randn(2, 32, 6, 6), torch.randn(2, 32, 6, 6)
    tail = _native_cbam_tail if name == "cbam" else _native_channel_tail

    def check() -> None:
        with torch.no_grad():
            got = tail(attn, x, identity, False)
            assert got is not None
            ref = copy.deepcopy(attn).double()
            if name == "cbam":
                want = _cbam_eval_reference(ref, x.double(), identity.double())
            else:
                want = _eval_tail_reference(ref, x.double(), identity.double())
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)

    check()
    with torch.no_grad():
        for p in attn.parameters():  # in place: versions change
            p.mul_(-1.5).add_(0.1)
    check()
    for p in attn.parameters():  # new storage
        p.data = torch.randn_like(p)
    check()
    for module in attn.modules():  # new parameter objects
        for key, p in list(module._parameters.items()):
            if p is not None:
                setattr(module, key, nn.Parameter(torch.randn_like(p) * 0.5))
    check()
    if name == "cbam":
        with torch.no_grad():
            attn.spatial_gate.bn.running_mean.fill_(0.7)  # a buffer read as a number
        check()
    handle = next(iter(attn.children())).register_forward_pre_hook(lambda *args: None)
    assert tail(attn, x, identity, False) is None
    handle.remove()
    check()


def _folded_reference(
    attn: nn.Module, bn: nn.BatchNorm2d, y: torch.Tensor, identity: torch.Tensor
) -> torch.Tensor:
    ref_attn, ref_bn = copy.deepcopy(attn).double(), copy.deepcopy(bn).double()
    x = ref_bn(y.double())
    if isinstance(attn, CBAM):
        return _cbam_eval_reference(ref_attn, x, identity.double())
    return _eval_tail_reference(ref_attn, x, identity.double())


@requires_native
@pytest.mark.parametrize("name", ["se", "eca", "scse", "cbam"])
def test_native_plans_follow_the_blocks_batchnorm(name: str) -> None:
    """The plan reads the block's BatchNorm at every call and is rebuilt when it is another
    BatchNorm, another eps, another mode, new storage or a hook."""
    torch.manual_seed(3)
    attn = create(name, channels=16).eval()
    bn = nn.BatchNorm2d(16).eval()
    y, identity = torch.randn(2, 16, 5, 6), torch.randn(2, 16, 5, 6)

    def check(norm: nn.BatchNorm2d) -> None:
        with torch.no_grad():
            got = _native_folded_tail(attn, norm, y, identity)
            assert got is not None
            want = _folded_reference(attn, norm, y, identity)
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)

    check(bn)
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2.0)  # in place: read at the call
        bn.running_mean.uniform_(-1, 1)
        bn.weight.uniform_(-2, 2)
    check(bn)
    bn.eps = 0.5
    check(bn)
    bn.running_mean = torch.randn(16) * 0.1  # a new buffer object
    check(bn)
    bn.weight.data = torch.randn(16)  # new storage
    check(bn)
    other = nn.BatchNorm2d(16).eval()
    with torch.no_grad():
        other.bias.fill_(0.75)
    check(other)  # another BatchNorm: not the first one's plan
    check(bn)
    bn.train()
    assert _native_folded_tail(attn, bn, y, identity) is None
    bn.eval()
    handle = bn.register_forward_hook(lambda *args: None)
    assert _native_folded_tail(attn, bn, y, identity) is None
    handle.remove()
    check(bn)
    bn.double()  # float64 storage: not the kernels'
    assert _native_folded_tail(attn, bn, y, identity) is None
    bn.float()
    check(bn)


@requires_native
def test_native_plans_are_not_copied_with_the_model(tmp_path: Path) -> None:
    """A model that ran on the kernels deep-copies and pickles; each copy builds its own plan
    (the pointers of the original's tensors are not carried over)."""
    torch.manual_seed(0)
    model = create_model("resnet18", attention="se").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        want = model(x)
    twin = copy.deepcopy(model)
    path = tmp_path / "model.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    del model
    for other in (twin, loaded):
        with torch.no_grad():
            other.layer1[0].attn.fc1.weight.add_(0.5)
        with torch.inference_mode():
            got = other(x)
        assert not torch.allclose(got, want)  # its own weights, not the dead original's
        with torch.no_grad():
            other.layer1[0].attn.fc1.weight.sub_(0.5)
        with torch.inference_mode():
            torch.testing.assert_close(other(x), want)


@requires_native
@pytest.mark.parametrize("attention", ["se", "cbam", "gc"])
def test_native_tails_overwrite_only_maps_nobody_holds(attention: str) -> None:
    """Without hooks the tail writes into the last convolution's output; a forward hook that
    keeps that output sees it untouched."""
    torch.manual_seed(0)
    model = create_model("resnet50", attention=attention).eval()
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep(module: nn.Module, args: object, out: torch.Tensor) -> None:
        kept.append((out, out.clone()))

    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        want = model(x)
        handle = model.layer2[1].conv3.register_forward_hook(keep)
        got = model(x)
        handle.remove()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    ((held, at_the_hook),) = kept
    torch.testing.assert_close(held, at_the_hook, rtol=0, atol=0)


@requires_native
def test_native_plans_work_for_inference_tensors() -> None:
    """Parameters made under inference_mode (no version counter) keep their plan."""
    with torch.inference_mode():
        attn = create("se", channels=16).eval()
        bn = nn.BatchNorm2d(16).eval()
        y, identity = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)
        first = _native_folded_tail(attn, bn, y, identity)
        plan = attn.__dict__["_convattn_plan_bn"]
        second = _native_folded_tail(attn, bn, y, identity)
        assert attn.__dict__["_convattn_plan_bn"] is plan
        assert first is not None and second is not None
        torch.testing.assert_close(first, second, rtol=0, atol=0)
        torch.testing.assert_close(first.double(), _folded_reference(attn, bn, y, identity))


def test_optimize_switches_the_native_kernels() -> None:
    from convattn.fast import optimize
    from convattn.models.resnet import _Block

    model = create_model("cifar_resnet20", attention="se")
    optimize(model, native=False)
    assert not any(m.fast_native for m in model.modules() if isinstance(m, _Block))
    optimize(model)
    assert all(m.fast_native for m in model.modules() if isinstance(m, _Block))
    with pytest.raises(TypeError, match="optimize: native must be a bool"):
        optimize(model, native="yes")  # type: ignore[arg-type]


def test_build_falls_back_to_the_temporary_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if _native._compiler() is None:
        pytest.skip("no C compiler")
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("CONVATTN_CACHE_DIR", str(blocked / "cache"))  # cannot be made
    monkeypatch.setattr(_native.tempfile, "gettempdir", lambda: str(tmp_path))
    path = _native.build()
    assert path.parent == tmp_path / f"convattn-{os.getuid()}" and path.is_file()
