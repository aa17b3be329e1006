"""Study configuration: load, fill defaults, validate, expand the matrix.

The schema (``mimlib/schema/config.schema.yaml``) documents every key. This module fills
its defaults and adds the checks a schema cannot express, so that a bad config fails before
any job starts, with an error naming the key.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import yaml

from mimlib.train.schedule import decay_at, length_problem

SCHEMA_PATH = Path(__file__).parent / "schema" / "config.schema.yaml"


class ConfigError(ValueError):
    """A config value is wrong; the message names the key (e.g. ``datasets.in1k_10.fraction``)."""


@lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    """The schema, with the task registry (:data:`mimlib.finetune.TASKS`) filled into the
    places that name the tasks, so the task list has one home."""
    from mimlib.finetune import TASKS

    with open(SCHEMA_PATH) as f:
        schema = yaml.safe_load(f)
    finetune = schema["properties"]["finetune"]
    finetune["properties"]["tasks"]["items"]["enum"] = list(TASKS)
    section = finetune["patternProperties"].pop("^(TASKS)$")
    finetune["patternProperties"]["^(" + "|".join(TASKS) + ")$"] = section
    # A per-model override is checked against the same key schemas as the pre-training block
    # (without their defaults: an override sets only what it names).
    pretrain = schema["properties"]["pretrain"]["properties"]
    pretrain["per_model"]["additionalProperties"] = {
        "type": "object", "additionalProperties": False,
        "properties": {k: _without_defaults(v) for k, v in pretrain.items() if k != "per_model"},
    }
    return schema


def _without_defaults(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_defaults(v) for k, v in node.items() if k != "default"}
    return node


def _fill_defaults(node: Any, schema: Mapping[str, Any]) -> Any:
    """Recursively insert schema ``default`` values for missing object properties."""
    if not isinstance(node, dict):
        return node
    for key, sub in schema.get("properties", {}).items():
        if key not in node and "default" in sub:
            node[key] = copy.deepcopy(sub["default"])
        if key in node:
            _fill_defaults(node[key], sub)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for key, value in node.items():
            if key not in schema.get("properties", {}):
                _fill_defaults(value, extra)
    return node


def _key_path(error) -> str:  # jsonschema.ValidationError
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


def validate_config(raw: Mapping[str, Any], check_paths: bool = True) -> dict[str, Any]:
    """Return a validated copy of ``raw`` with defaults filled; raise ConfigError otherwise.

    ``check_paths`` checks that non-demo dataset roots exist (skipped by tools that only plan).
    """
    import jsonschema

    from mimlib.models.registry import MODELS, window_problems  # torch-free: every Snakemake job validates
    from mimlib.resources import gpu_layout_problems

    cfg = _fill_defaults(copy.deepcopy(dict(raw)), load_schema())
    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  {_key_path(e)}: {e.message}" for e in errors]
        raise ConfigError("invalid config:\n" + "\n".join(lines))

    problems: list[str] = []
    sources = cfg["sources"]
    for name, src in sources.items():
        if src.get("demo"):
            if "train" in src or "val" in src:
                problems.append(f"sources.{name}: a demo source is generated; do not give train/val folders")
            continue
        if "train" not in src:
            problems.append(f"sources.{name}.train: missing (give the folder, or set demo: true)")
        if not check_paths:
            continue
        for split in ("train", "val"):
            if split in src and not Path(src[split]).is_dir():
                problems.append(f"sources.{name}.{split}: folder {src[split]!r} does not exist")
    for name, ds in cfg["datasets"].items():
        key = f"datasets.{name}"
        if ds["source"] not in sources:
            problems.append(f"{key}.source: unknown source {ds['source']!r} (known: {sorted(sources)})")
        if "fraction" in ds and "num_classes" in ds:
            problems.append(f"{key}: give either fraction or num_classes, not both")
        if "fraction" in ds and not 0.0 < ds["fraction"] <= 1.0:
            problems.append(f"{key}.fraction: {ds['fraction']} is outside (0, 1]")
        if "/" in name or name in ("trunk", "summary.csv", "scratch"):
            problems.append(f"{key}: {name!r} cannot be used as a dataset name (it is a path part)")
    val = cfg["validation"]
    if val["source"] not in sources:
        problems.append(f"validation.source: unknown source {val['source']!r}")
    elif "val" not in sources[val["source"]] and not sources[val["source"]].get("demo"):
        problems.append(f"sources.{val['source']}.val: the validation source needs a val folder")
    for i, model in enumerate(cfg["models"]):
        if model not in MODELS:
            problems.append(f"models[{i}]: unknown model {model!r} (known: {sorted(MODELS)})")
    if len(set(cfg["lengths"])) != len(cfg["lengths"]):
        problems.append(f"lengths: {cfg['lengths']} has duplicates")
    for i, length in enumerate(cfg["lengths"]):
        if (problem := length_problem(length)) is not None:
            problems.append(f"lengths[{i}]: {problem}")
    pre = cfg["pretrain"]
    for model in pre["per_model"]:
        if model not in cfg["models"]:
            problems.append(f"pretrain.per_model.{model}: not one of the study's models")
    for model in cfg["models"]:
        if model not in MODELS:
            continue
        # its keys and types were checked by the schema
        recipe = pretrain_recipe(cfg, model)
        problems += _pretrain_problems(recipe, f"pretrain (model {model})")
        problems += [f"pretrain (model {model}): {p}" for p in
                     window_problems(model, recipe["img_size"], recipe["window_size"], recipe["patch_size"])]
    problems += _finetune_problems(cfg, check_paths)
    problems += gpu_layout_problems(cfg["resources"])
    if check_paths:  # the environment, like the folders: tools that only plan skip it
        problems += tracking_problems(cfg["tracking"], "tracking")
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(f"  {p}" for p in problems))
    return cfg


def _pretrain_problems(recipe: Mapping[str, Any], key: str) -> list[str]:
    """The combinations of pre-training keys that cannot work."""
    problems = []
    if recipe["img_size"] % recipe["mask_patch_size"]:
        problems.append(f"{key}.img_size: {recipe['img_size']} not divisible by mask_patch_size {recipe['mask_patch_size']}")
    if recipe["mask_patch_size"] % recipe["patch_size"]:
        problems.append(f"{key}.mask_patch_size: {recipe['mask_patch_size']} not divisible by patch_size {recipe['patch_size']}")
    if recipe["checkpoint_every"] % recipe["log_every"]:
        problems.append(f"{key}.checkpoint_every: {recipe['checkpoint_every']} is not a multiple of log_every {recipe['log_every']}")
    if recipe["global_batch"] % recipe["micro_batch"]:
        problems.append(f"{key}.global_batch: {recipe['global_batch']} not divisible by micro_batch {recipe['micro_batch']}")
    return problems


def check_pretrain_recipe(recipe: Mapping[str, Any], where: str = "recipe") -> dict[str, Any]:
    """A pre-training recipe given on its own (``mimscale pretrain --recipe-json``): completed
    over the schema's defaults and checked as the config's ``pretrain`` block is."""
    import jsonschema

    schema = copy.deepcopy(load_schema()["properties"]["pretrain"])
    del schema["properties"]["per_model"]
    full = _fill_defaults(copy.deepcopy(dict(recipe)), schema)
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(full), key=lambda e: list(e.absolute_path))
    problems = [f"{where}.{_key_path(e)}: {e.message}".replace(".<top level>", "") for e in errors]
    if not problems:
        problems = _pretrain_problems(full, where)
    if problems:
        raise ConfigError("invalid pre-training recipe:\n" + "\n".join(f"  {p}" for p in problems))
    return full


#: the package each optional tracking backend imports (mimlib.train.tracking)
TRACKING_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}


def tracking_problems(block: Mapping[str, Any], where: str) -> list[str]:
    """An enabled W&B / MLflow backend whose package is not installed (named by its key)."""
    import importlib.util

    return [f"{where}.{name}.enabled: true, but the {package!r} package is not installed "
            f"(pip install 'mimscale[tracking]', or set {where}.{name}.enabled: false)"
            for name, package in TRACKING_PACKAGES.items()
            if block[name]["enabled"] and importlib.util.find_spec(package) is None]


def check_tracking(block: Mapping[str, Any], where: str = "tracking") -> dict[str, Any]:
    """A ``tracking`` block given on its own (``--tracking-json``): completed over the schema's
    defaults and checked as the config's is. Its ``run`` key (name, group, tags of the job's
    run; optional) is the job's own and passes through unchecked."""
    import jsonschema

    block = dict(block)
    run = block.pop("run", None)
    schema = copy.deepcopy(load_schema()["properties"]["tracking"])
    full = _fill_defaults(copy.deepcopy(block), schema)
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(full), key=lambda e: list(e.absolute_path))
    problems = [f"{where}.{_key_path(e)}: {e.message}".replace(".<top level>", "") for e in errors]
    if not problems:
        problems = tracking_problems(full, where)
    if run is not None and not isinstance(run, dict):
        problems.append(f"{where}.run: {run!r} is not an object (name, group, tags)")
    if problems:
        raise ConfigError("invalid tracking settings:\n" + "\n".join(f"  {p}" for p in problems))
    return {**full, **({"run": run} if run is not None else {})}


