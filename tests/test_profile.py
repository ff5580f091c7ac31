"""convattn.profile: FLOP/MAC counts against hand counts worked out from each mechanism's
equations, the tensor-memory tracker against known allocations, latency and the Profile."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import convattn
from convattn import models
from convattn.cli import main
from convattn.profile import (
    LatencyStats,
    Profile,
    TensorMemoryTracker,
    count_flops,
    measure_latency,
    profile,
)

# Conventions (see convattn.profile): conv/linear/matmul 2 FLOPs per MAC + 1 per output for a
# bias; element-wise 1 per output element; reductions 1 per input element; softmax 5 per
# element; BN in eval 2 per element; LayerNorm 7 per element with affine; pooling windows
# k * output elements. Views, cat, stack, split: 0.
C, H, W = 16, 4, 4
HW = H * W
X = C * HW  # elements of the (1, C, H, W) input


def linear_flops(cin: int, cout: int, bias: bool) -> tuple[int, int]:
    macs = cin * cout
    return 2 * macs + (cout if bias else 0), macs


def se_cost(channels: int, hw: int, rd: int) -> tuple[int, int]:
    """GAP -> FC(C->rd)+bias -> ReLU -> FC(rd->C)+bias -> sigmoid -> x * w, batch 1."""
    fc1, mac1 = linear_flops(channels, rd, True)
    fc2, mac2 = linear_flops(rd, channels, True)
    x = channels * hw
    flops = x + fc1 + rd + fc2 + channels + x
    return flops, mac1 + mac2


def hand_se() -> tuple[int, int]:
    return se_cost(C, HW, C // 16)


def hand_eca() -> tuple[int, int]:
    t = int(abs((math.log2(C) + 1) / 2))
    k = t if t % 2 else t + 1  # 3 for C = 16
    conv_macs = C * k  # C outputs of a 1 -> 1 conv of size k, no bias
    return X + 2 * conv_macs + C + X, conv_macs


def hand_cbam() -> tuple[int, int]:
    rd = C // 16
    fc1, mac1 = linear_flops(C, rd, True)
    fc2, mac2 = linear_flops(rd, C, True)
    mlp = fc1 + rd + fc2
    channel = X + X + 2 * mlp + C + C + X  # mean, amax, MLP twice, add, sigmoid, multiply
    conv_macs = HW * 2 * 49  # [max; mean] -> 1 map, 7x7, no bias
    spatial = X + X + 2 * conv_macs + 2 * HW + HW + X  # amax_c, mean_c, conv, BN, sigmoid, mul
    return channel + spatial, 2 * (mac1 + mac2) + conv_macs


def hand_scse() -> tuple[int, int]:
    cse, cse_macs = se_cost(C, HW, C // 2)
    sse_macs = HW * C  # 1x1 conv C -> 1 with bias
    sse = 2 * sse_macs + HW + HW + X  # conv + bias, sigmoid, multiply
    return cse + sse + X, cse_macs + sse_macs  # + element-wise max


def hand_coord() -> tuple[int, int]:
    mip = max(8, C // 32)
    pooled = C * (H + W)
    conv1_macs = mip * (H + W) * C
    conv_h_macs = C * H * mip
    conv_w_macs = C * W * mip
    flops = (
        X  # mean over W
        + X  # mean over H
        + 2 * conv1_macs
        + mip * (H + W)  # conv1 with bias
        + 2 * mip * (H + W)  # BN (eval)
        + mip * (H + W)  # h-swish
        + 2 * conv_h_macs
        + C * H  # conv_h with bias
        + 2 * conv_w_macs
        + C * W  # conv_w with bias
        + pooled  # two sigmoids
        + X
        + X  # x * g_w * g_h
    )
    return flops, conv1_macs + conv_h_macs + conv_w_macs


def hand_sk(groups: int) -> tuple[int, int]:
    branches, d = 2, max(C // 16, 32)
    conv_macs = X * (C // groups) * 9  # C -> C 3x3 grouped, no bias
    branch = 2 * conv_macs + 2 * X + X  # conv, BN (eval), ReLU
    fc1, mac1 = linear_flops(C, d, False)
    fc2, mac2 = linear_flops(d, branches * C, False)
    flops = (
        branches * branch
        + branches * X  # sum over branches
        + X  # GAP
        + fc1
        + 2 * d  # BN1d (eval)
        + d  # ReLU
        + fc2
        + 5 * branches * C  # softmax across branches
        + branches * X  # weights * U_m
        + branches * X  # sum over branches
    )
    return flops, branches * conv_macs + mac1 + mac2


def hand_gc() -> tuple[int, int]:
    rd = max(1, int(C / 16))
    mask_macs = HW * C  # 1x1 conv C -> 1, bias
    pool_macs = C * HW  # (C, HW) @ (HW, 1)
    t1_macs, t2_macs = C * rd, rd * C
    flops = (
        2 * mask_macs
        + HW
        + 5 * HW  # softmax over positions
        + 2 * pool_macs
        + 2 * t1_macs
        + rd
        + 7 * rd  # LayerNorm with affine
        + rd  # ReLU
        + 2 * t2_macs
        + C
        + X  # broadcast add
    )
    return flops, mask_macs + pool_macs + t1_macs + t2_macs


def hand_simam() -> tuple[int, int]:
    # mean, x - mu, ^2, sum, / n, v + lambda, 4 * (.), d / (.), + 1/2, sigmoid, x * w
    return X + X + X + X + C + C + C + X + X + X + X, 0


HAND_COUNTS = {
    "se": (lambda: convattn.create("se", C), hand_se),
    "eca": (lambda: convattn.create("eca", C), hand_eca),
    "cbam": (lambda: convattn.create("cbam", C), hand_cbam),
    "scse": (lambda: convattn.create("scse", C), hand_scse),
    "coord": (lambda: convattn.create("coord", C), hand_coord),
    "sk": (lambda: convattn.create("sk", C, groups=4), lambda: hand_sk(4)),
    "gc": (lambda: convattn.create("gc", C), hand_gc),
    "simam": (lambda: convattn.create("simam", C), hand_simam),
}


@pytest.mark.parametrize("name", sorted(HAND_COUNTS))
def test_flops_and_macs_match_hand_counts(name: str) -> None:
    build, hand = HAND_COUNTS[name]
    module = build()
    count = count_flops(module, torch.randn(1, C, H, W))
    flops, macs = hand()
    assert (count.flops, count.macs) == (flops, macs)
    assert count.uncounted == {}
    assert count.attention_modules == [""]
    assert count.attention_flops == flops


def test_flops_scale_with_batch() -> None:
    module = convattn.create("cbam", C)
    one = count_flops(module, torch.randn(1, C, H, W))
    three = count_flops(module, torch.randn(3, C, H, W))
    assert (three.flops, three.macs) == (3 * one.flops, 3 * one.macs)


def test_counting_restores_mode_and_attributes_modules() -> None:
    net = models.create_model("cifar_resnet20", attention="se", num_classes=10).train()
    count = count_flops(net, torch.randn(1, 3, 32, 32))
    assert net.training
    # 9 SE modules: 3 blocks per stage at C = 16, 32, 64 on 32x32, 16x16, 8x8 maps.
    assert len(count.attention_modules) == 9
    expected = [
        se_cost(c, s * s, c // 16) for c, s in ((16, 32), (32, 16), (64, 8)) for _ in range(3)
    ]
    assert [count.by_module[n].flops for n in count.attention_modules] == [f for f, _ in expected]
    assert count.attention_macs == sum(m for _, m in expected)
    # The modules the forward calls add up to the whole: stem, the 9 blocks, pool and FC.
    called = ["conv1", "bn1", "relu", *(f"layer{s}.{b}" for s in (1, 2, 3) for b in (0, 1, 2))]
    called += ["avgpool", "fc"]
    assert sum(count.by_module[n].flops for n in called) == count.flops
    assert count.by_module["conv1"].macs == 32 * 32 * 16 * 3 * 9  # 3 -> 16, 3x3, no bias
    assert count.by_module["fc"].flops == 2 * 64 * 10 + 10
    assert count.by_op["mul"] > 0 and count.by_op["sigmoid"] > 0


def test_window_pooling_and_layer_norm_rules() -> None:
    net = nn.Sequential(nn.MaxPool2d(3, stride=2, padding=1), nn.AvgPool2d(2), nn.LayerNorm(2))
    count = count_flops(net, torch.randn(1, 4, 8, 8))
    # max pool -> (1, 4, 4, 4): 9 per output; avg pool -> (1, 4, 2, 2): 4 per output;
    # LayerNorm over the last dim with affine: 7 per element.
    assert count.flops == 9 * 64 + 4 * 16 + 7 * 16


def test_tracker_counts_known_allocations() -> None:
    with TensorMemoryTracker() as tracker:
        a = torch.empty(1024, 1024)  # 4 MiB
        b = a + 1  # 4 MiB more
        view = b.view(-1)  # no new storage
        b.mul_(2)  # in place: no new storage
        del a
        assert tracker.current_bytes == 4 * 2**20
        c = torch.zeros(256, 1024)  # 1 MiB
        del view, b
    assert tracker.peak_bytes == 8 * 2**20
    assert tracker.current_bytes == 2**20  # c is still alive
    del c


def test_tracker_keeps_tensors_saved_for_backward() -> None:
    w = torch.randn(512, 512, requires_grad=True)  # allocated before: not counted
    with TensorMemoryTracker() as tracker:
        x = torch.randn(512, 512)
        h = (x @ w).sigmoid()  # the matmul result is freed, the sigmoid output is saved
        loss = h.sum()
        del h
        assert tracker.current_bytes == 2 * 2**20 + 4  # x, the saved sigmoid output, loss
        del loss  # frees the graph and what it saved
        assert tracker.current_bytes == 2**20
        del x
    assert tracker.peak_bytes == 3 * 2**20
    assert tracker.current_bytes == 0


class _Allocates(nn.Module):
    """Allocates a 1 MiB buffer in forward and returns a new (1, 8) tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scratch = torch.zeros(256, 1024)
        return x * scratch[0, :8]


