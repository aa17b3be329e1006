"""Experiment tracking: a training job's metric records, also as TensorBoard scalars and --
when the config's ``tracking`` block asks -- as W&B and MLflow metrics.

Every record a job logs (:class:`mimlib.train.metrics.JsonlLogger`) reaches a :class:`Tracker`
on the main rank, which fans it out to its sinks. A record's step is its ``iter``: the job's
global iteration (optimiser update), so the trunk segments of a model x dataset, its decay
branches and a resumed job all line up on one axis. Each other number in it becomes one
scalar, named by :func:`tag` (``train/loss``, ``train/lr``, ``val/loss``, ``val/top1``, ...).

One run per job folder (the folder of its declared log): the trunk's segments share
``<results>/pretrain/<model>/<dataset>/trunk``, each decay branch and fine-tuning job has its
own. A resumed job continues its run without duplicated points:

* TensorBoard: a new event file in the same folder, written with ``purge_step = start + 1``,
  so a reader drops what the killed job had logged after the resume point (the resumed job
  logs those iterations again, with the same values);
* W&B: the run id is a pure function of the run (its name, the recipe and the seed),
  ``resume="allow"``; points up to the last step already logged are skipped (kept in
  ``<resume_dir>/tracking.json`` while the job runs, and W&B's own step when it resumes);
* MLflow: the run is found again by its ``mimscale.run_id`` tag and continued; a metric's
  points up to its last logged step are skipped.

W&B and MLflow are imported only when enabled; a missing package is a :class:`TrackingError`
naming the config key. A sink that fails while the job runs is switched off with a warning:
tracking never stops a training job.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

from mimlib.provenance import recipe_hash
from mimlib.train.metrics import write_json_atomic

log = logging.getLogger(__name__)

#: the defaults of the config's ``tracking`` block (mimlib/schema/config.schema.yaml)
DEFAULTS: dict[str, Any] = {
    "tensorboard": True,
    "wandb": {"enabled": False, "project": "mimscale", "entity": None, "mode": "online", "dir": None},
    "mlflow": {"enabled": False, "tracking_uri": None, "experiment": "mimscale"},
}

STEP = "iter"  # the record key that is the step
VAL_KEYS = {"top1", "top5", "eval_s"}  # classification's scores, detection's evaluation time
VAL_PREFIXES = ("val_", "box_", "mask_")
STATE_FILE = "tracking.json"  # in the job's resume folder: the last step each sink logged


class TrackingError(RuntimeError):
    """A tracking backend is enabled but cannot be used (its package is not installed)."""


def tag(key: str) -> str:
    """The scalar's name of a record key: ``val/...`` for validation and scores, else ``train/...``."""
    if key == "train_loss":
        return "train/loss"
    if key.startswith("val_"):
        return "val/" + key[4:]
    if key in VAL_KEYS or key.startswith(VAL_PREFIXES):
        return "val/" + key
    return "train/" + key


