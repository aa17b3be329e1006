from __future__ import annotations

from pathlib import Path

import pytest

from mimlib.config import ConfigError, load_config, validate_config
from mimlib.plan import plan
from mimlib.resources import finetune_resources, pretrain_resources

ROOT = Path(__file__).resolve().parents[1]


def paper() -> dict:
    return load_config(ROOT / "config" / "paper.yaml", check_paths=False)


def test_bigger_models_ask_for_more() -> None:
    cfg = paper()
    small = pretrain_resources(cfg, "swinv2_s", 437_500 // 8, 2048)  # a 500K decay branch
    giant = pretrain_resources(cfg, "swinv2_g", 109_375, 2048)  # the first trunk segment
    assert (small["gpus"], small["nodes"], small["tasks"]) == (8, 1, 8)
    assert (giant["gpus"], giant["nodes"], giant["tasks"]) == (64, 8, 64)
    assert giant["gres"] == "gpu:8" and giant["tasks_per_gpu"] == 1 and giant["mpi"] == "srun"
    assert giant["runtime"] > small["runtime"]
    assert giant["runtime"] <= cfg["resources"]["max_runtime_min"]


def test_runtime_grows_with_retries() -> None:
    cfg = paper()
    first = pretrain_resources(cfg, "swinv2_b", 10_000, 2048, attempt=1)["runtime"]
    second = pretrain_resources(cfg, "swinv2_b", 10_000, 2048, attempt=2)["runtime"]
    assert second == 2 * first
    assert finetune_resources(cfg, "coco", "swinv2_b", attempt=2)["runtime"] > finetune_resources(cfg, "coco", "swinv2_b")["runtime"]


def test_cpu_jobs_use_gloo_ranks(smoke_config: dict) -> None:
    cfg = validate_config({**smoke_config, "resources": {"cpu_tasks": 2, "cpus_per_task": 1}})
    r = pretrain_resources(cfg, "swinv2_pico", 8, 8)
    assert (r["gpus"], r["tasks"], r["nodes"], r["mpi"]) == (0, 2, 1, "srun")
    assert r["gres"] == "" and r["tasks_per_gpu"] == 0  # no GPU flags reach sbatch
    single = pretrain_resources(validate_config(smoke_config), "swinv2_pico", 8, 8)
    assert single["tasks"] == 1 and single["mpi"] == ""


def test_paper_plan_counts_and_trunk_saving() -> None:
    result = plan(paper())
    rules = [j.rule for j in result["jobs"]]
    assert rules.count("pretrain_trunk") == 90 and rules.count("pretrain_branch") == 90
    assert rules.count("finetune") == 360
    # 125K + 250K + 500K = 875K iterations per model x dataset without reuse; 437.5K + 109.4K with
    assert abs(result["reuse_saving"] - (1 - 546_875 / 875_000)) < 1e-9
    assert result["critical_path_hours"] > 0


def test_a_job_across_nodes_fills_every_node_alike() -> None:
    cfg = paper()
    cfg["resources"]["pretrain_gpus"]["swinv2_l"] = 12  # 1.5 nodes of 8
    with pytest.raises(ConfigError, match=r"resources\.pretrain_gpus\.swinv2_l: 12 GPUs .*\(gpus_per_node 8\)"):
        validate_config(cfg, check_paths=False)
    cfg["resources"]["pretrain_gpus"]["swinv2_l"] = 4  # part of one node is fine
    r = pretrain_resources(validate_config(cfg, check_paths=False), "swinv2_l", 1000, 2048)
    assert (r["nodes"], r["tasks"], r["gres"], r["tasks_per_gpu"], r["mem_mb"]) == (1, 4, "gpu:4", 1, 4 * 96000)
