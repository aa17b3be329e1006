"""The findings page (mimlib/analysis/findings.py): each rule on hand-made results whose verdicts
are known (holds, does not hold, not testable), on the paper's own numbers (Tables 3-6 in
mimlib/analysis/paper_values.csv, Tables 8 and 9 below), and end to end on a smoke-shaped results
tree through the workflow's ``findings`` rule and ``snakemake --report``."""

from __future__ import annotations

import copy
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mimlib import paths
from mimlib.analysis import aggregate as AGG
from mimlib.analysis import common as C
from mimlib.analysis import findings as F
from mimlib.analysis.overfitting import COLUMNS as OVERFIT_COLUMNS
from mimlib.analysis.tables import table7

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------ hand-made results
MODELS = ["small", "big"]  # "big" is the largest
IMAGES = {"tiny": 10, "huge": 100}
LENGTHS = [10, 40]
# val loss per (model, dataset, length): big's gap tiny - huge widens from 0.01 to 0.08
VAL = {("big", "tiny", 10): 0.50, ("big", "huge", 10): 0.49, ("big", "tiny", 40): 0.48, ("big", "huge", 40): 0.40,
       ("small", "tiny", 10): 0.55, ("small", "huge", 10): 0.54, ("small", "tiny", 40): 0.53,
       ("small", "huge", 40): 0.47}
# IN-1K top-1: big's gap huge - tiny widens from 1 to 6; small beats big on tiny (80 > 79)
TOP1 = {("big", "tiny", 10): 78.0, ("big", "huge", 10): 79.0, ("big", "tiny", 40): 79.0, ("big", "huge", 40): 85.0,
        ("small", "tiny", 10): 79.0, ("small", "huge", 10): 79.5, ("small", "tiny", 40): 80.0,
        ("small", "huge", 40): 82.0}
FLAGGED = {("big", "tiny", 40)}


def overfit_frame(cells, val, flagged) -> pd.DataFrame:
    rows = []
    for m, d, n in cells:
        v = val[(m, d, n)]
        hit = (m, d, n) in flagged
        rows.append({"model": m, "dataset": d, "length": n, "final_val_loss": v,
                     "min_val_loss": v - 0.03 if hit else v, "min_at_iter": n // 2 if hit else n,
                     "rise": 0.03 / (v - 0.03) if hit else 0.0, "curve_rule": hit, "length_rule": False,
                     "overfit": hit, "reason": "hand-made" if hit else ""})
    return pd.DataFrame(rows, columns=OVERFIT_COLUMNS)


def hand_study(val=VAL, top1=TOP1, flagged=FLAGGED, models=MODELS, lengths=LENGTHS, tasks=("in1k",),
               **kw) -> F.Study:
    cells = [(m, d, n) for m in models for d in IMAGES for n in lengths]
    rows = []
    for m, d, n in cells:
        rows.append({"model": m, "dataset": d, "length": n, "score": "val_loss", "value": val[(m, d, n)],
                     "source": F.SRC_SUMMARY})
        rows.append({"model": m, "dataset": d, "length": n, "score": "train_loss", "value": val[(m, d, n)] - 0.01,
                     "source": F.SRC_SUMMARY})
        if "in1k" in tasks:
            rows.append({"model": m, "dataset": d, "length": n, "score": "in1k/top1", "value": top1[(m, d, n)],
                         "source": F.src_metrics("in1k", m, d, n)})
    t3 = pd.DataFrame([{"model": m, **{d: max(top1[(m, d, n)] for n in lengths) if "in1k" in tasks else math.nan
                                       for d in IMAGES}} for m in models])
    args = dict(name="hand", models=list(models), largest="big", datasets=list(IMAGES), images=IMAGES,
                lengths=list(lengths), finetune_lengths=list(lengths), tasks=list(tasks),
                scores=pd.DataFrame(rows, columns=F.SCORE_COLUMNS), overfit=overfit_frame(cells, val, flagged),
                table3=t3)
    args.update(kw)
    return F.Study(**args)


def by_name(findings) -> dict[str, F.Finding]:
    return {f.key: f for f in findings}


def check(finding: F.Finding, name: str) -> F.Check:
    return next(c for c in finding.checks if c.name == name)