def test_profile_peak_memory_of_a_known_allocation() -> None:
    result = profile(_Allocates(), (1, 8), latency=False, flops=False)
    input_bytes = output_bytes = 8 * 4
    assert result.peak_memory_bytes == input_bytes + 2**20 + output_bytes


def test_training_step_memory_holds_weights_grads_and_momentum() -> None:
    model = nn.Linear(512, 512, bias=False)
    before = model.weight.detach().clone()
    result = profile(model, (4, 512), train=True, repeats=2, warmup=0, train_repeats=1)
    weight_bytes = 512 * 512 * 4
    assert result.train_peak_memory_bytes is not None and result.peak_memory_bytes is not None
    assert result.train_peak_memory_bytes >= 3 * weight_bytes  # weights, momentum, grads
    assert result.peak_memory_bytes < 2 * weight_bytes
    torch.testing.assert_close(model.weight, before, rtol=0, atol=0)  # trained a copy
    assert model.training


def test_latency_stats() -> None:
    calls = []
    stats = measure_latency(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7 and stats.repeats == 5
    assert stats.min_ms <= stats.median_ms and stats.median_ms > 0 and stats.iqr_ms >= 0
    fixed = LatencyStats.from_samples([1.0, 2.0, 3.0, 4.0, 100.0])
    assert fixed.median_ms == 3.0 and fixed.iqr_ms == 2.0 and fixed.min_ms == 1.0


def test_profile_fields_and_to_dict() -> None:
    model = models.create_model("cifar_resnet20", attention="eca", num_classes=10)
    result = profile(model, 32, repeats=3, warmup=1, threads=1)
    assert isinstance(result, Profile)
    assert result.input_size == (1, 3, 32, 32) and result.threads == 1
    assert result.params == sum(p.numel() for p in model.parameters())
    assert result.attention_params == 9 * 3  # ECA: k = 3 weights per module, 9 modules
    assert result.macs is not None and result.flops is not None and result.flops > 2 * result.macs
    assert result.latency_ms is not None and result.latency_ms > 0 and result.latency_repeats == 3
    assert result.peak_memory_bytes is not None
    assert result.peak_memory_bytes > 4 * result.params  # weights plus activations
    assert result.train_latency_ms is None and result.train_peak_memory_bytes is None
    data = result.to_dict()
    assert {"params", "flops", "macs", "latency_ms", "peak_memory_bytes"} <= set(data)
    assert "by_module" not in data and "by_module" in result.to_dict(breakdown=True)
    assert json.loads(json.dumps(result.to_dict(breakdown=True)))["params"] == result.params
    assert "MACs" in result.summary()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"input_size": "224"}, TypeError, "input_size"),
        ({"input_size": (1, 0, 4)}, ValueError, "input_size"),
        ({"input_size": 8, "repeats": 0}, ValueError, "repeats must be an int >= 1"),
        ({"input_size": 8, "device": "tpu"}, ValueError, "device"),
        ({"input_size": 8, "threads": -1}, ValueError, "threads"),
    ],
)
def test_profile_rejects_bad_input(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        profile(convattn.create("se", 3), **kwargs)


def test_profile_rejects_non_module() -> None:
    with pytest.raises(TypeError, match=r"profile: model must be an nn\.Module"):
        profile("resnet50", 224)  # type: ignore[arg-type]


def test_profile_command_on_one_module(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["profile", "--attention", "se", "--channels", "16", "--input", "4", "--repeats", "1"]
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["flops"], data["macs"]) == hand_se()
    assert main([*argv, "--breakdown"]) == 0
    assert "fc1" in capsys.readouterr().out
    assert main(["profile", "--channels", "16"]) == 2
    assert "give --attention" in capsys.readouterr().err
