"""convattn compare: rows, overheads, the four output files and the published figures."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import convattn
from convattn import models
from convattn.cli import main
from convattn.profile import compare, format_text_table, load_published, write_comparison


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return compare(
        "cifar_resnet20",
        ["se", "eca"],
        input_size=32,
        num_classes=10,
        warmup=0,
        repeats=1,
        progress=False,
    )


def test_rows_plain_first_with_overheads(rows: list[dict]) -> None:
    assert [r["attention"] for r in rows] == [None, "se", "eca"]
    for row, attention in zip(rows, (None, "se", "eca"), strict=True):
        model = models.create_model("cifar_resnet20", attention=attention, num_classes=10)
        assert row["params"] == sum(p.numel() for p in model.parameters())
        assert row["input_size"] == [1, 3, 32, 32] and row["backbone"] == "cifar_resnet20"
    base = rows[0]
    for row in rows:
        for field in ("params", "macs", "flops", "latency_ms", "peak_memory_bytes"):
            expected = 100 * (row[field] - base[field]) / base[field]
            assert row[f"overhead_{field}_pct"] == pytest.approx(expected)
        assert row["overhead_train_latency_ms_pct"] is None  # not measured
    # ECA adds k = 3 weights in each of 9 blocks and no MACs worth a percent.
    assert rows[2]["params"] - base["params"] == 27
    assert rows[1]["overhead_flops_pct"] > rows[2]["overhead_flops_pct"] > 0
    assert base["paper_params_m"] is None  # nothing published for CIFAR ResNet-20


def test_write_comparison_files(rows: list[dict], tmp_path: Path) -> None:
    written = write_comparison(rows, tmp_path / "out")
    assert set(written) == {"md", "csv", "json", "png"}
    data = json.loads(written["json"].read_text())
    assert [r["attention"] for r in data] == [None, "se", "eca"]
    assert data[1]["params"] == rows[1]["params"]
    with written["csv"].open() as handle:
        table = list(csv.DictReader(handle))
    assert [r["attention"] for r in table] == ["", "se", "eca"]
    assert float(table[1]["overhead_params_pct"]) == pytest.approx(rows[1]["overhead_params_pct"])
    markdown = written["md"].read_text()
    assert "| se |" in markdown and "GMACs" in markdown and "multiply-accumulates" in markdown
    assert written["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "out").glob(".*tmp"))  # no temporary files left
    assert "Δparams" in format_text_table(rows)


def test_published_figures_load_with_sources() -> None:
    entries = load_published()
    assert len(entries) >= 20
    attentions = set(convattn.list_attention())
    for entry in entries:
        assert entry["source"].strip()
        assert entry["backbone"] in models.list_models()
        assert entry["attention"] is None or entry["attention"] in attentions
        numbers = {"params_m", "gflops", "top1", "top5", "top1_err", "top5_err", "cpu_latency_ms"}
        assert numbers & set(entry), entry
    se = [e for e in entries if e["backbone"] == "resnet50" and e["attention"] == "se"]
    assert se[0]["params_m"] == 28.09 and se[0]["gflops"] == 3.87
    assert any(e.get("cpu_latency_ms") == 167 for e in se)


def test_published_columns_are_matched_by_backbone_and_attention() -> None:
    rows = compare(
        "mobilenet_v2", ["eca"], input_size=32, warmup=0, repeats=1, memory=False, progress=False
    )
    assert rows[1]["paper_params_m"] == 3.34 and rows[1]["paper_gflops"] == 0.3199
    assert "ECA-Net" in rows[1]["paper_source"]
    assert rows[0]["paper_params_m"] == 3.34 and len(rows[0]["paper_all"]) == 2
    assert (
        rows[0]["peak_memory_bytes"] is None and rows[1]["overhead_peak_memory_bytes_pct"] is None
    )


def test_compare_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["compare", "--backbone", "resnet20", "--attention", "simam", "--input", "16"]
    argv += ["--repeats", "1"]
    argv += ["--warmup", "0", "--no-progress", "--train", "--train-repeats", "1"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "simam" in out and "train ms" in out and str(tmp_path / "compare.json") in out
    data = json.loads((tmp_path / "compare.json").read_text())
    assert data[1]["train_latency_ms"] > 0 and data[1]["train_peak_memory_bytes"] > 0
    assert data[1]["overhead_params_pct"] == 0.0  # SimAM has no parameters


def test_compare_rejects_unknown_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--backbone", "resnet51", "--out", str(tmp_path)]) == 2
    assert "Unknown model 'resnet51'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="Unknown attention 'sse2'"):
        compare("cifar_resnet20", ["sse2"], repeats=1, warmup=0, progress=False)
    with pytest.raises(TypeError, match="attentions must be a sequence"):
        compare("cifar_resnet20", "se", progress=False)  # type: ignore[arg-type]
