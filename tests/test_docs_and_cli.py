"""The README's generated table and the ``convattn`` command."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import convattn
from convattn.cli import main
from convattn.registry import markdown_table

ROOT = Path(__file__).resolve().parents[1]


def readme_table() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- modules:start -->\n(.*?)\n?<!-- modules:end -->", text, re.S)
    assert match, "README lacks the <!-- modules:start/end --> markers"
    return match.group(1).strip()


def test_readme_module_table_is_generated_from_the_registry() -> None:
    assert readme_table() == markdown_table().strip(), (
        "README module table is stale: regenerate it with `make readme`"
    )


def test_readme_opens_with_the_two_setup_commands() -> None:
    head = (ROOT / "README.md").read_text().splitlines()[:12]
    commands = [line.split("#")[0].strip() for line in head if line.startswith("make ")]
    assert commands == ["make demo", "make test"]


def test_list_prints_every_module(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in convattn.list_attention():
        assert re.search(rf"^{re.escape(name)}\s", out, re.M), name
    assert "params@C=256" in out and "8,464" in out  # SE at C = 256: 2*256*16 + 16 + 256


def test_list_json_and_kind(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--format", "json", "--kind", "spatial"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and {r["kind"] for r in rows} == {"spatial"}
    assert {"name", "kind", "paper", "year", "params"} <= set(rows[0])


def test_info(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "eca"]) == 0
    out = capsys.readouterr().out
    assert (
        "ECA-Net" in out
        and "https://arxiv.org/abs/1910.03151" in out
        and "params at C=256: 5" in out
    )


def test_info_unknown_name_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "sse2"]) == 2
    assert "Unknown attention 'sse2'" in capsys.readouterr().err


def test_python_dash_m() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "convattn", "info", "se"], capture_output=True, text=True, check=True
    )
    assert "Squeeze-and-Excitation" in result.stdout


def test_demo_runs_every_module_on_a_photo(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("skimage")
    assert main(["demo", "--image-size", "96", "--repeats", "1", "--channels", "128"]) == 0
    out = capsys.readouterr().out
    assert "astronaut" in out
    for name in convattn.list_attention():
        shape = "(1, 128)" if convattn.info(name).contract == "pool" else "(1, 128, 24, 24)"
        assert re.search(rf"^{re.escape(name)}\s+{re.escape(shape)}", out, re.M), name
