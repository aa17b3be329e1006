"""Fine-tuning tasks (paper section 2.5): ImageNet-1K / iNaturalist-18 classification, COCO
Mask R-CNN detection + instance segmentation, ADE20K UPerNet semantic segmentation.

:data:`TASKS` is the one task registry: the config check, the CLI's choices, the resource
defaults, the plan and the analysis read it. Each task names its engine module
(``DEFAULT_RECIPE``, ``check_recipe``, ``run``), its default recipe, its scores and, for the
embedded demo, the generator that writes a small set in the task's real on-disk format.
Torch-free: the engines are imported only when a job runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Task:
    name: str
    engine: str  # module with DEFAULT_RECIPE, check_recipe, run
    recipe: str  # its default recipe in mimlib.finetune.recipes (torch-free)
    metrics: tuple[str, ...]  # metrics.json keys of the summaries; the first is the headline
    scores: tuple[tuple[str, str], ...]  # (metric, display name) the analyses use, in the paper's order
    table: str  # the paper's table of this task
    table_by_length: bool  # that table has a row per model x length (Tables 4-6), not the best per dataset
    runtime_min: float  # Slurm runtime where the config gives none (paper scale, one attempt)
    demo: tuple[str, str, str] | None = None  # (module, writer, spec dataclass) of its demo set
    data_from_source: bool = False  # reads a config `source` (ImageNet) rather than a folder of its own
    seed_spread: bool = False  # its scores are repeated across seeds by `make demo-seeds`
    # its encoder sees only img_size inputs, so the window must tile every stage there
    # (detection: inputs of any size, timm pads them; mimlib.models.registry.window_problems)
    fixed_input_size: bool = True


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("in1k", "mimlib.finetune.classification", "CLASSIFICATION", ("top1", "top5"),
         (("top1", "IN-1K top-1 (%)"),), "table3", False, 2880.0, data_from_source=True, seed_spread=True),
    Task("inat18", "mimlib.finetune.classification", "CLASSIFICATION", ("top1", "top5"),
         (("top1", "iNat-18 top-1 (%)"),), "table4", True, 1440.0,
         demo=("mimlib.data.demo_inat", "write_inat_demo", "InatDemoSpec"), seed_spread=True),
    Task("coco", "mimlib.finetune.detection", "DETECTION", ("box_ap", "mask_ap"),
         (("box_ap", "COCO AP box"), ("mask_ap", "COCO AP mask")), "table6", True, 1440.0,
         demo=("mimlib.data.demo_coco", "write_coco_demo", "CocoDemoSpec"), fixed_input_size=False),
    Task("ade20k", "mimlib.finetune.segmentation", "SEGMENTATION", ("miou", "acc"),
         (("miou", "ADE20K mIoU"),), "table5", True, 960.0,
         demo=("mimlib.data.demo_ade20k", "write_ade20k_demo", "Ade20kDemoSpec")),
)}

#: tasks with a generator for the embedded demo
DEMO_TASKS: tuple[str, ...] = tuple(name for name, t in TASKS.items() if t.demo is not None)

#: (task, metric, display name) of every score the analyses use, in the paper's order
TASK_SCORES: tuple[tuple[str, str, str], ...] = tuple(
    (t.name, metric, label) for t in TASKS.values() for metric, label in t.scores
)


def task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r} (known: {sorted(TASKS)})")
    return TASKS[name]


def main_metrics(name: str) -> tuple[str, ...]:
    return task(name).metrics


def default_recipe(name: str) -> dict:
    from mimlib.finetune import recipes

    return dict(getattr(recipes, task(name).recipe))


def check_recipe(name: str, recipe: dict) -> dict:
    """The task's recipe completed over its defaults and checked (ValueError names the key)."""
    from mimlib.finetune import recipes

    return recipes.CHECKS[task(name).recipe](recipe)


def engine(name: str) -> ModuleType:
    return importlib.import_module(task(name).engine)


def write_demo(name: str, out: str, spec_fields: dict) -> dict:
    if task(name).demo is None:
        raise KeyError(f"task {name!r} has no demo generator (those with one: {list(DEMO_TASKS)})")
    module, writer, spec_cls = task(name).demo
    mod = importlib.import_module(module)
    spec = getattr(mod, spec_cls)(**spec_fields)
    return getattr(mod, writer)(out, spec)
