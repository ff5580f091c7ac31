"""convattn bench-train: variants x seeds, aggregation, outputs."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest

from convattn.train import TrainConfig, bench_train
from convattn.train.bench import summarize

TINY = TrainConfig(
    train_size=48, val_size=16, image_size=16, batch_size=16, epochs=1, progress=False, threads=1
)


def test_summarize_mean_and_sample_std() -> None:
    runs = [
        {"attention": "none", "final_acc": 80.0, "best_acc": 81.0, "sec_per_epoch": 2.0,
         "images_per_s": 100.0, "params": 10},
        {"attention": "none", "final_acc": 84.0, "best_acc": 85.0, "sec_per_epoch": 4.0,
         "images_per_s": 50.0, "params": 10},
        {"attention": "se", "final_acc": 90.0, "best_acc": 90.0, "sec_per_epoch": 3.0,
         "images_per_s": 70.0, "params": 12},
    ]  # fmt: skip
    none, se = summarize(runs, ["none", "se"])
    assert none["final_acc_mean"] == 82.0
    assert none["final_acc_std"] == pytest.approx(2.8284271247, rel=1e-9)  # sqrt(8 / (2 - 1))
    assert none["best_acc_mean"] == 83.0 and none["sec_per_epoch_mean"] == 3.0
    assert none["seeds"] == 2 and none["params"] == 10 and none["final_minus_baseline"] == 0.0
    assert se["final_acc_std"] == 0.0 and se["final_minus_baseline"] == 8.0


def test_bench_train_runs_every_variant_and_seed(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    result = bench_train(TINY, attentions=["none", "eca"], seeds=2, out=out)
    assert [(r["attention"], r["seed"]) for r in result.runs] == [
        ("none", 0), ("none", 1), ("eca", 0), ("eca", 1)
    ]  # fmt: skip
    for variant in ("none", "eca"):
        for seed in (0, 1):
            assert (out / variant / f"seed{seed}" / "last.pt").is_file()
    with open(out / "bench.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["attention"] for r in rows] == ["none", "eca"]
    finals = [r["final_acc"] for r in result.runs if r["attention"] == "eca"]
    assert float(rows[1]["final_acc_mean"]) == pytest.approx(sum(finals) / 2)
    assert int(rows[1]["params"]) > int(rows[0]["params"])  # ECA adds its conv1d weights
    payload = json.loads((out / "bench.json").read_text())
    assert payload["seeds"] == [0, 1] and len(payload["runs"]) == 4
    assert "| eca |" in result.markdown and "±" in result.markdown
    assert (out / "bench.md").read_text() == result.markdown
    assert (out / "bench_curves.png").read_bytes()[:4] == b"\x89PNG"

    # --resume reuses finished runs: same numbers, nothing retrained.
    again = bench_train(
        TrainConfig(**{**TINY.__dict__, "resume": True}), attentions=["none", "eca"], seeds=2,
        out=out,
    )  # fmt: skip
    assert [r["final_acc"] for r in again.runs] == [r["final_acc"] for r in result.runs]


def test_bench_train_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="duplicates"):
        bench_train(TINY, attentions=["se", "se"], out=tmp_path)
    with pytest.raises(ValueError, match="seeds must be >= 1"):
        bench_train(TINY, seeds=0, out=tmp_path)
    with pytest.raises(ValueError, match="sea"):
        bench_train(TINY, attentions=["none", "sea"], out=tmp_path)


def test_bench_train_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from convattn.train.cli import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["bench-train", "--attention", "none,se", "--seeds", "1", "--train-size", "32",
         "--val-size", "16", "--image-size", "16", "--batch-size", "16", "--epochs", "1",
         "--threads", "1", "--no-progress", "--out", str(tmp_path / "b")]
    )  # fmt: skip
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "| attention | params | seeds |" in printed and "| se |" in printed
    assert (tmp_path / "b" / "bench.md").is_file()
