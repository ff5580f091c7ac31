"""capture() and `convattn viz`: every registered module's maps, their layouts checked against
hand computations, hooks removed, and PNGs drawn from a real photo."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import convattn
from _reference import randomize
from convattn import models, viz
from convattn.layers._helpers import AttentionModule
from convattn.viz import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    capture,
    load_checkpoint,
    load_image,
    save_figures,
)

# What each registered mechanism's gates are, from its paper (not from viz.py): the kinds of
# map capture() must report. A module registered without an entry here fails the test below.
EXPECTED_KINDS: dict[str, set[str]] = {
    "attnpool": {"spatial"},  # the mean token's softmax over positions
    "bam": {"spatial"},  # sigma(Mc + Ms), one weight per neuron
    "cbam": {"channel", "spatial"},
    "cbam_channel": {"channel"},
    "cbam_spatial": {"spatial"},
    "channel": {"channel"},
    "coord": {"spatial"},  # (N, C, H, 1) and (N, C, 1, W) directional gates
    "cse": {"channel"},
    "da_channel": {"affinity"},
    "da_position": {"affinity"},
    "eca": {"channel"},
    "ema": {"spatial", "channel"},  # directional + final maps; softmaxed group descriptors
    "fca": {"channel"},
    "gc": {"spatial"},  # softmax attention pooling over positions
    "gct": {"channel"},
    "ge": {"channel"},  # global extent (the default): one weight per channel
    "ge_minus": {"channel"},
    "ge_plus": {"channel"},
    "nonlocal": {"affinity"},
    "psa": {"channel", "spatial"},
    "scse": {"channel", "spatial"},
    "se": {"channel"},
    "sge": {"spatial"},
    "shuffle": {"channel", "spatial"},
    "simam": {"spatial"},
    "sk": {"selection"},
    "spatial": {"spatial"},
    "srm": {"channel"},
    "sse": {"spatial"},
    "triplet": {"spatial"},
}

H, W = 8, 6  # non-square on purpose: a transposed map cannot pass


def hooks_left(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_registry_and_expected_kinds_agree() -> None:
    assert set(EXPECTED_KINDS) == set(convattn.list_attention())


@pytest.mark.parametrize("name", convattn.list_attention())
def test_capture_every_registered_module(name: str) -> None:
    channels = 128 if name == "shuffle" else 64
    model = nn.Sequential(nn.Identity(), convattn.create(name, channels)).eval()
    x = torch.randn(1, channels, H, W)
    with capture(model) as maps, torch.no_grad():
        model(x)
    assert len(maps) >= 1 and maps.uncaptured() == []
    assert {m.kind for m in maps.values()} == EXPECTED_KINDS[name]
    assert all(k.startswith("1.") and m.module_name.startswith("1") for k, m in maps.items())
    for item in maps.values():
        assert item.input_shape == (1, channels, H, W)
        assert item.tensor is not None and item.tensor.device.type == "cpu"
        assert not item.tensor.requires_grad
        assert torch.isfinite(item.tensor).all()
        if item.kind == "channel":
            assert item.tensor.dim() == 2 and item.tensor.shape[0] == 1
        elif item.kind == "spatial" or (item.kind == "affinity" and item.axis == "positions"):
            spatial = item.spatial()
            assert spatial.dim() == 3 and spatial.shape[0] == 1
            # Affinity keys may be subsampled (non-local's 2x2 max pool): 4 x 3 for 8 x 6.
            assert tuple(spatial.shape[1:]) in {(H, W), (math.ceil(H / 2), math.ceil(W / 2))}
        elif item.kind == "selection":
            assert item.tensor.shape[:2] == (1, 2)
            torch.testing.assert_close(item.tensor.sum(1), torch.ones(1, channels))
    assert hooks_left(model) == 0


def test_hooks_removed_after_an_error() -> None:
    model = nn.Sequential(convattn.create("cbam", 16), nn.Linear(3, 3)).eval()
    with pytest.raises(RuntimeError), capture(model) as maps:
        model(torch.randn(1, 16, 4, 5))  # the Linear fails on the 5-wide map
    assert hooks_left(model) == 0
    assert set(maps) == {"0.channel_gate.gate", "0.spatial_gate.gate"}  # kept up to the error


def test_nothing_recorded_outside_the_block() -> None:
    model = nn.Sequential(convattn.create("se", 32)).eval()
    with capture(model) as maps:
        pass
    model(torch.randn(1, 32, 3, 3))
    assert len(maps) == 0 and hooks_left(model) == 0


def test_cifar_resnet_cbam_maps() -> None:
    torch.manual_seed(0)
    net = models.create_model("cifar_resnet20", attention="cbam").eval()
    gates = [m for m in net.modules() if type(m).__name__ == "CBAMSpatialGate"]
    for gate in gates:  # the backbone zero-inits the spatial BN: give the maps some structure
        nn.init.normal_(gate.bn.weight, 1.0, 0.2)
    x = torch.randn(2, 3, 16, 16)
    seen: dict[str, torch.Tensor] = {}
    block = net.layer2[1].attn.spatial_gate
    handle = block.register_forward_hook(lambda m, a, o: seen.setdefault("x", a[0]))
    with capture(net) as maps, torch.no_grad():
        net(x)
    handle.remove()
    channel, spatial = maps.by_kind("channel"), maps.by_kind("spatial")
    assert len(channel) == 9 and len(spatial) == 9 and len(maps) == 18
    for stage, (c, size) in enumerate([(16, 16), (32, 8), (64, 4)], start=1):
        for index in range(3):
            prefix = f"layer{stage}.{index}.attn"
            assert maps[f"{prefix}.channel_gate.gate"].tensor.shape == (2, c)
            assert maps[f"{prefix}.spatial_gate.gate"].tensor.shape == (2, 1, size, size)
            assert maps[f"{prefix}.spatial_gate.gate"].spatial().shape == (2, size, size)
    # The layer2.1 spatial map against eq. 3 by hand: sigma(BN(conv7x7([max_c; mean_c]))).
    xin = seen["x"]
    pooled = torch.cat([xin.amax(1, keepdim=True), xin.mean(1, keepdim=True)], 1)
    logits = F.conv2d(pooled, block.conv.weight, padding=3)
    logits = F.batch_norm(
        logits, block.bn.running_mean, block.bn.running_var, block.bn.weight, block.bn.bias,
        eps=block.bn.eps,
    )  # fmt: skip
    expected = torch.sigmoid(logits)[:, 0]
    got = maps["layer2.1.attn.spatial_gate.gate"].spatial()
    torch.testing.assert_close(got, expected)
    assert got.std() > 1e-3


def test_gc_flattened_softmax_reshaped_to_the_map() -> None:
    gc = randomize(convattn.create("gc", 64), seed=0).eval()
    x = torch.randn(2, 64, H, W)
    with capture(gc) as maps, torch.no_grad():
        gc(x)
    item = maps["gate"]
    assert item.module_name == "" and item.raw_shape == (2, 1, H * W)
    # a_j = softmax_j(W_k x_j) over all positions, by hand, then row-major back to H x W.
    w = gc.conv_mask.weight.flatten()
    scores = torch.einsum("c,nchw->nhw", w, x) + gc.conv_mask.bias
    expected = scores.flatten(1).softmax(-1).reshape(2, H, W)
    torch.testing.assert_close(item.spatial(), expected)
    torch.testing.assert_close(item.tensor[:, 0], expected)


def test_layouts_rebuild_the_module_output() -> None:
    """The canonical maps, broadcast as documented, give back each module's output: a wrong
    transpose, fold or reshape in capture() would not."""
    x = torch.randn(2, 64, H, W)

    def run(name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        module = randomize(convattn.create(name, 64), seed=0).eval()
        with capture(module) as maps, torch.no_grad():
            y = module(x)
        return y, {k: m.tensor for k, m in maps.items() if m.tensor is not None}

    y, m = run("triplet")  # (x * g_cw + x * g_hc + x * g_hw) / 3
    assert m["cw.gate"].shape == (2, 64, 1, W) and m["hc.gate"].shape == (2, 64, H, 1)
    torch.testing.assert_close(y, (x * m["cw.gate"] + x * m["hc.gate"] + x * m["hw.gate"]) / 3)
    y, m = run("coord")  # x * g_h * g_w
    torch.testing.assert_close(y, x * m["gate_h"] * m["gate_w"])
    y, m = run("ema")  # per group of C/G channels: x_g * gate_g
    gate = m["gate"]  # (N, G, H, W)
    groups = gate.shape[1]
    expected = x.reshape(2, groups, 64 // groups, H, W) * gate[:, :, None]
    torch.testing.assert_close(y, expected.reshape_as(x))
    y, m = run("se")
    torch.testing.assert_close(y, x * m["gate"][:, :, None, None])
    y, m = run("da_channel")  # gamma * A X + x, A the (C, C) affinity
    module = randomize(convattn.create("da_channel", 64), seed=0)
    expected = module.gamma * torch.bmm(m["gate"], x.flatten(2)).reshape_as(x) + x
    torch.testing.assert_close(y, expected)


def test_affinity_summary_and_keep_affinity() -> None:
    block = randomize(convattn.create("nonlocal", 32), seed=0).eval()
    x = torch.randn(2, 32, H, W)
    with capture(block) as maps, torch.no_grad():
        block(x)
    item = maps["gate"]
    assert item.kind == "affinity" and item.axis == "positions"
    assert item.tensor.shape == (2, H * W, 12)  # keys after the 2x2 max pool: 4 x 3
    torch.testing.assert_close(item.tensor.sum(-1), torch.ones(2, H * W))
    torch.testing.assert_close(item.spatial(), item.tensor.mean(1).reshape(2, 4, 3))
    with capture(block, keep_affinity=False) as light, torch.no_grad():
        block(x)
    assert light["gate"].tensor is None
    torch.testing.assert_close(light["gate"].spatial(), item.spatial())
    with pytest.raises(ValueError, match="not per-channel weights"):
        item.channel()


def test_samples_and_include_options() -> None:
    net = models.create_model("cifar_resnet20", attention="se").eval()
    with capture(net, include="layer3.*", samples=1) as maps, torch.no_grad():
        net(torch.randn(3, 3, 16, 16))
    assert len(maps) == 3 and all(k.startswith("layer3.") for k in maps)
    assert all(m.tensor.shape == (1, 64) for m in maps.values())
    with pytest.raises(ValueError, match="matches no gate"), capture(net, include="nope*"):
        pass


class _BatchNormWithAttention(nn.BatchNorm2d):
    """What attach() builds: a module whose forward runs its own and then a child ``attn``."""

    def __init__(self, channels: int, attn: nn.Module) -> None:
        super().__init__(channels)
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(super().forward(x))


def test_capture_in_a_hand_built_and_an_attached_model() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        _BatchNormWithAttention(16, convattn.create("eca", 16)),
        nn.Sequential(nn.ReLU(), convattn.create("scse", 16)),
    ).eval()
    with capture(model) as maps, torch.no_grad():
        model(torch.randn(1, 3, 10, 7))
    assert list(maps) == ["1.attn.gate", "2.1.cse.gate", "2.1.sse.gate"]
    assert maps["2.1.sse.gate"].module_name == "2.1.sse"
    assert maps["2.1.sse.gate"].gate_name == "gate"
    assert maps.attention_modules["2.1"] == "ChannelSpatialSE"
    assert maps["2.1.sse.gate"].spatial().shape == (1, 10, 7)


def test_capture_errors() -> None:
    not_a_model: object = "x"
    with pytest.raises(TypeError, match=r"capture: model must be an nn\.Module"):
        capture(not_a_model).__enter__()  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="contains no convattn attention module"):
        capture(nn.Sequential(nn.Conv2d(3, 3, 1))).__enter__()
    with pytest.raises(ValueError, match="samples must be a positive int"):
        capture(convattn.create("se", 16), samples=0).__enter__()
    se = convattn.create("se", 16)
    with capture(se) as maps:
        se(torch.randn(1, 16, 2, 2))
    with pytest.raises(ValueError, match="holds channel weights, not a map over positions"):
        maps["gate"].spatial()
    with pytest.raises(KeyError, match="no map named 'gate_x'"):
        maps["gate_x"]


def test_unknown_module_layouts_are_inferred() -> None:
    class FlatGate(AttentionModule):  # a user module: softmax over flattened positions
        def __init__(self, channels: int) -> None:
            super().__init__(channels)
            self.score = nn.Conv2d(channels, 1, 1)
            self.gate_positions = nn.Softmax(dim=-1)
            self.gate_odd = nn.Sigmoid()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            weights = self.gate_positions(self.score(x).flatten(2))  # (N, 1, L)
            self.gate_odd(x.mean((2, 3))[:, :5, None].expand(-1, -1, 3))  # (N, 5, 3): unknown
            return x * weights.reshape(x.shape[0], 1, *x.shape[2:]) * x[0, 0].numel()

    module = FlatGate(8)
    x = torch.randn(1, 8, 5, 4)
    with capture(module) as maps, torch.no_grad():
        module(x)
    positions = maps["gate_positions"]
    assert positions.kind == "spatial" and positions.tensor.shape == (1, 1, 5, 4)
    expected = module.score(x).flatten(1).softmax(-1).reshape(1, 5, 4)
    torch.testing.assert_close(positions.spatial(), expected)
    assert maps["gate_odd"].kind == "other" and maps["gate_odd"].tensor.shape == (1, 5, 3)


# ----------------------------------------------------------------------------- images


def test_load_image_crops_and_normalises(tmp_path: Path) -> None:
    # 40 x 20 (W x H): left half red, right half blue; the centre 20 x 20 crop keeps a band of
    # each, and a size-10 load is that crop halved.
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    path = tmp_path / "halves.png"
    Image.fromarray(pixels).save(path)
    display, batch = load_image(path, size=10)
    assert display.shape == (10, 10, 3) and batch.shape == (1, 3, 10, 10)
    np.testing.assert_allclose(display[:, 0], [[1, 0, 0]] * 10, atol=1e-6)
    np.testing.assert_allclose(display[:, -1], [[0, 0, 1]] * 10, atol=1e-6)
    red = torch.tensor(
        [(1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], -IMAGENET_MEAN[1] / IMAGENET_STD[1]]
    )
    torch.testing.assert_close(batch[0, :2, 3, 0], red)

    display, batch = load_image(None, size=32)  # skimage.data.astronaut()
    assert display.shape == (32, 32, 3) and display.std() > 0.1


def test_load_image_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    with pytest.raises(ValueError, match=r"cannot read .*broken\.png"):
        load_image(broken)
    with pytest.raises(ValueError, match="neither an image file nor a built-in photo"):
        load_image("astronot")


# ----------------------------------------------------------------------------- plots and CLI


def main(argv: list[str]) -> int:
    """``convattn <argv>`` through viz.add_parser, with cli.main's error handling (ValueError /
    TypeError -> message on stderr, exit code 2)."""
    parser = argparse.ArgumentParser(prog="convattn")
    viz.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, TypeError) as exc:
        print(f"convattn {args.command}: error: {exc}", file=sys.stderr)
        return 2


def test_cli_lists_the_viz_command() -> None:
    from convattn.cli import COMMAND_MODULES

    assert "convattn.viz" in COMMAND_MODULES


def assert_real_png(path: Path, min_colours: int = 50) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) >= min_colours


def test_save_figures_every_kind(tmp_path: Path) -> None:
    model = nn.Sequential(
        randomize(convattn.create("cbam", 32), seed=0),
        randomize(convattn.create("sk", 32), seed=0),
        randomize(convattn.create("da_channel", 32), seed=0),
        randomize(convattn.create("nonlocal", 32), seed=0),
    ).eval()
    display, _ = load_image("chelsea", size=48)
    with capture(model) as maps, torch.no_grad():
        model(torch.randn(1, 32, 12, 12))
    written = save_figures(maps, display, tmp_path / "out", max_panels=4)
    assert set(written) == {"spatial", "channel", "selection"}
    for path in written.values():
        assert path.parent == tmp_path / "out"
        assert_real_png(path, min_colours=20)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "channel.png",
        "selection.png",
        "spatial.png",
    ]  # no temporary file left behind


def test_viz_command_on_a_real_photo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plain"
    argv = ["viz", "--model", "resnet18", "--attention", "cbam", "--image-size", "64"]
    assert main([*argv, "--out", str(out), "--max-panels", "4"]) == 0
    printed = capsys.readouterr().out
    assert "resnet18 + cbam on astronaut (64px): 16 maps from 8 attention modules" in printed
    assert f"spatial: {out / 'spatial.png'}" in printed
    assert_real_png(out / "spatial.png")
    assert_real_png(out / "channel.png")
    assert not (out / "selection.png").exists()

    # A checkpoint in the training command's format, with the spatial BN made non-zero (the
    # backbone's init gives constant 0.5 maps): the overlays must appear, so the PNG changes.
    torch.manual_seed(1)
    net = models.create_model("resnet18", attention="cbam", num_classes=10)
    for module in net.modules():
        if type(module).__name__ == "CBAMSpatialGate":
            nn.init.normal_(module.bn.weight, 1.0, 0.3)
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    checkpoint = tmp_path / "ckpt.pt"
    torch.save({"model": state, "config": {"model": "resnet18", "attention": "cbam"}}, checkpoint)
    trained = tmp_path / "trained"
    assert main(["viz", "--checkpoint", str(checkpoint), "--image-size", "64", "--out", str(trained), "--max-panels", "4"]) == 0  # fmt: skip
    assert "top classes" in capsys.readouterr().out  # 10 classes, read from the checkpoint
    with Image.open(out / "spatial.png") as a, Image.open(trained / "spatial.png") as b:
        plain, loaded = np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB"))
    assert plain.shape == loaded.shape
    assert np.abs(plain.astype(int) - loaded.astype(int)).mean() > 1.0


def test_load_checkpoint_formats(tmp_path: Path) -> None:
    state = {"w": torch.ones(2), "b": torch.zeros(1)}
    raw = tmp_path / "raw.pt"
    torch.save(state, raw)
    loaded, config = load_checkpoint(raw)
    assert set(loaded) == {"w", "b"} and config == {}
    wrapped = tmp_path / "wrapped.pt"
    compiled = {f"_orig_mod.{k}": v for k, v in state.items()}
    torch.save({"state_dict": compiled, "config": {"model": "resnet18"}}, wrapped)
    loaded, config = load_checkpoint(wrapped)
    assert set(loaded) == {"w", "b"} and config == {"model": "resnet18"}
    odd = tmp_path / "odd.pt"
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, odd)
    with pytest.raises(ValueError, match="neither a state dict nor a dict with one"):
        load_checkpoint(odd)
    with pytest.raises(ValueError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pt")


def test_viz_command_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "o")
    assert main(["viz", "--model", "cifar_resnet20", "--image-size", "32", "--out", out]) == 2
    assert "contains no convattn attention module" in capsys.readouterr().err
    assert main(["viz", "--model", "cifar_resnet20", "--attention", "se", "--image", "moon_landing"]) == 2  # fmt: skip
    assert "neither an image file nor a built-in photo" in capsys.readouterr().err
    assert main(["viz", "--attention", "se"]) == 2
    assert "--model is required" in capsys.readouterr().err
    wrong = tmp_path / "se.pt"
    torch.save(models.create_model("cifar_resnet20", attention="se").state_dict(), wrong)
    argv = ["viz", "--model", "cifar_resnet20", "--attention", "eca", "--checkpoint", str(wrong)]
    assert main([*argv, "--image-size", "32", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "does not fit cifar_resnet20 with attention='eca'" in err and "unexpected" in err
    assert not Path(out).exists()