# ------------------------------------------------------------------ (i)
def test_i_holds_and_the_stretch() -> None:
    f = F.finding_i(hand_study())
    assert f.verdict == F.HOLDS, f.reason
    assert [c.verdict for c in f.checks] == [F.HOLDS, F.HOLDS, F.HOLDS]
    assert check(f, "IN-1K part").numbers[0].value == 79.0 and check(f, "IN-1K part").numbers[1].value == 85.0
    stretch = check(f, "stretch")
    assert not stretch.in_verdict and "small" in stretch.reason  # small's 80 > big's 79 on tiny
    assert {n.source for n in check(f, "loss part").numbers} == {F.SRC_OVERFIT, "../tables/table2.md"}


def test_i_does_not_hold_when_the_largest_dataset_overfits_too() -> None:
    f = F.finding_i(hand_study(flagged=FLAGGED | {("big", "huge", 40)}))
    assert f.verdict == F.FAILS and check(f, "loss part").verdict == F.FAILS
    assert "flagged on huge too" in check(f, "loss part").reason
    # no flag at all on the smallest dataset: fails as well
    assert F.finding_i(hand_study(flagged=set())).verdict == F.FAILS
    # the best score on the small dataset is not lower
    top1 = {**TOP1, ("big", "tiny", 40): 86.0}
    f = F.finding_i(hand_study(top1=top1))
    assert f.verdict == F.FAILS and check(f, "IN-1K part").verdict == F.FAILS
    assert check(f, "stretch").verdict == F.FAILS  # big is now above small on tiny


def test_i_not_testable_and_loss_only() -> None:
    one = F.finding_i(hand_study(models=["big"]))
    assert one.verdict == F.UNTESTABLE and "one model" in one.reason
    same = F.finding_i(hand_study(images={"tiny": 50, "huge": 50}))
    assert same.verdict == F.UNTESTABLE and "same number of images" in same.reason
    subset = F.finding_i(hand_study(subsets=["tiny"]))  # a class subset is not a scaling dataset
    assert subset.verdict == F.UNTESTABLE and "1 scaling dataset(s)" in subset.reason
    loss_only = F.finding_i(hand_study(tasks=()))
    assert loss_only.verdict == F.HOLDS and [c.name for c in loss_only.checks] == ["loss part"]
    assert any("loss part only" in n for n in loss_only.notes)
    # IN-1K fine-tuned but the score missing: the loss part decides, and the page says so
    t3 = hand_study().table3.assign(tiny=math.nan)
    f = F.finding_i(hand_study(table3=t3))
    assert f.verdict == F.HOLDS and check(f, "IN-1K part").verdict == F.UNTESTABLE
    assert "testable part(s) only" in f.reason


# ------------------------------------------------------------------ (ii)
def test_ii_holds_narrows_and_not_testable() -> None:
    f = F.finding_ii(hand_study())
    assert f.verdict == F.HOLDS, f.reason
    val_part = check(f, "val-loss part")
    assert [e.value for e in val_part.effects] == pytest.approx([0.01, 0.08, 0.07])
    assert check(f, "IN-1K part").effects[-1].value == pytest.approx(5.0)
    narrow = F.finding_ii(hand_study(val={**VAL, ("big", "huge", 40): 0.475}))  # gap 0.005 < 0.01
    assert narrow.verdict == F.FAILS and check(narrow, "val-loss part").reason == "the gap does not widen"
    assert check(narrow, "IN-1K part").verdict == F.HOLDS
    score_narrow = F.finding_ii(hand_study(top1={**TOP1, ("big", "huge", 40): 79.5}))
    assert score_narrow.verdict == F.FAILS and check(score_narrow, "IN-1K part").verdict == F.FAILS
    one_length = F.finding_ii(hand_study(lengths=[40]))
    assert one_length.verdict == F.UNTESTABLE and "one pre-training length" in one_length.reason
    one_ft = F.finding_ii(hand_study(finetune_lengths=[40]))
    assert one_ft.verdict == F.HOLDS and check(one_ft, "IN-1K part").reason == "IN-1K fine-tuned at one length only"
    no_ft = F.finding_ii(hand_study(tasks=()))
    assert no_ft.verdict == F.HOLDS and [c.name for c in no_ft.checks] == ["val-loss part"]


