from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from mimlib.config import ConfigError, load_config, pretrain_cells, validate_config
from mimlib.train.schedule import trunk_points

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configs_are_valid() -> None:
    demo = load_config(ROOT / "config" / "config.yaml")
    assert len(pretrain_cells(demo)) >= 2 * 3 * 3
    paper = load_config(ROOT / "config" / "paper.yaml", check_paths=False)
    assert len(pretrain_cells(paper)) == 5 * 6 * 3
    assert paper["pretrain"]["global_batch"] == 2048
    assert trunk_points(paper["lengths"]) == [109_375, 218_750, 437_500]


def test_defaults_are_filled(smoke_config: dict) -> None:
    cfg = validate_config(smoke_config)
    assert cfg["pretrain"]["loss"] == "l1"
    assert cfg["pretrain"]["clip_grad"] == 5.0
    assert cfg["validation"]["max_images"] is None


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda c: c["models"].append("swinv2_xxl"), "models[1]: unknown model 'swinv2_xxl'"),
        (lambda c: c["datasets"]["half"].update(fraction=1.5), "datasets.half.fraction: 1.5 is outside (0, 1]"),
        (lambda c: c["datasets"]["half"].update(fraction=0.0), "datasets.half.fraction: 0.0 is outside (0, 1]"),
        (lambda c: c.update(lengths=[8, 20]), "lengths[1]: 20 is not divisible by 8"),
        (
            lambda c: c["sources"].update(extra={"train": "/nonexistent/imagenet/train"}),
            "sources.extra.train: folder '/nonexistent/imagenet/train' does not exist",
        ),
        (lambda c: c["datasets"]["half"].update(source="nope"), "datasets.half.source: unknown source 'nope'"),
        (lambda c: c["pretrain"].update(mask_ratio=1.5), "pretrain.mask_ratio"),
        (lambda c: c["pretrain"].update(learning_rate=1), "pretrain: Additional properties are not allowed"),
        (lambda c: c["pretrain"].update(global_batch=10), "global_batch: 10 not divisible by micro_batch 4"),
    ],
)
def test_errors_name_the_key(smoke_config: dict, mutate, key: str) -> None:
    cfg = copy.deepcopy(smoke_config)
    mutate(cfg)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert key in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [a\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_per_model_override(smoke_config: dict) -> None:
    from mimlib.config import pretrain_recipe

    cfg = copy.deepcopy(smoke_config)
    cfg["pretrain"]["per_model"] = {"swinv2_pico": {"micro_batch": 2}}
    cfg = validate_config(cfg)
    assert pretrain_recipe(cfg, "swinv2_pico")["micro_batch"] == 2
    cfg["pretrain"]["per_model"] = {"swinv2_pico": {"micro_batchh": 2}}
    with pytest.raises(ConfigError, match=r"pretrain.per_model.swinv2_pico: .*'micro_batchh' was unexpected"):
        validate_config(cfg)


@pytest.mark.parametrize("override, message", [
    ({"base_lr": -0.016}, r"pretrain.per_model.swinv2_pico.base_lr: -0.016 is less than or equal to the minimum of 0"),
    ({"global_batch": "32"}, r"pretrain.per_model.swinv2_pico.global_batch: '32' is not of type 'integer'"),
    ({"mask_ratio": 1.5}, r"pretrain.per_model.swinv2_pico.mask_ratio: 1.5 is greater than or equal to the maximum of 1"),
    ({"clip_grad": "5"}, r"pretrain.per_model.swinv2_pico.clip_grad: '5' is not of type 'number', 'null'"),
])
def test_a_per_model_pretrain_override_is_checked_as_the_key_it_overrides(override: dict, message: str) -> None:
    """Issue 12 (3): per-model values went unchecked (a negative lr trained; a string batch
    crashed check-config with a raw TypeError); they get the top-level keys' schema and messages."""
    cfg = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    cfg["pretrain"]["per_model"] = {"swinv2_pico": override}
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg, check_paths=False)
    # the override sets only what it names: no schema default leaks into it
    cfg = validate_config({**cfg, "pretrain": {**cfg["pretrain"], "per_model": {"swinv2_pico": {"micro_batch": 2}}}},
                          check_paths=False)
    assert cfg["pretrain"]["per_model"] == {"swinv2_pico": {"micro_batch": 2}}


