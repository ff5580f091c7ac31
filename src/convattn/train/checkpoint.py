"""Training checkpoints: atomic writes, ``weights_only`` loads, compatibility checks and the
random-number-generator states that make a resumed run continue exactly.

A checkpoint is a plain dict (tensors, numbers, strings, lists, dicts), so it loads with
``torch.load(..., weights_only=True)``:

``format``, ``version``, ``epoch`` (epochs completed), ``config`` (the run's recipe),
``model``, ``optimizer``, ``scheduler``, ``scaler`` (state dicts), ``rng`` (one entry per
process: torch, CUDA, numpy, python and the data-order generator), ``history`` (the metrics
rows so far), ``best_val_acc``, ``world_size``.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "atomic_write",
    "capture_rng_state",
    "check_compatible",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "convattn.train.checkpoint"
CHECKPOINT_VERSION = 1
_REQUIRED_KEYS = ("format", "version", "epoch", "config", "model", "optimizer", "scheduler")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that belongs to a different run."""


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> Path:
    """Write a file through ``write(fileobj)`` into a temporary file in the same folder, flush
    it to disk, then rename it over ``path``. If ``write`` raises, ``path`` keeps its previous
    content and the temporary file is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp makes 0600; use the usual mode
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any]) -> Path:
    """Save a checkpoint dict atomically (see :func:`atomic_write`); adds ``format`` and
    ``version``."""
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    missing = [k for k in _REQUIRED_KEYS if k not in payload]
    if missing:
        raise ValueError(f"save_checkpoint: the state lacks {missing}")
    return atomic_write(path, lambda handle: torch.save(payload, handle))


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a training checkpoint with ``weights_only=True`` on the CPU.

    Raises:
        CheckpointError (a ValueError): the file is missing, truncated, not a torch file, or
            not a convattn training checkpoint; the message names the file.
    """
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"checkpoint {file}: no such file")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, garbage bytes, unsafe pickle, ...
        raise CheckpointError(
            f"checkpoint {file}: cannot be read (truncated or corrupt file?): "
            f"{type(exc).__name__}: {_first_line(exc)}"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {file}: not a convattn training checkpoint (expected a dict with "
            f"format={CHECKPOINT_FORMAT!r})"
        )
    if not isinstance(state.get("version"), int) or state["version"] > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {file}: format version {state.get('version')!r} is newer than this "
            f"convattn reads ({CHECKPOINT_VERSION})"
        )
    missing = [k for k in _REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {file}: incomplete, missing {missing}")
    return state


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


def check_compatible(
    state: Mapping[str, Any],
    config: Mapping[str, Any],
    keys: Iterable[str],
    path: str | os.PathLike[str],
) -> None:
    """Raise CheckpointError when the checkpoint's recipe differs from ``config`` on ``keys``
    (model, attention, data, ...), listing every difference."""
    saved = state.get("config", {})
    differences = [
        f"{key}: checkpoint has {saved.get(key)!r}, this run has {config.get(key)!r}"
        for key in keys
        if saved.get(key) != config.get(key)
    ]
    if differences:
        raise CheckpointError(
            f"checkpoint {path} belongs to a different run ({'; '.join(differences)}); "
            "use the same options to resume, or another --out for a new run"
        )


def capture_rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """The state of every random number generator a training step can draw from."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": str(np_state["bit_generator"]),
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": _python_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng_state(state: Mapping[str, Any], generator: torch.Generator | None = None) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {
                "key": np_state["key"].numpy().astype(np.uint32),
                "pos": int(np_state["pos"]),
            },
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        }
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def _python_state_to_plain(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]
