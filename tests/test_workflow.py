"""The Snakemake DAG end to end: the smoke study on CPU, single cells, the paper-scale plan."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fake_paper import fake_paper_config

ROOT = Path(__file__).resolve().parents[1]


def snakemake(workdir: Path, *args: str, timeout: int = 900) -> str:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(workdir), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout + proc.stderr


def job_counts(output: str) -> dict[str, int]:
    """Parse Snakemake's 'Job stats' table."""
    table = output.split("Job stats:")[-1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m.group(1) != "total"}


@pytest.mark.slow
def test_smoke_study_end_to_end(tmp_path: Path) -> None:
    smoke = str(ROOT / "config" / "smoke.yaml")
    snakemake(tmp_path, "--cores", "2", "--configfile", smoke)
    summary = pd.read_csv(tmp_path / "results" / "pretrain" / "summary.csv")
    assert len(summary) == 1 * 2 * 2
    assert summary["val_loss"].notna().all() and (summary["val_loss"] > 0).all()
    assert summary["train_loss"].notna().all()
    curves = pd.read_parquet(tmp_path / "results" / "pretrain" / "curves.parquet")
    cell = curves[(curves.dataset == "half") & (curves.length == 16)]
    assert cell["iter"].is_monotonic_increasing and cell["iter"].max() == 16
    # every val_every=4 iterations, and at the end of each job (trunk points 7 and 14)
    assert cell.loc[cell["val_loss"].notna(), "iter"].tolist() == [4, 7, 8, 12, 14, 16]
    # trunk reuse: one trunk per model x dataset, saved at 7/8 of each length
    trunk = sorted(p.name for p in (tmp_path / "results/pretrain/swinv2_pico/half/trunk").glob("*.pt"))
    assert trunk == ["14.pt", "7.pt"]
    # every task fine-tuned the longest cells and a scratch baseline
    ft = pd.read_csv(tmp_path / "results" / "finetune" / "summary.csv")
    assert len(ft) == 4 * (2 + 1)
    assert set(ft["task"]) == {"in1k", "inat18", "coco", "ade20k"}
    assert ft.loc[ft.task == "in1k", "top1"].notna().all() and ft.loc[ft.task == "ade20k", "miou"].notna().all()
    assert ft.loc[ft.task == "coco", "box_ap"].notna().all()
    # the paper's tables and figures
    table3 = pd.read_csv(tmp_path / "results" / "tables" / "table3.csv")
    assert len(table3) >= 1
    for i in range(1, 9):
        assert (tmp_path / "results" / "figures" / f"fig{i}.png").stat().st_size > 1000
    # nothing left to do
    out = snakemake(tmp_path, "-n", "--configfile", smoke)
    assert "Nothing to be done" in out
    # and the report builds, with the tables in it
    snakemake(tmp_path, "--report", str(tmp_path / "report.html"), "--configfile", smoke)
    report = (tmp_path / "report.html").read_text(errors="replace")
    assert "table3" in report and "fig1" in report


def test_single_cell_builds_only_what_it_needs(tmp_path: Path) -> None:
    target = "results/pretrain/swinv2_pico/half/8/checkpoint.pt"
    out = snakemake(tmp_path, "-n", target, "--configfile", str(ROOT / "config" / "smoke.yaml"))
    assert job_counts(out) == {
        "demo_data": 1, "index": 2, "manifest": 1, "pretrain_trunk": 1, "pretrain_branch": 1,
    }


def test_paper_scale_plan_on_a_fake_imagenet(tmp_path: Path) -> None:
    cfg, config = fake_paper_config(tmp_path)
    out = snakemake(tmp_path, "-n", "--configfile", str(config))
    counts = job_counts(out)
    assert {k: counts[k] for k in ("index", "manifest", "pretrain_trunk", "pretrain_branch", "finetune")} == {
        "index": 3,  # in1k train + val, in22k train
        "manifest": 6,
        "pretrain_trunk": 5 * 6 * 3,  # one trunk per model x dataset, cut at 109,375 / 218,750 / 437,500
        "pretrain_branch": 5 * 6 * 3,
        "finetune": 4 * 5 * 6 * 3,  # four tasks for every cell
    }
    assert all(counts[f"table{i}"] == 1 for i in range(1, 10)) and all(counts[f"fig{i}"] == 1 for i in range(1, 9))
    assert counts["findings"] == 1
    assert "--end-iter 437500" in out and "--decay-at 109375" in out
    # every training job asks for GPUs (more for bigger models); data and summary jobs for none
    blocks = re.findall(r"^(?:local)?rule (\w+):\n(.*?)(?=^\S|\Z)", out, re.M | re.S)
    gpus: dict[str, set[int]] = {}
    for rule, body in blocks:
        m = re.search(r"resources: .*?\bgpus=(\d+)", body)
        gpus.setdefault(rule, set()).add(int(m.group(1)) if m else 0)
    assert gpus["pretrain_trunk"] == {8, 16, 32, 64} and gpus["pretrain_branch"] == {8, 16, 32, 64}
    assert gpus["finetune"] == {8, 16, 32}
    training = {"pretrain_trunk", "pretrain_branch", "finetune"}
    light = {rule: g for rule, g in gpus.items() if rule not in training}
    assert {"index", "manifest", "pretrain_summary", "finetune_summary", "table3", "fig1", "proxy"} <= set(light)
    assert all(g == {0} for g in light.values()), light  # data, summary and aggregation rules: no GPU
    # a missing dataset root stops before any job, naming the key
    cfg["sources"]["in22k"] = {"train": str(tmp_path / "missing22k")}
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(AssertionError, match=r"sources\.in22k\.train: folder .*missing22k.* does not exist"):
        snakemake(tmp_path, "-n", "--configfile", str(config))


