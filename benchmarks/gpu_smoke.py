"""GPU checks of the CUDA-only code paths (bf16 autocast, fused AdamW, SDPA attention, pinned
loaders with workers): what CI (no GPU) cannot run. Prints a report; exits non-zero on failure.

    python benchmarks/gpu_smoke.py [--model swinv2_b] [--workdir /tmp/mimscale_gpu]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def check_fused_attention(model_name: str, device: str) -> None:
    from mimlib.models.attention import use_fused_attention
    from mimlib.models.swinv2 import build_encoder

    torch.manual_seed(0)
    ref = build_encoder(model_name, img_size=192, window_size=12, drop_path_rate=0.0).to(device).eval()
    fused = build_encoder(model_name, img_size=192, window_size=12, drop_path_rate=0.0).to(device).eval()
    fused.load_state_dict(ref.state_dict())
    use_fused_attention(fused)
    x = torch.randn(8, 3, 192, 192, device=device)
    with torch.no_grad():
        a, b = ref(x), fused(x)
        diff32 = (a - b).abs().max().item()
        with torch.autocast(device, dtype=torch.bfloat16):
            a16, b16 = ref(x).float(), fused(x).float()
        diff16 = (a16 - b16).abs().max().item()
    scale = a.abs().max().item()
    print(f"fused attention vs timm on {model_name}: max|diff| fp32 {diff32:.2e}, bf16 {diff16:.2e} (|out| max {scale:.2f})")
    assert diff32 < 1e-3 * max(scale, 1.0), "fused attention differs from timm in fp32"


def run_engine(workdir: Path, model_name: str, device: str, micro_batch: int, compile_model: bool = False) -> None:
    from mimlib.data.demo import ClassificationDemoSpec, write_classification_demo
    from mimlib.data.index import build_index
    from mimlib.data.manifests import build_manifest
    from mimlib.config import validate_config, pretrain_recipe
    from mimlib.train import checkpoint as ckpt
    from mimlib.train.pretrain import PretrainJob, run_pretrain

    workdir.mkdir(parents=True, exist_ok=True)
    images = workdir / "images"
    if not images.exists():
        write_classification_demo(images, ClassificationDemoSpec(num_classes=10, train_per_class=64, val_per_class=8))
    build_index(images / "train", workdir / "index_train.parquet")
    build_index(images / "val", workdir / "index_val.parquet")
    build_manifest(workdir / "index_train.parquet", workdir / "manifest.parquet", "whole")
    cfg = validate_config(
        {
            "sources": {"demo": {"demo": True}},
            "datasets": {"all": {"source": "demo"}},
            "validation": {"source": "demo"},
            "models": [model_name],
            "lengths": [16],
            "pretrain": {
                "global_batch": 2 * micro_batch, "micro_batch": micro_batch, "warmup_iters": 4, "num_workers": 8 if device == "cuda" else 0,
                "log_every": 2, "val_every": 8, "checkpoint_every": 8,
            },
        }
    )
    recipe = pretrain_recipe(cfg, model_name)

    def job(name: str, end: int, decay_at: int | None, init: Path | None = None) -> PretrainJob:
        return PretrainJob(
            model=model_name, recipe=recipe, manifest=workdir / "manifest.parquet", end_iter=end,
            decay_at=decay_at, init=init, out=workdir / f"{name}.pt", log_out=workdir / f"{name}.jsonl",
            resume_dir=workdir / ".resume" / name, val_index=workdir / "index_val.parquet", device=device,
        )

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    full = run_pretrain(job("full", 16, 14), progress=False)
    t_full = time.perf_counter() - t0
    run_pretrain(job("trunk", 14, None), progress=False)
    branch = run_pretrain(job("branch", 16, 14, init=workdir / "trunk.pt"), progress=False)
    a, b = ckpt.load(workdir / "full.pt")["model"], ckpt.load(workdir / "branch.pt")["model"]
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    print(
        f"engine on {device} ({model_name}, global batch {2 * micro_batch} = 2 x {micro_batch}): 16 iterations in {t_full:.1f} s, "
        f"train loss {full['train_loss']:.4f}, val loss {full['val_loss']:.4f}; "
        f"trunk+branch val loss {branch['val_loss']:.4f}, max |weight diff| vs uninterrupted {worst:.2e}; "
        f"peak memory {torch.cuda.max_memory_allocated() / 2**30 if device == 'cuda' else float('nan'):.1f} GiB"
    )
    assert torch.isfinite(torch.tensor(full["val_loss"]))
    if compile_model:
        recipe = {**recipe, "compile": True}
        t0 = time.perf_counter()
        compiled = run_pretrain(job("compiled", 16, 14), progress=False)
        print(
            f"engine with torch.compile: 16 iterations in {time.perf_counter() - t0:.1f} s (compilation included); "
            f"val loss {compiled['val_loss']:.4f} vs eager {full['val_loss']:.4f}"
        )
        assert abs(compiled["val_loss"] - full["val_loss"]) < 0.02 * full["val_loss"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="swinv2_b")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/mimscale_gpu"))
    p.add_argument("--device", default="cuda", help="cpu runs the same checks slowly (a dry run of this script)")
    p.add_argument("--micro-batch", type=int, default=64)
    p.add_argument("--compile", action="store_true", help="run the engine with torch.compile")
    args = p.parse_args()
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA device: nothing to check")
            return 1
        print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}")
    check_fused_attention(args.model, args.device)
    run_engine(args.workdir, args.model, args.device, args.micro_batch, args.compile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
