"""Which device a rank trains on: its own GPU, a clear error without CUDA, the explicit CPU override."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from mimlib.train.distributed import GPU_FALLBACK_ENV, DeviceError, gpu_for_rank, init_distributed
from launching import rank_free_env


def test_each_rank_takes_its_own_gpu() -> None:
    # Slurm shows a node's GPUs to every task: the local rank picks (as torchrun does)
    assert gpu_for_rank(1, {"CUDA_VISIBLE_DEVICES": "0,1"}) == (1, "1")
    assert gpu_for_rank(0, {"CUDA_VISIBLE_DEVICES": "2,3"}) == (0, "2")
    # Slurm bound the task to one GPU: that one, whatever the local rank
    assert gpu_for_rank(3, {"CUDA_VISIBLE_DEVICES": "3"}) == (0, "3")
    # no CUDA_VISIBLE_DEVICES: the device count
    assert gpu_for_rank(1, {}, count=2) == (1, "1")
    # more local ranks than GPUs would share one: refused, naming the variable
    with pytest.raises(DeviceError, match=r"local rank 2 has no GPU of its own: 2 visible \(CUDA_VISIBLE_DEVICES=0,1\)"):
        gpu_for_rank(2, {"CUDA_VISIBLE_DEVICES": "0,1"})
    with pytest.raises(DeviceError, match="no GPU visible"):
        gpu_for_rank(0, {"CUDA_VISIBLE_DEVICES": ""})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on a machine without CUDA")
def test_a_job_given_gpus_never_falls_back_to_the_cpu_silently(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    for k in set(os.environ) - set(rank_free_env()):  # one process, whatever launched the tests
        monkeypatch.delenv(k)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.delenv(GPU_FALLBACK_ENV, raising=False)
    with pytest.raises(DeviceError, match=rf"given GPUs .*sees no CUDA device.*set {GPU_FALLBACK_ENV}=cpu"):
        init_distributed("cuda")
    assert init_distributed("auto").device.type == "cpu"  # a job given no GPU: CPU is right
    monkeypatch.setenv(GPU_FALLBACK_ENV, "cpu")
    with caplog.at_level("WARNING"):
        assert init_distributed("cuda").device.type == "cpu"
    assert "GPU 0 of CUDA_VISIBLE_DEVICES=0,1 -> cpu" in caplog.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on a machine without CUDA")
def test_the_cli_says_so_in_one_line(tmp_path, tiny_data: dict, tiny_recipe: dict) -> None:
    import json

    env = {**rank_free_env(), "CUDA_VISIBLE_DEVICES": "0"}
    env.pop(GPU_FALLBACK_ENV, None)
    proc = subprocess.run(
        [sys.executable, "-m", "mimlib", "pretrain", "--model", "swinv2_pico", "--recipe-json", json.dumps(tiny_recipe),
         "--manifest", str(tiny_data["manifest"]), "--end-iter", "8", "--out", str(tmp_path / "o.pt"),
         "--resume-dir", str(tmp_path / "r"), "--device", "cuda", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "error: rank 0/1 on" in proc.stderr and f"{GPU_FALLBACK_ENV}=cpu" in proc.stderr
    assert not (tmp_path / "o.pt").exists()