def _finetune_problems(cfg: dict[str, Any], check_paths: bool) -> list[str]:
    from mimlib.finetune import DEMO_TASKS, TASKS, check_recipe, default_recipe
    from mimlib.models.registry import MODELS, window_problems

    problems: list[str] = []
    ft = cfg["finetune"]
    for length in ft["lengths"] or []:
        if length not in cfg["lengths"]:
            problems.append(f"finetune.lengths: {length} is not one of the pre-training lengths {cfg['lengths']}")
    for task in ft["tasks"]:
        key = f"finetune.{task}"
        if task not in ft:
            problems.append(f"{key}: missing (needs at least `data`)")
            continue
        data = ft[task].get("data", {})
        if TASKS[task].data_from_source:
            src = data.get("source")
            if src not in cfg["sources"]:
                problems.append(f"{key}.data.source: unknown source {src!r} (known: {sorted(cfg['sources'])})")
            elif check_paths:
                problems += _split_class_problems(cfg["sources"][src], f"sources.{src}", key)
        elif "demo" in data:
            if task not in DEMO_TASKS:
                problems.append(f"{key}.data.demo: no demo generator for {task}")
        elif "root" not in data:
            problems.append(f"{key}.data: give root (a folder on disk) or demo")
        elif check_paths and not Path(data["root"]).is_dir():
            problems.append(f"{key}.data.root: folder {data['root']!r} does not exist")
        for model in ft[task].get("per_model", {}):
            if model not in cfg["models"]:
                problems.append(f"{key}.per_model.{model}: not one of the study's models")
        known = set(default_recipe(task))
        overrides = [("recipe", ft[task].get("recipe", {}))]
        overrides += [(f"per_model.{m}", o) for m, o in ft[task].get("per_model", {}).items()]
        unknown = [f"{key}.{where}.{k}: unknown key for task {task}"
                   for where, values in overrides for k in sorted(set(values) - known)]
        problems += unknown
        if not unknown:  # every model's recipe is checked here, before any job starts
            for model in cfg["models"]:
                try:
                    recipe = check_recipe(task, finetune_recipe(cfg, task, model))
                except ValueError as exc:
                    problems.append(f"{key}.recipe (model {model}): {exc}")
                    continue
                if TASKS[task].fixed_input_size and model in MODELS:
                    problems += [f"{key}.recipe (model {model}): {p}" for p in
                                 window_problems(model, recipe["img_size"], recipe["window_size"])]
    return problems


