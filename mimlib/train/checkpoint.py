"""Checkpoints: written atomically, loaded safely, rolling copies for automatic resume."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from mimlib.models.checkpoint_io import CheckpointError, read_checkpoint  # noqa: F401 (re-exported)


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``.

    A job killed mid-write leaves the previous file intact, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load(
    path: str | Path, map_location: str | torch.device = "cpu", require: Iterable[str] = ()
) -> dict[str, Any]:
    """Load a mimscale checkpoint dict with ``weights_only=True`` (no arbitrary code from pickles).

    A missing, empty, foreign, damaged or non-dict file, or one without the top-level keys in
    ``require``, raises :class:`~mimlib.models.checkpoint_io.CheckpointError` (a RuntimeError)
    naming the file and what is wrong.
    """
    return read_checkpoint(path, map_location, trust_hint=None, require=require)


_ROLLING = re.compile(r"^iter_(\d+)\.pt$")


def rolling_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """(iteration, path) of the rolling checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _ROLLING.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_rolling(obj: Any, folder: str | Path, iteration: int, keep: int = 2) -> Path:
    """Save ``iter_<iteration>.pt`` in ``folder`` and prune all but the newest ``keep``."""
    path = Path(folder) / f"iter_{iteration:09d}.pt"
    save_atomic(obj, path)
    for _, old in rolling_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    # A save that SIGKILL cut off (e.g. past Slurm's KillWait) leaves its temporary file behind.
    for stale in Path(folder).glob(".iter_*.pt.tmp*"):
        stale.unlink(missing_ok=True)
    return path
