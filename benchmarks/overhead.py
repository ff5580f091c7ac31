"""What attention costs inside a network: convattn (fast paths on) against timm, in one run.

Three measurements, each side by side in one process: every network runs once a round, in
an order shuffled each round, and every ratio is the median over rounds of that round's
ratio (paired: both times taken seconds apart, so a machine-wide slowdown cancels). For
inference, each contender is built ``--instances`` times (default 3) and a round's time is the
mean over its instances, every attention network reads its backbone weights from the
tensors of a plain network's instance (``--no-share-backbone``: its own copy), all networks
are built anew every ``--rebuild-every`` rounds (default 10: where a network's tensors land
moves its time by a few percent for as long as it lives), and a 90 % bootstrap interval of
each ratio is printed: single batch-1 passes jump by a third on a shared machine, so batch 1
runs 60 rounds and larger batches 25.

1. Inference overhead over the plain backbone, ResNet-50 at 224 px, batch 1 and 8, in eval
   mode under ``torch.inference_mode``: ``time(attention net) / time(plain net) - 1`` for
   convattn's reference ResNet-50 (against convattn's plain ResNet-50) and for timm's ResNet-50
   with the same attention layer in the same place (against timm's plain ResNet-50).
2. Training throughput, CIFAR ResNet-20 at batch 128 (forward, cross-entropy, backward):
   images/s with SE and CBAM relative to the plain network, for convattn's fast paths and for
   the direct implementation (``convattn.fast.set_fast_paths(model, False)``), CBAM on its
   PyTorch fast path instead of the native kernels (``set_fast_paths(model, native=False)``)
   and CBAM without its memory-saving recomputation (``recompute=False``); then the
   same networks through ``convattn.optimize(model, compile=True)``, each against the
   compiled plain network (first compiles take about a minute in all; ``--no-compile``
   skips them).
3. Peak memory of a training step (forward + backward) of SE- and CBAM-ResNet-50: convattn,
   the direct implementation and timm, counted with ``convattn.profile.TensorMemoryTracker``
   on CPU (every tensor allocated during the step while it lives; parameters not counted) or
   ``torch.cuda.max_memory_allocated`` on a GPU.

timm is configured like the papers / convattn: SE and CBAM widths C/16 (timm's SE rounding
gives the same widths on ResNet-50), CBAM's MLP with biases, GC with add fusion and C/16.
ECA: convattn uses the released per-stage kernels 3, 5, 5, 7, timm its adaptive 5, 5, 5, 7.
timm has no scSE; its column says n/a.

    python benchmarks/overhead.py                 # the full run (about 20 minutes on 2 cores)
    python benchmarks/overhead.py --quick         # smoke run: small inputs, few rounds
    python benchmarks/overhead.py --device cuda   # the same ratios on a GPU
    python benchmarks/overhead.py --batches 8 --mechanisms eca --skip training memory
                                                  # one mechanism, more rounds in the time
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from convattn.fast import optimize, set_fast_paths
from convattn.models import create_model
from convattn.profile import TensorMemoryTracker

# mechanism -> (inference goal in %, convattn attention_options, placement)
GOALS: dict[str, float] = {"se": 3.0, "eca": 1.5, "cbam": 8.0, "gc": 6.0, "scse": 8.0}
PLACEMENT = {"scse": "block_end"}
TRAIN_GOALS = {"se": 0.95, "cbam": 0.80}
MEMORY_GOAL = 0.85  # convattn's peak at most 85 % of timm's


def timm_resnet50(mechanism: str | None) -> nn.Module | None:
    """timm's ResNet-50 with ``mechanism`` where its SE-ResNet puts attention (after bn3)."""
    from timm.layers import EcaModule, GlobalContext, SEModule
    from timm.layers.cbam import CbamModule
    from timm.models.resnet import Bottleneck, ResNet

    layers: dict[str | None, Callable[..., nn.Module] | None] = {
        None: None,
        "se": functools.partial(SEModule, rd_ratio=1 / 16),
        "eca": EcaModule,
        "cbam": functools.partial(CbamModule, rd_ratio=1 / 16, mlp_bias=True),
        "gc": functools.partial(GlobalContext, fuse_add=True, fuse_scale=False, rd_ratio=1 / 16),
    }
    if mechanism not in layers:
        return None
    attn = layers[mechanism]
    block_args = {} if attn is None else {"attn_layer": attn}
    return ResNet(Bottleneck, [3, 4, 6, 3], block_args=block_args)