def _class_folders(folder: str) -> set[str]:
    # What mimlib.data.index lists as classes (non-hidden folders), without importing pandas.
    with os.scandir(folder) as it:
        return {e.name for e in it if not e.name.startswith(".") and e.is_dir()}


def _split_class_problems(src: Mapping[str, Any], where: str, task_key: str) -> list[str]:
    """A fine-tuning source's val class folders must all be train class folders: labels come
    from the train split's label map, so a val-only class has no label (mimlib.data.classification).
    Checked here, before pre-training, as well as when the fine-tuning job reads the indexes."""
    if src.get("demo") or "train" not in src or "val" not in src:
        return []
    try:
        train, val = _class_folders(src["train"]), _class_folders(src["val"])
    except OSError:  # a missing folder is reported above; anything else when the index is built
        return []
    extra = sorted(val - train)
    if not extra:
        return []
    shown = ", ".join(repr(c) for c in extra[:10]) + (f" (and {len(extra) - 10} more)" if len(extra) > 10 else "")
    return [f"{where}.val: {len(extra)} class folder(s) of {src['val']!r} are not in the train folder "
            f"{src['train']!r}, so {task_key} could not label them: {shown}"]


def finetune_recipe(cfg: Mapping[str, Any], task: str, model: str) -> dict[str, Any]:
    """A task's recipe for one model: engine defaults <- config recipe <- per-model overrides."""
    from mimlib.finetune import default_recipe

    section = cfg["finetune"][task]
    recipe = default_recipe(task)
    recipe.update(section.get("recipe", {}))
    recipe.update(section.get("per_model", {}).get(model, {}))
    return recipe


