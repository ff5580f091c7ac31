"""The ``convattn`` command.

``list``, ``info`` and ``demo`` live here; every other command lives in the module that does
its work (``convattn.profile`` for ``profile``/``compare``, ...), which exposes
``add_parser(subparsers)`` registering its sub-command with a ``func(args) -> int`` default.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Sequence

import torch
from torch import nn

from convattn import registry

__all__ = ["COMMAND_MODULES", "main"]

# Modules that add sub-commands through ``add_parser(subparsers)``.
COMMAND_MODULES = (
    "convattn.profile",
    "convattn.train.cli",
    "convattn.viz",
    "convattn.export",
)


def _text_table(rows: list[list[str]], headers: list[str], right: set[int] = frozenset()) -> str:  # type: ignore[assignment]
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]

    def fmt(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([fmt(headers), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)])


def cmd_list(args: argparse.Namespace) -> int:
    if args.format == "markdown":
        print(registry.markdown_table(args.channels))
        return 0
    rows = [
        r for r in registry.table_rows(args.channels) if args.kind is None or r["kind"] == args.kind
    ]
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    headers = ["name", "kind", "paper", "year", f"params@C={args.channels}"]
    cells = [
        [r["name"], r["kind"], _shorten(r["paper"], 60), str(r["year"]), f"{r['params']:,}"]
        for r in rows
    ]
    print(_text_table(cells, headers, right={3, 4}))
    return 0


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def cmd_info(args: argparse.Namespace) -> int:
    spec = registry.info(args.name)
    print(spec.describe())
    print(f"  params at C=256: {registry.count_params(spec.name, 256):,}")
    return 0


def _load_photo(size: int) -> torch.Tensor:
    try:
        from skimage import data
    except ImportError as exc:  # pragma: no cover - exercised only without the viz extra
        raise SystemExit("convattn demo needs scikit-image: pip install 'convattn[viz]'") from exc
    image = torch.from_numpy(data.astronaut()).permute(2, 0, 1).float().div(255)
    image = nn.functional.interpolate(
        image[None], size=(size, size), mode="bilinear", align_corners=False
    )
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (image - mean) / std


def _median_ms(module: nn.Module, x: torch.Tensor, repeats: int) -> float:
    times = []
    with torch.inference_mode():
        module(x)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            module(x)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def cmd_demo(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    print("convattn: registered attention modules\n")
    cmd_list(argparse.Namespace(format="text", kind=None, channels=256))
    torch.manual_seed(0)
    image = _load_photo(args.image_size)
    channels = args.channels
    stem = nn.Sequential(
        nn.Conv2d(3, channels, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1),
    ).eval()
    with torch.inference_mode():
        features = stem(image)
    print(
        f"\nEvery module on skimage.data.astronaut() ({args.image_size}x{args.image_size}), through a "
        f"conv stem to features of shape {tuple(features.shape)}; median of {args.repeats} runs, "
        f"{torch.get_num_threads()} thread(s):\n"
    )
    rows = []
    for name in registry.list_attention():
        module = registry.create(name, channels).eval()
        with torch.inference_mode():
            out = module(features)
        ms = _median_ms(module, features, args.repeats)
        params = sum(p.numel() for p in module.parameters())
        rows.append([name, str(tuple(out.shape)), f"{params:,}", f"{ms:.2f}"])
    print(_text_table(rows, ["name", "output shape", "params", "ms"], right={2, 3}))
    return 0


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent package is absent
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convattn", description="Channel and spatial attention for CNNs."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="print the registry as a table")
    p.add_argument("--kind", choices=registry.KINDS, help="only this kind of attention")
    p.add_argument("--format", choices=("text", "markdown", "json"), default="text")
    p.add_argument(
        "--channels", type=int, default=256, help="channel count for the params column (256)"
    )
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("info", help="print one registry entry")
    p.add_argument("name")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="run every module on a real photo")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument(
        "--channels", type=int, default=128, help="feature channels after the stem (128)"
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.set_defaults(func=cmd_demo)

    for module_name in COMMAND_MODULES:
        if _module_exists(module_name):
            importlib.import_module(module_name).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, TypeError) as exc:
        print(f"convattn {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
