"""``convattn train`` and ``convattn bench-train`` (registered by ``convattn.cli``)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from convattn.train.loop import TrainConfig

__all__ = ["add_parser", "config_from_args"]


def _add_train_options(p: argparse.ArgumentParser, *, single: bool) -> None:
    defaults = TrainConfig()
    g = p.add_argument_group("model")
    g.add_argument("--model", default=defaults.model, help="resnet20 (default), resnet50, ...")
    if single:
        g.add_argument(
            "--attention", default="none", help="registry key, or 'none' (default) for plain"
        )
    g.add_argument("--placement", default=None, help="override the paper placement")

    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default=defaults.data,
        help="shapes (built-in, default), cifar10, cifar100 or imagefolder:PATH "
        "(PATH/train/CLASS/*, PATH/val/CLASS/*)",
    )
    g.add_argument("--data-dir", default=defaults.data_dir, help="where CIFAR lives (./data)")
    g.add_argument(
        "--download", action="store_true", help="download CIFAR into --data-dir if missing"
    )
    g.add_argument(
        "--image-size", type=int, default=None, help="32 (shapes, CIFAR) / 224 (ImageFolder)"
    )
    g.add_argument(
        "--train-size", type=int, default=defaults.train_size, help="shapes: training images"
    )
    g.add_argument(
        "--val-size", type=int, default=defaults.val_size, help="shapes: validation images"
    )
    g.add_argument(
        "--workers", type=int, default=None, help="DataLoader workers (0 on CPU, 4 on GPU)"
    )

    g = p.add_argument_group("recipe")
    g.add_argument(
        "--epochs", type=int, default=None, help="164 on CIFAR, 90 ImageFolder, 15 shapes"
    )
    g.add_argument("--batch-size", type=int, default=defaults.batch_size, help="per process")
    g.add_argument("--optimizer", choices=("sgd", "adamw"), default=defaults.optimizer)
    g.add_argument("--lr", type=float, default=None, help="0.1 (sgd) / 1e-3 (adamw)")
    g.add_argument("--momentum", type=float, default=defaults.momentum)
    g.add_argument("--weight-decay", type=float, default=None, help="5e-4 (sgd) / 0.05 (adamw)")
    g.add_argument(
        "--schedule",
        choices=("step", "cosine", "constant"),
        default=defaults.schedule,
        help="step: x0.1 at 50%% and 75%% of the epochs (default)",
    )
    g.add_argument("--warmup-epochs", type=int, default=defaults.warmup_epochs)
    g.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing)
    g.add_argument("--seed", type=int, default=defaults.seed)

    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="output folder")
    g.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        type=str,
        metavar="CHECKPOINT",
        help="continue from OUT/last.pt (or CHECKPOINT)"
        if single
        else "reuse finished runs and continue interrupted ones",
    )
    g.add_argument("--overwrite", action="store_true", help="start afresh in an existing --out")
    g.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, cuda:N, mps")
    g.add_argument(
        "--amp",
        choices=("auto", "off", "fp16", "bf16"),
        default=defaults.amp,
        help="mixed precision (auto: on for CUDA)",
    )
    g.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under DDP")
    g.add_argument(
        "--stop-after", type=int, default=None, help="stop after N epochs in this invocation"
    )
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (torch's default)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` that parsed ``train`` / ``bench-train`` arguments describe."""
    resume: bool | str = args.resume
    values: dict[str, Any] = {
        "model": args.model,
        "attention": getattr(args, "attention", None),
        "placement": args.placement,
        "data": args.data,
        "data_dir": args.data_dir,
        "download": args.download,
        "image_size": args.image_size,
        "train_size": args.train_size,
        "val_size": args.val_size,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "optimizer": args.optimizer,
        "lr": args.lr,
        "momentum": args.momentum,
        "weight_decay": args.weight_decay,
        "schedule": args.schedule,
        "warmup_epochs": args.warmup_epochs,
        "label_smoothing": args.label_smoothing,
        "seed": args.seed,
        "out": args.out,
        "resume": resume,
        "overwrite": args.overwrite,
        "device": args.device,
        "amp": args.amp,
        "channels_last": args.channels_last,
        "workers": args.workers,
        "progress": not args.no_progress,
        "stop_after": args.stop_after,
        "sync_bn": args.sync_bn,
        "threads": args.threads,
    }
    return TrainConfig(**values)


def cmd_train(args: argparse.Namespace) -> int:
    from convattn.train.loop import train

    try:
        result = train(config_from_args(args))
    except FloatingPointError as exc:
        print(exc, file=sys.stderr)
        return 1
    if result.history and result.rank == 0:
        last = result.history[-1]
        print(
            f"{result.config.model} + {result.config.attention or 'none'}: epoch "
            f"{int(last['epoch'])}, val acc {last['val_acc']:.2f} % (best "
            f"{result.best_val_acc:.2f} %), {result.params:,} params -> {result.out_dir}"
        )
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    from convattn.train.bench import bench_train

    attentions = [a.strip() for a in args.attention.split(",") if a.strip()]
    try:
        result = bench_train(
            config_from_args(args), attentions=attentions, seeds=args.seeds, out=args.out
        )
    except FloatingPointError as exc:
        print(exc, file=sys.stderr)
        return 1
    if result.files:  # rank 0 (the only one under torchrun that writes and prints)
        print(result.markdown, end="")
        print(f"\nwrote {', '.join(str(p) for p in result.files.values())}")
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``train`` and ``bench-train`` with the ``convattn`` command."""
    p = subparsers.add_parser(
        "train",
        help="train a model with or without attention (also under torchrun)",
        description="Train a reference backbone with an attention module on the built-in "
        "shapes data, CIFAR-10/100 or an ImageFolder tree. Under `torchrun "
        "--nproc_per_node=N -m convattn train ...` it runs DDP.",
    )
    _add_train_options(p, single=True)
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser(
        "bench-train",
        help="compare attention variants over several seeds under one recipe",
        description="Train every --attention variant with every seed under one recipe and "
        "report mean and standard deviation of final/best accuracy and time per epoch.",
    )
    p.add_argument(
        "--attention",
        default="none,se,eca,cbam",
        help="comma-separated registry keys ('none' = plain); default none,se,eca,cbam",
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant: --seed .. +N-1 (3)")
    _add_train_options(p, single=False)
    p.set_defaults(func=cmd_bench_train)
