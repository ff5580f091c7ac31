"""``convattn bench-train``: attention variants x seeds under one recipe.

A single short run says little about whether attention helps: the ranking of variants after a
few epochs changes from seed to seed and from epoch to epoch. This trains every variant with
every seed (same data, schedule and budget), then reports the mean and the sample standard
deviation over seeds of the final and the best validation accuracy, the time per epoch and the
parameter count, as ``bench.md``, ``bench.csv``, ``bench.json`` and ``bench_curves.png``
(validation accuracy per epoch, mean with a +-1 std band).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convattn.train.checkpoint import atomic_write
from convattn.train.loop import TrainConfig, _distributed, train

__all__ = ["SUMMARY_FIELDS", "BenchResult", "bench_train", "summarize"]

SUMMARY_FIELDS = (
    "attention",
    "params",
    "seeds",
    "final_acc_mean",
    "final_acc_std",
    "best_acc_mean",
    "best_acc_std",
    "final_minus_baseline",
    "sec_per_epoch_mean",
    "sec_per_epoch_std",
    "images_per_s_mean",
)


@dataclass
class BenchResult:
    """What :func:`bench_train` returns: one summary row per variant (``SUMMARY_FIELDS``), one
    record per run (with its metrics history), where the files went, and the Markdown table."""

    summary: list[dict[str, Any]]
    runs: list[dict[str, Any]]
    out_dir: Path
    markdown: str = ""
    files: dict[str, Path] = field(default_factory=dict)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: Sequence[dict[str, Any]], variants: Sequence[str]) -> list[dict[str, Any]]:
    """Aggregate per-run records (``attention``, ``final_acc``, ``best_acc``,
    ``sec_per_epoch``, ``images_per_s``, ``params``) into one row per variant; the sample
    standard deviation (n - 1) over seeds, 0 for one seed. ``final_minus_baseline`` is the
    difference of mean final accuracy to the first variant."""
    rows: list[dict[str, Any]] = []
    for variant in variants:
        mine = [r for r in runs if r["attention"] == variant]
        final = _mean_std([r["final_acc"] for r in mine])
        best = _mean_std([r["best_acc"] for r in mine])
        seconds = _mean_std([r["sec_per_epoch"] for r in mine])
        rows.append(
            {
                "attention": variant,
                "params": mine[0]["params"] if mine else 0,
                "seeds": len(mine),
                "final_acc_mean": final[0],
                "final_acc_std": final[1],
                "best_acc_mean": best[0],
                "best_acc_std": best[1],
                "final_minus_baseline": 0.0,
                "sec_per_epoch_mean": seconds[0],
                "sec_per_epoch_std": seconds[1],
                "images_per_s_mean": _mean_std([r["images_per_s"] for r in mine])[0],
            }
        )
    if rows:
        baseline = rows[0]["final_acc_mean"]
        for row in rows:
            row["final_minus_baseline"] = row["final_acc_mean"] - baseline
    return rows


def _markdown(summary: Sequence[dict[str, Any]], cfg: TrainConfig, seeds: Sequence[int]) -> str:
    baseline = summary[0]["attention"] if summary else "-"
    lines = [
        f"| attention | params | seeds | final val acc (%) | best val acc (%) "
        f"| final - {baseline} | s / epoch |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summary:
        lines.append(
            f"| {row['attention']} | {row['params']:,} | {row['seeds']} "
            f"| {row['final_acc_mean']:.2f} ± {row['final_acc_std']:.2f} "
            f"| {row['best_acc_mean']:.2f} ± {row['best_acc_std']:.2f} "
            f"| {row['final_minus_baseline']:+.2f} "
            f"| {row['sec_per_epoch_mean']:.1f} |"
        )
    data = cfg.data
    if cfg.data == "shapes":
        data = f"shapes ({cfg.train_size} train / {cfg.val_size} val)"
    lines.append("")
    lines.append(
        f"{cfg.model} on {data}, {cfg.image_size} px, {cfg.epochs} epochs, batch "
        f"{cfg.batch_size}, {cfg.optimizer} lr {cfg.lr:g} ({cfg.schedule} schedule), seeds "
        f"{', '.join(map(str, seeds))}; mean ± sample standard deviation over seeds."
    )
    return "\n".join(lines) + "\n"


def _plot(
    runs: Sequence[dict[str, Any]], variants: Sequence[str], path: Path, title: str
) -> Path | None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("convattn bench-train: matplotlib is not installed, no chart", file=sys.stderr)
        return None
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for variant in variants:
        curves = [r["val_acc_curve"] for r in runs if r["attention"] == variant]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        epochs = list(range(1, length + 1))
        means, lows, highs = [], [], []
        for i in range(length):
            mean, std = _mean_std([c[i] for c in curves])
            means.append(mean)
            lows.append(mean - std)
            highs.append(mean + std)
        (line,) = ax.plot(epochs, means, marker="o", label=f"{variant} (n={len(curves)})")
        if len(curves) > 1:
            ax.fill_between(epochs, lows, highs, color=line.get_color(), alpha=0.2)
    ax.set(xlabel="epoch", ylabel="validation accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return atomic_write(path, lambda h: h.write(buffer.getvalue()))


def bench_train(
    config: TrainConfig | None = None,
    *,
    attentions: Sequence[str | None] = ("none", "se", "eca", "cbam"),
    seeds: int | Sequence[int] = 3,
    out: str | os.PathLike[str] | None = None,
) -> BenchResult:
    """Train ``config``'s model once per attention variant and seed, sequentially, under one
    recipe, and write the comparison (see the module docstring).

    Args:
        config: the shared recipe (its ``attention``, ``seed`` and ``out`` are set per run).
        attentions: registry keys; ``None``/``"none"`` is the plain network.
        seeds: a count (seeds ``config.seed`` .. ``config.seed + n - 1``) or explicit seeds.
        out: output folder (``runs/bench-train/<model>``); run ``<attention>/seed<k>`` goes in
            a sub-folder. With ``config.resume``, finished runs are reused and interrupted ones
            continue from their last checkpoint.
    """
    base = (config or TrainConfig()).resolved()
    variants = [("none" if a is None or str(a).lower() == "none" else str(a)) for a in attentions]
    if not variants:
        raise ValueError("bench_train: attentions is empty")
    if len(set(variants)) != len(variants):
        raise ValueError(f"bench_train: attentions has duplicates: {variants}")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"bench_train: seeds must be >= 1, got {seeds}")
        seed_list = [base.seed + i for i in range(seeds)]
    else:
        seed_list = [int(s) for s in seeds]
        if not seed_list or len(set(seed_list)) != len(seed_list):
            raise ValueError(f"bench_train: seeds must be distinct and non-empty, got {seeds}")
    from convattn import registry

    for variant in variants:
        if variant != "none":
            registry.info(variant)  # unknown keys fail now, not after hours of training
    out_dir = Path(out) if out is not None else Path("runs", "bench-train", base.model)

    runs: list[dict[str, Any]] = []
    total = len(variants) * len(seed_list)
    main = True
    with _distributed(base.device) as ctx:
        main = ctx.main
        for index, (variant, seed) in enumerate((v, s) for v in variants for s in seed_list):
            run_dir = out_dir / variant / f"seed{seed}"
            resume = bool(base.resume) and (run_dir / "last.pt").exists()
            if main:
                print(
                    f"convattn bench-train: [{index + 1}/{total}] attention={variant} seed={seed}",
                    file=sys.stderr,
                )
            cfg = dataclasses.replace(
                base,
                attention=None if variant == "none" else variant,
                seed=seed,
                out=str(run_dir),
                resume=resume,
            )
            result = train(cfg)
            history = result.history
            runs.append(
                {
                    "attention": variant,
                    "seed": seed,
                    "params": result.params,
                    "epochs": len(history),
                    "final_acc": history[-1]["val_acc"] if history else math.nan,
                    "best_acc": max((r["val_acc"] for r in history), default=math.nan),
                    "sec_per_epoch": _mean_std([r["epoch_time_s"] for r in history])[0],
                    "images_per_s": _mean_std([r["images_per_s"] for r in history])[0],
                    "val_acc_curve": [r["val_acc"] for r in history],
                    "out": str(run_dir),
                }
            )
        summary = summarize(runs, variants)
        markdown = _markdown(summary, base, seed_list)
        files: dict[str, Path] = {}
        if main:
            files = _write(out_dir, base, seed_list, summary, runs, markdown, variants)
        ctx.barrier()
    return BenchResult(summary, runs, out_dir, markdown, files)


def _write(
    out_dir: Path,
    cfg: TrainConfig,
    seeds: Sequence[int],
    summary: Sequence[dict[str, Any]],
    runs: Sequence[dict[str, Any]],
    markdown: str,
    variants: Sequence[str],
) -> dict[str, Path]:
    files = {"markdown": atomic_write(out_dir / "bench.md", lambda h: h.write(markdown.encode()))}
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(summary)
    text = buffer.getvalue()
    files["csv"] = atomic_write(out_dir / "bench.csv", lambda h: h.write(text.encode()))
    recipe = {k: v for k, v in cfg.to_dict().items() if k not in ("attention", "out", "resume")}
    payload = json.dumps(
        {"recipe": recipe, "seeds": list(seeds), "summary": summary, "runs": runs}, indent=2
    )
    files["json"] = atomic_write(out_dir / "bench.json", lambda h: h.write(payload.encode()))
    title = f"{cfg.model} on {cfg.data}: validation accuracy, mean ± std over {len(seeds)} seed(s)"
    chart = _plot(runs, variants, out_dir / "bench_curves.png", title)
    if chart is not None:
        files["chart"] = chart
    return files