def convattn_model(
    name: str,
    mechanism: str | None,
    fast: bool = True,
    recompute: bool = True,
    native: bool = True,
) -> nn.Module:
    model = create_model(name, attention=mechanism, placement=PLACEMENT.get(mechanism or ""))
    set_fast_paths(model, fast, recompute=recompute, native=native)
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rounds(
    steps: list[Callable[[], object]],
    warmup: int,
    repeats: int,
    device: torch.device,
    seed: int = 0,
) -> list[list[float]]:
    """Seconds of every step in every round: ``result[round][step]``. Every step runs once
    a round, in an order shuffled anew each round (so no step always follows the same one)."""
    for _ in range(warmup):
        for step in steps:
            step()
    sync(device)
    order = list(range(len(steps)))
    rng = random.Random(seed)
    rounds: list[list[float]] = []
    for _ in range(repeats):
        rng.shuffle(order)
        times = [0.0] * len(steps)
        for i in order:
            start = time.perf_counter()
            steps[i]()
            sync(device)
            times[i] = time.perf_counter() - start
        rounds.append(times)
    return rounds


def paired_ratio(rounds: list[list[float]], num: list[int], den: list[int]) -> float:
    """Median over rounds of ``mean time of steps num / mean time of steps den`` in that round.

    Each round's ratio compares runs made seconds apart, so a machine-wide slowdown (which on
    a shared 2-core machine moves a whole ResNet-50 by 30 % and more) cancels; averaging
    several separately built instances per contender takes out the few-percent differences
    between instances of one architecture (memory placement)."""
    ratios = [
        statistics.fmean(r[i] for i in num) / statistics.fmean(r[i] for i in den) for r in rounds
    ]
    return statistics.median(ratios)


def ratio_interval(
    rounds: list[list[float]], num: list[int], den: list[int], level: float = 0.9
) -> tuple[float, float]:
    """A ``level`` bootstrap confidence interval of :func:`paired_ratio` (rounds resampled
    with replacement, 500 times, fixed seed): on a shared machine single forward passes
    jump by 30 % and more, and the interval says how far the median may be trusted."""
    rng = random.Random(1)
    ratios = [
        statistics.fmean(r[i] for i in num) / statistics.fmean(r[i] for i in den) for r in rounds
    ]
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(500))
    tail = (1 - level) / 2
    return medians[int(tail * len(medians))], medians[int((1 - tail) * len(medians)) - 1]


def median_time(rounds: list[list[float]], steps: list[int]) -> float:
    """Median over rounds of the mean time of ``steps``."""
    return statistics.median(statistics.fmean(r[i] for i in steps) for r in rounds)


def share_backbone(model: nn.Module, plain: nn.Module) -> int:
    """Point every parameter and buffer of ``model`` that ``plain`` has under the same name
    and shape at ``plain``'s tensor; returns how many. The attention network then reads its
    backbone from the very memory the plain network reads, so that the two differ by the
    attention alone: separately allocated copies of the same weights run a few percent apart
    on a CPU (alignment, cache-set and page placement), as much as the effects measured."""
    theirs = dict(plain.named_parameters()) | dict(plain.named_buffers())
    shared = 0
    for prefix, module in model.named_modules():
        for table in (module._parameters, module._buffers):
            for key, tensor in table.items():
                other = theirs.get(f"{prefix}.{key}" if prefix else key)
                if tensor is not None and other is not None and other.shape == tensor.shape:
                    table[key] = other
                    shared += 1
    return shared


