"""Training for convattn: ``convattn train`` and ``convattn bench-train``.

- :func:`train` / :class:`TrainConfig`: one model on CIFAR-10/100, an ImageFolder tree or the
  built-in :class:`ClutteredShapes`, with AMP, channels_last, DDP under torchrun, a checkpoint
  after every epoch and exact resume.
- :func:`bench_train`: several attention variants x several seeds under one recipe, with mean
  and standard deviation.
"""

from convattn.train.bench import BenchResult, bench_train
from convattn.train.checkpoint import (
    CheckpointError,
    atomic_write,
    load_checkpoint,
    save_checkpoint,
)
from convattn.train.data import ClutteredShapes, DataBundle, build_data
from convattn.train.loop import (
    METRIC_FIELDS,
    TrainConfig,
    TrainResult,
    evaluate,
    lr_factor,
    plot_curves,
    train,
)

__all__ = [
    "METRIC_FIELDS",
    "BenchResult",
    "CheckpointError",
    "ClutteredShapes",
    "DataBundle",
    "TrainConfig",
    "TrainResult",
    "atomic_write",
    "bench_train",
    "build_data",
    "evaluate",
    "load_checkpoint",
    "lr_factor",
    "plot_curves",
    "save_checkpoint",
    "train",
]
