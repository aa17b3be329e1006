"""Fine-tuning training throughput per task, and what it makes of a paper-scale job's runtime.

Synthetic on-device batches (data loading not measured, as in bench_pretrain.py) through the
engines' own models and optimiser: the classifier of ``mimlib.finetune.classification`` at
224 px / window 14, Mask R-CNN of ``mimlib.finetune.detection`` on 1024 px crops with 10
instances per image, UPerNet + auxiliary head of ``mimlib.finetune.segmentation`` on 640 px
crops; AdamW over layer-decay groups (fused on CUDA), bf16 autocast on CUDA, gradient
clipping; eager, and with ``--modes eager,compiled`` also torch.compile'd as the engines do
with ``compile: true``. Prints images/s per GPU and the hours a paper recipe's job would take on
``--gpus`` GPUs if it scaled linearly (an upper bound on speed: no data loading, no
communication) -- the basis of ``resources.finetune_runtime_min`` in config/paper.yaml.

    python benchmarks/bench_finetune.py --device cuda --model swinv2_b
    python benchmarks/bench_finetune.py --device cuda --model swinv2_b --modes eager,compiled
    python benchmarks/bench_finetune.py --device cpu --small      # a quick check on a laptop
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mimlib.finetune.common import FinetuneJob, build_optimizer  # noqa: E402
from mimlib.finetune.recipes import CLASSIFICATION, DETECTION, SEGMENTATION  # noqa: E402

# Paper-scale work per job: images seen in training (Tables 11-14; COCO train2017, ADE20K 80k x 32).
WORK = {
    "in1k": CLASSIFICATION["epochs"] * 1_281_167,
    "inat18": CLASSIFICATION["epochs"] * 437_513,
    "coco": DETECTION["epochs"] * 118_287,
    "ade20k": SEGMENTATION["iters"] * SEGMENTATION["global_batch"],
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def classification_step(model_name: str, batch: int, size: int, window: int, device: torch.device, compile_model: bool):
    from mimlib.models.attention import use_fused_attention
    from mimlib.models.pretrained import build_finetune_encoder

    model, _ = build_finetune_encoder(model_name, None, size, window, 0.2, num_classes=1000)
    use_fused_attention(model)
    model.to(device).train()
    fwd = torch.compile(model) if compile_model else model  # what the loop's wrap_model does
    opt = build_optimizer(model, {**CLASSIFICATION, "lr": 1e-4}, device, "", model_name)
    images = torch.randn(batch, 3, size, size, device=device)
    soft = torch.softmax(torch.randn(batch, 1000, device=device), dim=1)  # Mixup-style soft targets

    def loss() -> torch.Tensor:
        return torch.sum(-soft * F.log_softmax(fwd(images).float(), dim=-1), dim=-1).mean()

    return model, opt, loss


def detection_step(model_name: str, batch: int, size: int, window: int, device: torch.device, compile_model: bool):
    from mimlib.finetune import detection as D

    job = FinetuneJob(task="coco", model=model_name, recipe={"img_size": size, "window_size": window},
                      data={}, out_dir=Path("."), resume_dir=Path("."))
    model, _ = D.build_model(job, num_classes=80)
    model.to(device).train()
    fwd = torch.compile(model) if compile_model else model
    opt = build_optimizer(model, {**DETECTION, "lr": 1e-4}, device, D.ENCODER_PREFIX, model_name)
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for _ in range(batch):
        xy = torch.rand(10, 2, generator=g) * (size * 0.7)
        wh = 16 + torch.rand(10, 2, generator=g) * (size * 0.3 - 16)
        boxes = torch.cat([xy, xy + wh], dim=1).round()
        masks = torch.zeros(10, size, size, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            masks[i, y0:y1, x0:x1] = 1
        images.append(torch.rand(3, size, size, generator=g).to(device))
        targets.append({"boxes": boxes.to(device), "labels": torch.randint(1, 81, (10,), generator=g).to(device),
                        "masks": masks.to(device)})

    def loss() -> torch.Tensor:
        return sum(fwd(images, targets).values())

    return model, opt, loss


def segmentation_step(model_name: str, batch: int, size: int, window: int, device: torch.device, compile_model: bool):
    from mimlib.finetune import segmentation as S

    job = FinetuneJob(task="ade20k", model=model_name, recipe={"img_size": size, "window_size": window},
                      data={}, out_dir=Path("."), resume_dir=Path("."))
    model, _ = S.build_model(job)
    model.to(device).train()
    fwd = torch.compile(model) if compile_model else model
    opt = build_optimizer(model, {**SEGMENTATION, "lr": 1e-4}, device, S.ENCODER_PREFIX, model_name)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, SEGMENTATION["num_classes"], (batch, size, size), device=device)

    def loss() -> torch.Tensor:
        logits, aux = fwd(images)
        return S.seg_loss(logits, labels) + SEGMENTATION["aux_weight"] * S.seg_loss(aux, labels)

    return model, opt, loss


def measure(build: Callable, args: argparse.Namespace, batch: int, size: int, window: int,
            compile_model: bool) -> dict[str, Any]:
    device = torch.device(args.device)
    model, opt, loss_fn = build(args.model, batch, size, window, device, compile_model)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step() -> float:
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    t = time.perf_counter()
    for _ in range(args.warmup):  # the first steps compile (compiled mode)
        step()
    sync(device)
    warmup_s = time.perf_counter() - t
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    last = 0.0
    for _ in range(args.iters):
        last = step()
    sync(device)
    seconds = (time.perf_counter() - t) / args.iters
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"images_per_s": batch / seconds, "ms_per_iter": seconds * 1e3, "peak_gib": peak, "loss": last,
            "warmup_s": warmup_s}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=None, help="default swinv2_b on CUDA, swinv2_pico on CPU")
    p.add_argument("--tasks", default="in1k,coco,ade20k")
    p.add_argument("--gpus", type=int, default=8, help="GPUs per job for the runtime column (config: 8)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--small", action="store_true", help="tiny sizes and batches, to check the script on a CPU")
    p.add_argument("--modes", default="eager", help="eager,compiled: torch.compile the training forward as the "
                   "engines do with `compile: true` (one row per task and mode)")
    args = p.parse_args()
    args.model = args.model or ("swinv2_b" if args.device.startswith("cuda") else "swinv2_pico")
    if args.small:
        shapes = {"in1k": (4, 64, 4), "coco": (1, 128, 4), "ade20k": (2, 128, 4)}
        args.iters, args.warmup = min(args.iters, 2), min(args.warmup, 1)
    else:  # per-GPU batches of the paper recipes: 2048 / 16 GPUs, 32 / 16, 32 / 8
        shapes = {"in1k": (128, 224, 14), "coco": (2, DETECTION["img_size"], DETECTION["window_size"]),
                  "ade20k": (4, SEGMENTATION["img_size"], SEGMENTATION["window_size"])}
    builders = {"in1k": classification_step, "coco": detection_step, "ade20k": segmentation_step}
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - {"eager", "compiled"}:
        p.error(f"--modes {args.modes!r}: give eager and/or compiled")
    print(f"{name}, torch {torch.__version__}, {args.model}, {args.iters} timed iterations after {args.warmup}\n")
    print(f"| task | mode | batch / GPU | crop | images/s / GPU | ms/iter | warm-up s | peak GiB | "
          f"paper job on {args.gpus} GPUs (h) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for task in [t for t in args.tasks.split(",") if t]:
        batch, size, window = shapes[task]
        for mode in modes:
            row = measure(builders[task], args, batch, size, window, mode == "compiled")
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()  # the task's model and optimiser went with measure()
            for shown, work in [(task, WORK[task])] + ([("inat18 (as in1k)", WORK["inat18"])] if task == "in1k" else []):
                hours = work / (row["images_per_s"] * args.gpus) / 3600
                print(f"| {shown} | {mode} | {batch} | {size} / w{window} | {row['images_per_s']:.1f} | "
                      f"{row['ms_per_iter']:.0f} | {row['warmup_s']:.0f} | {row['peak_gib']:.1f} | {hours:.1f} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
