"""SIGTERM plumbing shared by the engines: loader workers survive a job-wide SIGTERM, the main
process still gets it, and the signal mask / handler come back afterwards."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import torch

from mimlib.train.distributed import DistInfo
from mimlib.train.preemption import StopRequest, reduce_mean_and_stop, sigterm_blocked

# Runs in its own session: SIGTERM goes to the whole process group, as Slurm sends it to every
# process of a job step, at the worst moment -- right after the workers were forked, before any
# of them has run a line of its own Python.
_WORKERS_SURVIVE = textwrap.dedent(
    """
    import os, signal, sys, time
    import torch
    from torch.utils.data import Dataset
    from mimlib.train.preemption import SigtermSafeDataLoader, StopRequest

    class Slow(Dataset):
        def __len__(self):
            return 24
        def __getitem__(self, i):
            time.sleep(0.01)
            return torch.tensor([i, int(signal.getsignal(signal.SIGTERM) == signal.SIG_IGN)])

    class SignalledAtStart(SigtermSafeDataLoader):
        def __iter__(self):
            it = super().__iter__()  # the workers were just forked and are still starting
            os.killpg(0, signal.SIGTERM)
            return it

    with StopRequest() as stop:
        rows = torch.cat([b for b in SignalledAtStart(Slow(), batch_size=4, num_workers=2)])
        assert stop.requested, "the main process lost the SIGTERM"
    assert sorted(rows[:, 0].tolist()) == list(range(24)), rows
    assert rows[:, 1].all(), "a worker does not ignore SIGTERM"
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, set())
    print("ok")
    """
)


def test_loader_workers_survive_a_sigterm_sent_while_they_start() -> None:
    proc = subprocess.run([sys.executable, "-c", _WORKERS_SURVIVE], capture_output=True, text=True, timeout=60,
                          start_new_session=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_a_blocked_sigterm_is_deferred_not_lost() -> None:
    with StopRequest() as stop:
        with sigterm_blocked():
            signal.raise_signal(signal.SIGTERM)
            assert not stop.requested
        assert stop.requested
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_stop_flag_rides_on_the_loss_reduction() -> None:
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with StopRequest() as stop:
        mean, now = reduce_mean_and_stop(torch.tensor([1.5, 2.0], dtype=torch.float64), stop, info)
        assert mean.tolist() == [1.5, 2.0] and not now
        stop.requested = True
        assert reduce_mean_and_stop(torch.tensor(3.0), stop, info)[1]


def test_a_save_cut_off_by_sigkill_is_ignored_then_cleaned_up(tmp_path) -> None:
    from mimlib.train import checkpoint as ckpt

    ckpt.save_rolling({"step": 1}, tmp_path, 1)
    stale = tmp_path / ".iter_000000002.pt.tmp4242"  # what a killed save_atomic leaves
    stale.write_bytes(b"half a checkpoint")
    assert [i for i, _ in ckpt.rolling_checkpoints(tmp_path)] == [1]
    ckpt.save_rolling({"step": 3}, tmp_path, 3)
    assert not stale.exists() and [i for i, _ in ckpt.rolling_checkpoints(tmp_path)] == [1, 3]
