"""Metric logs: one JSON object per line, appended; readable by pandas and the aggregation."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable


class JsonlLogger:
    """A job's metric log. With a ``tracker`` (:func:`mimlib.train.tracking.open_tracker`)
    every record also goes to TensorBoard / W&B / MLflow: the one place every engine logs."""

    def __init__(self, path: str | Path, enabled: bool = True, tracker: Any = None):
        self.path = Path(path)
        self.enabled = enabled
        self.tracker = tracker if enabled else None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
        if self.tracker is not None:
            self.tracker.log(record)

    def close(self) -> None:
        """The job is complete: close its tracking runs as finished."""
        if self.tracker is not None:
            self.tracker.close(finished=True)

    def truncate_after(self, iteration: int) -> None:
        """Drop records past ``iteration``: a resumed job re-logs them exactly as before."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in read_jsonl(self.path) if r.get("iter", 0) <= iteration]
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in kept)
        os.replace(tmp, self.path)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                records.append(json.loads(line))
    return records


def write_json_atomic(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def copy_atomic(src: str | Path, dst: str | Path) -> None:
    """Copy ``src`` to ``dst`` through a temporary file and a rename: readers of ``dst`` never
    see half a file (``src`` may live on another filesystem, e.g. a resume folder)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()


def merge_curves(logs: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Concatenate job logs (trunk segments, then a branch) into one curve ordered by iteration."""
    records: list[dict[str, Any]] = []
    for p in logs:
        records.extend(read_jsonl(p))
    return sorted(records, key=lambda r: (r["iter"], "val_loss" in r))
