"""The seed studies of `make demo-seeds` (mimlib/analysis/seeds.py): their configs, targets and spread."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mimlib import paths
from mimlib.analysis.seeds import key_cells, seed_spread, seed_study_config, seed_targets
from mimlib.config import load_config, validate_config
from mimlib.models.registry import MODELS

ROOT = Path(__file__).resolve().parents[1]


def _demo(tmp_path: Path) -> dict:
    return load_config(ROOT / "config" / "config.yaml", overrides={"results": str(tmp_path / "results")})


def _manifests(cfg: dict, sizes: dict[str, int]) -> None:
    for ds, n in sizes.items():
        p = paths.at(cfg["results"], paths.MANIFEST, dataset=ds)
        p.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"path": [f"x/{i}.JPEG" for i in range(n)]}).to_parquet(p)


def test_seed_study_keeps_the_images_and_changes_the_training_seed(tmp_path: Path) -> None:
    cfg = _demo(tmp_path)
    study = validate_config(seed_study_config(cfg, 3))
    assert study["seed"] == 3 and study["results"] == str(Path(cfg["results"]) / "seeds" / "seed3")
    assert study["demo_data"]["seed"] == cfg["seed"]  # the same generated images
    for task in ("inat18", "coco", "ade20k"):
        assert study["finetune"][task]["data"]["demo"]["seed"] == cfg["seed"]
    # everything else is the main study's
    strip = lambda c: {k: v for k, v in c.items() if k not in ("seed", "results", "name", "demo_data", "finetune")}  # noqa: E731
    assert strip(study) == strip(cfg)
    assert cfg["seed"] == 0 and "seed" not in cfg["demo_data"]  # the input is not modified


def test_key_cells_and_targets_from_the_manifests(tmp_path: Path) -> None:
    cfg = _demo(tmp_path)
    with pytest.raises(FileNotFoundError, match="run the main study"):
        key_cells(cfg, cfg["results"])
    _manifests(cfg, {"in1k_1": 10, "in1k_10": 100, "in1k_100": 1000})
    cells = key_cells(cfg, cfg["results"])
    big = max(cfg["models"], key=lambda m: MODELS[m].embed_dim)  # the demo's larger size
    lo, hi = min(cfg["lengths"]), max(cfg["lengths"])
    assert cells == [(big, "in1k_1", lo), (big, "in1k_1", hi), (big, "in1k_100", lo), (big, "in1k_100", hi)]
    study = validate_config(seed_study_config(cfg, 1))
    targets = seed_targets(study, cells)
    assert len(targets) == 4 * 3  # pre-training metrics + in1k + inat18 per cell
    assert all(t.startswith(study["results"] + "/") for t in targets)
    assert f"{study['results']}/finetune/in1k/{big}/in1k_1/{hi}/metrics.json" in targets


def test_spread_over_the_studies(tmp_path: Path) -> None:
    cfg = _demo(tmp_path)
    _manifests(cfg, {"in1k_1": 10, "in1k_10": 100, "in1k_100": 1000})
    cells = key_cells(cfg, cfg["results"])
    studies = [Path(cfg["results"])] + [Path(cfg["results"]) / f"seeds/seed{s}" for s in (1, 2)]
    for k, res in enumerate(studies):
        for model, ds, length in cells:
            p = paths.at(res, paths.CELL_METRICS, model=model, dataset=ds, length=length)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps({"val_loss": 0.3 + 0.01 * k}))
            if res != studies[2]:  # seed 2 has no IN-1K score: counted over two seeds
                q = paths.at(res, paths.FINETUNE_METRICS, task="in1k", model=model, dataset=ds, length=length)
                q.parent.mkdir(parents=True, exist_ok=True)
                q.write_text(json.dumps({"metrics": {"top1": 80.0 + k, "top5": 99.0}}))
    table = seed_spread(cfg, studies).set_index("quantity")
    cell = f"{cells[0][0]}/{cells[0][1]}/{cells[0][2]}"
    row = table.loc[f"val_loss:{cell}"]
    assert row["n_seeds"] == 3 and row["mean"] == pytest.approx(0.31) and row["std"] == pytest.approx(0.01)
    row = table.loc[f"in1k/top1:{cell}"]
    assert row["n_seeds"] == 2 and row["std"] == pytest.approx(math.sqrt(0.5)) and row["values"] == "80 81"
    assert not any(q.startswith("inat18") for q in table.index)  # no iNat metrics written


def test_seed_study_command_writes_a_valid_config(tmp_path: Path) -> None:
    cfg = _demo(tmp_path)
    main = tmp_path / "main.yaml"
    main.write_text(yaml.safe_dump(cfg))
    _manifests(cfg, {"in1k_1": 10, "in1k_10": 100, "in1k_100": 1000})
    out = tmp_path / "seed1.yaml"
    run = subprocess.run([sys.executable, "-m", "mimlib", "seed-study", "--config", str(main), "--seed", "1",
                          "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert load_config(out)["seed"] == 1
    assert len(run.stdout.split()) == 12
