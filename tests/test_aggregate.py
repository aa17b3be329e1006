"""The aggregation stage on a small fake results tree with known values (no training runs).

The tree (``fake_tree``) has 2 models x 3 datasets (two class fractions and a class subset) x
3 lengths, losses from a closed form with two overfitting cells, scores that are linear in the
validation loss (IN-1K exactly, so the proxy must be perfect), real manifests over a generated
image folder, and random-weight SimMIM checkpoints for Figure 5.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from mimlib import paths
from mimlib.analysis import aggregate as AGG
from mimlib.analysis import common as C
from mimlib.analysis.overfitting import classify_overfitting
from mimlib.analysis.scaling import fit_scaling
from mimlib.analysis.stats import pearson, spearman

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["swinv2_pico", "swinv2_nano"]
DATASETS = ["half", "full", "two_classes"]
LENGTHS = [8, 16, 32]
OVERFIT = {("swinv2_nano", "half", 32), ("swinv2_nano", "two_classes", 32)}
PARAMS = {"swinv2_pico": 820059, "swinv2_nano": 1654414}
IMAGES = {"half": 24, "full": 48, "two_classes": 24}
# left out of the "partial" tree: whole IN-1K model x dataset, one iNat cell
MISSING = {("in1k", "swinv2_nano", "two_classes", n) for n in LENGTHS} | {("inat18", "swinv2_pico", "half", 16)}


def fake_config(results: str = "results") -> dict:
    return {
        "name": "fake-study",
        "seed": 0,
        "results": results,
        "demo_data": {"num_classes": 4, "train_per_class": 12, "val_per_class": 3, "min_size": 64, "max_size": 96},
        "sources": {"imagenet": {"demo": True}},
        "datasets": {
            "half": {"source": "imagenet", "fraction": 0.5, "label": "Half (50%)"},
            "full": {"source": "imagenet", "fraction": 1.0},
            "two_classes": {"source": "imagenet", "num_classes": 2, "label": "Two classes"},
        },
        "validation": {"source": "imagenet"},
        "models": list(MODELS),
        "lengths": list(LENGTHS),
        "pretrain": {"img_size": 64, "window_size": 4, "global_batch": 8, "micro_batch": 8,
                     "norm_target_window": 7, "num_workers": 0, "threads": 1,
                     "log_every": 2, "val_every": 4, "checkpoint_every": 4},
        "finetune": {
            "tasks": ["in1k", "inat18", "coco", "ade20k"],
            "in1k": {"data": {"source": "imagenet"}, "recipe": {"img_size": 64, "window_size": 4}},
            "inat18": {"data": {"demo": {}}},
            "coco": {"data": {"demo": {}}},
            "ade20k": {"data": {"demo": {}}},
        },
    }


def val_loss(model: str, dataset: str, length: int) -> float:
    if (model, dataset, length) in OVERFIT:
        return val_loss(model, dataset, 16) + 0.02
    return (0.3 + 0.04 * (PARAMS["swinv2_pico"] / PARAMS[model]) ** 0.5
            + 0.03 * (24 / IMAGES[dataset]) ** 0.4 + 0.2 * (8 / length) ** 0.7 + 0.001 * len(dataset))


def train_loss(model: str, dataset: str, length: int) -> float:
    shift = 0.04 if (model, dataset, length) in OVERFIT else 0.01
    return val_loss(model, dataset, length) - shift


def score(task: str, model: str, dataset: str, length: int) -> dict[str, float]:
    v = val_loss(model, dataset, length)
    wobble = 0.3 * math.sin(7 * length + len(dataset) + PARAMS[model] % 7)
    if task == "in1k":
        return {"top1": 100.0 - 100.0 * v, "top5": 100.0 - 20.0 * v}
    if task == "inat18":
        return {"top1": 90.0 - 120.0 * v + wobble, "top5": 95.0 - 50.0 * v}
    if task == "coco":
        return {"box_ap": 60.0 - 50.0 * v + wobble, "mask_ap": 56.0 - 50.0 * v - wobble}
    return {"miou": 55.0 - 60.0 * v + wobble, "acc": 80.0 - 30.0 * v}


SCRATCH = {"in1k": {"top1": 40.0, "top5": 70.0}, "inat18": {"top1": 30.0, "top5": 50.0},
           "coco": {"box_ap": 20.0, "mask_ap": 18.0}, "ade20k": {"miou": 15.0, "acc": 60.0}}


def curve(model: str, dataset: str, length: int) -> pd.DataFrame:
    final = val_loss(model, dataset, length)
    rows = []
    for it in range(2, length + 1, 2):
        frac = it / length
        if (model, dataset, length) in OVERFIT:  # dips to 0.03 below the end at half way, then rises
            v = final - 0.03 * (1 - abs(2 * frac - 1))
        else:
            v = final + 0.2 * (1 - frac)
        rows.append({"iter": it, "loss": train_loss(model, dataset, length) + 0.25 * (1 - frac),
                     "val_loss": v if it % 4 == 0 or it == length else math.nan,
                     "lr": 1e-3, "grad_norm": 1.0, "images_per_s": 100.0, "corrupt_images": 0.0})
    df = pd.DataFrame(rows)
    df.loc[df["iter"] == length, "val_loss"] = final
    df.insert(0, "length", length)
    df.insert(0, "dataset", dataset)
    df.insert(0, "model", model)
    return df


def write_tree(base: Path, images: Path, partial: bool) -> tuple[dict, Path]:
    """Write the fake results tree under ``base/results``; return (validated config, results)."""
    import torch

    from mimlib.config import finetune_cells, pretrain_recipe, validate_config
    from mimlib.data.index import build_index
    from mimlib.data.manifests import build_manifest
    from mimlib.models.simmim import build_simmim

    cfg = validate_config(fake_config(str(base / "results")))
    results = Path(cfg["results"])
    build_index(images / "train", paths.at(results, paths.INDEX, source="imagenet", split="train"))
    build_index(images / "val", paths.at(results, paths.INDEX, source="imagenet", split="val"))
    for name, ds in cfg["datasets"].items():
        kind = "fraction" if "fraction" in ds else "classes"
        build_manifest(paths.at(results, paths.INDEX, source="imagenet", split="train"),
                       paths.at(results, paths.MANIFEST, dataset=name), kind, seed=0,
                       fraction=ds.get("fraction"), num_classes=ds.get("num_classes"))
    rows = [{"model": m, "dataset": d, "length": n, "train_loss": train_loss(m, d, n), "val_loss": val_loss(m, d, n),
             "corrupt_images": 0, "branch_wall_time_s": 1.0} for m in MODELS for d in DATASETS for n in LENGTHS]
    paths.at(results, paths.PRETRAIN_SUMMARY).parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(paths.at(results, paths.PRETRAIN_SUMMARY), index=False)
    pd.concat([curve(m, d, n) for m in MODELS for d in DATASETS for n in LENGTHS]).to_parquet(
        paths.at(results, paths.PRETRAIN_CURVES), index=False)
    for c in finetune_cells(cfg):
        if partial and (c.task, c.model, c.dataset, c.length) in MISSING:
            continue
        metrics = SCRATCH[c.task] if c.dataset == paths.SCRATCH else score(c.task, c.model, c.dataset, c.length)
        path = paths.at(results, paths.FINETUNE_METRICS, task=c.task, model=c.model, dataset=c.dataset, length=c.length)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"task": c.task, "model": c.model, "dataset": c.dataset, "length": c.length,
                                    "metrics": metrics, "wall_time_s": 1.0}))
    recipe = pretrain_recipe(cfg, "swinv2_nano")
    for ds in DATASETS:  # Figure 5: the largest model (nano) at the longest length
        torch.manual_seed(len(ds))
        net = build_simmim("swinv2_nano", img_size=recipe["img_size"], window_size=recipe["window_size"],
                           decoder=recipe["decoder"], norm_target_window=recipe["norm_target_window"])
        path = paths.at(results, paths.CELL_CKPT, model="swinv2_nano", dataset=ds, length=32)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": net.state_dict(), "model_name": "swinv2_nano", "recipe": recipe, "iteration": 32}, path)
    return cfg, results


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    from mimlib.data.demo import ClassificationDemoSpec, write_classification_demo

    base = tmp_path_factory.mktemp("agg_images") / "imagenet"
    write_classification_demo(base, ClassificationDemoSpec(num_classes=4, train_per_class=12, val_per_class=3,
                                                           min_size=64, max_size=96, seed=0))
    return base


@pytest.fixture(scope="module")
def tree(tmp_path_factory, images) -> tuple[dict, Path]:
    cfg, results = write_tree(tmp_path_factory.mktemp("agg_partial"), images, partial=True)
    AGG.write_overfitting(cfg, results)
    return cfg, results


# ------------------------------------------------------------------ tables
def test_table3_is_best_over_lengths_and_missing_stays_empty(tree) -> None:
    cfg, results = tree
    df = AGG.write_table3(cfg, results).set_index("model")
    for m in MODELS:
        for d in DATASETS:
            if (m, d) == ("swinv2_nano", "two_classes"):
                assert math.isnan(df.at[m, d])
            else:
                assert df.at[m, d] == pytest.approx(max(score("in1k", m, d, n)["top1"] for n in LENGTHS))
        assert df.at[m, "scratch"] == 40.0
    csv = pd.read_csv(results / "tables/table3.csv")
    assert list(csv.columns) == ["model", *DATASETS, "scratch"] and csv["two_classes"].isna().sum() == 1
    md = (results / "tables/table3.md").read_text()
    assert "SwinV2-nano" in md and "Half (50%)" in md and "Two classes" in md
    assert (results / "tables/table3.html").stat().st_size > 200


def test_tables_4_to_6_per_length(tree) -> None:
    cfg, results = tree
    t4 = AGG.write_table_by_length(cfg, results, "table4").set_index(["model", "length"])
    assert math.isnan(t4.at[("swinv2_pico", 16), "half"])
    assert t4.at[("swinv2_pico", 32), "half"] == pytest.approx(score("inat18", "swinv2_pico", "half", 32)["top1"])
    assert t4.at[("swinv2_nano", 0), "scratch"] == 30.0 and math.isnan(t4.at[("swinv2_nano", 0), "full"])
    assert len(t4) == len(MODELS) * (len(LENGTHS) + 1)
    t6 = AGG.write_table_by_length(cfg, results, "table6").set_index(["model", "length"])
    want = score("coco", "swinv2_nano", "full", 8)
    assert t6.at[("swinv2_nano", 8), "full/box_ap"] == pytest.approx(want["box_ap"])
    assert t6.at[("swinv2_nano", 8), "full/mask_ap"] == pytest.approx(want["mask_ap"])
    t5 = AGG.write_table_by_length(cfg, results, "table5").set_index(["model", "length"])
    assert t5.at[("swinv2_pico", 16), "two_classes"] == pytest.approx(score("ade20k", "swinv2_pico", "two_classes", 16)["miou"])


def test_tables_1_2_8_9(tree) -> None:
    cfg, results = tree
    t1 = AGG.write_table1(cfg, results).set_index("model")
    assert t1.at["swinv2_pico", "params"] == PARAMS["swinv2_pico"]
    assert t1.at["swinv2_nano", "pretrain_img_size"] == 64 and t1.at["swinv2_nano", "finetune_window"] == 4
    assert 0 < t1.at["swinv2_pico", "pretrain_gflops"] < t1.at["swinv2_nano", "pretrain_gflops"]
    t2 = AGG.write_table2(cfg, results).set_index("dataset")
    assert t2["images"].to_dict() == IMAGES and t2["classes"].to_dict() == {"half": 4, "full": 4, "two_classes": 2}
    t8 = AGG.write_table8(cfg, results)  # one decoder in the study: header only
    assert t8.empty and list(pd.read_csv(results / "tables/table8.csv").columns)[:2] == ["encoder", "decoder"]
    t9 = AGG.write_table9(cfg, results)
    assert set(t9["dataset"]) == {"half", "two_classes"}  # 24 images each: the closest pair
    row = t9[(t9["model"] == "swinv2_pico") & (t9["length"] == 16) & (t9["dataset"] == "two_classes")].iloc[0]
    assert row["images"] == 24 and row["classes"] == 2
    assert row["val_loss"] == pytest.approx(val_loss("swinv2_pico", "two_classes", 16))
    assert row["top1"] == pytest.approx(score("in1k", "swinv2_pico", "two_classes", 16)["top1"])
    assert t9[(t9["model"] == "swinv2_nano") & (t9["dataset"] == "two_classes")]["top1"].isna().all()


def test_table8_compares_decoders(tree) -> None:
    cfg, results = tree
    cfg = copy.deepcopy(cfg)
    cfg["pretrain"]["per_model"] = {"swinv2_nano": {"decoder": "blocks4"}}
    t8 = AGG.write_table8(cfg, results)
    assert set(t8["decoder"]) == {"linear", "blocks4"} and len(t8) == len(MODELS) * len(DATASETS) * len(LENGTHS)
    linear = t8[t8["decoder"] == "linear"]["params_m"].iloc[0]
    assert linear * 1e6 > PARAMS["swinv2_pico"]  # encoder + mask token + decoder
    row = t8[(t8["encoder"] == "swinv2_nano") & (t8["dataset"] == "full") & (t8["length"] == 8)].iloc[0]
    assert row["top1"] == pytest.approx(score("in1k", "swinv2_nano", "full", 8)["top1"])


def test_table7_matches_numpy(tree) -> None:
    cfg, results = tree
    t7 = AGG.write_table7(cfg, results)
    cells = [(m, d, n) for m in MODELS for d in DATASETS for n in LENGTHS]
    for group, keep in (("all", lambda c: True), ("non-overfit", lambda c: c not in OVERFIT)):
        sel = [c for c in cells if keep(c) and ("inat18", *c) not in MISSING]
        y = [score("inat18", *c)["top1"] for c in sel]
        row = t7[(t7["task"] == "inat18") & (t7["group"] == group)].iloc[0]
        assert row["n"] == len(sel)
        assert row["r_val_loss"] == pytest.approx(np.corrcoef([val_loss(*c) for c in sel], y)[0, 1])
        assert row["r_train_loss"] == pytest.approx(np.corrcoef([train_loss(*c) for c in sel], y)[0, 1])
    over = t7[(t7["task"] == "in1k") & (t7["group"] == "overfit")].iloc[0]
    assert over["n"] == 1 and math.isnan(over["r_val_loss"])  # nano/two_classes has no IN-1K: 1 < 3 cells
    assert set(t7["score"]) == {label for _, _, label in C.TASK_SCORES}


def test_pearson_spearman_against_numpy() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=20), rng.normal(size=20)
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert math.isnan(pearson([1.0, 2.0], [3.0, 4.0]))  # fewer than 3
    ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731 (no ties here)
    assert spearman(x, y) == pytest.approx(np.corrcoef(ranks(x), ranks(y))[0, 1])
    assert spearman([1, 2, 2, 3], [1, 5, 5, 9]) == pytest.approx(1.0)


# ------------------------------------------------------------------ overfitting
def _hand_curves(rows):
    out = []
    for (model, dataset, length), vals in rows.items():
        for it, v in vals:
            out.append({"model": model, "dataset": dataset, "length": length, "iter": it, "loss": 0.5, "val_loss": v})
    return pd.DataFrame(out)


def test_overfitting_rule_on_hand_made_curves() -> None:
    curves = _hand_curves({
        ("m", "small", 10): [(5, 0.50), (10, 0.45)],               # falls: fine
        ("m", "small", 20): [(5, 0.50), (10, 0.45), (20, 0.44)],   # still falls: fine
        ("m", "small", 40): [(10, 0.45), (20, 0.40), (40, 0.43)],  # curve rises 7.5%: overfit
        ("m", "big", 10): [(5, 0.50), (10, 0.40)],
        ("m", "big", 20): [(10, 0.40), (20, 0.4030)],              # +0.75% rise: within 1% tolerance
        ("m", "big", 40): [(40, 0.41)],                            # above length 10 by 2.5%: length rule
    })
    summary = pd.DataFrame([{"model": "m", "dataset": d, "length": n,
                             "val_loss": curves[(curves.dataset == d) & (curves.length == n)].val_loss.iloc[-1]}
                            for d in ("small", "big") for n in (10, 20, 40)])
    df = classify_overfitting(summary, curves, tolerance=0.01).set_index(["dataset", "length"])
    assert df["overfit"].to_dict() == {("small", 10): False, ("small", 20): False, ("small", 40): True,
                                       ("big", 10): False, ("big", 20): False, ("big", 40): True}
    assert df.at[("small", 40), "curve_rule"] and df.at[("small", 40), "rise"] == pytest.approx(0.075)
    assert df.at[("small", 40), "min_at_iter"] == 20
    assert df.at[("big", 40), "length_rule"] and not df.at[("big", 40), "curve_rule"]
    assert "10" in df.at[("big", 40), "reason"]
    strict = classify_overfitting(summary, curves, tolerance=0.005).set_index(["dataset", "length"])
    assert strict.at[("big", 20), "overfit"]  # 0.75% > 0.5%
    assert not classify_overfitting(summary, curves, tolerance=0.2)["overfit"].any()


def test_overfitting_file_of_the_fake_tree(tree) -> None:
    _, results = tree
    df = pd.read_csv(results / C.OVERFITTING)
    flagged = {(r.model, r.dataset, int(r.length)) for r in df.itertuples() if r.overfit}
    assert flagged == OVERFIT


# ------------------------------------------------------------------ proxy and scaling
def test_proxy_is_perfect_when_val_loss_predicts_scores(tree) -> None:
    cfg, results = tree
    per_cell, summary = AGG.write_proxy(cfg, results)
    row = summary.set_index("task").loc["in1k"]
    assert row["spearman_val_loss"] == pytest.approx(1.0) and row["spearman_loo"] == pytest.approx(1.0)
    assert row["slope"] == pytest.approx(-100.0) and row["intercept"] == pytest.approx(100.0)
    assert row["rmse_loo"] == pytest.approx(0.0, abs=1e-8)
    assert row["runs_needed"] == 1 and row["runs_saved"] == row["measured"] - 1 == 14
    assert row["regret_top1"] == pytest.approx(0.0)
    cells = per_cell[per_cell["task"] == "in1k"]
    # cells never fine-tuned on IN-1K are still predicted from their val loss
    unmeasured = cells[cells["measured"].isna()]
    assert len(unmeasured) == 3
    for r in unmeasured.itertuples():
        assert r.predicted == pytest.approx(100 - 100 * val_loss(r.model, r.dataset, r.length))
    assert cells["val_loss_rank"].tolist() == sorted(cells["val_loss_rank"])
    assert (results / "figures/proxy.png").stat().st_size > 5000


def test_scaling_fit_recovers_known_parameters() -> None:
    N = np.array([1e6, 4e6, 1.6e7, 6.4e7])
    D = np.array([1e4, 3e4, 1e5, 3e5])
    iters = np.array([1e3, 2e3, 4e3, 8e3])
    grid = np.array(np.meshgrid(N, D, iters, indexing="ij")).reshape(3, -1)
    E, A, a, B, b, Cc, c = 0.3, 0.2, 0.5, 0.15, 0.35, 0.4, 0.7
    L = E + A * (grid[0] / 1e6) ** -a + B * (grid[1] / 1e4) ** -b + Cc * (grid[2] / 1e3) ** -c
    fit = fit_scaling(*grid, L)
    assert fit.form == "additive" and fit.axes == ["N", "D", "I"]
    p = fit.params
    assert p["E"] == pytest.approx(E, abs=2e-3)
    assert (p["coef_N"], p["exp_N"]) == pytest.approx((A, a), rel=2e-2)
    assert (p["coef_D"], p["exp_D"]) == pytest.approx((B, b), rel=2e-2)
    assert (p["coef_I"], p["exp_I"]) == pytest.approx((Cc, c), rel=2e-2)
    assert fit.r2 > 0.9999
    # few cells: the multiplicative log form, exact on power-law data
    Lm = 2.0 * (grid[0] / 1e6) ** -0.1 * (grid[2] / 1e3) ** -0.2
    few = [0, 5, 21, 42, 63]
    fit2 = fit_scaling(grid[0][few], np.full(5, 1e4), grid[2][few], Lm[few])
    assert fit2.form == "multiplicative" and fit2.axes == ["N", "I"]
    assert (fit2.params["K"], fit2.params["exp_N"], fit2.params["exp_I"]) == pytest.approx((2.0, 0.1, 0.2))


def test_study_scaling_outputs(tree) -> None:
    cfg, results = tree
    AGG.write_table1(cfg, results)
    fit, cells, predictions = AGG.write_scaling(cfg, results)
    assert fit.form == "additive" and fit.n == len(MODELS) * len(DATASETS) * len(LENGTHS) - len(OVERFIT)
    assert not cells[cells["overfit"]]["used"].any()
    assert fit.r2 > 0.99  # the fake losses follow the additive form off the overfitting cells
    assert predictions["predicted_val_loss"].notna().all()
    assert json.loads((results / C.SCALING_JSON).read_text())["form"] == "additive"


# ------------------------------------------------------------------ figures
def test_figure5_picks_overfitting_and_non_overfitting_cells(tree) -> None:
    from mimlib.analysis.reconstruction import choose_cells

    cfg, results = tree
    chosen = choose_cells(cfg, pd.read_csv(results / C.OVERFITTING).astype({"overfit": bool}), AGG.largest_model(cfg))
    # nano at 32: two_classes has the highest final val loss of the overfitting cells; of the
    # others, full (the most data) has the lowest
    assert chosen == [("two_classes", "overfitting"), ("full", "non-overfitting")]


def test_reconstruction_denormalises_like_the_target() -> None:
    import torch

    from mimlib.analysis.reconstruction import local_stats, prediction_to_input_space
    from mimlib.models.simmim import normalize_targets

    x = torch.randn(2, 3, 32, 32)
    mean, std = local_stats(x, 7)
    assert torch.allclose((x - mean) / std, normalize_targets(x, 7), atol=1e-4)
    # a perfect prediction of the target maps back to the input
    assert torch.allclose(prediction_to_input_space(normalize_targets(x, 7), x, 7), x, atol=1e-4)


def test_placeholder_figures_without_data(tree, tmp_path) -> None:
    cfg, _ = tree
    from mimlib.analysis.figures import figure6

    figure6(cfg, pd.DataFrame(), [], tmp_path / "f6.png", tmp_path / "f6.pdf")
    assert (tmp_path / "f6.png").stat().st_size > 2000 and (tmp_path / "f6.pdf").exists()


# ------------------------------------------------------------------ Snakemake: targets and report
def _snakemake(workdir: Path, snakefile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(snakefile), "-d", str(workdir), "--cores", "2", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _job_inputs(log: str, rule: str) -> list[str]:
    """The input files Snakemake printed for ``rule``'s job."""
    block = log.split(f"rule {rule}:\n", 1)[1].split("\n    output:", 1)[0]
    return [p.strip() for p in block.split("input:", 1)[1].split(",")] if "input:" in block else []


