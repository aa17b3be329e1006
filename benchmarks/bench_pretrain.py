"""SimMIM x SwinV2 pre-training throughput (images/s) on the current device.

One model / micro-batch / image size, several variants of the training step, each built fresh
from the same seed and timed on the same synthetic batch (random ImageNet-normalised images on
the device + per-sample SimMIM masks), so data loading is not measured (see bench_decode.py):

* ``mimscale``          our step as :mod:`mimlib.train.pretrain` runs it: ``build_simmim`` +
                        ``use_fused_attention`` (SDPA window attention), AdamW over
                        ``param_groups`` (fused on CUDA), bf16 autocast on CUDA / fp32 on CPU,
                        float64 loss accumulation, grad-norm clip 5, finite check (a host sync,
                        as in the engine), ``zero_grad(set_to_none=True)``.
* ``mimscale+compile``  the same with ``torch.compile(model)`` (only with ``--compile``; a
                        failure is reported as a row, not raised).
* ``reference-style``   what microsoft/Swin-Transformer's SimMIM loop does: the same SimMIM with
                        timm's hand-written ``WindowAttention``, plain (non-fused) AdamW, fp16
                        autocast + ``torch.amp.GradScaler`` on CUDA (fp32, no scaler, on CPU),
                        unscale -> clip 5 -> scaler step, ``loss.item()`` every step.

Reported per row: images/s, ms per optimiser step, the first (warm-up / compile) step's time,
peak GPU memory (reset per row) and the achieved training TFLOP/s, on CUDA also as a share of
``--peak-tflops`` (bf16 dense). Training FLOPs per image = 3 x forward (forward + 2x backward);
forward = 2 x fvcore's multiply-add count of the encoder (``encoder_gflops``, one multiply-add
= 1 "FLOP") + 2 x the decoder's 1x1 conv multiply-adds (counted analytically). Without fvcore
the encoder count falls back to the paper sizes' known values at 192/w12. Element-wise work
(softmax, norms, the 47x47 target normalisation) is not counted, so this is a "model FLOPs"
utilisation.

Usage (from a checkout, nothing installed needed besides torch + timm)::

    python benchmarks/bench_pretrain.py                       # CPU: swinv2_pico 96/w6 b16
    python benchmarks/bench_pretrain.py --model swinv2_b --img-size 192 --window 12 \\
        --batch 128 --compile --json bench_pretrain.json      # GPU
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import timm  # noqa: E402

from mimlib.models.attention import use_fused_attention  # noqa: E402
from mimlib.models.masking import MaskGenerator  # noqa: E402
from mimlib.models.simmim import SimMIM, build_simmim  # noqa: E402
from mimlib.models.swinv2 import get_spec  # noqa: E402
from mimlib.train.optim import param_groups  # noqa: E402

from mimlib.train.precision import autocast_context  # noqa: E402
from mimlib.train.pretrain import build_optimizer  # noqa: E402

# Schema defaults of the keys the step uses (mimlib/schema/config.schema.yaml, paper Table 10).
RECIPE: dict[str, Any] = {
    "drop_path": 0.1,
    "decoder": "linear",
    "loss": "l1",
    "norm_target_window": 47,
    "patch_size": 4,
    "mask_patch_size": 32,
    "mask_ratio": 0.6,
    "weight_decay": 0.05,
    "betas": [0.9, 0.999],
    "eps": 1e-8,
    "clip_grad": 5.0,
    "precision": "auto",
}
LR = 4e-4  # constant: the schedule does not change the step's cost

# Encoder GFLOPs (fvcore convention, 1 multiply-add = 1) at 192 / window 12, from
# /work/shared/docs/reference.md's Table: used only when fvcore is not importable.
KNOWN_ENCODER_GFLOPS_192_W12: dict[str, float] = {
    "swinv2_s": 6.83,
    "swinv2_b": 11.88,
    "swinv2_l": 26.14,
    "swinv2_h": 86.0,
    "swinv2_g": 138.6,
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Variant:
    name: str
    style: str  # "engine" or "reference"
    fused_attention: bool
    compile: bool = False


@dataclass
class Row:
    variant: str
    attention: str
    optimizer: str
    precision: str
    status: str = "ok"
    images_per_s: float | None = None
    ms_per_iter: float | None = None
    first_iter_s: float | None = None  # first warm-up step (includes compilation)
    peak_mem_gib: float | None = None
    tflops: float | None = None
    peak_share: float | None = None
    final_loss: float | None = None


# --------------------------------------------------------------------------- inputs / FLOPs
def synthetic_batch(batch: int, img_size: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet-normalised uniform-noise images and SimMIM token masks, on ``device``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, img_size, img_size, generator=g)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    images = (x - mean) / std
    gen = MaskGenerator(img_size, RECIPE["mask_patch_size"], RECIPE["patch_size"], RECIPE["mask_ratio"])
    masks = torch.stack([gen(g) for _ in range(batch)])
    return images.to(device), masks.to(device)


def train_gflops_per_image(model: str, img_size: int, window: int, num_features: int) -> tuple[float | None, str]:
    """(real training GFLOPs per image, where the encoder count came from)."""
    try:
        from mimlib.models.flops import encoder_gflops

        enc, source = encoder_gflops(model, img_size, window), "fvcore"
    except Exception as exc:  # fvcore missing, or an older timm it cannot trace
        known = KNOWN_ENCODER_GFLOPS_192_W12.get(model) if (img_size, window) == (192, 12) else None
        if known is None:
            return None, f"unknown (fvcore failed: {type(exc).__name__}: {exc}; no known value)"
        enc, source = known, f"reference.md table (fvcore failed: {type(exc).__name__})"
    stride = RECIPE["patch_size"] * 2**3
    # Linear decoder: 1x1 conv num_features -> stride^2*3 on the (H/32)^2 grid (multiply-adds).
    dec = num_features * stride**2 * 3 * (img_size // stride) ** 2 / 1e9
    return 3 * 2 * (enc + dec), source


# --------------------------------------------------------------------------- the two steps
StepFn = Callable[[int], torch.Tensor]


def engine_step(
    model: SimMIM, fwd: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
    images: torch.Tensor, masks: torch.Tensor, accum: int, seed: int,
) -> StepFn:
    """One optimiser step as mimlib.train.pretrain.run_pretrain does it (single process)."""

    def step(k: int) -> torch.Tensor:
        for group in optimizer.param_groups:
            group["lr"] = LR
        torch.manual_seed(seed + k)  # the engine reseeds per iteration (drop path)
        step_loss = torch.zeros((), dtype=torch.float64, device=device)
        for _ in range(accum):
            with autocast_context(RECIPE, device):
                loss = fwd(images, masks)
            (loss / accum).backward()
            step_loss += loss.detach().double() / accum
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), RECIPE["clip_grad"])
        if not torch.isfinite(step_loss) or not torch.isfinite(gnorm):  # host sync, as in the engine
            raise FloatingPointError(f"non-finite loss {float(step_loss)} / grad norm {float(gnorm)}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return step_loss

    return step


def reference_step(
    model: SimMIM, optimizer: torch.optim.Optimizer, device: torch.device,
    images: torch.Tensor, masks: torch.Tensor, accum: int,
) -> StepFn:
    """microsoft/Swin-Transformer's SimMIM step: AMP fp16 + GradScaler (CUDA), clip, .item()."""
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)

    def step(k: int) -> torch.Tensor:
        for group in optimizer.param_groups:
            group["lr"] = LR
        for a in range(accum):
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                loss = model(images, masks)
            loss = loss / accum
            scaler.scale(loss).backward()
            if a == accum - 1:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), RECIPE["clip_grad"])
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad()
            loss.item()  # the reference's loss meter reads the loss every step
        return loss.detach() * accum

    return step


