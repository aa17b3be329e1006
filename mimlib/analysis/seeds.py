"""Seed-to-seed spread of the numbers that carry the findings (``make demo-seeds``).

A *seed study* is the main study re-run with another ``seed`` (the training seed: subset
draw, batches, masks, drop path, fine-tuning order) and the same generated data (the demo
generators keep the main study's seed), restricted to the *key cells*: the largest model on
the smallest and on the largest pre-training dataset, at the shortest and the longest
length, pre-trained and fine-tuned on IN-1K and iNat-18. :func:`seed_spread` collects each
key number over the main study and its seed studies into ``analysis/seed_spread.csv``
(``quantity, n_seeds, mean, std, min, max, values``); the findings page puts the std beside
every effect built from these numbers.

Quantities are named ``val_loss:<model>/<dataset>/<length>`` and
``<task>/<metric>:<model>/<dataset>/<length>``.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from mimlib import paths

SPREAD = "analysis/seed_spread.csv"
SEED_STUDY = "seeds/seed{seed}"  # under the main study's results folder
COLUMNS = ["quantity", "n_seeds", "mean", "std", "min", "max", "values"]


def dataset_sizes(results: str | Path, datasets) -> dict[str, int]:
    """Images per pre-training dataset, from the main study's manifests (which must exist)."""
    sizes = {}
    for ds in datasets:
        path = paths.at(results, paths.MANIFEST, dataset=ds)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no manifest; run the main study (make demo) before its seed studies")
        sizes[ds] = len(pd.read_parquet(path, columns=["path"]))
    return sizes


def key_cells(cfg: Mapping[str, Any], results: str | Path) -> list[tuple[str, str, int]]:
    """(model, dataset, length) of the key cells (see the module doc)."""
    from .aggregate import largest_model

    sizes = dataset_sizes(results, cfg["datasets"])
    smallest, largest = min(sizes, key=sizes.get), max(sizes, key=sizes.get)
    lengths = sorted({min(cfg["lengths"]), max(cfg["lengths"])})
    model = largest_model(cfg)
    return [(model, ds, length) for ds in dict.fromkeys([smallest, largest]) for length in lengths]


def seed_tasks(cfg: Mapping[str, Any]) -> list[str]:
    from mimlib.finetune import TASKS

    return [t for t, spec in TASKS.items() if spec.seed_spread and t in cfg["finetune"].get("tasks", [])]


def seed_study_config(cfg: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """The main study's config with another training seed, its own results folder, and the
    demo generators pinned to the main study's seed (the same images)."""
    out = copy.deepcopy(dict(cfg))
    base_seed = cfg["seed"]
    out["seed"] = seed
    out["name"] = f"{cfg.get('name', 'study')}-seed{seed}"
    out["results"] = str(Path(cfg["results"]) / SEED_STUDY.format(seed=seed))
    out["demo_data"] = {**cfg.get("demo_data", {}), "seed": cfg.get("demo_data", {}).get("seed", base_seed)}
    for task in cfg["finetune"].get("tasks", []):
        demo = out["finetune"][task].get("data", {}).get("demo")
        if isinstance(demo, dict):
            demo.setdefault("seed", base_seed)
    return out


def seed_targets(cfg: Mapping[str, Any], cells) -> list[str]:
    """The files a seed study builds: each key cell's pre-training and fine-tuning metrics."""
    res = cfg["results"]
    out = []
    for model, ds, length in cells:
        out.append(str(paths.at(res, paths.CELL_METRICS, model=model, dataset=ds, length=length)))
        for task in seed_tasks(cfg):
            out.append(str(paths.at(res, paths.FINETUNE_METRICS, task=task, model=model, dataset=ds, length=length)))
    return out


def _key_numbers(cfg: Mapping[str, Any], results: str | Path, cells) -> dict[str, float]:
    from mimlib.finetune import main_metrics

    numbers: dict[str, float] = {}
    for model, ds, length in cells:
        cell = f"{model}/{ds}/{length}"
        p = paths.at(results, paths.CELL_METRICS, model=model, dataset=ds, length=length)
        if p.exists():
            numbers[f"val_loss:{cell}"] = json.loads(p.read_text())["val_loss"]
        for task in seed_tasks(cfg):
            p = paths.at(results, paths.FINETUNE_METRICS, task=task, model=model, dataset=ds, length=length)
            if p.exists():
                metrics = json.loads(p.read_text())["metrics"]
                metric = main_metrics(task)[0]
                numbers[f"{task}/{metric}:{cell}"] = metrics.get(metric)
    return numbers


def seed_spread(cfg: Mapping[str, Any], studies: list[str | Path]) -> pd.DataFrame:
    """One row per key number over ``studies`` (the main study's results folder first)."""
    cells = key_cells(cfg, studies[0])
    per_study = [_key_numbers(cfg, s, cells) for s in studies]
    rows = []
    for q in dict.fromkeys(k for numbers in per_study for k in numbers):
        values = [float(n[q]) for n in per_study if n.get(q) is not None and not math.isnan(float(n[q]))]
        if not values:
            continue
        v = np.asarray(values)
        rows.append({"quantity": q, "n_seeds": len(v), "mean": v.mean(),
                     "std": float(v.std(ddof=1)) if len(v) > 1 else math.nan,
                     "min": v.min(), "max": v.max(), "values": " ".join(f"{x:.6g}" for x in v)})
    return pd.DataFrame(rows, columns=COLUMNS)
