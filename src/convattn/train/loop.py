"""The training loop behind ``convattn train``: one process or DDP, AMP, channels_last,
checkpoints after every epoch and exact resume.

>>> from convattn.train import TrainConfig, train
>>> result = train(TrainConfig(model="resnet20", attention="eca", epochs=10))  # doctest: +SKIP
>>> result.final_val_acc, result.out_dir                                      # doctest: +SKIP

The recipe defaults follow the CIFAR ResNet recipe (SGD, momentum 0.9, weight decay 5e-4,
batch 128, lr 0.1 divided by 10 at 50 % and 75 % of the epochs; 164 epochs on CIFAR).
Under ``torchrun`` every process trains on its shard of each epoch (``DistributedSampler``),
``batch_size`` is per process, metrics are summed over processes and only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler

from convattn.train.checkpoint import (
    CheckpointError,
    atomic_write,
    capture_rng_state,
    check_compatible,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from convattn.train.data import DataBundle, build_data, parse_data_spec

__all__ = [
    "METRIC_FIELDS",
    "RECIPE_KEYS",
    "TrainConfig",
    "TrainResult",
    "default_epochs",
    "evaluate",
    "lr_factor",
    "plot_curves",
    "train",
]

METRIC_FIELDS = (
    "epoch",
    "lr",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "best_val_acc",
    "images_per_s",
    "epoch_time_s",
)
# Options that define a run: a checkpoint resumes only under the same values. ``epochs`` may
# change (to extend a run); the schedule then follows the new value.
RECIPE_KEYS = (
    "model",
    "attention",
    "placement",
    "data",
    "image_size",
    "train_size",
    "val_size",
    "batch_size",
    "optimizer",
    "lr",
    "momentum",
    "weight_decay",
    "schedule",
    "warmup_epochs",
    "label_smoothing",
    "seed",
)
_OPTIMIZERS = ("sgd", "adamw")
_SCHEDULES = ("step", "cosine", "constant")
_AMP_MODES = ("auto", "off", "fp16", "bf16")


def default_epochs(data: str) -> int:
    """164 for CIFAR (the recipe), 90 for ImageFolder, 15 for the built-in shapes."""
    kind, _ = parse_data_spec(data)
    return {"cifar10": 164, "cifar100": 164, "imagefolder": 90}.get(kind, 15)


@dataclass
class TrainConfig:
    """Everything ``convattn train`` takes. ``None`` means "the recipe's default" and is filled
    in by :meth:`resolved`. Accuracies are in percent.

    Args:
        model: a name for :func:`convattn.models.create_model` (``resnet20``, ``resnet50``, ...).
        attention: a registry key, or None / ``"none"`` for the plain network.
        placement: override the paper placement (a key of ``convattn.placement.PLACEMENTS``).
        data: ``shapes`` (built-in), ``cifar10``, ``cifar100`` or ``imagefolder:PATH``.
        data_dir: where CIFAR lives (or is downloaded to with ``download=True``).
        image_size: input side; 32 for shapes/CIFAR and 224 for ImageFolder by default.
        train_size, val_size: number of built-in shapes images per split.
        epochs: total epochs (164 on CIFAR, 90 on ImageFolder, 15 on shapes by default).
        batch_size: per process.
        optimizer: ``sgd`` (momentum, the recipe) or ``adamw``.
        lr: base learning rate (0.1 for SGD, 1e-3 for AdamW).
        weight_decay: 5e-4 for SGD, 0.05 for AdamW.
        schedule: ``step`` (x0.1 at 50 % and 75 % of the epochs), ``cosine`` or ``constant``;
            after ``warmup_epochs`` of linear warm-up.
        seed: seeds the model initialisation, the data order and the built-in data.
        out: output folder (``runs/train/<model>-<attention>``).
        resume: True for ``<out>/last.pt``, or a checkpoint path.
        overwrite: start afresh even if ``out`` holds a checkpoint.
        device: ``auto`` (CUDA, else MPS, else CPU), or a torch device string.
        amp: ``auto`` (bf16 on CUDA where supported, else fp16 with loss scaling; off on
            CPU), ``off``, ``fp16`` or ``bf16``.
        channels_last: train in the channels_last memory format.
        workers: DataLoader worker processes (0 on CPU, for determinism; 4 on GPU).
        progress: show a progress bar per epoch (rank 0 only).
        stop_after: stop after this many epochs in this invocation (for time-limited jobs; go
            on later with ``resume``).
        sync_bn: SyncBatchNorm under DDP.
        threads: torch intra-op threads during the run (torch's default when None); 1 is
            often fastest for small models on a busy CPU.
    """

    model: str = "resnet20"
    attention: str | None = None
    placement: str | None = None
    data: str = "shapes"
    data_dir: str = "data"
    download: bool = False
    image_size: int | None = None
    train_size: int = 10_000
    val_size: int = 2_000
    epochs: int | None = None
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    schedule: str = "step"
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    seed: int = 0
    out: str | None = None
    resume: bool | str = False
    overwrite: bool = False
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool = False
    workers: int | None = None
    progress: bool = True
    stop_after: int | None = None
    sync_bn: bool = False
    threads: int | None = None

    def resolved(self) -> TrainConfig:
        """A copy with every default filled in and every value checked (ValueError naming the
        option otherwise)."""
        cfg = dataclasses.replace(self)
        kind, _ = parse_data_spec(cfg.data)
        if isinstance(cfg.attention, str) and cfg.attention.lower() in ("none", ""):
            cfg.attention = None
        if cfg.optimizer not in _OPTIMIZERS:
            raise ValueError(f"--optimizer: expected one of {_OPTIMIZERS}, got {cfg.optimizer!r}")
        if cfg.schedule not in _SCHEDULES:
            raise ValueError(f"--schedule: expected one of {_SCHEDULES}, got {cfg.schedule!r}")
        if cfg.amp not in _AMP_MODES:
            raise ValueError(f"--amp: expected one of {_AMP_MODES}, got {cfg.amp!r}")
        if cfg.epochs is None:
            cfg.epochs = default_epochs(cfg.data)
        if cfg.image_size is None:
            cfg.image_size = 224 if kind == "imagefolder" else 32
        if cfg.lr is None:
            cfg.lr = 0.1 if cfg.optimizer == "sgd" else 1e-3
        if cfg.weight_decay is None:
            cfg.weight_decay = 5e-4 if cfg.optimizer == "sgd" else 0.05
        for name, value, low in (
            ("--epochs", cfg.epochs, 1),
            ("--batch-size", cfg.batch_size, 1),
            ("--image-size", cfg.image_size, 8),
            ("--warmup-epochs", cfg.warmup_epochs, 0),
            ("--train-size", cfg.train_size, 1),
            ("--val-size", cfg.val_size, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        if cfg.stop_after is not None and (
            not isinstance(cfg.stop_after, int) or cfg.stop_after < 1
        ):
            raise ValueError(f"--stop-after: expected an int >= 1, got {cfg.stop_after!r}")
        if cfg.threads is not None and (not isinstance(cfg.threads, int) or cfg.threads < 1):
            raise ValueError(f"--threads: expected an int >= 1, got {cfg.threads!r}")
        if cfg.workers is not None and (not isinstance(cfg.workers, int) or cfg.workers < 0):
            raise ValueError(f"--workers: expected an int >= 0, got {cfg.workers!r}")
        for name, number in (
            ("--lr", cfg.lr),
            ("--weight-decay", cfg.weight_decay),
            ("--momentum", cfg.momentum),
        ):
            if not math.isfinite(number) or number < 0 or (name == "--lr" and number == 0):
                raise ValueError(f"{name}: expected a finite number > 0, got {number!r}")
        if not 0.0 <= cfg.label_smoothing < 1.0:
            raise ValueError(
                f"--label-smoothing: expected a number in [0, 1), got {cfg.label_smoothing!r}"
            )
        if kind != "shapes":  # the sizes only shape the built-in data
            cfg.train_size, cfg.val_size = TrainConfig.train_size, TrainConfig.val_size
        if cfg.out is None:
            cfg.out = os.path.join("runs", "train", f"{cfg.model}-{cfg.attention or 'none'}")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank; ``files`` is empty except on rank 0)."""

    config: TrainConfig
    history: list[dict[str, float]]
    params: int
    out_dir: Path
    epochs_completed: int
    checkpoint: Path
    best_val_acc: float = float("nan")
    final_val_acc: float = float("nan")
    files: dict[str, Path] = field(default_factory=dict)
    rank: int = 0


def lr_factor(epoch: int, epochs: int, schedule: str, warmup_epochs: int = 0) -> float:
    """Multiplier of the base learning rate during epoch ``epoch`` (0-based).

    ``step``: the recipe's x0.1 steps, scaled to ``epochs``: 1, then 0.1 from epoch
    ``round(epochs * 81 / 164)`` and 0.01 from ``round(epochs * 122 / 164)`` (epochs 81 and 122
    of 164, about 50 % and 75 %). ``cosine``: half a cosine from 1 towards 0 over the epochs
    after warm-up. ``constant``: 1. The first ``warmup_epochs`` ramp up linearly from
    ``1 / (warmup_epochs + 1)``.
    """
    if epoch < warmup_epochs:
        return (epoch + 1) / (warmup_epochs + 1)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, epochs - warmup_epochs)
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / span))
    milestones = (max(1, round(epochs * 81 / 164)), max(1, round(epochs * 122 / 164)))
    return 0.1 ** sum(epoch >= m for m in milestones)