@pytest.mark.parametrize("task, where, override, message", [
    ("in1k", "recipe", {"epochs": "1"}, r"finetune.in1k.recipe \(model swinv2_pico\): invalid classification recipe: epochs = '1': Input should be a valid integer"),
    ("in1k", "per_model", {"base_lr": -0.5}, r"finetune.in1k.recipe \(model swinv2_pico\): invalid classification recipe: base_lr = -0.5: Input should be greater than 0"),
    ("coco", "recipe", {"anchor_sizes": [16, "32"]}, r"finetune.coco.recipe \(model swinv2_pico\): invalid coco recipe: anchor_sizes.1 = '32': Input should be a valid integer"),
    ("ade20k", "per_model", {"precision": "fp16"}, r"finetune.ade20k.recipe \(model swinv2_pico\): invalid ade20k recipe: precision = 'fp16': Input should be 'auto', 'bf16' or 'fp32'"),
    ("ade20k", "recipe", {"save_weights": 1}, r"finetune.ade20k.recipe \(model swinv2_pico\): invalid ade20k recipe: save_weights = 1: Input should be a valid boolean"),
])
def test_every_fine_tuning_recipe_value_is_checked_before_any_job(task: str, where: str, override: dict, message: str) -> None:
    """Issue 12 (3): a string epochs or a negative lr passed check-config and the job died
    later naming no key; the typed recipes (mimlib.finetune.recipes) name key and value."""
    cfg = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    section = cfg["finetune"][task]
    if where == "recipe":
        section["recipe"] = {**section["recipe"], **override}
    else:
        section["per_model"] = {"swinv2_pico": override}
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg, check_paths=False)


def test_the_recipe_defaults_pass_their_own_types() -> None:
    """The defaults are not validated when a recipe is made (pydantic leaves them be): check here."""
    import dataclasses

    from mimlib.finetune import recipes

    for cls in (recipes.ClassificationRecipe, recipes.DetectionRecipe, recipes.SegmentationRecipe):
        defaults = dataclasses.asdict(cls())
        assert dataclasses.asdict(cls(**defaults)) == defaults



def test_the_task_registry_is_the_one_task_list() -> None:
    """The schema, the CLI and the analyses take the tasks from mimlib.finetune.TASKS."""
    from mimlib import cli
    from mimlib.analysis import common as C
    from mimlib.config import load_schema
    from mimlib.finetune import DEMO_TASKS, TASKS

    finetune = load_schema()["properties"]["finetune"]
    assert finetune["properties"]["tasks"]["items"]["enum"] == list(TASKS) == ["in1k", "inat18", "coco", "ade20k"]
    assert list(finetune["patternProperties"]) == ["^(in1k|inat18|coco|ade20k)$"]
    commands = cli.build_parser()._subparsers._group_actions[0].choices

    def task_choices(command: str) -> list[str]:
        return list(next(a.choices for a in commands[command]._actions if a.dest == "task"))

    assert task_choices("finetune") == list(TASKS)
    assert task_choices("task-demo") == list(DEMO_TASKS) == ["inat18", "coco", "ade20k"]
    assert {t for t, _, _ in C.TASK_SCORES} == set(TASKS)


def test_an_unknown_task_is_refused_by_name() -> None:
    cfg = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    cfg["finetune"]["tasks"] = ["in1k", "imagenet21k"]
    with pytest.raises(ConfigError, match="imagenet21k"):
        validate_config(cfg, check_paths=False)


def test_a_task_recipe_that_cannot_work_is_refused_before_any_job() -> None:
    """The engines' checks run in config validation, for every model's recipe (per-model overrides too)."""
    cfg = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    cfg["finetune"]["ade20k"]["per_model"] = {"swinv2_pico": {"window_size": 12}}
    with pytest.raises(ConfigError, match=r"finetune.ade20k.recipe \(model swinv2_pico\): .*window_size 12 does not tile"):
        validate_config(cfg, check_paths=False)
    cfg = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    cfg["finetune"]["in1k"]["recipe"]["warmup_epochs"] = 5  # more than its 1 epoch
    with pytest.raises(ConfigError, match=r"finetune.in1k.recipe \(model swinv2_pico\): .*warmup_epochs 5(\.0)? is more than epochs 1"):
        validate_config(cfg, check_paths=False)


