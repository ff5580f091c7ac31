"""convattn's modules against the same mechanisms in other installed collections (timm).

Both sides get the same configuration (channels, reduction width, kernel sizes, fusion), the
same input, and take turns in every timing round (interleaved), so a slow spell of the
machine hits both alike. Forward is timed in eval mode under ``torch.inference_mode``;
forward + backward in train mode on ``out.sum()``. Printed: medians and the ratio
convattn / peer (below 1: convattn is faster).

    python benchmarks/peers.py                      # C=256, 14x14, batch 8
    python benchmarks/peers.py --channels 64 --size 56 --batch 4 --repeats 30 --threads 2

Where timm's defaults differ from the papers' official code they are aligned here:
SE: timm rounds the width to a multiple of 8 (rd_divisor) -> pass rd_channels = C // 16.
ECA: both take kernel_size explicitly (timm's default k is 3 unless channels are given).
CBAM: timm's MLP has no bias by default (mlp_bias=False); the official code has one.
GC: timm defaults to ratio 1/8, scale fusion and no zero init; set to add fusion,
C // 16, as the official block. Coordinate attention: timm's has no conv bias by default
and another width rule; set rd_channels = max(8, C // 32) and bias=True.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import convattn


def timm_pairs(channels: int) -> dict[str, tuple[nn.Module, nn.Module, str]]:
    """name -> (convattn module, timm module, what was aligned)."""
    from timm.layers import EcaModule, GlobalContext, SEModule
    from timm.layers.cbam import CbamModule
    from timm.layers.coord_attn import CoordAttn

    rd = channels // 16
    k = 5 if channels >= 64 else 3
    return {
        "se": (
            convattn.create("se", channels, rd_channels=rd),
            SEModule(channels, rd_channels=rd),
            "rd_channels=C/16",
        ),
        "eca": (
            convattn.create("eca", channels, kernel_size=k),
            EcaModule(kernel_size=k),
            f"kernel_size={k}",
        ),
        "cbam": (
            convattn.create("cbam", channels, rd_channels=rd),
            CbamModule(channels, rd_channels=rd, mlp_bias=True),
            "rd_channels=C/16, mlp_bias=True",
        ),
        "gc": (
            convattn.create("gc", channels, rd_channels=rd),
            GlobalContext(channels, fuse_add=True, fuse_scale=False, rd_channels=rd),
            "add fusion, rd_channels=C/16",
        ),
        "coord": (
            convattn.create("coord", channels),
            CoordAttn(channels, rd_channels=max(8, channels // 32), bias=True),
            "rd_channels=max(8, C/32), bias=True",
        ),
    }


def interleaved(steps: list[Callable[[], None]], warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        for step in steps:
            step()
    samples: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for i, step in enumerate(steps):
            start = time.perf_counter()
            step()
            samples[i].append((time.perf_counter() - start) * 1e3)
    return [statistics.median(s) for s in samples]


def forward_step(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    module.eval()

    def step() -> None:
        with torch.inference_mode():
            module(x)

    return step


def train_step(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    x = x.clone().requires_grad_(True)

    def step() -> None:
        module.train()
        module.zero_grad(set_to_none=True)
        module(x).sum().backward()

    return step


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--size", type=int, default=14)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if importlib.util.find_spec("timm") is None:
        raise SystemExit("benchmarks/peers.py: no peer collection installed (pip install timm)")
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.channels, args.size, args.size)
    print(
        f"convattn vs timm: input {tuple(x.shape)}, {torch.get_num_threads()} thread(s), "
        f"median of {args.repeats} interleaved runs (torch {torch.__version__})\n"
    )
    header = (
        f"{'module':<7} {'params ca/timm':>16} {'fwd ms ca':>10} {'timm':>8} {'ratio':>6} "
        f"{'f+b ms ca':>10} {'timm':>8} {'ratio':>6}  aligned"
    )
    print(header)
    print("-" * len(header))
    for name, (ours, theirs, aligned) in timm_pairs(args.channels).items():
        fwd = interleaved(
            [forward_step(ours, x), forward_step(theirs, x)], args.warmup, args.repeats
        )
        both = interleaved([train_step(ours, x), train_step(theirs, x)], args.warmup, args.repeats)
        print(
            f"{name:<7} {params(ours):>7,}/{params(theirs):<8,} {fwd[0]:>10.3f} {fwd[1]:>8.3f} "
            f"{fwd[0] / fwd[1]:>6.2f} {both[0]:>10.3f} {both[1]:>8.3f} {both[0] / both[1]:>6.2f}"
            f"  {aligned}"
        )
    print("\nratio = convattn / timm (below 1: convattn faster).")


if __name__ == "__main__":
    main()