# ------------------------------------------------------------------ (iii): on Table 7 built by tables.table7
def proxy_cells(ade_sign: float = -1.0) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """Scored cells: IN-1K and ADE20K linear in the val loss; the train loss wobbles off it
    (so r(train) is weaker); one overfitting cell."""
    rows = []
    for i, (m, d, n) in enumerate((m, d, n) for m in MODELS for d in IMAGES for n in LENGTHS):
        v = VAL[(m, d, n)]
        rows.append({"model": m, "dataset": d, "length": n, "val_loss": v,
                     "train_loss": v - 0.01 + 0.03 * math.sin(3 * i), "in1k/top1": 100 - 100 * v,
                     "ade20k/miou": 30 + ade_sign * 40 * v})
    cfg = {"finetune": {"tasks": ["in1k", "ade20k"]}}
    cells = pd.DataFrame(rows)
    overfit = overfit_frame([(r["model"], r["dataset"], r["length"]) for r in rows], VAL, FLAGGED)
    return cfg, cells, overfit


def test_iii_holds_and_fails_on_table7() -> None:
    cfg, cells, overfit = proxy_cells()
    t7 = table7(cfg, cells, overfit)
    f = F.finding_iii(hand_study(tasks=("in1k", "ade20k"), table7=t7))
    assert f.verdict == F.HOLDS, f.reason
    assert len(f.checks) == 4 and all(c.verdict == F.HOLDS for c in f.checks)
    assert check(f, "IN-1K top-1 (%): r(val loss) <= -0.6").numbers[0].value == pytest.approx(-1.0)
    assert all(n.source == "../tables/table7.md" for c in f.checks for n in c.numbers)
    cfg, cells, overfit = proxy_cells(ade_sign=+1.0)  # r(val loss, ADE20K mIoU) = +1
    bad = F.finding_iii(hand_study(tasks=("in1k", "ade20k"), table7=table7(cfg, cells, overfit)))
    assert bad.verdict == F.FAILS and check(bad, "ADE20K mIoU: r(val loss) < 0").verdict == F.FAILS
    assert "ADE20K mIoU: r(val loss) < 0: does not hold" in bad.reason


def test_iii_not_testable() -> None:
    assert F.finding_iii(hand_study(tasks=())).verdict == F.UNTESTABLE
    cfg, cells, overfit = proxy_cells()
    few = table7(cfg, cells.head(2), overfit)  # 2 cells: Table 7 leaves r empty
    f = F.finding_iii(hand_study(tasks=("in1k", "ade20k"), table7=few))
    assert f.verdict == F.UNTESTABLE and "fewer than 3" in f.reason


# ------------------------------------------------------------------ Tables 8 and 9
def paper_table8(top1_8blocks: float = 84.5) -> pd.DataFrame:
    """The paper's Table 8: SwinV2-B on IN1K (20%), # params, train / val loss, IN-1K top-1."""
    rows = [("linear", 90.0, 0.46, 0.47, 84.4), ("blocks4", 140.4, 0.44, 0.48, 84.4),
            ("blocks8", 190.8, 0.41, 0.50, top1_8blocks)]
    return pd.DataFrame([{"encoder": "swinv2_b", "decoder": d, "dataset": "in1k_20", "length": 500000,
                          "params_m": p, "train_loss": t, "val_loss": v, "top1": a} for d, p, t, v, a in rows])


def paper_table9() -> pd.DataFrame:
    """The paper's Table 9: SwinV2-L at 500K, IN1K (10%) vs IN100."""
    rows = [("in1k_10", 128000, 1000, 0.351, 0.515, 83.5), ("in100", 127000, 100, 0.352, 0.511, 83.4)]
    return pd.DataFrame([{"pair": "in1k_10 vs in100", "model": "swinv2_l", "length": 500000, "dataset": d,
                          "sampling": "", "images": i, "classes": c, "train_loss": t, "val_loss": v, "top1": a}
                         for d, i, c, t, v, a in rows])