def test_the_paper_config_has_the_papers_recipes() -> None:
    """config/paper.yaml restates nothing: its Table 10-12 values come from the schema and the
    recipe defaults, and are pinned here."""
    from mimlib.config import finetune_recipe, pretrain_recipe

    paper = load_config(ROOT / "config" / "paper.yaml", check_paths=False)
    pre = pretrain_recipe(paper, "swinv2_b")
    assert {k: pre[k] for k in ("img_size", "window_size", "mask_patch_size", "mask_ratio", "global_batch",
                                "base_lr", "warmup_lr", "warmup_iters", "decay_ratio", "weight_decay", "clip_grad",
                                "drop_path", "loss", "decoder", "compile")} == {
        "img_size": 192, "window_size": 12, "mask_patch_size": 32, "mask_ratio": 0.6, "global_batch": 2048,
        "base_lr": 1e-4, "warmup_lr": 5e-7, "warmup_iters": 6250, "decay_ratio": 0.1, "weight_decay": 0.05,
        "clip_grad": 5.0, "drop_path": 0.1, "loss": "l1", "decoder": "linear", "compile": True}
    assert pretrain_recipe(paper, "swinv2_g")["micro_batch"] == 16
    in1k_s, in1k_h = finetune_recipe(paper, "in1k", "swinv2_s"), finetune_recipe(paper, "in1k", "swinv2_h")
    assert {k: in1k_s[k] for k in ("img_size", "window_size", "epochs", "warmup_epochs", "layer_decay",
                                   "global_batch", "base_lr", "weight_decay", "drop_path")} == {
        "img_size": 224, "window_size": 14, "epochs": 100, "warmup_epochs": 20, "layer_decay": 0.8,
        "global_batch": 2048, "base_lr": 1.25e-3, "weight_decay": 0.05, "drop_path": 0.2}
    assert (in1k_h["epochs"], in1k_h["layer_decay"]) == (50, 0.65)
    inat = finetune_recipe(paper, "inat18", "swinv2_b")
    assert (inat["base_lr"] * 2048 / 512, inat["weight_decay"], inat["layer_decay"], inat["epochs"]) == (1.6e-2, 0.1, 0.75, 100)


def test_a_pretrain_recipe_given_on_the_command_line_is_checked_as_the_config_block(capsys) -> None:
    """`mimscale pretrain --recipe-json` recipes were never checked (`{}` died with KeyError
    'threads'); now they are completed over the schema's defaults and checked like `pretrain:`."""
    from mimlib.cli import main
    from mimlib.config import check_pretrain_recipe, load_config, pretrain_recipe

    cfg = load_config(ROOT / "config" / "smoke.yaml", check_paths=False)
    given = pretrain_recipe(cfg, "swinv2_pico")
    assert check_pretrain_recipe(given) == given  # a complete recipe comes back as it was (same hash)
    assert check_pretrain_recipe({})["threads"] is None  # an empty one gets the schema's defaults
    with pytest.raises(ConfigError, match=r"recipe.global_batch: '8' is not of type 'integer'"):
        check_pretrain_recipe({**given, "global_batch": "8"})
    with pytest.raises(ConfigError, match=r"recipe.img_size: 64 not divisible by mask_patch_size 24"):
        check_pretrain_recipe({**given, "mask_patch_size": 24})
    rc = main(["pretrain", "--model", "swinv2_pico", "--recipe-json", '{"base_lr": -1}', "--manifest", "m.parquet",
               "--end-iter", "8", "--out", "x.pt", "--resume-dir", "r"])
    err = capsys.readouterr().err
    assert rc == 2 and "--recipe-json.base_lr: -1 is less than or equal to the minimum of 0" in err
