"""The one training loop every engine runs: SimMIM pre-training, classification, detection
and segmentation fine-tuning each describe their task in a :class:`TrainTask` and call
:func:`train`.

The loop owns what is the same for every task: the lr of each optimiser update (from the
task's schedule, :mod:`mimlib.train.schedule`), gradient accumulation with DDP's ``no_sync``
on all but the last micro-batch, the recipe's autocast, gradient clipping, one all-reduce
that carries the losses and "a rank got SIGTERM", the non-finite stop, the progress bar,
preemption (save, then exit 143) and rolling saves. The task owns its model, data, loss,
metric log and evaluation (a :class:`TrainTask` subclass: ``forward``, ``after_update``, ...).

Counted in optimiser updates: ``k`` is the 0-based update being made, ``done = k + 1`` the
number made. Every random draw of an update is seeded by the task from ``k`` (``begin_update``
/ ``forward``), so where a run was cut into jobs never changes its result.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mimlib.train.distributed import DistInfo, barrier
from mimlib.train.precision import autocast_context
from mimlib.train.preemption import StopRequest, reduce_mean_and_stop, stop_after_saving
from mimlib.train.schedule import set_lr
from mimlib.train.step import checked_step


def wrap_model(model: nn.Module, info: DistInfo, compile_model: bool) -> tuple[nn.Module, nn.Module]:
    """(DDP-wrapped model, the module the training forward calls: compiled if asked).

    Only the training forward is compiled; evaluation and checkpoints use ``model`` itself.
    """
    ddp_model: nn.Module = model
    if info.distributed:
        ddp_model = DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    return ddp_model, (torch.compile(ddp_model) if compile_model else ddp_model)


@dataclass
class Update:
    """What the loop hands ``after_update``: update ``k`` was made with ``lr``."""

    k: int
    lr: float
    losses: torch.Tensor  # the task's logged loss parts, averaged over micro-batches and ranks
    grad_norm: torch.Tensor  # before clipping

    @property
    def done(self) -> int:
        return self.k + 1


@dataclass(kw_only=True)
class TrainTask:
    """One task's side of the loop: the fields every task has, and hooks to override.

    A task subclasses it (a dataclass too, ``kw_only``) with its own state -- its metric log,
    evaluation data, resume state -- and implements :meth:`lr`, :meth:`forward`, :meth:`save`
    and :meth:`should_save`; the other hooks have defaults.
    """

    name: str  # names the job in errors ("coco swinv2_b")
    model: nn.Module  # unwrapped: clipping, saving and evaluation use it
    optimizer: torch.optim.Optimizer
    recipe: Mapping[str, Any]  # clip_grad, precision, compile and the task's own keys
    info: DistInfo
    batches: Iterator[Any]  # this rank's micro-batches from update ``start`` on
    start: int
    total: int
    accum: int  # micro-batches per update on each rank
    resume_dir: Path
    progress: bool = True
    desc: str = ""  # the progress bar's label (default: name)

    def lr(self, k: int) -> float:
        """The lr of update ``k`` before layer-decay scaling (a :mod:`mimlib.train.schedule` function)."""
        raise NotImplementedError

    def begin_update(self, k: int) -> None:
        """Before update ``k``'s micro-batches: e.g. seed the global RNG from ``k``."""

    def forward(self, train_model: nn.Module, batch: Any, k: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to back-propagate, float64 loss parts to log) of one micro-batch, under autocast."""
        raise NotImplementedError

    def after_update(self, update: Update) -> Mapping[str, str] | None:
        """After the optimiser step: the task's metric log and evaluation; the bar's postfix."""
        return None

    def save(self, done: int) -> None:
        """Write the rolling state after ``done`` updates (the main rank writes)."""
        raise NotImplementedError

    def should_save(self, done: int) -> bool:
        raise NotImplementedError

    def where(self, k: int) -> str:
        """Update ``k`` in the non-finite error."""
        return f"iteration {k}"

    def stop_message(self, done: int) -> str:
        return f"{self.name}: stopped by SIGTERM after iteration {done} of {self.total}; state saved in {self.resume_dir}"


def train(task: TrainTask) -> None:
    """Make updates ``start .. total - 1`` of ``task``."""
    info, model, optimizer = task.info, task.model, task.optimizer
    ddp_model, train_model = wrap_model(model, info, bool(task.recipe["compile"]))
    clip = task.recipe["clip_grad"] or float("inf")
    bar = None
    if task.progress and info.is_main:
        from tqdm import tqdm

        bar = tqdm(total=task.total, initial=task.start, desc=task.desc or task.name, unit="it", dynamic_ncols=True)
    model.train()
    with StopRequest() as stop:  # SIGTERM / SIGINT -> save and raise Preempted after this update
        for k in range(task.start, task.total):
            lr = task.lr(k)
            set_lr(optimizer, lr)
            task.begin_update(k)
            step: torch.Tensor | None = None
            for a in range(task.accum):
                batch = next(task.batches)
                sync = a == task.accum - 1 or not info.distributed
                with (contextlib.nullcontext() if sync else ddp_model.no_sync()), \
                        autocast_context(task.recipe, info.device):
                    loss, parts = task.forward(train_model, batch, k, a)
                (loss / task.accum).backward()
                if step is None:
                    step = torch.zeros_like(parts)
                step += parts / task.accum
            assert step is not None  # accum >= 1
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            # One reduction carries the losses and "a rank was asked to stop", so every rank
            # stops after the same update. The gradients are all-reduced: the norm agrees too.
            reduced, stop_now = reduce_mean_and_stop(step, stop, info)
            checked_step(optimizer, reduced, gnorm, task.name, task.where(k), task.resume_dir)
            done = k + 1
            postfix = task.after_update(Update(k, lr, reduced, gnorm))
            if bar is not None:
                if postfix:
                    bar.set_postfix(postfix)
                bar.update(1)
            if stop_now and done < task.total:
                stop_after_saving(lambda: task.save(done), task.stop_message(done), info, stop)
            if task.should_save(done):
                task.save(done)
                barrier(info)
    if bar is not None:
        bar.close()


class IntervalLog:
    """Means of named values over the updates since the last log record (and their rate).

    ``state()`` (merged into a rolling checkpoint's extra state) and the ``state`` argument
    (that extra state) carry an open interval through a rolling checkpoint,
    so a resumed job's log matches an uninterrupted one's.
    """

    def __init__(self, state: Mapping[str, Any] | None = None):
        state = state or {}
        self.sums: dict[str, float] = dict(state.get("interval_sums", {}))
        self.n = int(state.get("interval_iters", 0))
        self.reset_clock()

    def reset_clock(self) -> None:
        self.t0 = time.perf_counter()

    def add(self, **values: float) -> None:
        for name, v in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(v)
        self.n += 1

    def means(self) -> dict[str, float]:
        return {name: v / self.n for name, v in self.sums.items()}

    def rate(self, per_update: float) -> float:
        """Per second since the interval opened (images/s with ``per_update`` = the global batch)."""
        return self.n * per_update / max(time.perf_counter() - self.t0, 1e-9)

    def clear(self) -> None:
        self.sums.clear()
        self.n = 0
        self.reset_clock()

    def state(self) -> dict[str, Any]:
        return {"interval_sums": dict(self.sums), "interval_iters": self.n}