def paper_study(**kw) -> F.Study:
    """A paper-scale study with only the tables a rule needs."""
    args = dict(name="paper", models=["swinv2_b", "swinv2_l"], largest="swinv2_l",
                datasets=["in1k_10", "in1k_20", "in100"], images={}, lengths=[125000, 500000],
                finetune_lengths=[125000, 500000], tasks=["in1k"], scores=pd.DataFrame(columns=F.SCORE_COLUMNS),
                subsets=["in100"])
    return F.Study(**{**args, **kw})


def test_decoder_rule_on_the_paper_and_a_failing_case() -> None:
    f = F.finding_decoder(paper_study(table8=paper_table8()))
    assert f.verdict == F.HOLDS, f.reason
    assert [c.verdict for c in f.checks if c.in_verdict] == [F.HOLDS, F.HOLDS]
    also = [c for c in f.checks if not c.in_verdict]  # heavier: lower train, higher val loss
    assert also and all(c.verdict == F.HOLDS for c in also)
    bad = F.finding_decoder(paper_study(table8=paper_table8(85.0)))
    assert bad.verdict == F.FAILS and "0.6 points apart" in bad.reason
    assert F.finding_decoder(paper_study(table8=paper_table8().iloc[:0])).verdict == F.UNTESTABLE
    assert "no decoder runs" in F.finding_decoder(hand_study()).reason
    assert F.finding_decoder(paper_study(table8=paper_table8(), tasks=[])).verdict == F.UNTESTABLE


def test_sampling_rule_on_the_paper_and_a_failing_case() -> None:
    f = F.finding_sampling(paper_study(table9=paper_table9()))
    assert f.verdict == F.HOLDS, f.reason  # 0.1 points, 0.78% and 0.28% apart
    assert [c.name for c in f.checks if c.in_verdict] == [
        "in1k_10 vs in100: IN-1K top-1", "in1k_10 vs in100: val loss", "in1k_10 vs in100: train loss"]
    t9 = paper_table9()
    t9.loc[1, "val_loss"] = 0.53  # 2.9% above: beyond the 1% tolerance
    bad = F.finding_sampling(paper_study(table9=t9))
    assert bad.verdict == F.FAILS and "val loss: does not hold" in bad.reason
    none = F.finding_sampling(hand_study())
    assert none.verdict == F.UNTESTABLE and "no sampling runs" in none.reason


# ------------------------------------------------------------------ the paper's own numbers (Tables 3-6)
def paper_tables() -> pd.DataFrame:
    """The shipped transcription (one row per number) as one row per table row, a column per dataset."""
    from mimlib.analysis.paper import paper_values

    wide = paper_values().pivot_table(index=["table", "task", "metric", "model", "length"], columns="dataset",
                                      values="value").reset_index()
    return wide.assign(length=wide["length"].where(wide["table"] != 3))  # Table 3: no length


DS = ["in1k_10", "in1k_20", "in1k_50", "in1k_100", "in22k"]


def test_paper_fixture_is_complete() -> None:
    df = paper_tables()
    assert df.groupby("table").size().to_dict() == {3: 5, 4: 9, 5: 9, 6: 18}
    t3 = df[df["table"] == 3].set_index("model")
    assert t3.at["swinv2_h", "in1k_20"] == 84.4 and t3.at["swinv2_l", "in1k_20"] == 84.7  # the text's example
    assert math.isnan(t3.at["swinv2_s", "in22k"]) and math.isnan(t3.at["swinv2_g", "in1k_20"])


