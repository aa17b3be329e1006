"""Fine-tuning tasks (paper section 2.5): ImageNet-1K / iNaturalist-18 classification, COCO
Mask R-CNN detection + instance segmentation, ADE20K UPerNet semantic segmentation.

Each task names its engine module (``DEFAULT_RECIPE``, ``check_recipe``, ``run``) and, for the
embedded demo, the generator that writes a small set in the task's real on-disk format.
"""

from __future__ import annotations

import importlib
from types import ModuleType

TASK_ENGINES: dict[str, str] = {
    "in1k": "mimlib.finetune.classification",
    "inat18": "mimlib.finetune.classification",
    "coco": "mimlib.finetune.detection",
    "ade20k": "mimlib.finetune.segmentation",
}

# task -> its default recipe in mimlib.finetune.recipes (torch-free)
TASK_RECIPES: dict[str, str] = {
    "in1k": "CLASSIFICATION",
    "inat18": "CLASSIFICATION",
    "coco": "DETECTION",
    "ade20k": "SEGMENTATION",
}

# task -> (module, writer function, spec dataclass) of its demo-data generator
DEMO_GENERATORS: dict[str, tuple[str, str, str]] = {
    "inat18": ("mimlib.data.demo_inat", "write_inat_demo", "InatDemoSpec"),
    "coco": ("mimlib.data.demo_coco", "write_coco_demo", "CocoDemoSpec"),
    "ade20k": ("mimlib.data.demo_ade20k", "write_ade20k_demo", "Ade20kDemoSpec"),
}

# the headline metric of each task in tables and summaries
MAIN_METRICS: dict[str, tuple[str, ...]] = {
    "in1k": ("top1", "top5"),
    "inat18": ("top1", "top5"),
    "coco": ("box_ap", "mask_ap"),
    "ade20k": ("miou", "acc"),
}


def default_recipe(task: str) -> dict:
    from mimlib.finetune import recipes

    return dict(getattr(recipes, TASK_RECIPES[task]))


def engine(task: str) -> ModuleType:
    if task not in TASK_ENGINES:
        raise KeyError(f"unknown task {task!r} (known: {sorted(TASK_ENGINES)})")
    return importlib.import_module(TASK_ENGINES[task])


def write_demo(task: str, out: str, spec_fields: dict) -> dict:
    module, writer, spec_cls = DEMO_GENERATORS[task]
    mod = importlib.import_module(module)
    spec = getattr(mod, spec_cls)(**spec_fields)
    return getattr(mod, writer)(out, spec)