@dataclass(frozen=True)
class FinetuneCell:
    task: str
    model: str
    dataset: str  # a pre-training dataset, or "scratch"
    length: int  # a pre-training length, or 0 for scratch


def finetune_cells(cfg: Mapping[str, Any]) -> list[FinetuneCell]:
    ft = cfg["finetune"]
    lengths = sorted(ft["lengths"] or cfg["lengths"])
    cells = []
    for task in ft["tasks"]:
        for model in cfg["models"]:
            if ft["scratch_baseline"]:
                cells.append(FinetuneCell(task, model, "scratch", 0))
            cells += [FinetuneCell(task, model, d, n) for d in cfg["datasets"] for n in lengths]
    return cells


def _mark(mark) -> str:  # a yaml Mark: 0-based line and column
    return f"{mark.line + 1}:{mark.column + 1}"


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's top-level mapping ({} when empty); raises ConfigError naming the file, and
    for a syntax error ``FILE:LINE:COLUMN: problem`` (the Snakefile uses it for the same message)."""
    path = Path(path)
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{_mark(mark)}" if mark is not None else str(path)
        problem = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem:
            cm = exc.context_mark
            started = f", from line {cm.line + 1}, column {cm.column + 1}" if cm is not None and cm != mark else ""
            problem += f" ({exc.context}{started})"
        raise ConfigError(f"{where}: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file ({exc.reason} at byte {exc.start})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys, not a {type(raw).__name__}")
    return raw


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None, check_paths: bool = True) -> dict[str, Any]:
    """Read a YAML config, apply ``overrides`` (a shallow dict update) and validate it."""
    path = Path(path)
    raw = read_yaml(path)
    raw.update(overrides or {})
    try:
        return validate_config(raw, check_paths=check_paths)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def source_root(cfg: Mapping[str, Any], source: str, split: str) -> str:
    """Folder of a source's split; demo sources live under ``<results>/demo/<source>/``."""
    src = cfg["sources"][source]
    if src.get("demo"):
        return f"{cfg['results']}/demo/{source}/{split}"
    return src[split]


def pretrain_recipe(cfg: Mapping[str, Any], model: str) -> dict[str, Any]:
    """The pre-training recipe of one model: ``pretrain`` with its ``per_model`` overrides."""
    recipe = {k: v for k, v in cfg["pretrain"].items() if k != "per_model"}
    recipe.update(cfg["pretrain"].get("per_model", {}).get(model, {}))
    return recipe


@dataclass(frozen=True)
class Cell:
    """One pre-training cell of the study matrix."""

    model: str
    dataset: str
    length: int

    @property
    def decay_at(self) -> int:
        return decay_at(self.length)


def pretrain_cells(cfg: Mapping[str, Any]) -> list[Cell]:
    return [
        Cell(model, dataset, length)
        for model in cfg["models"]
        for dataset in cfg["datasets"]
        for length in sorted(cfg["lengths"])
    ]