def test_paper_numbers_i_score_part_and_stretch() -> None:
    t3 = paper_tables().query("table == 3")[["model", *DS]].reset_index(drop=True)
    # SwinV2-H, the largest model with a score on IN1K (20%): 84.4 there < 86.3 on IN22K
    c = F.best_score_check(t3, "swinv2_h", "in1k_20", "in22k")
    assert c.verdict == F.HOLDS and [n.value for n in c.numbers] == [84.4, 86.3]
    # SwinV2-L on the smallest dataset IN1K (10%): 83.7 < 85.8
    assert F.best_score_check(t3, "swinv2_l", "in1k_10", "in22k").verdict == F.HOLDS
    # the stretch: on IN1K (20%) SwinV2-H (84.4) is below SwinV2-L (84.7)
    s = F.smaller_model_check(t3, "swinv2_h", ["swinv2_s", "swinv2_b", "swinv2_l"], "in1k_20")
    assert s.verdict == F.HOLDS and s.reason == "below SwinV2-B, SwinV2-L"  # 84.6 and 84.7 > 84.4
    assert [e.value for e in s.effects if "SwinV2-L" in e.label] == [pytest.approx(0.3)]
    # the study-level rule takes the largest model, SwinV2-g, which the paper never ran on 10%
    g = F.best_score_check(t3, "swinv2_g", "in1k_10", "in22k")
    assert g.verdict == F.UNTESTABLE


def test_paper_numbers_ii_score_part() -> None:
    """Tables 4-6 give scores per length for SwinV2-S/B/L: for SwinV2-L (the largest there) the
    gap IN22K - IN1K (10%) widens from 125K to 500K on every task."""
    df = paper_tables().query("table != 3")
    long = df.melt(id_vars=["table", "task", "metric", "model", "length"], value_vars=DS, var_name="dataset")
    long = long.assign(score=long["task"] + "/" + long["metric"], source="paper",
                       length=long["length"].astype(int))[F.SCORE_COLUMNS]
    gaps = {}
    for score in ("inat18/top1", "ade20k/miou", "coco/box_ap", "coco/mask_ap"):
        c = F.gap_check(long, "swinv2_l", score, "in1k_10", "in22k", [125000, 250000, 500000])
        assert c.verdict == F.HOLDS, (score, c.text)
        gaps[score] = [e.value for e in c.effects[:2]]
    assert gaps["inat18/top1"] == pytest.approx([79.1 - 77.3, 81.9 - 77.2])
    assert gaps["ade20k/miou"] == pytest.approx([47.4 - 43.4, 51.2 - 41.9])
    assert gaps["coco/box_ap"] == pytest.approx([52.4 - 50.6, 53.9 - 49.5])


# ------------------------------------------------------------------ seed spread and writers
def seeds(std: float) -> pd.DataFrame:
    keys = [F.quantity("val_loss", "big", d, n) for d in IMAGES for n in LENGTHS]
    return pd.DataFrame({"quantity": keys, "n_seeds": 3, "mean": 0.5, "std": std, "min": 0.4, "max": 0.6})


def test_seed_spread_beside_effects() -> None:
    f = F.finding_ii(hand_study(seeds=seeds(0.001)))
    widen = check(f, "val-loss part").effects[-1]
    assert widen.combined_std == pytest.approx(0.002) and widen.exceeds  # 0.07 > 2 x 0.002
    assert check(f, "val-loss part").numbers[0].std == 0.001
    f = F.finding_ii(hand_study(seeds=seeds(0.05)))
    assert check(f, "val-loss part").effects[-1].exceeds is False  # 0.07 < 2 x 0.1
    assert check(f, "IN-1K part").effects[-1].combined_std is None  # top-1 not in the file
    md = F.findings_markdown("hand", [f], seeds(0.05))
    assert "exceeds 2 x combined: no" in md and "not all quantities in seed_spread.csv" in md
    f = F.finding_ii(hand_study())
    assert check(f, "val-loss part").effects[-1].combined_std is None
    md = F.findings_markdown("hand", [f], None)
    assert "Seed spread not measured; run `make demo-seeds`" in md and "exceeds" not in md


# ------------------------------------------------------------------ beyond the paper's claims
def _with_ratios(study: F.Study, ratio) -> F.Study:
    rows = study.scores[study.scores["score"] == "val_loss"].copy()
    rows["score"] = "val_loss_ratio"
    rows["value"] = [ratio(m, d, n) for m, d, n in zip(rows["model"], rows["dataset"], rows["length"])]
    study.scores = pd.concat([study.scores, rows], ignore_index=True)
    return study