def scalars(record: Mapping[str, Any]) -> tuple[int | None, dict[str, float]]:
    """(step, {tag: value}) of a record; numbers only (None, strings, lists, bools are left out)."""
    step = record.get(STEP)
    values = {tag(k): float(v) for k, v in sorted(record.items())
              if k != STEP and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return (None if step is None else int(step)), values


def settings(spec: Mapping[str, Any] | None) -> dict[str, Any]:
    """``spec`` (a tracking block, possibly partial) over :data:`DEFAULTS`."""
    spec = dict(spec or {})
    out = {"tensorboard": bool(spec.get("tensorboard", DEFAULTS["tensorboard"]))}
    for name in ("wandb", "mlflow"):
        out[name] = {**DEFAULTS[name], **(spec.get(name) or {})}
    if "run" in spec:
        out["run"] = dict(spec["run"] or {})
    return out


def run_id(name: str, recipe: Mapping[str, Any], seed: int) -> str:
    """The run's id: the same job folder, recipe and seed always continue the same run."""
    return hashlib.sha256(json.dumps([name, recipe_hash(dict(recipe)), seed]).encode()).hexdigest()[:24]


def _import(package: str, key: str):
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise TrackingError(f"{key}.enabled is true, but {package!r} cannot be imported ({exc}); "
                            f"pip install 'mimscale[tracking]', or set {key}.enabled: false") from None


class TensorBoardSink:
    name = "tensorboard"

    def __init__(self, log_dir: Path, start: int):
        from torch.utils.tensorboard import SummaryWriter

        log_dir.mkdir(parents=True, exist_ok=True)
        _after_existing_event_files(log_dir)
        # A reader drops every point at step >= purge_step from the folder's older event
        # files: what a killed job logged after the resume point. A fresh job (start 0)
        # replaces the folder's whole run.
        self.writer = SummaryWriter(str(log_dir), purge_step=start + 1)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # a killed job keeps what it logged, as its JSON-lines log does

    def close(self, finished: bool) -> None:
        self.writer.close()


def _after_existing_event_files(log_dir: Path) -> None:
    """Wait until this second is later than every event file's: TensorBoard reads a folder's
    files in name order, and the name starts with the second it was opened."""
    stamps = []
    for p in log_dir.glob("events.out.tfevents.*"):
        try:
            stamps.append(int(p.name.split(".")[3]))
        except (IndexError, ValueError):
            continue
    deadline = time.time() + 2.0
    while stamps and int(time.time()) <= max(stamps) and time.time() < deadline:
        time.sleep(0.05)


class WandbSink:
    """A W&B run; the last step of each metric it logged is kept in the job's resume folder,
    so a resumed job (also in offline mode, where W&B cannot tell) skips what was logged."""

    name = "wandb"

    def __init__(self, cfg: Mapping[str, Any], run: Mapping[str, Any], state_dir: Path | None):
        wandb = _import("wandb", "tracking.wandb")
        self.state_file = None if state_dir is None else Path(state_dir) / STATE_FILE
        tags = run["tags"]
        self.run = wandb.init(
            project=cfg["project"], entity=cfg["entity"], mode=cfg["mode"], dir=cfg["dir"],
            id=run["id"], name=run["name"], group=run["group"], resume="allow", reinit="create_new",
            tags=[str(v) for v in tags.values() if v is not None][:20],
            config={**tags, "seed": run["seed"], "recipe": run["recipe"], "recipe_hash": run["recipe_hash"]},
        )
        self.last: dict[str, int] = self._load()
        if getattr(self.run, "resumed", False) and self.run.step:  # W&B's server knows where the run is
            self.floor = int(self.run.step) - 1
        else:
            self.floor = -1

    def _load(self) -> dict[str, int]:
        if self.state_file is None or not self.state_file.exists():
            return {}
        try:
            return {str(k): int(v) for k, v in json.loads(self.state_file.read_text()).get(self.name, {}).items()}
        except (ValueError, OSError, AttributeError, TypeError):
            return {}

    def log(self, step: int, values: Mapping[str, float]) -> None:
        fresh = {k: v for k, v in values.items() if step > max(self.last.get(k, -1), self.floor)}
        if not fresh:
            return  # logged before the job was resumed
        self.run.log(fresh, step=step)
        self.last.update({k: step for k in fresh})
        if self.state_file is not None:
            write_json_atomic({self.name: self.last}, self.state_file)

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)
        if finished and self.state_file is not None:
            self.state_file.unlink(missing_ok=True)


