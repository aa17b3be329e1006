"""Checkpoints: written atomically, loaded safely, rolling copies for automatic resume."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from mimlib.models.checkpoint_io import CheckpointError, read_checkpoint  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


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


# --- resuming: the newest intact rolling checkpoint, and only for the job that wrote it --------

DAMAGED_SUFFIX = ".damaged"


def _set_aside(path: Path) -> Path:
    """Rename an unreadable rolling checkpoint to ``<name>.damaged`` (never delete it)."""
    target = path.with_name(path.name + DAMAGED_SUFFIX)
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}{DAMAGED_SUFFIX}.{n}")
        n += 1
    os.replace(path, target)
    return target


def load_rolling(
    folder: str | Path, map_location: str | torch.device = "cpu", below: int | None = None,
    set_aside: bool = True,
) -> tuple[int, Path, dict[str, Any]] | None:
    """(iteration, path, state) of the newest *readable* rolling checkpoint in ``folder`` (only
    those before iteration ``below``, if given), or None when there is none.

    A rolling checkpoint that cannot be read (truncated by a full disk, damaged by a copy, ...)
    does not stop the job: it is renamed to ``<name>.damaged`` (kept for inspection; only the
    main rank renames, ``set_aside``), a warning names it, and the previous one is used.
    """
    for it, path in reversed(rolling_checkpoints(folder)):
        if below is not None and it >= below:
            continue
        try:
            return it, path, load(path, map_location)
        except CheckpointError as exc:
            where = "left for rank 0 to set aside"
            if set_aside and path.exists():
                try:
                    where = f"renamed to {_set_aside(path).name}"
                except OSError as err:  # a read-only folder, say
                    where = f"left in place (cannot rename it: {err})"
            log.warning("rolling checkpoint %s is unusable (%s); %s (kept, not deleted), resuming from the "
                        "previous rolling checkpoint instead", path, exc, where)
    return None


def agree_across_ranks(found: tuple[int, Path, dict[str, Any]] | None, info: Any, folder: str | Path) -> None:
    """Every rank must resume from the same rolling checkpoint (one rank may fail to read a file
    another can, e.g. an I/O error on one node): otherwise stop with a message, never train on."""
    if not getattr(info, "distributed", False):
        return
    import torch.distributed as dist

    it = torch.tensor([found[0] if found else -1, -(found[0] if found else -1)], device=info.device)
    dist.all_reduce(it, op=dist.ReduceOp.MAX)
    if int(it[0]) != -int(it[1]):
        raise CheckpointError(
            f"the ranks found different rolling checkpoints in {folder} (iterations {-int(it[1])} to {int(it[0])}; "
            "-1 is none): a file one rank could not read, see the warnings; rerun to retry"
        )


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, computed once per process per (path, size, mtime).

    What identifies a job's inputs (its manifest, its init checkpoint): a full hash, not a
    size/mtime guess, because a rebuilt manifest can have the same size and a copied file
    another mtime. Reading is streamed (1 MiB blocks): about 1 s per GB.
    """
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    digest = _SHA256_CACHE.get(key)
    if digest is None:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = _SHA256_CACHE[key] = h.hexdigest()
    return digest


_SHA256_CACHE: dict[tuple[str, int, int], str] = {}


class ResumeMismatchError(CheckpointError):
    """A resume state or an init checkpoint was written for another job definition."""


def show_value(value: Any) -> str:
    """A recorded value for a message: a SHA-256 shortened to 12 digits, anything else as repr."""
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return f"sha256 {value[:12]}..."
    return repr(value)


def identity_differences(recorded: Mapping[str, Any] | None, expected: Mapping[str, Any]) -> list[str]:
    """One phrase per key of ``expected`` that ``recorded`` lacks or has another value for."""
    if not recorded:
        return ["the state records no job identity (written by a mimscale that did not check them)"]
    out = []
    for key, want in expected.items():
        if key not in recorded:
            out.append(f"{key}: not recorded in the state, {show_value(want)} for this job")
        elif recorded[key] != want:
            out.append(f"{key}: {show_value(recorded[key])} in the state, {show_value(want)} for this job")
    out += [f"{key}: {show_value(recorded[key])} in the state, not part of this job" for key in recorded
            if key not in expected]
    return out


def check_resume_identity(state: Mapping[str, Any], path: str | Path, expected: Mapping[str, Any],
                          resume_dir: str | Path) -> None:
    """Raise :class:`ResumeMismatchError` unless the resume ``state`` (read from ``path``) was
    written by a job with the identity ``expected`` (its ``job_identity`` entry)."""
    differ = identity_differences(state.get("job_identity"), expected)
    if differ:
        raise ResumeMismatchError(
            f"resume state {path} was written for another definition of this job ({'; '.join(differ)}), "
            f"so it is not resumed. Nothing was deleted. To start this job over, move its resume folder "
            f"away (e.g. mv {resume_dir} {resume_dir}.old) and rerun; to continue the interrupted run "
            "instead, restore its settings"
        )