def test_learns_holds_fails_and_not_testable() -> None:
    assert by_name(F.study_findings(hand_study()))["learns"].verdict == F.UNTESTABLE  # no trivial loss
    good = by_name(F.study_findings(_with_ratios(hand_study(), lambda m, d, n: 0.7 + 0.001 * n)))["learns"]
    assert good.verdict == F.HOLDS and "0.710" in good.checks[0].text and "0.740" in good.checks[0].text
    # one cell at the mean-colour level is enough to fail
    bad = _with_ratios(hand_study(), lambda m, d, n: 0.97 if (m, d, n) == ("small", "tiny", 10) else 0.7)
    f = by_name(F.study_findings(bad))["learns"]
    assert f.verdict == F.FAILS and "small/tiny/10" in f.reason


def test_helps_per_model_and_task() -> None:
    def scratch(values):
        return pd.DataFrame([{"model": m, "score": "in1k/top1", "value": v,
                              "source": F.src_metrics("in1k", m, "scratch", 0)} for m, v in values.items()])

    assert by_name(F.study_findings(hand_study()))["helps"].verdict == F.UNTESTABLE
    # TOP1's best: big 85, small 82
    f = by_name(F.study_findings(hand_study(scratch=scratch({"big": 80.0, "small": 81.0}))))["helps"]
    assert f.verdict == F.HOLDS and len(f.checks) == 2
    big = next(c for c in f.checks if c.name.endswith(", big"))
    assert big.effects[0].value == pytest.approx(max(v for (m, _, _), v in TOP1.items() if m == "big") - 80.0)
    f = by_name(F.study_findings(hand_study(scratch=scratch({"big": 80.0, "small": 82.0}))))["helps"]
    assert f.verdict == F.FAILS and "small" in f.reason


def test_writers_json_md_html() -> None:
    found = F.study_findings(hand_study())
    doc = json.loads(F.findings_json("hand", found, None))
    assert [x["key"] for x in doc["findings"]] == ["i", "ii", "iii", "decoder", "sampling", "learns", "helps"]
    assert all(x["verdict"] in F.VERDICTS for x in doc["findings"]) and doc["seed_spread"]["measured"] is False
    md = F.findings_markdown("hand", found, None)
    assert "[85](../finetune/in1k/big/huge/40/metrics.json)" in md and "**Rule:**" in md
    page = F.findings_html("hand", found, None)
    assert "<a href='../tables/table3.md'>" in page and page.count("<h3") == 7


# ------------------------------------------------------------------ end to end: the smoke study
def smoke_loss(dataset: str, length: int) -> float:
    return 0.6 + 0.02 * (dataset == "two_classes") + 0.1 * 8 / length


def write_smoke_tree(base: Path) -> tuple[dict, Path]:
    """config/smoke.yaml's study with made-up results (no training): manifests over a generated
    image folder, a pre-training summary and curves, every fine-tuning metrics.json."""
    from mimlib.config import finetune_cells, pretrain_cells, validate_config
    from mimlib.data.demo import ClassificationDemoSpec, write_classification_demo
    from mimlib.data.index import build_index
    from mimlib.data.manifests import build_manifest

    raw = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    raw["results"] = str(base / "results")
    cfg = validate_config(copy.deepcopy(raw))
    results = Path(cfg["results"])
    spec = {k: v for k, v in cfg["demo_data"].items() if k in ("num_classes", "train_per_class", "val_per_class",
                                                                  "min_size", "max_size")}
    write_classification_demo(base / "images", ClassificationDemoSpec(**spec, seed=0))
    for split in ("train", "val"):
        build_index(base / "images" / split, paths.at(results, paths.INDEX, source="imagenet", split=split))
    for name, ds in cfg["datasets"].items():
        build_manifest(paths.at(results, paths.INDEX, source="imagenet", split="train"),
                       paths.at(results, paths.MANIFEST, dataset=name), "fraction" if "fraction" in ds else "classes",
                       seed=0, fraction=ds.get("fraction"), num_classes=ds.get("num_classes"))
    cells = pretrain_cells(cfg)
    summary = pd.DataFrame([{"model": c.model, "dataset": c.dataset, "length": c.length,
                             "train_loss": smoke_loss(c.dataset, c.length) - 0.02,
                             "val_loss": smoke_loss(c.dataset, c.length)} for c in cells])
    paths.at(results, paths.PRETRAIN_SUMMARY).parent.mkdir(parents=True, exist_ok=True)
    summary.to_csv(paths.at(results, paths.PRETRAIN_SUMMARY), index=False)
    curves = pd.DataFrame([{"model": c.model, "dataset": c.dataset, "length": c.length, "iter": it,
                            "loss": smoke_loss(c.dataset, it), "val_loss": smoke_loss(c.dataset, it)}
                           for c in cells for it in (4, c.length)])
    curves.to_parquet(paths.at(results, paths.PRETRAIN_CURVES), index=False)
    values = {"in1k": {"top1": 30.0, "top5": 70.0}, "inat18": {"top1": 20.0, "top5": 50.0},
              "coco": {"box_ap": 5.0, "mask_ap": 4.0}, "ade20k": {"miou": 10.0, "acc": 40.0}}
    for c in finetune_cells(cfg):
        shift = 0.1 * (c.dataset == "two_classes")
        path = paths.at(results, paths.FINETUNE_METRICS, task=c.task, model=c.model, dataset=c.dataset, length=c.length)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"task": c.task, "model": c.model, "dataset": c.dataset, "length": c.length,
                                    "metrics": {k: v + shift for k, v in values[c.task].items()}}))
    for target in ("overfitting", "table2", "table3", "table4", "table5", "table6", "table7", "table8", "table9"):
        AGG.run_target(target, cfg, results)
    return raw, results