class MlflowSink:
    name = "mlflow"

    def __init__(self, cfg: Mapping[str, Any], run: Mapping[str, Any]):
        uri = cfg["tracking_uri"]
        if uri is not None and (uri.startswith("file:") or "://" not in uri):
            # a folder store named in the config: MLflow 3 asks for this opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        _import("mlflow", "tracking.mlflow")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(cfg["experiment"])
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(cfg["experiment"])
        found = self.client.search_runs([exp_id], filter_string=f"tags.`mimscale.run_id` = '{run['id']}'",
                                        max_results=1)
        self.last: dict[str, int] = {}
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            for key in found[0].data.metrics:
                self.last[key] = max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=-1)
        else:
            tags = {f"mimscale.{k}": str(v) for k, v in run["tags"].items() if v is not None}
            created = self.client.create_run(exp_id, run_name=run["name"], tags={
                **tags, "mimscale.run_id": run["id"], "mimscale.group": run["group"],
                "mimscale.recipe_hash": run["recipe_hash"]})
            self.run_id = created.info.run_id
            params = [Param(k, json.dumps(v)[:6000]) for k, v in sorted(run["recipe"].items())]
            for i in range(0, len(params), 100):  # MLflow's batch limit
                self.client.log_batch(self.run_id, params=params[i:i + 100])
            self.client.log_batch(self.run_id, params=[Param("seed", str(run["seed"]))])

    def log(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        fresh = [Metric(k, v, now, step) for k, v in values.items() if step > self.last.get(k, -1)]
        if fresh:
            self.client.log_batch(self.run_id, metrics=fresh)
            for m in fresh:
                self.last[m.key] = step

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if finished else "KILLED")


_OPEN: dict[str, "Tracker"] = {}  # run id -> the tracker that has it open in this process


class Tracker:
    """Fans a job's records out to its sinks (main rank only); :meth:`close` at the job's end.

    A job that ends otherwise (an error, SIGTERM's exit 143) is closed at interpreter exit,
    its W&B / MLflow run marked as not finished.
    """

    def __init__(self, sinks: list[Any], run_id: str | None = None):
        self.sinks = list(sinks)
        self.closed = False
        self.run_id = run_id
        if run_id is not None:
            _OPEN[run_id] = self
        atexit.register(self._at_exit)

    def log(self, record: Mapping[str, Any]) -> None:
        step, values = scalars(record)
        if step is None or not values:
            return
        for sink in list(self.sinks):
            try:
                sink.log(step, values)
            except Exception as exc:  # never stop a training job for its tracking
                log.warning("tracking: %s failed (%s: %s); no more %s logging for this job",
                            sink.name, type(exc).__name__, exc, sink.name)
                self.sinks.remove(sink)

    def close(self, finished: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self._at_exit)
        if _OPEN.get(self.run_id) is self:
            del _OPEN[self.run_id]
        for sink in self.sinks:
            try:
                sink.close(finished)
            except Exception as exc:
                log.warning("tracking: closing %s failed (%s: %s)", sink.name, type(exc).__name__, exc)

    def _at_exit(self) -> None:
        self.close(finished=False)


def open_tracker(spec: Mapping[str, Any] | None, *, log_dir: str | Path, state_dir: str | Path | None, start: int,
                 is_main: bool, recipe: Mapping[str, Any], seed: int, tags: Mapping[str, Any],
                 group: str) -> Tracker | None:
    """The job's tracker, or None (``spec`` None, another rank, or nothing enabled).

    ``log_dir``: the job's folder (TensorBoard's run, and the run's name); ``start``: the
    iteration the job starts from; ``tags``/``group``: the cell the job belongs to.
    ``spec["run"]`` may override ``name``, ``group`` and ``tags``.
    """
    if spec is None or not is_main:
        return None
    s = settings(spec)
    override = s.get("run", {})
    name = str(override.get("name") or log_dir)
    run = {"name": name, "group": str(override.get("group") or group),
           "tags": {**{k: v for k, v in tags.items()}, **dict(override.get("tags") or {})},
           "seed": seed, "recipe": _jsonable(recipe), "recipe_hash": recipe_hash(dict(recipe)),
           "id": run_id(name, recipe, seed)}
    if (stale := _OPEN.get(run["id"])) is not None:
        stale.close(finished=False)  # the same job failed earlier in this process (its exit never came)
    sinks: list[Any] = []
    if s["tensorboard"]:
        sinks.append(TensorBoardSink(Path(log_dir), start))
    if s["wandb"]["enabled"]:
        sinks.append(WandbSink(s["wandb"], run, None if state_dir is None else Path(state_dir)))
    if s["mlflow"]["enabled"]:
        sinks.append(MlflowSink(s["mlflow"], run))
    return Tracker(sinks, run["id"]) if sinks else None


def _jsonable(obj: Any) -> Any:
    out = json.loads(json.dumps(obj, default=str))
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()} \
        if isinstance(out, dict) else out