def test_snakemake_targets_and_report(tmp_path, images) -> None:
    """Aggregation targets build from a complete fake tree with only the aggregation rules
    included (so the fake inputs are source files), a table's job reads only its own task's
    results, and ``snakemake --report`` builds a self-contained HTML report. (A few targets
    only, to stay fast: every job is a fresh process.)"""
    cfg, results = write_tree(tmp_path, images, partial=False)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(fake_config(str(results))))
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text(
        f'configfile: "{config}"\n'
        f'include: "{ROOT}/workflow/rules/common.smk"\n'
        f'include: "{ROOT}/workflow/rules/aggregate.smk"\n'
    )
    targets = [str(results / "tables/table3.html"), str(results / C.OVERFITTING), str(results / "figures/fig7.png")]
    run = _snakemake(tmp_path, snakefile, *targets)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    inputs = _job_inputs(log, "table3")
    assert len(inputs) == len(MODELS) * (len(DATASETS) * len(LENGTHS) + 1)  # + scratch
    assert all("/finetune/in1k/" in p for p in inputs)
    assert _job_inputs(log, "overfitting") == [str(results / paths.PRETRAIN_SUMMARY), str(results / paths.PRETRAIN_CURVES)]
    table3 = pd.read_csv(results / "tables/table3.csv").set_index("model")
    assert table3.at["swinv2_nano", "full"] == pytest.approx(max(score("in1k", "swinv2_nano", "full", n)["top1"] for n in LENGTHS))
    assert (results / "figures/fig7.png").stat().st_size > 10_000 and (results / "figures/fig7.pdf").exists()
    assert (results / "logs/aggregate/table3.log").exists()  # each target's own log (snakemake --lint)
    report = tmp_path / "report.html"
    rep = _snakemake(tmp_path, snakefile, *targets, "--report", str(report))
    assert rep.returncode == 0, (rep.stdout + rep.stderr)[-4000:]
    text = report.read_text()
    assert report.stat().st_size > 50_000
    assert "Table 3 of study <strong>fake-study</strong>" in text and "tolerance" in text


