"""convattn's native CPU kernels: plain C (no PyTorch headers), compiled with the system's C
compiler on first use and loaded with :mod:`ctypes`.

The library compiles this folder's C files into one shared library: ``cbam_train.c`` and
``se_train.c``, the training tails of CBAM and of SE / ECA; ``channel_eval.c``,
``cbam_eval.c`` and ``gc_eval.c``, the inference tails of SE, ECA, scSE, CBAM and GC, and
``residual_eval.c``, that of a block without attention. It
builds once per source version, compiler and machine, into
``$CONVATTN_CACHE_DIR`` (default ``$XDG_CACHE_HOME/convattn`` or ``~/.cache/convattn``), which
takes about a second; later processes load the cached library. Without a compiler, or with
``CONVATTN_NATIVE=0`` in the environment, :func:`library` returns None and the fast paths that
would use it fall back to their PyTorch implementations (same results, more memory traffic).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

__all__ = ["NativeBuildError", "build", "cache_dir", "library"]

SOURCES = sorted(Path(__file__).parent.glob("*.c"))
HEADERS = sorted(Path(__file__).parent.glob("*.h"))
# -ffp-contract=off: x * s + b must round as in eager PyTorch (a multiply, then an add), so
# that a value recomputed in backward equals the maximum the forward pass found.
FLAGS = [
    "-O3",
    "-march=native",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fopenmp",
    "-fPIC",
    "-shared",
]
LIBS = ["-lm"]

_L = ctypes.c_long
_I = ctypes.c_int
# (name, argument types): every pointer is passed as a c_void_p address.
_SIGNATURES: dict[str, list[Any]] = {
    "cbam_row_stats": [ctypes.c_void_p] * 1 + [_L] * 3 + [ctypes.c_void_p] * 6 + [_I],
    "cbam_spatial_pool": [ctypes.c_void_p] * 4 + [_L] * 3 + [ctypes.c_void_p] * 2 + [_I],
    "cbam_apply": [ctypes.c_void_p] * 6 + [_L] * 3 + [ctypes.c_void_p] + [_I],
    "cbam_backward_mask": [ctypes.c_void_p] * 7 + [_L] * 3 + [ctypes.c_void_p] * 2 + [_I],
    "cbam_backward_gate": [ctypes.c_void_p] * 10 + [_L] * 3 + [ctypes.c_void_p] * 2 + [_I],
    "cbam_backward_sums": [ctypes.c_void_p] * 14 + [_L] * 3 + [ctypes.c_void_p] * 2 + [_I],
    "cbam_backward_input": [ctypes.c_void_p] * 16 + [_L] * 3 + [ctypes.c_void_p] + [_I],
    # the inference tails: (plan, map, identity, sizes..., out, threads) -> 0 or -1 (memory)
    "cbam_eval_tail": [ctypes.c_void_p] * 3 + [_L] * 3 + [ctypes.c_void_p, _I],
    "gc_eval_tail": [ctypes.c_void_p] * 3 + [_L] * 2 + [ctypes.c_void_p, _I],
    "residual_eval_tail": [ctypes.c_void_p] * 3 + [_L] * 2 + [ctypes.c_void_p, _I],
    "se_apply": [ctypes.c_void_p] * 5 + [_L] * 3 + [ctypes.c_void_p, _I],
    "se_backward_mask": [ctypes.c_void_p] * 4 + [_L] * 3 + [ctypes.c_void_p] * 2 + [_I],
    "se_backward_input": [ctypes.c_void_p] * 8 + [_L] * 3 + [ctypes.c_void_p, _I],
    "channel_eval_tail": [ctypes.c_void_p] * 3 + [_L] * 2 + [ctypes.c_void_p, _I],
}

# the functions that return a status (0, or -1 when their workspace cannot be allocated)
_RETURN_STATUS = frozenset(
    {"cbam_eval_tail", "channel_eval_tail", "gc_eval_tail", "residual_eval_tail"}
)


class NativeBuildError(RuntimeError):
    """The C compiler is missing or failed; the message carries its output."""


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$CONVATTN_CACHE_DIR``, else ``$XDG_CACHE_HOME/convattn``,
    else ``~/.cache/convattn``."""
    explicit = os.environ.get("CONVATTN_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "convattn"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def _machine_key() -> str:
    """What ``-march=native`` depends on: the architecture and the CPU's feature flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line
                    break
    except OSError:
        pass
    return f"{platform.machine()}|{platform.processor()}|{flags}"


def _library_path(compiler: str) -> Path:
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    key = hashlib.sha256()
    files = (*SOURCES, *HEADERS)
    parts = [*(f.read_bytes() for f in files), " ".join(FLAGS + LIBS).encode()]
    for part in (*parts, version.encode()):
        key.update(part)
        key.update(b"\0")
    key.update(_machine_key().encode())
    return cache_dir() / f"kernels-{key.hexdigest()[:20]}.so"


def build() -> Path:
    """Compile the kernels (unless the cache holds them) and return the shared library's path;
    :class:`NativeBuildError` when no C compiler is found or it fails. The library is written
    under a temporary name and renamed into place, so a concurrent or interrupted build never
    leaves a partial file under the final name."""
    compiler = _compiler()
    if compiler is None:
        raise NativeBuildError(
            "convattn native kernels: no C compiler found (looked for $CC, cc and gcc)"
        )
    path = _library_path(compiler)
    if path.exists():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # an unwritable home: a private folder under the temporary directory
        fallback = Path(tempfile.gettempdir()) / f"convattn-{os.getuid()}"
        fallback.mkdir(mode=0o700, exist_ok=True)
        path = fallback / path.name
        if path.exists():
            return path
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".so.tmp", dir=path.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [compiler, *FLAGS, "-o", tmp, *map(str, SOURCES), *LIBS],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            raise NativeBuildError(
                f"convattn native kernels: {compiler} failed (exit {result.returncode}):\n"
                f"{result.stderr.strip()}"
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


_lock = threading.Lock()
_loaded: ctypes.CDLL | None = None
_failed = False


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them on first use; None when ``CONVATTN_NATIVE=0`` is set
    before that first use or they cannot be built or loaded (a warning says why, once per
    process). Once loaded they stay (the check is one global read: it runs per block)."""
    global _loaded, _failed
    if _loaded is not None:
        return _loaded
    if os.environ.get("CONVATTN_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if _failed:
        return None
    with _lock:
        if _loaded is not None or _failed:
            return _loaded
        try:
            lib = ctypes.CDLL(str(build()))
            for name, argtypes in _SIGNATURES.items():
                function = getattr(lib, name)
                function.argtypes = argtypes
                function.restype = _I if name in _RETURN_STATUS else None
        except (NativeBuildError, OSError, AttributeError) as err:
            _failed = True
            warnings.warn(
                f"{err}; convattn falls back to its PyTorch fast paths "
                "(set CONVATTN_NATIVE=0 to silence this)",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
        _loaded = lib
    return _loaded
