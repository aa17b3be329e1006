"""The paper's Tables 3-6 as data (mimlib/analysis/paper_values.csv) and the study-vs-paper
comparison: reference columns in Tables 3-6 and the reproduction page, on hand-made results
of config/paper.yaml's study (no training runs)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mimlib import paths
from mimlib.analysis import aggregate as AGG
from mimlib.analysis import paper as P
from mimlib.config import ConfigError, validate_config

ROOT = Path(__file__).resolve().parents[1]
PAPER_YAML = ROOT / "config" / "paper.yaml"

# hand-made results: (task, model, dataset, length) -> metrics
MEASURED = {
    ("in1k", "swinv2_b", "in1k_20", 125000): {"top1": 84.0},
    ("in1k", "swinv2_b", "in1k_20", 250000): {"top1": 84.9},   # the best: paper 84.6 -> +0.3
    ("in1k", "swinv2_b", "in1k_20", 500000): {"top1": 84.3},
    ("inat18", "swinv2_l", "in1k_50", 250000): {"top1": 80.0},  # paper 80.7 -> -0.7 (off at 0.5)
    ("ade20k", "swinv2_s", "in1k_100", 500000): {"miou": 48.3, "acc": 82.0},  # paper 48.3 -> 0
    ("coco", "swinv2_b", "in22k", 125000): {"box_ap": 51.4, "mask_ap": 46.5},  # paper 51.4 / 45.5
}


def paper_study(results: Path, **analysis) -> dict:
    raw = yaml.safe_load(PAPER_YAML.read_text())
    raw["results"] = str(results)
    if analysis:
        raw["analysis"] = analysis
    return validate_config(raw, check_paths=False)


def write_metrics(results: Path) -> None:
    for (task, model, ds, length), metrics in MEASURED.items():
        path = paths.at(results, paths.FINETUNE_METRICS, task=task, model=model, dataset=ds, length=length)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"task": task, "metrics": metrics}))


def test_paper_values_are_tables_3_to_6_cell_by_cell() -> None:
    v = P.paper_values()
    # Table 3: 5 models, 21 printed numbers; Tables 4/5: S (4 datasets) + B, L (5) x 3 lengths; Table 6: x 2 metrics
    assert v.groupby("table").size().to_dict() == {3: 21, 4: 42, 5: 42, 6: 84}
    assert set(v["dataset"]) == set(P.PAPER_DATASETS)
    assert all(c.startswith(f"Table {t}, row ") for t, c in zip(v["table"], v["cite"]))
    assert not v.duplicated(["table", "model", "dataset", "length", "metric"]).any()

    def at(table, model, ds, length, metric):
        hit = v[(v.table == table) & (v.model == model) & (v.dataset == ds) & (v.length == length) & (v.metric == metric)]
        return float(hit["value"].iloc[0]) if len(hit) else None

    assert at(3, "swinv2_h", "in1k_20", 0, "top1") == 84.4  # quoted in the paper's text
    assert at(3, "swinv2_g", "in22k", 0, "top1") == 86.5
    assert at(3, "swinv2_h", "in1k_10", 0, "top1") is None  # '-' in the paper
    assert at(4, "swinv2_l", "in1k_10", 500000, "top1") == 77.2
    assert at(4, "swinv2_s", "in22k", 125000, "top1") is None
    assert at(5, "swinv2_b", "in1k_10", 500000, "miou") == 42.1
    assert at(6, "swinv2_l", "in22k", 500000, "box_ap") == 53.9
    assert at(6, "swinv2_l", "in22k", 500000, "mask_ap") == 47.5
    assert at(6, "swinv2_s", "in1k_10", 125000, "mask_ap") == 43.5


def test_paper_datasets_are_config_paper_yamls() -> None:
    raw = yaml.safe_load(PAPER_YAML.read_text())
    for name, spec in P.PAPER_DATASETS.items():
        assert {k: v for k, v in raw["datasets"][name].items() if k != "label"} == spec, name
    assert P.paper_datasets(raw) == list(P.PAPER_DATASETS)  # in100 is not in Tables 3-6
    demo = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())  # has an in1k_10 key, demo data
    assert P.paper_datasets(demo) == []
    lookalike = {"sources": {"in1k": {"demo": True}}, "datasets": {"in1k_10": {"source": "in1k", "fraction": 0.1}}}
    assert P.paper_datasets(lookalike) == []


def test_tables_3_to_6_show_the_paper_beside_the_study(tmp_path: Path) -> None:
    cfg = paper_study(tmp_path / "results")
    write_metrics(tmp_path / "results")
    t3 = AGG.run_target("table3", cfg).set_index("model")
    assert t3.at["swinv2_b", "in1k_20"] == pytest.approx(84.9)
    assert t3.at["swinv2_b", "in1k_20/paper"] == 84.6
    assert t3.at["swinv2_b", "in1k_20/diff"] == pytest.approx(0.3)
    assert math.isnan(t3.at["swinv2_s", "in1k_20/diff"])  # not measured: no difference
    assert math.isnan(t3.at["swinv2_h", "in1k_10/paper"])  # '-' in the paper
    assert "in100/paper" not in t3.columns
    cols = list(t3.columns)
    assert cols[cols.index("in1k_10"):cols.index("in1k_10") + 3] == ["in1k_10", "in1k_10/paper", "in1k_10/diff"]

    t4 = AGG.run_target("table4", cfg).set_index(["model", "length"])
    assert t4.at[("swinv2_l", 250000), "in1k_50/paper"] == 80.7
    assert t4.at[("swinv2_l", 250000), "in1k_50/diff"] == pytest.approx(-0.7)
    assert math.isnan(t4.at[("swinv2_h", 250000), "in1k_50/paper"])  # Tables 4-6 have S, B, L only
    t5 = AGG.run_target("table5", cfg).set_index(["model", "length"])
    assert t5.at[("swinv2_s", 500000), "in1k_100/diff"] == pytest.approx(0.0)
    t6 = AGG.run_target("table6", cfg).set_index(["model", "length"])
    assert t6.at[("swinv2_b", 125000), "in22k/mask_ap/paper"] == 45.5
    assert t6.at[("swinv2_b", 125000), "in22k/mask_ap/diff"] == pytest.approx(1.0)
    assert t6.at[("swinv2_b", 125000), "in22k/box_ap/diff"] == pytest.approx(0.0)
    # the written files carry them too, with display names and the note
    csv = pd.read_csv(AGG.table_paths(cfg["results"], "table6")["csv"])
    assert "in22k/mask_ap/paper" in csv.columns
    md = AGG.table_paths(cfg["results"], "table4")["md"].read_text()
    assert "IN1K (50%) paper" in md and "IN1K (50%) diff" in md and "paper_values.csv" in md


def test_reproduction_page_lists_the_cells_off_by_more_than_the_margin(tmp_path: Path) -> None:
    cfg = paper_study(tmp_path / "results")
    assert cfg["analysis"]["reproduction_margin"] == 0.5  # the schema's default
    write_metrics(tmp_path / "results")
    df = AGG.run_target("reproduction", cfg)
    assert len(df) == 189  # every cell of the paper's Tables 3-6 is in config/paper.yaml's study
    assert df["reproduced"].notna().sum() == 5  # Table 3: one best; 4, 5: one each; 6: box + mask
    off = df[df["off"]]
    assert sorted(zip(off["table"], off["model"], off["dataset"], off["metric"])) == [
        (4, "swinv2_l", "in1k_50", "top1"), (6, "swinv2_b", "in22k", "mask_ap")]
    assert off["diff"].tolist() == pytest.approx([-0.7, 1.0])
    out = AGG.target_outputs("reproduction", cfg["results"])
    md = out["md"].read_text()
    assert "189 of the paper's cells are in this study, 5 measured; 2 differ" in md
    assert "Table 4, row SwinV2-L 250K, column IN1K (50%)" in md
    assert "Table 6, row SwinV2-B 125K, column IN22K (100%) APmask" in md
    assert "Table 3, row SwinV2-B" not in md  # +0.3 is within the margin
    assert "IN1K (50%)" in out["html"].read_text()
    assert len(pd.read_csv(out["csv"])) == 189

    wide = paper_study(tmp_path / "results", reproduction_margin=1.5)
    assert not AGG.run_target("reproduction", wide)["off"].any()
    assert "No cell is off." in out["md"].read_text()


def test_table3_needs_all_three_paper_lengths_and_others_get_no_reference(tmp_path: Path) -> None:
    raw = yaml.safe_load(PAPER_YAML.read_text())
    raw["finetune"]["lengths"] = [500000]
    cfg = validate_config(raw, check_paths=False)
    assert P.study_reference(cfg, 3).empty  # the best over one length is not Table 3's number
    assert set(P.study_reference(cfg, 4)["length"]) == {500000}

    demo = validate_config(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()), check_paths=False)
    demo["results"] = str(tmp_path / "demo")
    t3 = AGG.run_target("table3", demo)
    assert not any(str(c).endswith(("/paper", "/diff")) for c in t3.columns)
    assert AGG.run_target("reproduction", demo).empty
    assert "nothing to compare" in AGG.target_outputs("reproduction", demo["results"])["md"].read_text()


def test_reproduction_margin_is_checked() -> None:
    raw = yaml.safe_load(PAPER_YAML.read_text())
    raw["analysis"] = {"reproduction_margin": -1}
    with pytest.raises(ConfigError, match="reproduction_margin"):
        validate_config(copy.deepcopy(raw), check_paths=False)
