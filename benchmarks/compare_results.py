"""Compare two studies' outputs value by value: every metrics.json, the two summaries, the
tables and the jsonl training logs of two ``results/`` folders (e.g. the same config run on two
commits, to show a refactor changed no result).

Timings (``*time*``, ``*_s``, ``images_per_s``) differ between any two runs and are left out;
everything else is compared exactly (floats bit for bit). Prints the keys only one side has and
each value that differs, grouped by file.

Usage: ``python benchmarks/compare_results.py OLD_WORKDIR NEW_WORKDIR`` (the folders that hold
``results/``, e.g. two ``snakemake -d`` directories).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pandas as pd


def is_timing(key: str) -> bool:
    leaf = key.rsplit(".", 1)[-1].split("[")[0]
    return "time" in leaf or leaf.endswith("_s") or leaf == "eval_s"


def flatten(prefix: str, obj: Any, out: dict[str, Any]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            flatten(f"{prefix}.{k}", v, out)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            flatten(f"{prefix}[{i}]", v, out)
    else:
        out[prefix] = obj


def values(workdir: Path) -> dict[str, Any]:
    """{file-qualified key: value} of one study's outputs (the resume folder and logs/ excluded)."""
    root = workdir / "results"
    out: dict[str, Any] = {}
    for p in sorted(root.rglob("*.json")) + sorted(root.rglob("*.jsonl")):
        if {".resume", "logs"} & set(p.relative_to(root).parts):
            continue
        name = str(p.relative_to(root))
        if p.suffix == ".jsonl":
            for i, line in enumerate(p.read_text().splitlines()):
                flatten(f"{name}[{i}]", json.loads(line), out)
        else:
            flatten(name, json.loads(p.read_text()), out)
    for p in [root / "pretrain/summary.csv", root / "finetune/summary.csv", *sorted((root / "tables").glob("*.csv"))]:
        if p.exists():
            for i, row in pd.read_csv(p).iterrows():
                for col, v in row.items():
                    out[f"{p.relative_to(root)}[{i}].{col}"] = None if pd.isna(v) else v
    return {k: v for k, v in out.items() if not is_timing(k)}


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--show", type=int, default=10, help="differing values shown per file")
    args = ap.parse_args()
    a, b = values(args.old), values(args.new)
    differ = defaultdict(list)
    for k in sorted(set(a) & set(b)):
        if not same(a[k], b[k]):
            differ[k.split("[")[0].split(".json")[0]].append(k)
    n_diff = sum(map(len, differ.values()))
    print(f"{len(set(a) & set(b))} values compared (timings left out), {n_diff} differ; "
          f"{len(set(a) - set(b))} only in {args.old}, {len(set(b) - set(a))} only in {args.new}")
    for k in sorted(set(a) ^ set(b))[: args.show]:
        print(f"  only {'old' if k in a else 'new'}: {k}")
    for where, keys in differ.items():
        print(f"{where}: {len(keys)} differ")
        for k in keys[: args.show]:
            print(f"  {k}: {a[k]!r} -> {b[k]!r}")
    return 1 if n_diff or set(a) ^ set(b) else 0


if __name__ == "__main__":
    sys.exit(main())
