"""The cost of a study before it runs: jobs, GPU-hours, the trunk-reuse saving, the critical path.

Estimates come from the same numbers the scheduler gets (mimlib/resources.py: GPUs per job
and images/s per process) without the runtime safety margin, so they are what the study
should cost, not what it reserves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from mimlib.config import finetune_cells, pretrain_recipe
from mimlib.train.schedule import branch_iters, decay_at, trunk_points
from mimlib.resources import DEFAULT_IMAGES_PER_S, _lookup, default_finetune_runtime_min


@dataclass(frozen=True)
class PlannedJob:
    rule: str
    target: str
    gpus: int
    hours: float  # estimated wall time of the job

    @property
    def gpu_hours(self) -> float:
        return self.gpus * self.hours


def _pretrain_hours(cfg: Mapping[str, Any], model: str, iterations: int) -> tuple[int, float]:
    res = cfg["resources"]
    gpus = _lookup(res["pretrain_gpus"], [model], 0)
    ips = _lookup(res["images_per_s"], [model], DEFAULT_IMAGES_PER_S.get(model, DEFAULT_IMAGES_PER_S["default"]))
    batch = pretrain_recipe(cfg, model)["global_batch"]
    return gpus, iterations * batch / (ips * max(gpus, 1)) / 3600


def plan(cfg: Mapping[str, Any]) -> dict[str, Any]:
    jobs: list[PlannedJob] = []
    points = trunk_points(cfg["lengths"])
    critical = 0.0
    without_reuse = 0.0
    for model in cfg["models"]:
        for dataset in cfg["datasets"]:
            done, trunk_hours = 0, {}
            for p in points:
                gpus, h = _pretrain_hours(cfg, model, p - done)
                jobs.append(PlannedJob("pretrain_trunk", f"pretrain/{model}/{dataset}/trunk/{p}.pt", gpus, h))
                trunk_hours[p] = (trunk_hours[points[points.index(p) - 1]] if done else 0.0) + h
                done = p
            for length in sorted(cfg["lengths"]):
                gpus, h = _pretrain_hours(cfg, model, branch_iters(length))
                jobs.append(PlannedJob("pretrain_branch", f"pretrain/{model}/{dataset}/{length}/checkpoint.pt", gpus, h))
                critical = max(critical, trunk_hours[decay_at(length)] + h)
                full_gpus, full_hours = _pretrain_hours(cfg, model, length)
                without_reuse += full_gpus * full_hours
    res = cfg["resources"]
    finetune_critical = 0.0
    for c in finetune_cells(cfg):
        keys = [f"{c.task}.{c.model}", c.task]
        gpus = _lookup(res["finetune_gpus"], keys, 0)
        hours = _lookup(res["finetune_runtime_min"], keys, default_finetune_runtime_min(c.task)) / 60
        jobs.append(PlannedJob("finetune", f"finetune/{c.task}/{c.model}/{c.dataset}/{c.length}/metrics.json", gpus, hours))
        finetune_critical = max(finetune_critical, hours)
    pre = [j for j in jobs if j.rule.startswith("pretrain")]
    pretrain_gpu_hours = sum(j.gpu_hours for j in pre)
    return {
        "jobs": jobs,
        "pretrain_gpu_hours": pretrain_gpu_hours,
        "pretrain_gpu_hours_without_reuse": without_reuse,
        "reuse_saving": 1 - pretrain_gpu_hours / without_reuse if without_reuse else 0.0,
        "finetune_gpu_hours": sum(j.gpu_hours for j in jobs if j.rule == "finetune"),
        "critical_path_hours": critical + finetune_critical,
    }


def format_plan(result: Mapping[str, Any], show_jobs: bool = False) -> str:
    jobs: list[PlannedJob] = result["jobs"]
    lines = []
    if show_jobs:
        lines.append(f"{'rule':<16} {'GPUs':>5} {'hours':>8} {'GPU-h':>9}  target")
        lines += [f"{j.rule:<16} {j.gpus:>5} {j.hours:>8.1f} {j.gpu_hours:>9.1f}  {j.target}" for j in jobs]
        lines.append("")
    by_rule: dict[str, list[PlannedJob]] = {}
    for j in jobs:
        by_rule.setdefault(j.rule, []).append(j)
    for rule, js in by_rule.items():
        lines.append(f"{rule:<16} {len(js):>5} jobs  {sum(j.gpu_hours for j in js):>12,.0f} GPU-hours")
    lines.append(
        f"pre-training: {result['pretrain_gpu_hours']:,.0f} GPU-hours with trunk reuse, "
        f"{result['pretrain_gpu_hours_without_reuse']:,.0f} without ({result['reuse_saving']:.1%} saved)"
    )
    lines.append(f"fine-tuning: {result['finetune_gpu_hours']:,.0f} GPU-hours")
    lines.append(
        f"critical path (enough GPUs for every job at once): {result['critical_path_hours']:,.1f} hours "
        "(the longest trunk + decay branch, then its longest fine-tuning)"
    )
    return "\n".join(lines)