# --------------------------------------------------------------------------- one row
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_variant(
    v: Variant, args: argparse.Namespace, device: torch.device,
    images: torch.Tensor, masks: torch.Tensor, gflops: float | None,
) -> Row:
    cuda = device.type == "cuda"
    if v.style == "engine":
        row = Row(v.name, "SDPA (fused)" if v.fused_attention else "timm", "AdamW fused" if cuda else "AdamW",
                  "bf16 autocast" if cuda else "fp32")
    else:
        row = Row(v.name, "timm", "AdamW (not fused)", "fp16 autocast + GradScaler" if cuda else "fp32")
    free_memory(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    model = optimizer = fwd = step = None
    try:
        torch.manual_seed(args.seed)  # same initial weights for every variant
        model = build_simmim(
            args.model, img_size=args.img_size, window_size=args.window,
            drop_path_rate=RECIPE["drop_path"], decoder=RECIPE["decoder"], loss=RECIPE["loss"],
            norm_target_window=RECIPE["norm_target_window"],
        )
        if v.fused_attention:
            use_fused_attention(model)
        model = model.to(device).train()
        if v.style == "engine":
            optimizer = build_optimizer(model, RECIPE, device)
            fwd = torch.compile(model) if v.compile else model
            step = engine_step(model, fwd, optimizer, device, images, masks, args.accum, args.seed)
        else:
            optimizer = torch.optim.AdamW(
                param_groups(model, RECIPE["weight_decay"]), lr=LR, betas=tuple(RECIPE["betas"]),
                eps=RECIPE["eps"], fused=False,
            )
            step = reference_step(model, optimizer, device, images, masks, args.accum)

        sync(device)
        for k in range(args.warmup):
            t = time.perf_counter()
            step(k)
            sync(device)
            if k == 0:
                row.first_iter_s = time.perf_counter() - t
        t0 = time.perf_counter()
        for k in range(args.warmup, args.warmup + args.iters):
            loss = step(k)
        sync(device)
        dt = time.perf_counter() - t0

        row.final_loss = float(loss)
        row.ms_per_iter = 1e3 * dt / args.iters
        row.images_per_s = args.iters * args.batch * args.accum / dt
        if gflops is not None:
            row.tflops = row.images_per_s * gflops / 1e3
            if cuda and args.peak_tflops:
                row.peak_share = row.tflops / args.peak_tflops
    except Exception as exc:  # report (e.g. a torch.compile failure) and go on
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        row.status = f"failed: {type(exc).__name__}: {first[:160]}"
        if args.verbose:
            traceback.print_exc()
    finally:
        if cuda:
            row.peak_mem_gib = torch.cuda.max_memory_allocated(device) / 2**30
        del model, optimizer, fwd, step
        if v.compile:
            with contextlib.suppress(Exception):
                torch._dynamo.reset()
        free_memory(device)
    return row


# --------------------------------------------------------------------------- report
def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(
            device_name=torch.cuda.get_device_name(device),
            capability=f"{p.major}.{p.minor}",
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
        with warnings.catch_warnings(), contextlib.suppress(Exception):
            warnings.simplefilter("ignore")  # newer torch deprecates allow_tf32 in favour of fp32_precision
            env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return env


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(rows: list[Row]) -> None:
    head = ["variant", "attention", "optimizer", "precision", "img/s", "ms/iter", "1st it s",
            "peak GiB", "TFLOP/s", "% peak", "loss", "status"]
    cells = [
        [r.variant, r.attention, r.optimizer, r.precision, fmt(r.images_per_s, ".1f"), fmt(r.ms_per_iter, ".1f"),
         fmt(r.first_iter_s, ".2f"), fmt(r.peak_mem_gib, ".2f"), fmt(r.tflops, ".3g"),
         fmt(None if r.peak_share is None else 100 * r.peak_share, ".1f"), fmt(r.final_loss, ".4f"), r.status]
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    print(line(head))
    print(line(["-" * w for w in widths]))
    for c in cells:
        print(line(c))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--model", default=None, help="registry name (default: swinv2_b on CUDA, swinv2_pico on CPU)")
    p.add_argument("--img-size", type=int, default=None, help="default 192 on CUDA, 96 on CPU")
    p.add_argument("--window", type=int, default=None, help="default img-size // 16 (12 at 192, 6 at 96)")
    p.add_argument("--batch", type=int, default=None, help="micro-batch (default 128 on CUDA, 16 on CPU)")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimiser step (default 1)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=None, help="timed steps (default 20 on CUDA, 3 on CPU)")
    p.add_argument("--compile", action="store_true", help="add a torch.compile row of our step")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100/H200 SXM: 989)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the rows as JSON")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failed rows")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="profile N eager steps of our engine")
    args = p.parse_args(argv)

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.device(args.device).type == "cuda"
    args.model = args.model or ("swinv2_b" if cuda else "swinv2_pico")
    args.img_size = args.img_size or (192 if cuda else 96)
    args.window = args.window or max(1, args.img_size // 16)
    args.batch = args.batch or (128 if cuda else 16)
    args.iters = args.iters or (20 if cuda else 3)
    if min(args.batch, args.accum, args.iters) < 1 or args.warmup < 1:
        p.error("--batch, --accum, --iters and --warmup must be >= 1")
    return args


def profile_engine(args: argparse.Namespace, device: torch.device, images: torch.Tensor, masks: torch.Tensor) -> None:
    """Where our eager step spends its time: the top operators by device (or CPU) self time."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(args.seed)
    model = build_simmim(args.model, img_size=args.img_size, window_size=args.window,
                         drop_path_rate=RECIPE["drop_path"], norm_target_window=RECIPE["norm_target_window"])
    use_fused_attention(model)
    model = model.to(device).train()
    step = engine_step(model, model, build_optimizer(model, RECIPE, device), device, images, masks, args.accum, args.seed)
    for k in range(3):
        step(k)
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for k in range(args.profile):
            step(k)
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60))
    del model, step
    free_memory(device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)

    env = environment(device)
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print(
        f"config: model={args.model} img={args.img_size} window={args.window} batch={args.batch} "
        f"accum={args.accum} warmup={args.warmup} iters={args.iters} (synthetic on-device data, "
        f"drop_path={RECIPE['drop_path']}, decoder={RECIPE['decoder']}, loss={RECIPE['loss']}, "
        f"clip={RECIPE['clip_grad']})"
    )
    gflops, source = train_gflops_per_image(args.model, args.img_size, args.window, get_spec(args.model).num_features)
    print(
        f"FLOPs: training {fmt(gflops, '.2f')} GFLOP/image (3 x forward, 1 multiply-add = 2 FLOPs; "
        f"encoder count from {source})"
        + (f"; peak {args.peak_tflops:g} TFLOP/s bf16 dense for % peak" if device.type == "cuda" else "")
    )

    images, masks = synthetic_batch(args.batch, args.img_size, device, args.seed)
    variants = [Variant("mimscale", "engine", fused_attention=True)]
    if args.compile:
        variants.append(Variant("mimscale+compile", "engine", fused_attention=True, compile=True))
    variants.append(Variant("reference-style", "reference", fused_attention=False))

    rows = []
    for v in variants:
        t = time.perf_counter()
        rows.append(run_variant(v, args, device, images, masks, gflops))
        print(f"  {v.name}: {rows[-1].status} ({time.perf_counter() - t:.1f} s)", flush=True)
    print()
    print_table(rows)
    base = rows[-1].images_per_s
    for r in rows[:-1]:
        if r.images_per_s and base:
            print(f"{r.variant} / reference-style: {r.images_per_s / base:.2f}x images/s")

    if args.profile:
        profile_engine(args, device, images, masks)

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "environment": env,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "train_gflops_per_image": gflops,
            "flops_source": source,
            "rows": [asdict(r) for r in rows],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(r.status == "ok" for r in rows if not r.variant.endswith("compile")) else 1


if __name__ == "__main__":
    sys.exit(main())
