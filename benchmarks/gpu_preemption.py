"""GPU check of preemption, and how long saving a job's resume state takes per model size.

1. A pre-training and a fine-tuning (IN-1K) job of SwinV2-B run through the CLI on CUDA (bf16,
   fused AdamW, 8 loader workers); once training is under way the whole process group gets
   SIGTERM, as Slurm sends it at a time limit. Printed: the seconds from SIGTERM to exit (Slurm
   allows ~30 s, KillWait), the exit code (143), the update the state was saved after, and the
   rerun (exit 0, where it resumed).
2. Saving and loading the rolling resume state (weights + AdamW moments) of each SwinV2 size
   on this machine's local disk: does it fit in the grace period?

    python benchmarks/gpu_preemption.py [--workdir /tmp/mimscale_preempt] [--sizes swinv2_s,...]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import yaml  # noqa: E402

from mimlib.config import finetune_recipe, pretrain_recipe, validate_config  # noqa: E402
from mimlib.train import checkpoint as ckpt  # noqa: E402


def make_data(base: Path) -> dict[str, Path]:
    from mimlib.data.demo import ClassificationDemoSpec, write_classification_demo
    from mimlib.data.index import build_index
    from mimlib.data.manifests import build_manifest

    if not (base / "manifest.parquet").exists():
        spec = ClassificationDemoSpec(num_classes=4, train_per_class=128, val_per_class=16, min_size=160, max_size=256,
                                      seed=0)
        write_classification_demo(base / "images", spec)
        build_index(base / "images" / "train", base / "index_train.parquet")
        build_index(base / "images" / "val", base / "index_val.parquet")
        build_manifest(base / "index_train.parquet", base / "manifest.parquet", "whole")
    return {"index_train": base / "index_train.parquet", "index_val": base / "index_val.parquet",
            "manifest": base / "manifest.parquet"}


def sigterm_run(name: str, cmd: list[str], resume_dir: Path, wait_for_step: int) -> dict[str, Any]:
    """Start ``cmd`` in its own session, SIGTERM the group once a rolling checkpoint at or past
    ``wait_for_step`` exists (plus one second), then rerun it to the end."""
    t_start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    while proc.poll() is None and not any(s >= wait_for_step for s, _ in ckpt.rolling_checkpoints(resume_dir)):
        time.sleep(0.05)
    if proc.poll() is not None:
        print(f"{name}: ended before SIGTERM (rc {proc.returncode})\n{proc.stderr.read()[-3000:]}", flush=True)
        return {"name": name, "ok": False}
    time.sleep(1.0)  # mid-run, not at a checkpoint boundary
    t_term = time.perf_counter()
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        print(f"{name}: HUNG after SIGTERM", flush=True)
        return {"name": name, "ok": False}
    latency = time.perf_counter() - t_term
    saved = ckpt.rolling_checkpoints(resume_dir)
    stopped = [line for line in err.splitlines() if "stopped by SIGTERM" in line]
    t_rerun = time.perf_counter()
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    row = {
        "name": name, "ok": proc.returncode == 143 and rerun.returncode == 0 and bool(stopped),
        "rc": proc.returncode, "sigterm_to_exit_s": round(latency, 2), "ran_before_sigterm_s": round(t_term - t_start, 1),
        "saved_step": saved[-1][0] if saved else None, "rerun_rc": rerun.returncode,
        "rerun_s": round(time.perf_counter() - t_rerun, 1), "message": stopped[-1][-160:] if stopped else err[-1500:],
    }
    if rerun.returncode:
        row["rerun_err"] = rerun.stderr[-2000:]
    print(json.dumps(row), flush=True)
    return row


def save_state_times(sizes: list[str], workdir: Path, device: torch.device) -> None:
    from bench_pretrain import RECIPE, synthetic_batch

    from mimlib.models.simmim import build_simmim
    from mimlib.train.optim import param_groups

    print("| model | params (M) | state (GB) | save (s) | load (s) |")
    print("|---|---|---|---|---|")
    for name in sizes:
        model = build_simmim(name, img_size=192, window_size=12, drop_path_rate=0.0).to(device)
        opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, fused=device.type == "cuda")
        images, masks = synthetic_batch(4, 192, device, 0)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(images, masks)
        loss.backward()
        opt.step()
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "iteration": 1, "recipe": RECIPE}
        sync(device)
        t = time.perf_counter()
        path = ckpt.save_rolling(state, workdir / "save_bench", 1)
        save_s = time.perf_counter() - t
        gb = path.stat().st_size / 1e9
        t = time.perf_counter()
        ckpt.load(path, map_location=device)
        sync(device)
        load_s = time.perf_counter() - t
        path.unlink()
        n = sum(p.numel() for p in model.encoder.parameters()) / 1e6
        print(f"| {name} | {n:.0f} | {gb:.2f} | {save_s:.1f} | {load_s:.1f} |", flush=True)
        del model, opt, state, loss
        if device.type == "cuda":
            torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/mimscale_preempt"))
    p.add_argument("--model", default="swinv2_b")
    p.add_argument("--sizes", default="swinv2_s,swinv2_b,swinv2_l,swinv2_h,swinv2_g")
    p.add_argument("--skip-jobs", action="store_true")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--small", action="store_true", help="64 px, batch 16: a quick check of this script on a CPU")
    args = p.parse_args()
    device = torch.device(args.device)
    print(torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", torch.__version__, flush=True)
    data = make_data(args.workdir / "data")
    cfg = validate_config(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()))
    results = []
    if not args.skip_jobs:
        pre = {**pretrain_recipe(cfg, "swinv2_pico"), "img_size": 192, "window_size": 12, "global_batch": 128,
               "micro_batch": 64, "num_workers": 8, "threads": None, "warmup_iters": 10, "log_every": 5,
               "val_every": 1000, "checkpoint_every": 10, "norm_target_window": 47}
        if args.small:
            pre.update(img_size=64, window_size=4, global_batch=16, micro_batch=8, num_workers=2)
        out = args.workdir / "pretrain"
        cmd = [sys.executable, "-m", "mimlib", "pretrain", "--model", args.model, "--recipe-json", json.dumps(pre),
               "--manifest", str(data["manifest"]), "--end-iter", "60", "--out", str(out / "checkpoint.pt"),
               "--log-out", str(out / "log.jsonl"), "--resume-dir", str(out / "resume"), "--device", args.device,
               "--val-index", str(data["index_val"]), "--no-progress"]
        results.append(sigterm_run("pretrain", cmd, out / "resume", 10))
        ft = {**finetune_recipe(cfg, "in1k", "swinv2_pico"), "img_size": 224, "window_size": 14, "global_batch": 64,
              "micro_batch": 32, "epochs": 12, "warmup_epochs": 1, "num_workers": 8, "threads": None,
              "mixup": 0.8, "cutmix": 1.0}
        if args.small:
            ft.update(img_size=64, window_size=4, global_batch=16, micro_batch=8, num_workers=2, epochs=6)
        data_json = {"train_index": str(data["index_train"]), "val_index": str(data["index_val"]), "num_classes": 4}
        out = args.workdir / "in1k"
        cmd = [sys.executable, "-m", "mimlib", "finetune", "--task", "in1k", "--model", args.model,
               "--recipe-json", json.dumps(ft), "--data-json", json.dumps(data_json), "--out-dir", str(out / "out"),
               "--resume-dir", str(out / "resume"), "--device", args.device, "--no-progress"]
        results.append(sigterm_run("finetune-in1k", cmd, out / "resume", 1))
    save_state_times([s for s in args.sizes.split(",") if s], args.workdir, device)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
