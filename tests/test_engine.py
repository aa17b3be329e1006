"""The pre-training engine: cut points never change the result; failures keep good state."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from launching import mimlib_cmd, pretrain_args, rank_free_env

from mimlib.train import checkpoint as ckpt
from mimlib.train.metrics import read_jsonl
from mimlib.train.pretrain import PretrainJob, TooManyCorruptImagesError, run_pretrain
from mimlib.train.step import NonFiniteLossError

ROOT = Path(__file__).resolve().parents[1]


def job(tmp: Path, data: dict, recipe: dict, name: str, end: int, decay_at: int | None, **kw) -> PretrainJob:
    return PretrainJob(
        model="swinv2_pico",
        recipe=recipe,
        manifest=kw.pop("manifest", data["manifest"]),
        end_iter=end,
        decay_at=decay_at,
        out=tmp / f"{name}.pt",
        log_out=tmp / f"{name}.jsonl",
        resume_dir=tmp / ".resume" / name,
        val_index=data["index_val"],
        **kw,
    )


def weights(path: Path) -> dict[str, torch.Tensor]:
    return ckpt.load(path)["model"]


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def losses(path: Path) -> dict[int, float]:
    return {r["iter"]: r["loss"] for r in read_jsonl(path) if "loss" in r}


def test_trunk_plus_branch_equals_uninterrupted(tmp_path: Path, tiny_data: dict, tiny_recipe: dict) -> None:
    # L = 16: lr x0.1 from iteration 14. Trunk cut into two jobs (7, 14), then the branch.
    run_pretrain(job(tmp_path, tiny_data, tiny_recipe, "full", 16, 14), progress=False)
    run_pretrain(job(tmp_path, tiny_data, tiny_recipe, "trunk7", 7, None), progress=False)
    run_pretrain(job(tmp_path, tiny_data, tiny_recipe, "trunk14", 14, None, init=tmp_path / "trunk7.pt"), progress=False)
    summary = run_pretrain(
        job(tmp_path, tiny_data, tiny_recipe, "branch", 16, 14, init=tmp_path / "trunk14.pt", save_optimizer=False),
        progress=False,
    )
    assert_bitwise_equal(weights(tmp_path / "full.pt"), weights(tmp_path / "branch.pt"))
    full = losses(tmp_path / "full.jsonl")
    pieces = {**losses(tmp_path / "trunk7.jsonl"), **losses(tmp_path / "trunk14.jsonl"), **losses(tmp_path / "branch.jsonl")}
    for it in (2, 4, 6, 10, 12, 16):
        assert pieces[it] == full[it]
    assert summary["val_loss"] is not None and summary["val_loss"] > 0
    assert "optimizer" not in ckpt.load(tmp_path / "branch.pt")
    assert "optimizer" in ckpt.load(tmp_path / "trunk14.pt")
    # a different seed gives different weights (the test above could not pass vacuously)
    other = job(tmp_path, tiny_data, tiny_recipe, "seed1", 7, None, seed=1)
    run_pretrain(other, progress=False)
    assert not torch.equal(weights(tmp_path / "seed1.pt")["decoder.0.weight"], weights(tmp_path / "trunk7.pt")["decoder.0.weight"])


def _cli(j: PretrainJob) -> list[str]:
    return mimlib_cmd(pretrain_args(j))


def test_killed_job_resumes_to_the_same_weights(tmp_path: Path, tiny_data: dict, tiny_recipe: dict) -> None:
    recipe = {**tiny_recipe, "checkpoint_every": 2}
    end = 24
    run_pretrain(job(tmp_path, tiny_data, recipe, "ref", end, 21), progress=False)
    j = job(tmp_path, tiny_data, recipe, "killed", end, 21)
    proc = subprocess.Popen(_cli(j), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if any(i >= 6 for i, _ in ckpt.rolling_checkpoints(j.resume_dir)):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the job finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not j.out.exists()
    killed_at = ckpt.rolling_checkpoints(j.resume_dir)[-1][0]
    assert 6 <= killed_at < end
    subprocess.run(_cli(j), cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert_bitwise_equal(weights(tmp_path / "ref.pt"), weights(j.out))
    assert losses(j.log_out) == losses(tmp_path / "ref.jsonl")
    assert not j.resume_dir.exists()  # rolling state is cleaned up once the job is done


def test_sigterm_saves_state_and_the_rerun_resumes(tmp_path: Path, tiny_data: dict, tiny_recipe: dict) -> None:
    """A time limit / preemption / scancel: SIGTERM -> checkpoint at the next iteration, exit 143.

    Slurm signals every process of the step, so the signal goes to the whole process group,
    DataLoader workers included (they must not die before the main process has saved)."""
    recipe = {**tiny_recipe, "checkpoint_every": 1000}  # only the SIGTERM path saves state
    end = 40
    run_pretrain(job(tmp_path, tiny_data, recipe, "ref", end, 35), progress=False)
    j = job(tmp_path, tiny_data, {**recipe, "num_workers": 2}, "term", end, 35)
    proc = subprocess.Popen(_cli(j), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    work_log = j.resume_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (work_log.exists() and work_log.read_text()):
        time.sleep(0.05)
    assert proc.poll() is None, "the job finished before SIGTERM"
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    saved = ckpt.rolling_checkpoints(j.resume_dir)
    assert len(saved) == 1 and 0 < saved[0][0] < end
    assert "stopped by SIGTERM" in err and "DataLoader worker" not in err
    subprocess.run(_cli(j), cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert_bitwise_equal(weights(tmp_path / "ref.pt"), weights(j.out))
    assert losses(j.log_out) == losses(tmp_path / "ref.jsonl")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(
    tmp_path: Path, tiny_data: dict, tiny_recipe: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mimlib.models.simmim import SimMIM

    calls = {"n": 0}
    original = SimMIM.forward

    def poisoned(self, images, mask):
        calls["n"] += 1
        loss = original(self, images, mask)
        return loss * float("nan") if calls["n"] > 2 * 9 else loss  # 2 micro-steps per iteration

    monkeypatch.setattr(SimMIM, "forward", poisoned)
    j = job(tmp_path, tiny_data, tiny_recipe, "nan", 16, None)
    with pytest.raises(NonFiniteLossError, match="iteration 9"):
        run_pretrain(j, progress=False)
    assert not j.out.exists()
    kept = ckpt.rolling_checkpoints(j.resume_dir)
    assert [i for i, _ in kept][-1] == 8
    state = ckpt.load(kept[-1][1])
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_corrupt_images_counted_then_limit_enforced(tmp_path: Path, tiny_data: dict, tiny_recipe: dict) -> None:
    from mimlib.data.manifests import read_manifest, write_manifest

    root = tmp_path / "train"
    shutil.copytree(tiny_data["root"] / "train", root)
    df, _, meta = read_manifest(tiny_data["manifest"])
    bad = [root / df["path"][3], root / df["path"][17]]
    for p in bad:
        p.write_bytes(b"GIF89a truncated")
    manifest = tmp_path / "manifest.parquet"
    write_manifest(df, manifest, root, {"kind": meta["kind"]})
    # 32 images x 4 iterations x batch 8: every file is drawn once.
    ok = run_pretrain(
        job(tmp_path, tiny_data, {**tiny_recipe, "max_corrupt_fraction": 0.1}, "tolerant", 4, None, manifest=manifest),
        progress=False,
    )
    assert ok["corrupt_images"] == 2
    assert read_jsonl(tmp_path / "tolerant.jsonl")[-2]["corrupt_images"] == 2
    with pytest.raises(TooManyCorruptImagesError) as err:
        run_pretrain(
            job(tmp_path, tiny_data, {**tiny_recipe, "max_corrupt_fraction": 0.05}, "strict", 4, None, manifest=manifest),
            progress=False,
        )
    assert bad[0].name in str(err.value) and "max_corrupt_fraction=0.05" in str(err.value)


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path: Path, tiny_data: dict, tiny_recipe: dict) -> None:
    """2 gloo ranks x micro 2 x 2 accumulation == 1 process x micro 4 x 2 (global batch 8)."""
    recipe = {**tiny_recipe, "drop_path": 0.0}  # drop-path draws depend on the rank layout
    single = job(tmp_path, tiny_data, recipe, "single", 6, None)
    run_pretrain(single, progress=False)
    ddp = job(tmp_path, tiny_data, {**recipe, "micro_batch": 2}, "ddp", 6, None)
    # launched the way the workflow launches a 2-rank job (torchrun here, srun inside Slurm)
    subprocess.run(mimlib_cmd(pretrain_args(ddp), ranks=2), cwd=ROOT, env=rank_free_env(), check=True,
                   capture_output=True, timeout=300)
    a, b = losses(single.log_out), losses(ddp.log_out)
    assert a.keys() == b.keys()
    for it in a:
        assert b[it] == pytest.approx(a[it], rel=1e-5, abs=1e-6)
    wa, wb = weights(single.out), weights(ddp.out)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
    va = [r["val_loss"] for r in read_jsonl(single.log_out) if "val_loss" in r]
    vb = [r["val_loss"] for r in read_jsonl(ddp.log_out) if "val_loss" in r]
    assert vb == pytest.approx(va, rel=1e-5)
