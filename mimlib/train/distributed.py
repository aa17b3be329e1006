"""Process-group set-up from torchrun or Slurm environment variables.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. Under ``srun`` each
rank sees SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; MASTER_ADDR and MASTER_PORT come from
the launching rule. With neither, the run is a single process (a laptop).

A job that was given GPUs (``--device cuda``) trains on them or stops: on a node where PyTorch
sees no CUDA device it raises :class:`DeviceError`, never a silent CPU run. The one exception is
explicit: ``MIMSCALE_GPU_FALLBACK=cpu`` makes each rank log the GPU Slurm gave it and train on
the CPU with gloo (the tests' fake-GPU Slurm nodes).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

GPU_FALLBACK_ENV = "MIMSCALE_GPU_FALLBACK"


class DeviceError(RuntimeError):
    """The job's GPUs cannot be used as asked (no CUDA, or fewer GPUs than local ranks)."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_ranks(env: dict[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's or Slurm's variables; (0, 1, 0) if none."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "MASTER_ADDR" in env:
        # Only when the launcher set a rendezvous: a plain `sbatch` job step is one process.
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def visible_gpus(env: Mapping[str, str]) -> list[str] | None:
    """The GPU ids in CUDA_VISIBLE_DEVICES (what Slurm or the user gave this process), or None."""
    if "CUDA_VISIBLE_DEVICES" not in env:
        return None
    return [g.strip() for g in env["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]


def gpu_for_rank(local_rank: int, env: Mapping[str, str], count: int | None = None) -> tuple[int, str]:
    """(index among the visible GPUs, the GPU's id) for a rank: its own GPU, never a shared one.

    Slurm either binds each task to one GPU (one visible: take it) or shows the node's GPUs to
    every task (take the local rank's, as torchrun does). ``count`` is the device count when
    CUDA_VISIBLE_DEVICES is not set.
    """
    visible = visible_gpus(env)
    n = len(visible) if visible is not None else (count or 0)
    shown = env.get("CUDA_VISIBLE_DEVICES", "unset")
    if n == 0:
        raise DeviceError(f"local rank {local_rank}: no GPU visible (CUDA_VISIBLE_DEVICES={shown})")
    if n == 1:
        index = 0
    elif local_rank < n:
        index = local_rank
    else:
        raise DeviceError(
            f"local rank {local_rank} has no GPU of its own: {n} visible (CUDA_VISIBLE_DEVICES={shown}); "
            "ask for one task per GPU"
        )
    return index, visible[index] if visible is not None else str(index)


def _pick_device(device: str, rank: int, world: int, local: int) -> torch.device:
    where = f"rank {rank}/{world} on {socket.gethostname()} (local rank {local})"
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    env = os.environ
    if not torch.cuda.is_available():  # device == "cuda": this job was given GPUs
        if env.get(GPU_FALLBACK_ENV) != "cpu":
            raise DeviceError(
                f"{where}: this job was given GPUs (--device cuda, CUDA_VISIBLE_DEVICES="
                f"{env.get('CUDA_VISIBLE_DEVICES', 'unset')}) but PyTorch {torch.__version__} sees no CUDA "
                "device (a CPU-only build, or no driver on this node). Fix the node or the install; to "
                f"train on the CPU instead, set {GPU_FALLBACK_ENV}=cpu"
            )
        _, gpu = gpu_for_rank(local, env)
        log.warning("%s: GPU %s of CUDA_VISIBLE_DEVICES=%s -> cpu (%s=cpu: not a CUDA device, gloo on the CPU)",
                    where, gpu, env.get("CUDA_VISIBLE_DEVICES"), GPU_FALLBACK_ENV)
        return torch.device("cpu")
    index, gpu = gpu_for_rank(local, env, torch.cuda.device_count())
    dev = torch.device("cuda", index)
    torch.cuda.set_device(dev)
    log.info("%s: GPU %s of CUDA_VISIBLE_DEVICES=%s -> %s", where, gpu, env.get("CUDA_VISIBLE_DEVICES", "unset"), dev)
    return dev


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise torch.distributed if the environment asks for several processes.

    ``device``: 'auto' (CUDA if available, else CPU), 'cpu' or 'cuda' (a job given GPUs: CUDA
    or DeviceError, see the module doc). Each rank takes its own GPU (:func:`gpu_for_rank`).
    NCCL on GPUs, gloo on CPU.
    """
    rank, world, local = env_ranks()
    dev = _pick_device(device, rank, world, local)
    if world > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            init_method="env://",
            rank=rank,
            world_size=world,
            timeout=timedelta(minutes=30),
        )
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