def test_findings_target_on_the_smoke_study(tmp_path) -> None:
    """The workflow's findings rule on the smoke study (only the aggregation rules included, the
    other targets' outputs already there): the files exist, the json parses, the verdicts are
    the allowed ones, every link resolves; the report opens on the findings."""
    raw, results = write_smoke_tree(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text(f'configfile: "{config}"\n'
                         f'report: "{ROOT}/workflow/report/workflow.rst"\n'
                         f'include: "{ROOT}/workflow/rules/common.smk"\n'
                         f'include: "{ROOT}/workflow/rules/aggregate.smk"\n')
    target = str(results / C.FINDINGS.format(ext="html"))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(snakefile), "-d", str(tmp_path), "--cores", "1"]
    run = subprocess.run([*cmd, target], cwd=ROOT, capture_output=True, text=True, timeout=300)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert re.search(r"^findings\s+1$", log, re.M) and not re.search(r"^table\d\s+1$", log, re.M), log[-3000:]

    out = {ext: results / C.FINDINGS.format(ext=ext) for ext in ("json", "md", "html")}
    assert all(p.stat().st_size > 500 for p in out.values())
    doc = json.loads(out["json"].read_text())
    assert doc["study"] == "smoke" and doc["seed_spread"]["measured"] is False
    verdicts = {f["key"]: f["verdict"] for f in doc["findings"]}
    assert set(verdicts.values()) <= set(F.VERDICTS)
    # one model; half vs two_classes is a fraction vs a class subset; 2 cells; one decoder
    # the smoke tree's made-up summary has no trivial loss; its scratch scores are below the cells'
    assert verdicts == {"i": F.UNTESTABLE, "ii": F.UNTESTABLE, "iii": F.UNTESTABLE,
                        "decoder": F.UNTESTABLE, "sampling": F.FAILS, "learns": F.UNTESTABLE,
                        "helps": verdicts["helps"]}
    assert verdicts["helps"] != F.UNTESTABLE
    reasons = {f["key"]: f["reason"] for f in doc["findings"]}
    assert "one model" in reasons["i"] and "fewer than 3" in reasons["iii"]
    sources = {n["source"] for f in doc["findings"] for c in f["checks"] for n in c["numbers"]}
    md_links = set(re.findall(r"\]\(([^)#]+)\)", out["md"].read_text()))
    assert sources and sources <= md_links
    for link in md_links:
        assert (out["md"].parent / link).exists(), link
    assert "run `make demo-seeds`" in out["md"].read_text()

    report = tmp_path / "report.html"
    rep = subprocess.run([*cmd, target, "--report", str(report)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert rep.returncode == 0, (rep.stdout + rep.stderr)[-4000:]
    text = report.read_text()
    assert "Start with the findings" in text and "1. Findings" in text and "findings.html</a>" in text
