"""Crash-safe files and resumable training state.

Every file is written to a temporary file in the destination's directory, flushed and fsynced,
then moved over the destination with os.replace (atomic on POSIX and Windows within one file
system), and the directory entry is fsynced. A crash at any point leaves either the old file or
the new one, never a truncated mix.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch

CHECKPOINT_FORMAT = "nnclr_fast.checkpoint/1"


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory (Windows).
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """torch.save ``state`` (plus a format tag) to ``path`` atomically."""
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **state}, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Uses ``weights_only=True``: a checkpoint holds tensors, numbers, strings and containers
    only, so nothing in it can run code. Raises FileNotFoundError or ValueError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise ValueError(f"checkpoint {str(path)!r} is unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not an nnclr_fast checkpoint (format {CHECKPOINT_FORMAT!r})")
    return state


def check_config(saved: Mapping[str, Any], current: Mapping[str, Any], keys: Iterable[str], *, source: str = "checkpoint") -> None:
    """Raise ValueError listing every key in ``keys`` whose value differs between the two."""
    diffs = [f"{k}: {source} has {saved.get(k)!r}, this run has {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]
    if diffs:
        raise ValueError(f"{source} was written by a different configuration:\n  " + "\n  ".join(diffs))


def capture_rng_state(generators: Optional[Mapping[str, torch.Generator]] = None) -> dict:
    """Global torch (CPU and every CUDA device) RNG states plus the named generators'."""
    state = {"torch": torch.get_rng_state(), "generators": {k: g.get_state() for k, g in (generators or {}).items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any], generators: Optional[Mapping[str, torch.Generator]] = None) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    saved = state.get("generators", {})
    for name, gen in (generators or {}).items():
        if name not in saved:
            raise ValueError(f"checkpoint has no state for random generator {name!r}")
        gen.set_state(saved[name].cpu())
