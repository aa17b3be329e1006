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
    with pytest.raises(ConfigError, match="unknown keys"):
        validate_config(cfg)



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
    with pytest.raises(ConfigError, match=r"finetune.ade20k.recipe \(model swinv2_pico\): window_size 12 does not tile"):
        validate_config(cfg, check_paths=False)
    cfg = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    cfg["finetune"]["in1k"]["recipe"]["warmup_epochs"] = 5  # more than its 1 epoch
    with pytest.raises(ConfigError, match=r"finetune.in1k.recipe \(model swinv2_pico\): need epochs >= 1"):
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