def test_report_captions_render() -> None:
    """Every report() caption of aggregate.smk exists and renders (Jinja, then reStructuredText)."""
    import re
    from types import SimpleNamespace

    from docutils.core import publish_parts
    from jinja2 import Environment

    rules = (ROOT / "workflow/rules/aggregate.smk").read_text()
    extra = {"overfitting", "proxy", "scaling", "reproduction", "findings"}
    names = {*(f"table{i}" for i in range(1, 10)), *(f"fig{i}" for i in range(1, 9)), *extra}
    # one row of AGG_TARGETS per target, each with the report entry (shown=) its rule gets
    rows = re.findall(r'^    "(\w+)": dict\((.*?)\),?\n(?=    "|    #|})', rules, re.M | re.S)
    assert names == {name for name, _ in rows}
    assert all("shown=" in spec for _, spec in rows)
    fake = SimpleNamespace(config=fake_config(), params=SimpleNamespace(tolerance=0.02))
    for name in sorted(names):
        source = (ROOT / f"workflow/report/{name}.rst").read_text()
        text = Environment().from_string(source).render(snakemake=fake)
        assert "fake-study" in text, name
        with warnings.catch_warnings():  # Snakemake renders captions with this (deprecated) argument
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            body = publish_parts(text, writer_name="html", settings_overrides={"report_level": 2, "halt_level": 2})["body"]
        assert len(body) > 200, name


def test_bounded_least_squares_is_the_exact_optimum_with_zeros_at_the_bound() -> None:
    """The scaling fit's inner solve equals the best of every support (an exhaustive oracle)."""
    import itertools

    from mimlib.analysis.scaling import _nnls_with_free_intercept

    rng = np.random.default_rng(0)
    for trial in range(20):
        X = rng.uniform(0.1, 1.0, size=(12, 3))
        y = 2.0 + X @ rng.normal(size=3) + 0.01 * rng.normal(size=12)  # some true coefficients negative
        coef, sse = _nnls_with_free_intercept(X, y)
        assert (coef[1:] >= 0).all()
        best = np.inf
        for size in range(4):
            for support in itertools.combinations(range(3), size):
                A = np.column_stack([np.ones(12), X[:, list(support)]])
                sol = np.linalg.lstsq(A, y, rcond=None)[0]
                if (sol[1:] >= 0).all():
                    best = min(best, float(((A @ sol - y) ** 2).sum()))
        assert sse == pytest.approx(best, rel=1e-9, abs=1e-12), trial
        assert ((coef[1:] == 0) | (coef[1:] > 1e-12)).all()  # inactive coefficients exactly 0
