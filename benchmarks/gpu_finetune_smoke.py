"""GPU check of the three fine-tuning engines (bf16 autocast, fused AdamW, CUDA data paths):
a few updates of each task on small generated sets, with the demo config's recipes.

    python benchmarks/gpu_finetune_smoke.py [--model swinv2_b] [--workdir /tmp/mimscale_ft]
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from mimlib.config import finetune_recipe, validate_config  # noqa: E402
from mimlib.finetune import engine, write_demo  # noqa: E402
from mimlib.finetune.common import FinetuneJob  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="swinv2_b")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/mimscale_ft"))
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["models"] = [args.model]
    cfg = validate_config(cfg)
    sets = {
        "inat18": ({"num_classes": 6, "max_train_per_class": 16, "val_per_class": 4}, lambda r: {"root": r, "train_json": f"{r}/train2018.json", "val_json": f"{r}/val2018.json"}),
        "coco": ({"num_classes": 4, "train_images": 24, "val_images": 8, "image_size": 128}, lambda r: {"train_images": f"{r}/train2017", "val_images": f"{r}/val2017", "train_json": f"{r}/annotations/instances_train2017.json", "val_json": f"{r}/annotations/instances_val2017.json"}),
        "ade20k": ({"num_classes": 8, "train_images": 24, "val_images": 8}, lambda r: {"root": f"{r}/ADEChallengeData2016"}),
    }
    overrides = {
        "inat18": {"epochs": 2, "warmup_epochs": 0.5, "num_workers": 4, "threads": None},
        "coco": {"epochs": 1, "step_epochs": [1], "warmup_iters": 2, "num_workers": 4, "threads": None},
        "ade20k": {"iters": 12, "warmup_iters": 2, "num_workers": 4, "threads": None},
    }
    failed = 0
    for task, (spec, data) in sets.items():
        root = args.workdir / task
        if not root.exists():
            write_demo(task, str(root), spec)
        recipe = {**finetune_recipe(cfg, task, args.model), **overrides[task]}
        job = FinetuneJob(task=task, model=args.model, recipe=recipe, data=data(str(root)),
                          out_dir=args.workdir / "out" / task, resume_dir=args.workdir / "resume" / task,
                          device=args.device)
        t = time.perf_counter()
        try:
            record = engine(task).run(job, progress=False)
            print(f"{task}: ok in {time.perf_counter() - t:.1f} s, metrics {record['metrics']}", flush=True)
        except Exception:
            failed += 1
            print(f"{task}: FAILED after {time.perf_counter() - t:.1f} s", flush=True)
            traceback.print_exc()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