def infer_step(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    model.eval()

    def step() -> object:
        with torch.inference_mode():
            return model(x)

    return step


def train_step(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, run: Callable[..., Any] | None = None
) -> Callable[[], None]:
    """One training step of ``model`` (called through ``run``, e.g. its compiled wrapper)."""
    model.train()
    forward = model if run is None else run

    def step() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(forward(x), target).backward()

    return step


def inference_rounds(args: argparse.Namespace, batch: int) -> int:
    """Rounds at ``batch``: ``--repeats``, else 60 at batch 1 and 25 from batch 3 on (a
    batch-1 forward pass is short enough for the machine's hiccups to move it by a third;
    60 rounds narrow the 90 % interval of a ratio to about +-1.5 %)."""
    if args.repeats is not None:
        return int(args.repeats)
    if args.quick:
        return 3
    return max(25, 60 // batch)


def build_contenders(
    args: argparse.Namespace, device: torch.device
) -> dict[tuple[str, str], list[nn.Module]]:
    """(library, mechanism) -> ``--instances`` separately built networks, each attention
    network sharing its backbone tensors with the plain instance of its index (unless
    ``--no-share-backbone``)."""
    models: dict[tuple[str, str], list[nn.Module]] = {}
    for m in ["plain", *args.mechanisms]:
        mech = None if m == "plain" else m
        models["ca", m] = [
            convattn_model("resnet50", mech).to(device) for _ in range(args.instances)
        ]
        theirs = [timm_resnet50(mech) for _ in range(args.instances)]
        if all(t is not None for t in theirs):
            models["timm", m] = [t.to(device) for t in theirs if t is not None]
    if args.share_backbone:
        for (lib, m), instances in models.items():
            if m != "plain":
                for model, plain in zip(instances, models[lib, "plain"], strict=True):
                    share_backbone(model, plain)
    return models


def inference_table(args: argparse.Namespace, device: torch.device) -> None:
    size = 112 if args.quick else 224
    for batch in args.batches:
        torch.manual_seed(0)
        x = torch.randn(batch, 3, size, size, device=device)
        repeats = inference_rounds(args, batch)
        # Every --rebuild-every rounds all networks are built anew: where their tensors land
        # moves a network's time by a few percent for as long as it lives. (Runs still drift
        # apart by a few points with the machine's state, which no design here removes.)
        rounds: list[list[float]] = []
        index: dict[tuple[str, str], list[int]] = {}
        while len(rounds) < repeats:
            models = build_contenders(args, device)
            steps: list[Callable[[], object]] = []
            index = {}
            for key, instances in models.items():
                index[key] = list(range(len(steps), len(steps) + len(instances)))
                steps += [infer_step(model, x) for model in instances]
            count = min(args.rebuild_every or repeats, repeats - len(rounds))
            rounds += timed_rounds(steps, args.warmup, count, device, seed=len(rounds))
            del models, steps
        plain_ms = {lib: median_time(rounds, index[lib, "plain"]) * 1e3 for lib in ("ca", "timm")}
        print(
            f"\nInference, ResNet-50, {size} px, batch {batch} ({repeats} rounds): plain "
            f"convattn {plain_ms['ca']:.1f} ms, plain timm {plain_ms['timm']:.1f} ms"
        )
        header = (
            f"{'mechanism':<10} {'convattn %':>10} {'90 % CI':>14} {'timm %':>8} {'goal %':>7} "
            f"{'<= goal':>8} {'<= timm':>8}"
        )
        print(header)
        print("-" * len(header))
        for m in args.mechanisms:
            ca = (paired_ratio(rounds, index["ca", m], index["ca", "plain"]) - 1) * 100
            low, high = ratio_interval(rounds, index["ca", m], index["ca", "plain"])
            interval = f"[{(low - 1) * 100:+.1f}, {(high - 1) * 100:+.1f}]"
            tm = None
            if ("timm", m) in index:
                tm = (paired_ratio(rounds, index["timm", m], index["timm", "plain"]) - 1) * 100
            tm_cell = "n/a" if tm is None else f"{tm:+.1f}"
            beats = "n/a" if tm is None else ("yes" if ca <= tm else "NO")
            ok = "yes" if ca <= GOALS[m] else "NO"
            print(
                f"{m:<10} {ca:>+10.1f} {interval:>14} {tm_cell:>8} {GOALS[m]:>7.1f} {ok:>8} "
                f"{beats:>8}"
            )


def training_table(args: argparse.Namespace, device: torch.device) -> None:
    batch = 32 if args.quick else 128
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, device=device)
    target = torch.randint(10, (batch,), device=device)
    entries = [
        ("plain", convattn_model("cifar_resnet20", None)),
        ("se", convattn_model("cifar_resnet20", "se")),
        ("se torch", convattn_model("cifar_resnet20", "se", native=False)),
        ("se direct", convattn_model("cifar_resnet20", "se", fast=False)),
        ("cbam", convattn_model("cifar_resnet20", "cbam")),
        ("cbam torch", convattn_model("cifar_resnet20", "cbam", native=False)),
        ("cbam direct", convattn_model("cifar_resnet20", "cbam", fast=False)),
        ("cbam no-rec.", convattn_model("cifar_resnet20", "cbam", recompute=False)),
    ]
    steps = [train_step(model.to(device), x, target) for _, model in entries]
    compiled = [] if args.quick or args.no_compile else ["plain", "se", "cbam"]
    for mech in compiled:  # optimize(compile=True), each against the compiled plain network
        model = convattn_model("cifar_resnet20", None if mech == "plain" else mech).to(device)
        entries.append((f"{mech} compiled", model))
        steps.append(train_step(model, x, target, optimize(model, compile=True)))
    rounds = timed_rounds(steps, args.warmup, args.train_repeats, device)
    plain = median_time(rounds, [0])
    print(f"\nTraining, CIFAR ResNet-20, batch {batch}: plain {batch / plain:.0f} images/s")
    header = f"{'network':<14} {'images/s':>9} {'vs plain':>9} {'goal':>6} {'ok':>4}"
    print(header)
    print("-" * len(header))
    labels = [label for label, _ in entries]
    for i, label in enumerate(labels[1:], start=1):
        speed = batch / median_time(rounds, [i])
        if label == "plain compiled":
            ratio = 1 / paired_ratio(rounds, [i], [0])
            print(f"{label:<14} {speed:>9.0f} {ratio:>9.3f}   (the base of the rows below)")
            continue
        base = labels.index("plain compiled") if label.endswith("compiled") else 0
        ratio = 1 / paired_ratio(rounds, [i], [base])  # throughput ratio = inverse time ratio
        goal = TRAIN_GOALS.get(label.removesuffix(" compiled"))
        goal_cell = "" if goal is None else f">={goal:.2f}"
        ok = "" if goal is None else ("yes" if ratio >= goal else "NO")
        print(f"{label:<14} {speed:>9.0f} {ratio:>9.3f} {goal_cell:>6} {ok:>4}")


def step_peak_bytes(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> int:
    """Peak bytes allocated during one training step (forward + backward)."""
    model.train()
    model.zero_grad(set_to_none=True)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        base = torch.cuda.memory_allocated(x.device)
        F.cross_entropy(model(x), target).backward()
        torch.cuda.synchronize(x.device)
        return torch.cuda.max_memory_allocated(x.device) - base
    with TensorMemoryTracker() as tracker:
        F.cross_entropy(model(x), target).backward()
    return tracker.peak_bytes


def memory_table(args: argparse.Namespace, device: torch.device) -> None:
    batch, size = (2, 112) if args.quick else (8, 224)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=device)
    target = torch.randint(1000, (batch,), device=device)
    print(f"\nTraining-step peak memory, ResNet-50, batch {batch}, {size} px (MiB)")
    header = (
        f"{'mechanism':<10} {'convattn':>9} {'direct':>9} {'timm':>9} {'ca/timm':>8} "
        f"{'goal':>6} {'ok':>4}"
    )
    print(header)
    print("-" * len(header))
    for m in ("plain", "se", "cbam"):
        mech = None if m == "plain" else m
        peaks = []
        for model in (
            convattn_model("resnet50", mech),
            convattn_model("resnet50", mech, fast=False),
            timm_resnet50(mech),
        ):
            assert model is not None
            peaks.append(step_peak_bytes(model.to(device), x, target))
            del model
        ratio = peaks[0] / peaks[2]
        goal_cell = "" if m == "plain" else f"<={MEMORY_GOAL:.2f}"
        ok = "" if m == "plain" else ("yes" if ratio <= MEMORY_GOAL else "NO")
        mib = [p / 2**20 for p in peaks]
        print(
            f"{m:<10} {mib[0]:>9.1f} {mib[1]:>9.1f} {mib[2]:>9.1f} {ratio:>8.3f} "
            f"{goal_cell:>6} {ok:>4}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small inputs, few rounds")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (0: torch default)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="inference rounds (default: 60 at batch 1, 25 above)",
    )
    parser.add_argument(
        "--train-repeats", type=int, default=None, help="training rounds (default 40)"
    )
    parser.add_argument(
        "--instances",
        type=int,
        default=None,
        help="separately built networks per inference contender, averaged in every round",
    )
    parser.add_argument(
        "--rebuild-every",
        type=int,
        default=None,
        help="inference: build every network anew after this many rounds (default 10; 0: never)",
    )
    parser.add_argument(
        "--no-share-backbone",
        dest="share_backbone",
        action="store_false",
        help="inference: give each network its own copy of the backbone weights",
    )
    parser.add_argument(
        "--no-compile", action="store_true", help="skip the torch.compile training rows"
    )
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["inference", "training", "memory"]
    )
    parser.add_argument(
        "--mechanisms",
        nargs="+",
        default=list(GOALS),
        choices=list(GOALS),
        help="inference: the attention networks to time against the plain one (default: all)",
    )
    args = parser.parse_args()
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    if args.instances is None:
        args.instances = 1 if args.quick else 3
    if args.instances < 1:
        parser.error("--instances must be at least 1")
    if args.rebuild_every is None:
        args.rebuild_every = 0 if args.quick else 10
    if args.rebuild_every < 0:
        parser.error("--rebuild-every must be at least 0")
    if args.train_repeats is None:  # one step a round: ten rounds moved ratios by +-0.03
        args.train_repeats = 2 if args.quick else 40
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("benchmarks/overhead.py: --device cuda given but CUDA is not available")
    device = torch.device(args.device)
    if importlib.util.find_spec("timm") is None:
        raise SystemExit("benchmarks/overhead.py: needs timm for the comparison (pip install timm)")
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(
        f"convattn attention overhead: torch {torch.__version__}, device {device} ({where}), "
        f"{torch.get_num_threads()} thread(s), load average {load:.2f}; ratios are medians "
        f"over rounds (inference: {args.instances} instance(s) per network, backbone "
        f"{'shared' if args.share_backbone else 'copied'}) / "
        f"{args.train_repeats} (training) rounds of per-round paired ratios"
    )
    if "inference" not in args.skip:
        inference_table(args, device)
    if "training" not in args.skip:
        training_table(args, device)
    if "memory" not in args.skip:
        memory_table(args, device)


if __name__ == "__main__":
    main()