# --------------------------------------------------------------------------- distributed


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return [float(v) for v in tensor.tolist()]

    def max(self, value: float, device: torch.device) -> float:
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor.item())

    def gather(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


@contextlib.contextmanager
def _distributed(device_name: str) -> Iterator[_Dist]:
    """Join the process group that torchrun describes through RANK/WORLD_SIZE/LOCAL_RANK
    (NCCL on CUDA, gloo otherwise); a no-op for a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        yield _Dist()
        return
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    owns = False
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        owns = True
    info = _Dist(
        dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns
    )
    try:
        yield info
    finally:
        if owns and dist.is_initialized():
            dist.destroy_process_group()


def _resolve_device(name: str, ctx: _Dist) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", ctx.local_rank if ctx.enabled else 0)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            if ctx.enabled:
                return torch.device("cpu")  # DDP has no MPS backend
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(
            f"--device: expected auto, cpu, cuda, cuda:N or mps, got {name!r}"
        ) from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine")
        if ctx.enabled:
            device = torch.device("cuda", ctx.local_rank)
    return device


def _amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    if mode == "off":
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16":
        return torch.bfloat16
    if device.type == "cuda":  # auto
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


class _ShardSampler(Sampler[int]):
    """Every ``world_size``-th index from ``rank``: each validation image once, no padding."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


# --------------------------------------------------------------------------- steps


def _autocast(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def evaluate(
    model: nn.Module,
    loader: DataLoader[Any],
    device: torch.device,
    *,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> tuple[float, float, int]:
    """Mean cross-entropy, accuracy (percent) and image count of ``model`` on ``loader``, in
    this process (DDP callers sum the counts themselves)."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    with torch.inference_mode():
        for images, targets in loader:
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            targets = targets.to(device, non_blocking=True)
            with _autocast(device, amp_dtype):
                logits = model(images)
            loss_sum += nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
            correct += (logits.argmax(1) == targets).sum()
            count += int(targets.numel())
    model.train(was_training)
    if count == 0:
        return float("nan"), float("nan"), 0
    return float(loss_sum) / count, 100.0 * float(correct) / count, count


class _Trainer:
    def __init__(self, cfg: TrainConfig, ctx: _Dist) -> None:
        from convattn.models import create_model

        self.cfg = cfg
        self.ctx = ctx
        self.device = _resolve_device(cfg.device, ctx)
        self.amp_dtype = _amp_dtype(cfg.amp, self.device)
        self.out = Path(cfg.out or ".")
        self.last_path = self.out / "last.pt"
        self.best_path = self.out / "best.pt"
        if not cfg.resume and not cfg.overwrite and self.last_path.exists():
            raise ValueError(
                f"--out {self.out} already holds a run ({self.last_path}); pass --resume to "
                "continue it, --overwrite to start afresh, or another --out"
            )

        # Identical model initialisation on every rank; per-rank streams afterwards.
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        torch.manual_seed(cfg.seed)

        def load(download: bool) -> DataBundle:
            return build_data(
                cfg.data,
                data_dir=cfg.data_dir,
                download=download,
                image_size=cfg.image_size,
                train_size=cfg.train_size,
                val_size=cfg.val_size,
                seed=cfg.seed,
            )

        if ctx.enabled and cfg.download:  # rank 0 downloads, the others wait and read
            if ctx.main:
                self.data = load(True)
            ctx.barrier()
            if not ctx.main:
                self.data = load(False)
        else:
            self.data = load(cfg.download)
        kwargs: dict[str, Any] = {"attention": cfg.attention, "num_classes": self.data.num_classes}
        if cfg.placement is not None:
            kwargs["placement"] = cfg.placement
        model = create_model(cfg.model, **kwargs)
        self.params = sum(p.numel() for p in model.parameters())
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        model = model.to(self.device).to(memory_format=self.memory_format)
        if ctx.enabled and cfg.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.net: nn.Module = model
        if ctx.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if ctx.rank:
            torch.manual_seed(cfg.seed + ctx.rank)
            np.random.seed((cfg.seed + ctx.rank) % 2**32)
            random.seed(cfg.seed + ctx.rank)

        if cfg.lr is None or cfg.weight_decay is None or cfg.epochs is None:
            raise ValueError("convattn train: the config must be resolved (TrainConfig.resolved())")
        self.epochs = cfg.epochs
        if cfg.optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        else:
            self.optimizer = torch.optim.AdamW(
                model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
            )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda e: lr_factor(e, self.epochs, cfg.schedule, cfg.warmup_epochs),
        )
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp_dtype == torch.float16
        )
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

        workers = (
            cfg.workers if cfg.workers is not None else (4 if self.device.type == "cuda" else 0)
        )
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.train_sampler: Sampler[int]
        if ctx.enabled:
            self.train_sampler = DistributedSampler(
                self.data.train, num_replicas=ctx.world_size, rank=ctx.rank, seed=cfg.seed
            )
        else:
            self.train_sampler = RandomSampler(
                cast(Sized, self.data.train), generator=self.generator
            )
        pin = self.device.type == "cuda"
        self.train_loader = DataLoader(
            self.data.train,
            batch_size=cfg.batch_size,
            sampler=self.train_sampler,
            num_workers=workers,
            pin_memory=pin,
            generator=self.generator,
            worker_init_fn=_seed_worker,
            drop_last=_drop_last(len(cast(Sized, self.train_sampler)), cfg.batch_size),
        )
        self.val_loader = DataLoader(
            self.data.val,
            batch_size=cfg.batch_size * 2,
            sampler=_ShardSampler(len(cast(Sized, self.data.val)), ctx.rank, ctx.world_size),
            num_workers=workers,
            pin_memory=pin,
            worker_init_fn=_seed_worker,
        )
        self.history: list[dict[str, float]] = []
        self.best_val_acc = float("-inf")
        self.start_epoch = 0
        if cfg.resume:
            self._resume()

    # ------------------------------------------------------------------ resume / save

    def _resume(self) -> None:
        cfg = self.cfg
        path = self.last_path if cfg.resume is True else Path(str(cfg.resume))
        if not path.is_file():
            raise ValueError(f"--resume: no checkpoint at {path}")
        state = load_checkpoint(path)
        check_compatible(state, cfg.to_dict(), RECIPE_KEYS, path)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(
                f"checkpoint {path} does not fit this model/optimizer: {exc}"
            ) from exc
        self.start_epoch = int(state["epoch"])
        self.history = list(state.get("history", []))
        self.best_val_acc = float(state.get("best_val_acc", float("-inf")))
        rng_states = state.get("rng") or []
        saved_world = int(state.get("world_size", 1))
        if saved_world == self.ctx.world_size and len(rng_states) == self.ctx.world_size:
            restore_rng_state(rng_states[self.ctx.rank], self.generator)
        elif self.ctx.main:
            print(
                f"convattn train: {path} was written by {saved_world} process(es), this run has "
                f"{self.ctx.world_size}: training goes on, but not bit-identically",
                file=sys.stderr,
            )
        if self.ctx.main:
            print(f"convattn train: resumed {path} after epoch {self.start_epoch}", file=sys.stderr)

    def _state(self, epoch: int, rng: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "rng": rng,
            "world_size": self.ctx.world_size,
            "history": self.history,
            "best_val_acc": self.best_val_acc,
            "params": self.params,
            "classes": list(self.data.classes),
        }

    # ------------------------------------------------------------------ epochs

    def _train_epoch(self, epoch: int) -> tuple[float, float, float]:
        cfg = self.cfg
        if isinstance(self.train_sampler, DistributedSampler):
            self.train_sampler.set_epoch(epoch)
        self.net.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        count = 0
        bar = _progress(
            len(self.train_loader),
            f"epoch {epoch + 1}/{self.epochs}",
            cfg.progress and self.ctx.main,
        )
        start = time.perf_counter()
        for step, (images, targets) in enumerate(self.train_loader):
            images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
            targets = targets.to(self.device, non_blocking=True)
            with _autocast(self.device, self.amp_dtype):
                logits = self.net(images)
                loss = self.criterion(logits, targets)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            batch = int(targets.numel())
            loss_sum += loss.detach().double() * batch
            correct += (logits.detach().argmax(1) == targets).sum()
            count += batch
            if bar is not None:
                bar.update(1)
                if step % 10 == 0 or step == len(self.train_loader) - 1:
                    mean_loss = float(loss_sum) / count
                    _check_finite(mean_loss, epoch, step)
                    rate = count * self.ctx.world_size / (time.perf_counter() - start)
                    bar.set_postfix(
                        loss=f"{mean_loss:.4f}",
                        acc=f"{100.0 * float(correct) / count:.2f}",
                        img_s=f"{rate:.0f}",
                        refresh=False,
                    )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = self.ctx.max(time.perf_counter() - start, self.device)
        if bar is not None:
            bar.close()
        total_loss, total_correct, total = self.ctx.sum(
            [float(loss_sum), float(correct), float(count)], self.device
        )
        _check_finite(total_loss, epoch, None)
        return total_loss / total, 100.0 * total_correct / total, total / seconds

    def _validate(self) -> tuple[float, float]:
        loss, acc, count = evaluate(
            self.net,
            self.val_loader,
            self.device,
            amp_dtype=self.amp_dtype,
            channels_last=self.cfg.channels_last,
        )
        loss_sum = 0.0 if count == 0 else loss * count
        correct = 0.0 if count == 0 else acc * count / 100.0
        total_loss, total_correct, total = self.ctx.sum([loss_sum, correct, count], self.device)
        return total_loss / total, 100.0 * total_correct / total

    def run(self) -> TrainResult:
        cfg = self.cfg
        end = (
            self.epochs
            if cfg.stop_after is None
            else min(self.epochs, self.start_epoch + cfg.stop_after)
        )
        if self.ctx.main:
            self.out.mkdir(parents=True, exist_ok=True)
            config_text = json.dumps(
                {**cfg.to_dict(), "params": self.params, "world_size": self.ctx.world_size},
                indent=2,
            )
            atomic_write(self.out / "config.json", lambda h: h.write(config_text.encode()))
            if self.start_epoch == 0:
                attention = cfg.attention or "none"
                print(
                    f"convattn train: {cfg.model} + {attention} ({self.params:,} params) on "
                    f"{self.data.name} ({len(cast(Sized, self.data.train))} train / {len(cast(Sized, self.data.val))} val, "
                    f"{self.data.image_size}px), {self.epochs} epochs, {self.device}"
                    f"{f' x{self.ctx.world_size}' if self.ctx.enabled else ''}, "
                    f"amp={_dtype_name(self.amp_dtype)} -> {self.out}",
                    file=sys.stderr,
                )
        for epoch in range(self.start_epoch, end):
            epoch_start = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            train_loss, train_acc, rate = self._train_epoch(epoch)
            val_loss, val_acc = self._validate()
            self.scheduler.step()
            is_best = val_acc > self.best_val_acc
            self.best_val_acc = max(self.best_val_acc, val_acc)
            row = {
                "epoch": epoch + 1,
                "lr": lr,
                "train_loss": train_loss,
                "train_acc": train_acc,
                "val_loss": val_loss,
                "val_acc": val_acc,
                "best_val_acc": self.best_val_acc,
                "images_per_s": rate,
                "epoch_time_s": self.ctx.max(time.perf_counter() - epoch_start, self.device),
            }
            self.history.append(row)
            rng = self.ctx.gather(capture_rng_state(self.generator))
            if self.ctx.main:
                save_checkpoint(self.last_path, self._state(epoch + 1, rng))
                if is_best:
                    _atomic_copy(self.last_path, self.best_path)
                self._write_metrics()
                if cfg.progress:
                    _echo(
                        f"epoch {epoch + 1}/{self.epochs}: train loss {train_loss:.4f} acc "
                        f"{train_acc:.2f} | val loss {val_loss:.4f} acc {val_acc:.2f} "
                        f"(best {self.best_val_acc:.2f}) | {rate:.0f} img/s"
                    )
            self.ctx.barrier()
        files: dict[str, Path] = {}
        if self.ctx.main:
            self._write_metrics()
            files = {
                "metrics_jsonl": self.out / "metrics.jsonl",
                "metrics_csv": self.out / "metrics.csv",
                "last": self.last_path,
                "config": self.out / "config.json",
            }
            if self.best_path.exists():
                files["best"] = self.best_path
            curves = plot_curves(self.history, self.out / "curves.png")
            if curves is not None:
                files["curves"] = curves
        self.ctx.barrier()
        return TrainResult(
            config=cfg,
            history=list(self.history),
            params=self.params,
            out_dir=self.out,
            epochs_completed=len(self.history),
            checkpoint=self.last_path,
            best_val_acc=self.best_val_acc if self.history else float("nan"),
            final_val_acc=self.history[-1]["val_acc"] if self.history else float("nan"),
            files=files,
            rank=self.ctx.rank,
        )

    def _write_metrics(self) -> None:
        jsonl = "".join(json.dumps(row) + "\n" for row in self.history)
        atomic_write(self.out / "metrics.jsonl", lambda h: h.write(jsonl.encode()))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=METRIC_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.history)
        text = buffer.getvalue()
        atomic_write(self.out / "metrics.csv", lambda h: h.write(text.encode()))


def _drop_last(samples: int, batch_size: int) -> bool:
    # A last batch of one image breaks BatchNorm in training; drop it in that case only.
    return samples > batch_size and samples % batch_size == 1


def _check_finite(value: float, epoch: int, step: int | None) -> None:
    if not math.isfinite(value):
        where = f"epoch {epoch + 1}" + (f", step {step + 1}" if step is not None else "")
        raise FloatingPointError(
            f"convattn train: the training loss became {value} at {where}; lower --lr or use "
            "--amp off"
        )


def _dtype_name(dtype: torch.dtype | None) -> str:
    return "off" if dtype is None else str(dtype).removeprefix("torch.")


def _atomic_copy(source: Path, target: Path) -> None:
    def write(handle: Any) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, handle)

    atomic_write(target, write)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - the train extra installs tqdm
        return None
    return tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True)


def _echo(text: str) -> None:
    try:
        from tqdm.auto import tqdm

        tqdm.write(text, file=sys.stderr)
    except ImportError:  # pragma: no cover
        print(text, file=sys.stderr)


def plot_curves(history: Sequence[dict[str, float]], path: str | os.PathLike[str]) -> Path | None:
    """Loss and accuracy per epoch (train and validation) as a PNG; None without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("convattn train: matplotlib is not installed, no curves.png", file=sys.stderr)
        return None
    if not history:
        return None
    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [r["train_loss"] for r in history], marker="o", label="train")
    loss_ax.plot(epochs, [r["val_loss"] for r in history], marker="o", label="val")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    acc_ax.plot(epochs, [r["train_acc"] for r in history], marker="o", label="train")
    acc_ax.plot(epochs, [r["val_acc"] for r in history], marker="o", label="val")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return atomic_write(path, lambda h: h.write(buffer.getvalue()))


def train(config: TrainConfig | None = None, **overrides: Any) -> TrainResult:
    """Train a model as ``convattn train`` does; ``overrides`` replace fields of ``config``.

    Joins the torchrun process group when launched by torchrun. Raises ValueError for a bad
    option, CheckpointError (a ValueError) for an unreadable or mismatched checkpoint, and
    FloatingPointError when the loss diverges.
    """
    base = config or TrainConfig()
    if overrides:
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(TrainConfig)})
        if unknown:
            raise TypeError(f"train: unknown options {unknown}")
        base = dataclasses.replace(base, **overrides)
    cfg = base.resolved()
    threads = torch.get_num_threads()
    try:
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        with _distributed(cfg.device) as ctx:
            return _Trainer(cfg, ctx).run()
    finally:
        torch.set_num_threads(threads)
