"""What each job asks a scheduler for, derived from the config (model size, recipe, length).

Snakemake rules call these for their ``resources:``; the Slurm executor turns them into
sbatch flags (nodes, tasks, GPUs, CPUs, memory, runtime). A SwinV2-g trunk asks for more than
a SwinV2-S decay branch because its GPU count and its throughput come from the config.
Runtimes grow linearly with Snakemake's ``attempt``, so a retried job gets more time (and it
resumes from its rolling checkpoint, so no work is repeated).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

# Fallback throughput (images/s of one process) where the config gives none: one H200 at
# 192 px, bf16 (docs/measurements.md: SwinV2-B 716 eager, 1,187 compiled), scaled by FLOPs
# for the other sizes; the CPU demo sizes at 96 px on one core (pico3 / nano3: 32 x 48 images
# over the demo's 384-iteration branches, 24.6-30.9 s and 38.9-47.6 s with two jobs sharing 2 cores).
DEFAULT_IMAGES_PER_S = {
    "swinv2_s": 2000.0, "swinv2_b": 1100.0, "swinv2_l": 500.0, "swinv2_h": 150.0, "swinv2_g": 95.0,
    "swinv2_pico": 60.0, "swinv2_nano": 45.0, "swinv2_pico3": 60.0, "swinv2_nano3": 40.0, "default": 100.0,
}


def default_finetune_runtime_min(task: str) -> float:
    """A task's Slurm runtime where the config gives none (the registry's paper-scale value)."""
    from mimlib.finetune import TASKS

    return TASKS[task].runtime_min if task in TASKS else 60.0


def _lookup(table: Mapping[str, Any], keys: list[str], fallback: Any) -> Any:
    for key in keys:
        if key in table:
            return table[key]
    return table.get("default", fallback)


def gpu_layout_problems(res: Mapping[str, Any]) -> list[str]:
    """Config problems with the GPU counts: a job spanning nodes must fill each node alike."""
    per_node = res["gpus_per_node"]
    problems = []
    for key in ("pretrain_gpus", "finetune_gpus"):
        for name, gpus in res[key].items():
            if gpus > per_node and gpus % per_node:
                problems.append(
                    f"resources.{key}.{name}: {gpus} GPUs is more than one node's "
                    f"(gpus_per_node {per_node}) and not a multiple of it; Slurm gets the same "
                    "number of GPUs on every node of a job"
                )
    return problems


def _layout(gpus: int, res: Mapping[str, Any]) -> dict[str, Any]:
    """nodes / tasks / GPU flags for a job of ``gpus`` GPUs (0 = a CPU job of cpu_tasks ranks).

    A GPU job is one task per GPU and the same GPUs on each node: Slurm gets
    ``--nodes=N --ntasks=G --ntasks-per-gpu=1 --gres=gpu:G/N`` (the executor plugin turns
    ``tasks_per_gpu`` into ``--ntasks-per-gpu`` and would use ``tasks`` there without it).
    ``gpus`` (the job's total) is for Snakemake's own scheduler (``--resources gpus=N`` on a
    workstation); the plugin does not read it, so no ``--gpus`` total competes with ``--gres``.
    """
    if gpus == 0:
        tasks = res["cpu_tasks"]
        layout: dict[str, Any] = {"nodes": 1, "tasks": tasks, "gpus": 0, "gres": "", "tasks_per_gpu": 0}
    else:
        per_node = min(gpus, res["gpus_per_node"])
        nodes = math.ceil(gpus / per_node)
        tasks = gpus  # one process per GPU
        layout = {"nodes": nodes, "tasks": tasks, "gpus": gpus, "gres": f"gpu:{per_node}", "tasks_per_gpu": 1}
    tasks_per_node = math.ceil(tasks / layout["nodes"])
    layout["cpus_per_task"] = res["cpus_per_task"]
    layout["mem_mb"] = res["mem_mb_per_task"] * tasks_per_node  # --mem is per node
    # The launcher (workflow/scripts/launch.sh) runs srun itself for several processes.
    layout["mpi"] = "srun" if tasks > 1 else ""
    return layout


def _runtime(minutes: float, res: Mapping[str, Any], attempt: int) -> int:
    minutes = max(minutes * res["runtime_margin"], res["min_runtime_min"]) * attempt
    return int(math.ceil(min(minutes, res["max_runtime_min"])))


def pretrain_resources(cfg: Mapping[str, Any], model: str, iterations: int, global_batch: int, attempt: int = 1) -> dict[str, Any]:
    """A pre-training job (a trunk segment or a decay branch) of ``iterations`` iterations."""
    res = cfg["resources"]
    gpus = _lookup(res["pretrain_gpus"], [model], 0)
    layout = _layout(gpus, res)
    per_process = _lookup(res["images_per_s"], [model], DEFAULT_IMAGES_PER_S.get(model, DEFAULT_IMAGES_PER_S["default"]))
    processes = max(gpus, 1) if gpus else 1  # CPU ranks share one machine's cores
    minutes = iterations * global_batch / (per_process * processes) / 60
    layout["runtime"] = _runtime(minutes, res, attempt)
    return layout


def finetune_resources(cfg: Mapping[str, Any], task: str, model: str, attempt: int = 1) -> dict[str, Any]:
    res = cfg["resources"]
    keys = [f"{task}.{model}", task]
    layout = _layout(_lookup(res["finetune_gpus"], keys, 0), res)
    minutes = _lookup(res["finetune_runtime_min"], keys, default_finetune_runtime_min(task))
    layout["runtime"] = _runtime(minutes, res, attempt)
    return layout


def light_resources(attempt: int = 1) -> dict[str, Any]:
    """Data preparation and aggregation: one CPU process, no GPU."""
    return {"nodes": 1, "tasks": 1, "gpus": 0, "gres": "", "tasks_per_gpu": 0, "cpus_per_task": 2,
            "mem_mb": 8000, "runtime": 60 * attempt, "mpi": ""}
