"""Where every artefact of a study lives, relative to the results folder (one place).

The Snakemake rules and the aggregation both use these, so a path changes in one spot.
"""

from __future__ import annotations

from pathlib import Path

DEMO_SOURCE = "demo/{source}"  # generated image folders: <results>/demo/<source>/{train,val}
INDEX = "data/{source}/index_{split}.parquet"
MANIFEST = "manifests/{dataset}.parquet"
TRUNK_CKPT = "pretrain/{model}/{dataset}/trunk/{iter}.pt"
TRUNK_LOG = "pretrain/{model}/{dataset}/trunk/{iter}.jsonl"
CELL_CKPT = "pretrain/{model}/{dataset}/{length}/checkpoint.pt"
CELL_METRICS = "pretrain/{model}/{dataset}/{length}/metrics.json"
CELL_LOG = "pretrain/{model}/{dataset}/{length}/log.jsonl"
PRETRAIN_SUMMARY = "pretrain/summary.csv"
PRETRAIN_CURVES = "pretrain/curves.parquet"
# Rolling checkpoints of jobs in progress: outside every declared output, so Snakemake never
# deletes them when a job dies, and the rerun resumes from them.
# They live under the config's resume_root (default <results>/.resume, see resume_root()).
RESUME = "pretrain/{model}/{dataset}/{job}"


def at(results: str | Path, pattern: str, **wildcards: object) -> Path:
    return Path(results) / pattern.format(**wildcards)


def resume_root(cfg: dict) -> Path:
    """The folder of rolling resume state: ``resume_root`` if set, else ``<results>/.resume``."""
    return Path(cfg.get("resume_root") or Path(cfg["results"]) / ".resume")

DEMO_TASK = "demo/{task}"  # generated fine-tuning sets (iNat json, COCO json, ADE20K PNGs)
FINETUNE_METRICS = "finetune/{task}/{model}/{dataset}/{length}/metrics.json"
FINETUNE_SUMMARY = "finetune/summary.csv"
FINETUNE_RESUME = "finetune/{task}/{model}/{dataset}/{length}"
SCRATCH = "scratch"  # the dataset name of from-scratch baselines (length 0)
