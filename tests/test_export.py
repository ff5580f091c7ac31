"""Export paths for every mechanism and for representative backbones: TorchScript (script and
trace), torch.compile(fullgraph=True), torch.export and ONNX + onnxruntime, each compared with
eager here; the export helpers' atomic writes and verification; ``convattn export`` and
``convattn matrix``; the stored matrix and the README block.

torch.compile with the inductor backend, ONNX on larger backbones and the full
backbone x mechanism matrix are ``slow``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import convattn
from convattn import cli, export

onnxruntime = pytest.importorskip("onnxruntime")

MECHANISMS = convattn.list_attention()
ATOL, RTOL = 1e-5, 1e-4  # the fp32 tolerance, written here independently
README = Path(__file__).resolve().parents[1] / "README.md"


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


def ort_run(path: Path, x: torch.Tensor) -> torch.Tensor:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(np.asarray(output))


def stored_status(row: str, check: str) -> str:
    return str(export.load_matrix()["rows"][row][check]["status"])


# ------------------------------------------------------------------------------------------
# Every mechanism, every export path


@pytest.mark.parametrize("name", MECHANISMS)
def test_mechanism_script_trace_export_compile(name: str) -> None:
    module, x = export.build_mechanism(name)
    x1, x3 = torch.randn(1, *x.shape[1:]), torch.randn(3, *x.shape[1:])
    with torch.no_grad():
        expected = {b.shape[0]: module(b) for b in (x, x1, x3)}
        scripted = torch.jit.script(module)
        traced = torch.jit.trace(module, x, check_trace=False)
        program = torch.export.export(
            module, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
        ).module()
        for batch in (x, x1, x3):
            close(scripted(batch), expected[batch.shape[0]])
            close(traced(batch), expected[batch.shape[0]])
            close(program(batch), expected[batch.shape[0]])
        torch._dynamo.reset()
        compiled = torch.compile(module, fullgraph=True, backend="aot_eager")  # raises on a break
        close(compiled(x), expected[2])
        torch._dynamo.reset()
    # The stored matrix agrees with what this test just re-checked.
    for check in ("script", "trace", "export", "compile"):
        assert stored_status(name, check) == "pass", (name, check)


@pytest.mark.parametrize("name", MECHANISMS)
def test_mechanism_onnx_dynamic_batch_matches_eager(name: str, tmp_path: Path) -> None:
    module, x = export.build_mechanism(name)
    path = tmp_path / f"{name}.onnx"
    report = export.export_onnx(module, path, x)  # opset 18
    assert path.is_file() and report.verified and set(report.max_abs_error) == {1, 3}
    import onnx

    model = onnx.load(str(path))
    assert model.opset_import[0].version == export.DEFAULT_OPSET >= 17
    ops = {node.op_type for node in model.graph.node}
    # No adaptive pooling with None sizes (exporters reject them): means and maxes only.
    assert not any("Adaptive" in op for op in ops)
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param, "batch axis must be symbolic"
    for batch in (1, 3):
        inputs = torch.randn(batch, *x.shape[1:])
        with torch.no_grad():
            close(ort_run(path, inputs), module(inputs))
    assert stored_status(name, "onnx") == "pass"


@pytest.mark.parametrize("name", ["se", "cbam", "psa", "gc", "ge", "nonlocal", "sk"])
def test_option_variants_script_and_export(name: str) -> None:
    variants = {
        "se": {"spatial_dims": 3, "gate_layer": "hard_sigmoid"},
        "cbam": {"kernel_size": 3, "spatial_dims": 1},
        "psa": {"layout": "sequential", "form": "official"},
        "gc": {"pooling_type": "avg", "fusion_types": ("add", "mul")},
        "ge": {"extent": 2},
        "nonlocal": {"mode": "concatenation", "bn": False},
        "sk": {"num_branches": 3, "groups": 8, "stride": 2},
    }
    options = variants[name]
    module = export.randomize_parameters(convattn.create(name, 32, **options)).eval()
    dims = options.get("spatial_dims", 2)
    x = torch.randn(2, 32, *(8, 6, 4)[:dims])
    with torch.no_grad():
        expected = module(x)
        close(torch.jit.script(module)(x), expected)
        close(torch.export.export(module, (x,)).module()(x), expected)


def test_inductor_compile_matches_eager() -> None:
    module, x = export.build_mechanism("cbam")
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), module(x), atol=1e-5, rtol=1e-4)
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("name", MECHANISMS)
def test_inductor_compile_every_mechanism(name: str) -> None:
    result = export.check_compile(*export.build_mechanism(name), backend="inductor")
    assert result.ok, result.detail


# ------------------------------------------------------------------------------------------
# Backbones


@pytest.mark.parametrize("name", MECHANISMS)
def test_cifar_resnet20_script_trace_export(name: str) -> None:
    net, x = export.build_backbone("cifar_resnet20", name)
    x3 = torch.randn(3, *x.shape[1:])
    with torch.no_grad():
        expected, expected3 = net(x), net(x3)
        close(torch.jit.script(net)(x3), expected3)
        close(torch.jit.trace(net, x, check_trace=False)(x3), expected3)
        program = torch.export.export(
            net, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
        ).module()
        close(program(x), expected)
        close(program(x3), expected3)


@pytest.mark.parametrize(
    ("model", "name"),
    [("cifar_resnet20", "se"), ("cifar_resnet20", "nonlocal"), ("mobilenet_v2", "coord")],
)
def test_backbone_onnx(model: str, name: str, tmp_path: Path) -> None:
    net, x = export.build_backbone(model, name)
    path = tmp_path / "net.onnx"
    export.export_onnx(net, path, x)
    for batch in (1, 3):
        inputs = torch.randn(batch, *x.shape[1:])
        with torch.no_grad():
            close(ort_run(path, inputs), net(inputs))


@pytest.mark.parametrize(
    ("model", "name"), [("resnet18", "cbam"), ("resnet18", "bam"), ("mobilenet_v2", "eca")]
)
def test_imagenet_backbones_script_and_export(model: str, name: str) -> None:
    net, x = export.build_backbone(model, name)
    with torch.no_grad():
        expected = net(x)
        close(torch.jit.script(net)(x), expected)
        close(torch.export.export(net, (x,)).module()(x), expected)


@pytest.mark.slow
@pytest.mark.parametrize("model", convattn.models.list_models())
def test_full_matrix_every_backbone(model: str) -> None:
    """The full matrix for one backbone: every mechanism with a placement passes every check;
    mechanisms without one are reported n/a with the reason."""
    data = export.compatibility_matrix(full=True, mechanisms=MECHANISMS, models=[model])
    for key, cells in data["rows"].items():
        if "/" not in key:
            continue
        for check, cell in cells.items():
            assert cell["status"] in ("pass", "n/a"), (key, check, cell["detail"])
            if cell["status"] == "n/a":
                assert cell["detail"], (key, check)


# ------------------------------------------------------------------------------------------
# Export helpers


class _Doubler(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


def test_export_onnx_failed_verification_writes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    target.write_text("previous version")
    with pytest.raises(export.ExportVerificationError, match="batch size 1"):
        # A negative tolerance makes every comparison fail.
        export.export_onnx(_Doubler(), target, torch.randn(2, 3, 4, 4), atol=-1.0, rtol=0.0)
    assert target.read_text() == "previous version"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temp files left


def test_export_onnx_bad_arguments(tmp_path: Path) -> None:
    module = _Doubler()
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="opset must be >= 17, got 13"):
        export.export_onnx(module, tmp_path / "m.onnx", x, opset=13)
    with pytest.raises(TypeError, match=r"example must be a torch\.Tensor"):
        export.export_onnx(module, tmp_path / "m.onnx", [x])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not exist"):
        export.export_onnx(module, tmp_path / "missing" / "m.onnx", x)
    with pytest.raises(ValueError, match="directory"):
        export.export_onnx(module, tmp_path, x)
    assert list(tmp_path.iterdir()) == []


def test_export_onnx_restores_training_mode(tmp_path: Path) -> None:
    module, x = export.build_mechanism("srm")
    module.train()
    export.export_onnx(module, tmp_path / "srm.onnx", x)
    assert module.training  # exported in eval mode, flag restored


@pytest.mark.parametrize("method", ["script", "trace"])
def test_export_torchscript_roundtrip(method: str, tmp_path: Path) -> None:
    module, x = export.build_mechanism("eca")
    path = tmp_path / "eca.pt"
    report = export.export_torchscript(module, path, x, method=method)
    assert report.verified
    loaded = torch.jit.load(str(path))
    x3 = torch.randn(3, *x.shape[1:])
    with torch.no_grad():
        close(loaded(x3), module(x3))
    with pytest.raises(ValueError, match="method must be 'script' or 'trace'"):
        export.export_torchscript(module, path, x, method="freeze")


def test_export_program_roundtrip(tmp_path: Path) -> None:
    module, x = export.build_mechanism("triplet")
    path = tmp_path / "triplet.pt2"
    assert export.export_program(module, path, x).verified
    loaded = torch.export.load(str(path)).module()
    x1 = torch.randn(1, *x.shape[1:])
    with torch.no_grad():
        close(loaded(x1), module(x1))


def test_checks_report_failures_with_reasons() -> None:
    class WithGraphBreak(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            torch._dynamo.graph_break()  # a no-op in eager
            return 2 * x

    class WithLambda(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = lambda t: 2 * t  # TorchScript cannot compile a lambda attribute

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.scale(x)

    x = torch.randn(2, 3, 4, 4)
    results = export.run_checks(WithGraphBreak(), x, ["trace", "compile"])
    assert results["trace"].ok
    assert not results["compile"].ok and "graph" in results["compile"].detail.lower()
    results = export.run_checks(WithLambda(), x, ["script", "trace"])
    assert results["trace"].ok
    assert not results["script"].ok and results["script"].detail
    with pytest.raises(ValueError, match="unknown checks"):
        export.run_checks(WithGraphBreak(), torch.randn(2, 3, 4, 4), ["speed"])


# ------------------------------------------------------------------------------------------
# Command line


def test_cli_export_resnet50_cbam_onnx(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "resnet50_cbam.onnx"
    code = cli.main(
        [
            "export",
            *("--model", "resnet50", "--attention", "cbam", "--format", "onnx"),
            *("--out", str(out), "--input-size", "64"),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "resnet50 + cbam" in printed and "batch 1:" in printed and "batch 3:" in printed
    errors = [float(e) for e in re.findall(r"batch \d: ([0-9.e+-]+)", printed)]
    assert errors and max(errors) <= 1e-4
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (logits,) = session.run(
        None, {session.get_inputs()[0].name: np.zeros((2, 3, 64, 64), np.float32)}
    )
    assert logits.shape == (2, 1000)


def test_cli_export_torchscript_and_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "net.pt"
    args = ["export", "--model", "cifar_resnet20", "--attention", "eca", "--input-size", "32"]
    assert cli.main([*args, "--format", "torchscript", "--out", str(out)]) == 0
    assert "torchscript (script)" in capsys.readouterr().out
    assert torch.jit.load(str(out))(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert (
        cli.main([*args, "--format", "onnx", "--out", str(tmp_path / "x.onnx"), "--opset", "12"])
        == 2
    )
    assert "opset must be >= 17" in capsys.readouterr().err
    assert cli.main(["export", "--model", "resnet7", "--out", str(tmp_path / "y.onnx")]) == 2
    assert "Unknown model" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "y.onnx").exists()


def test_cli_matrix_subset(tmp_path: Path) -> None:
    out, js = tmp_path / "m.md", tmp_path / "m.json"
    code = cli.main(
        [
            "matrix",
            *("--mechanisms", "se,simam", "--checks", "trace,fp16,channels_last"),
            *("--out", str(out), "--json", str(js), "--quiet"),
        ]
    )
    assert code == 0
    text = out.read_text()
    assert "| `se` | ✓ | ✓ | ✓ |" in text and "| `simam` | ✓ | ✓ | ✓ |" in text
    data = export.load_matrix(js)
    # A cheap re-check agrees with the stored matrix.
    for name in ("se", "simam"):
        for check in ("trace", "fp16", "channels_last"):
            assert data["rows"][name][check]["status"] == stored_status(name, check)


# ------------------------------------------------------------------------------------------
# The matrix: rendering, stored file, README


def test_matrix_markdown_lists_every_limitation_with_its_reason() -> None:
    data = {
        "settings": export.load_matrix()["settings"],
        "rows": {
            "se": {c: {"status": "pass", "detail": "x"} for c in export.CHECKS},
            "mobilenet_v2/bam": {
                c: {"status": "n/a", "detail": "no placement in MobileNetV2"} for c in export.CHECKS
            },
            "foo": {
                **{c: {"status": "pass", "detail": "x"} for c in export.CHECKS},
                "onnx": {"status": "fail", "detail": "Unsupported op Foo"},
            },
        },
    }
    text = export.matrix_markdown(data)
    lines = text.splitlines()
    assert lines[2] == "| `se` | " + " | ".join(["✓"] * len(export.CHECKS)) + " |"
    assert lines[3].count("– (1)") == len(export.CHECKS)
    assert "✗ (2)" in lines[4]
    assert "1. `mobilenet_v2/bam` script, " in text and ": no placement in MobileNetV2" in text
    assert "2. `foo` onnx: Unsupported op Foo" in text


def test_stored_matrix_covers_every_mechanism_and_check() -> None:
    data = export.load_matrix()
    assert data["settings"]["checks"] == list(export.CHECKS)
    assert list(data["rows"]) == MECHANISMS
    for name, cells in data["rows"].items():
        assert list(cells) == list(export.CHECKS), name
        for check, cell in cells.items():
            assert cell["status"] in ("pass", "fail", "n/a")
            assert cell["detail"], (name, check)  # a failure always says why


def test_readme_block_equals_stored_matrix() -> None:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"<!-- compat:start -->\n(.*?)\n<!-- compat:end -->", text, re.S)
    if match is None:
        pytest.skip("README.md has no <!-- compat:start --> / <!-- compat:end --> markers yet")
    assert match.group(1) == export.matrix_markdown(export.load_matrix()), (
        "README compatibility matrix is stale: run python scripts/update_compat.py"
    )
