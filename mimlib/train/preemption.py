"""SIGTERM and SIGINT handling shared by every training engine (pre-training and the three
fine-tuning tasks).

Slurm sends SIGTERM at a time limit, on preemption and on ``scancel``, then SIGKILL after
KillWait (~30 s). A training loop turns the signal into a flag (:class:`StopRequest`), carries the
flag in the all-reduce it already does for its loss (:func:`reduce_mean_and_stop`) so that every
rank stops after the same update, saves its rolling state and raises :class:`Preempted`; the CLI
exits 143 and Snakemake's retry (or Slurm's requeue) resumes from that state.

SIGINT (Ctrl-C: the terminal signals the whole process group, Snakemake and its jobs) is
handled the same way -- save after the current update, then exit 130 -- instead of Python's
``KeyboardInterrupt``, which threw the work since the last rolling checkpoint away. A process
that starts with SIGINT *ignored* keeps ignoring it: that is how a non-interactive shell starts
its background jobs (``cmd &``) and how ``nohup``-style launchers shield a job from the
terminal, a choice made on purpose by whoever started it, so StopRequest does not undo it.

The signal reaches every process of the job step, DataLoader workers included; a worker that dies
of it makes the main process raise "DataLoader worker exited unexpectedly" at a random point,
before anything is saved. :class:`SigtermSafeDataLoader` keeps the workers out of it: they are
forked with SIGTERM blocked (a signal landing while they start stays pending) and ignore it from
their first line of Python on; they exit with the main process, and SIGKILL still ends them.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Any, Callable, Iterator, NoReturn

import torch
from torch.utils.data import DataLoader

from mimlib.train.distributed import DistInfo, all_reduce_sum, barrier

log = logging.getLogger(__name__)


class Preempted(RuntimeError):
    """SIGTERM (time limit, preemption, scancel) or SIGINT (Ctrl-C): state saved, the rerun resumes."""

    exit_code = 143  # 128 + SIGTERM, what schedulers expect of a terminated job

    def __init__(self, message: str, signum: int = signal.SIGTERM) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + int(signum)  # 143 for SIGTERM, 130 for SIGINT (the shell's codes)


def _handled_signals() -> tuple[int, ...]:
    """SIGTERM always; SIGINT unless this process was started with it ignored (see above)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return (signal.SIGTERM,)
    return (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Turns SIGTERM and SIGINT into a flag the training loop checks after each update (main
    thread only; elsewhere, e.g. in a test runner's worker thread, no handler is installed).
    ``signum`` is the first signal received (SIGTERM if both came).

    Use it as a context manager so the previous handlers come back however the loop ends.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in _handled_signals():
                self._previous[signum] = signal.signal(signum, self._handle)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum or signal.SIGTERM).name

    def close(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        if self.signum is None or signum == signal.SIGTERM:
            self.signum = signum


# The signals loader workers leave to the main process (which saves, then exits).
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


@contextlib.contextmanager
def sigterm_blocked() -> Iterator[None]:
    """Hold SIGTERM and SIGINT pending in this thread (and in the processes it forks) for the block."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_sigterm_in_worker(worker_id: int) -> None:
    """``worker_init_fn``: the main process decides when to stop (a pending SIGTERM or SIGINT
    is dropped; a worker that raised KeyboardInterrupt would end the main process's loader)."""
    for signum in _STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


class SigtermSafeDataLoader(DataLoader):
    """A DataLoader whose worker processes leave SIGTERM and SIGINT to the training loop (see above)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("worker_init_fn") is not None:
            raise ValueError("SigtermSafeDataLoader sets worker_init_fn itself")
        super().__init__(*args, worker_init_fn=ignore_sigterm_in_worker, **kwargs)

    def __iter__(self) -> Any:
        if self.num_workers == 0:
            return super().__iter__()
        with sigterm_blocked():  # workers start here: no window before ignore_sigterm_in_worker
            return super().__iter__()


def reduce_mean_and_stop(values: torch.Tensor, stop: StopRequest, info: DistInfo) -> tuple[torch.Tensor, bool]:
    """Mean of ``values`` over ranks and "some rank got SIGTERM", in one all-reduce."""
    flag = torch.tensor([float(stop.requested)], dtype=torch.float64, device=values.device)
    summed = all_reduce_sum(torch.cat([values.detach().reshape(-1).double(), flag]), info)
    return (summed[:-1] / info.world_size).reshape(values.shape), bool(summed[-1] > 0)


def stop_after_saving(save: Callable[[], None], message: str, info: DistInfo,
                      stop: StopRequest | None = None) -> NoReturn:
    """The ranks agreed to stop: rank 0 runs ``save``, every rank waits for it, then
    :class:`Preempted` (the CLI exits 143, or 130 where this rank got SIGINT and no SIGTERM, and
    the rerun resumes from what was saved). ``message`` names SIGTERM; it is told the signal."""
    signum = stop.signum if stop is not None and stop.signum is not None else signal.SIGTERM
    message = message.replace("by SIGTERM", f"by {signal.Signals(signum).name}")
    if info.is_main:
        save()
        log.warning(message)
    barrier(info)
    raise Preempted(f"{message}; rerun to resume", signum)
