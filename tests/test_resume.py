"""Resume states belong to the job that wrote them; damaged rolling checkpoints fall back;
a cell's unreadable files are counted over all its jobs (issue 12, items 1, 4 and 6)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from mimlib.data.manifests import read_manifest, write_manifest
from mimlib.data.pretrain_data import SampleOrder
from mimlib.train import checkpoint as ckpt
from mimlib.train.distributed import DistInfo
from mimlib.train.metrics import read_jsonl
from mimlib.train.pretrain import PretrainJob, TooManyCorruptImagesError, run_pretrain


class Interrupted(Exception):
    """Stands for a killed job: raised right after a given rolling save."""


def job(tmp: Path, data: dict, recipe: dict, name: str, end: int, decay_at: int | None = None, **kw) -> PretrainJob:
    return PretrainJob(
        model="swinv2_pico", recipe=recipe, manifest=kw.pop("manifest", data["manifest"]), end_iter=end,
        decay_at=decay_at, out=tmp / f"{name}.pt", log_out=tmp / f"{name}.jsonl",
        resume_dir=tmp / ".resume" / name, val_index=data["index_val"], **kw,
    )


def interrupt_after(monkeypatch: pytest.MonkeyPatch, iteration: int) -> None:
    original = ckpt.save_rolling

    def save_then_die(obj, folder, it, keep=2):
        path = original(obj, folder, it, keep)
        if it == iteration:
            raise Interrupted(it)
        return path

    monkeypatch.setattr(ckpt, "save_rolling", save_then_die)


def run_until(monkeypatch: pytest.MonkeyPatch, j: PretrainJob, iteration: int) -> None:
    with monkeypatch.context() as m:
        interrupt_after(m, iteration)
        with pytest.raises(Interrupted):
            run_pretrain(j, progress=False)
    assert not j.out.exists() and ckpt.rolling_checkpoints(j.resume_dir)[-1][0] == iteration


def copy_manifest(tiny_data: dict, tmp: Path, rows=None) -> Path:
    df, root, meta = read_manifest(tiny_data["manifest"])
    out = tmp / "manifest.parquet"
    write_manifest(df if rows is None else df.iloc[rows].reset_index(drop=True), out, root, {"kind": meta["kind"]})
    return out


# --- item 1: a resume state is resumed only by the job that wrote it ---------------------------


def test_a_pretrain_resume_state_is_not_reused_after_the_seed_or_the_manifest_changed(
    tmp_path: Path, tiny_data: dict, tiny_recipe: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = {**tiny_recipe, "checkpoint_every": 2}
    manifest = copy_manifest(tiny_data, tmp_path)
    j = job(tmp_path, tiny_data, recipe, "cell", 8, manifest=manifest)
    run_until(monkeypatch, j, 4)
    kept = ckpt.rolling_checkpoints(j.resume_dir)

    other_seed = job(tmp_path, tiny_data, recipe, "cell", 8, manifest=manifest, seed=1)
    with pytest.raises(ckpt.ResumeMismatchError) as e:
        run_pretrain(other_seed, progress=False)
    msg = str(e.value)
    assert "iter_000000004.pt" in msg and "seed: 0 in the state, 1 for this job" in msg, msg
    assert f"mv {j.resume_dir} {j.resume_dir}.old" in msg and "Nothing was deleted" in msg, msg

    # the dataset's fraction changed: the manifest is rebuilt in place with other images
    copy_manifest(tiny_data, tmp_path, rows=list(range(24)))
    with pytest.raises(ckpt.ResumeMismatchError, match=r"manifest_sha256: sha256 [0-9a-f]{12}\.\.\. in the state"):
        run_pretrain(j, progress=False)
    assert ckpt.rolling_checkpoints(j.resume_dir) == kept  # nothing was deleted
    assert not j.out.exists()

    # with the job's own definition back, it resumes where it stopped
    copy_manifest(tiny_data, tmp_path)
    summary = run_pretrain(j, progress=False)
    assert summary["resumed_from"].endswith("iter_000000004.pt")


def test_a_pretrain_resume_state_is_not_reused_after_the_init_checkpoint_changed(
    tmp_path: Path, tiny_data: dict, tiny_recipe: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = {**tiny_recipe, "checkpoint_every": 2}
    run_pretrain(job(tmp_path, tiny_data, recipe, "trunk", 2), progress=False)
    branch = job(tmp_path, tiny_data, recipe, "branch", 8, 7, init=tmp_path / "trunk.pt")
    run_until(monkeypatch, branch, 4)
    # the trunk point is rebuilt (same settings, other weights: e.g. another code version)
    state = ckpt.load(tmp_path / "trunk.pt")
    state["model"]["decoder.0.weight"] += 1
    ckpt.save_atomic(state, tmp_path / "trunk.pt")
    with pytest.raises(ckpt.ResumeMismatchError, match=r"init_sha256: sha256 [0-9a-f]{12}\.\.\. in the state, "
                                                        r"sha256 [0-9a-f]{12}\.\.\. for this job"):
        run_pretrain(branch, progress=False)


def test_an_init_checkpoint_of_another_seed_model_or_manifest_is_reported(
    tmp_path: Path, tiny_data: dict, tiny_recipe: dict
) -> None:
    run_pretrain(job(tmp_path, tiny_data, tiny_recipe, "trunk", 2), progress=False)
    init = tmp_path / "trunk.pt"
    with pytest.raises(ckpt.ResumeMismatchError) as e:
        run_pretrain(job(tmp_path, tiny_data, tiny_recipe, "branch", 4, 3, init=init, seed=1), progress=False)
    assert f"init checkpoint {init}" in str(e.value) and f"seed: 0 in {init}, 1 for this job" in str(e.value)
    other = copy_manifest(tiny_data, tmp_path, rows=list(range(24)))
    with pytest.raises(ckpt.ResumeMismatchError, match="manifest_sha256"):
        run_pretrain(job(tmp_path, tiny_data, tiny_recipe, "branch", 4, 3, init=init, manifest=other), progress=False)
    state = ckpt.load(init)
    state["model_name"] = "swinv2_nano"
    ckpt.save_atomic(state, tmp_path / "renamed.pt")
    with pytest.raises(ckpt.ResumeMismatchError, match="model: 'swinv2_nano' in .*'swinv2_pico' for this job"):
        run_pretrain(job(tmp_path, tiny_data, tiny_recipe, "branch", 4, 3, init=tmp_path / "renamed.pt"),
                     progress=False)


def test_the_cli_reports_a_mismatch_in_one_line_with_exit_code_2(
    tmp_path: Path, tiny_data: dict, tiny_recipe: dict
) -> None:
    import subprocess

    from launching import mimlib_cmd, pretrain_args

    run_pretrain(job(tmp_path, tiny_data, tiny_recipe, "trunk", 2), progress=False)
    branch = job(tmp_path, tiny_data, tiny_recipe, "branch", 4, 3)
    done = subprocess.run(mimlib_cmd(pretrain_args(branch) + ["--init", str(tmp_path / "trunk.pt"), "--seed", "1"]),
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("mimscale: error: init checkpoint") and "seed: 0 in" in last, done.stderr[-3000:]
    assert "Traceback" not in done.stderr


def _finetune_job(tmp: Path, **kw):
    from mimlib.finetune.common import FinetuneJob

    index = tmp / "index.parquet"
    if not index.exists():
        index.write_bytes(b"index v1")
    pretrained = tmp / "cell.pt"
    if not pretrained.exists():
        torch.save({"model": {"w": torch.zeros(2)}}, pretrained)
    args = dict(task="in1k", model="swinv2_pico", recipe={"lr": 1e-3}, data={"train_index": str(index), "num_classes": 4},
                out_dir=tmp / "out", resume_dir=tmp / "resume", checkpoint=pretrained, seed=0)
    return FinetuneJob(**{**args, **kw})


def _net() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    return model, torch.optim.AdamW(model.parameters())


def test_a_finetune_resume_state_is_resumed_only_by_the_job_that_wrote_it(tmp_path: Path) -> None:
    from mimlib.finetune.common import ResumableState

    info = DistInfo()
    model, opt = _net()
    ResumableState(_finetune_job(tmp_path), info).save(3, model, opt, {"best_top1": 0.5})
    assert ResumableState(_finetune_job(tmp_path), info).load(*_net()) == (3, {"best_top1": 0.5})

    with pytest.raises(ckpt.ResumeMismatchError, match="seed: 0 in the state, 1 for this job"):
        ResumableState(_finetune_job(tmp_path, seed=1), info).load(*_net())
    with pytest.raises(ckpt.ResumeMismatchError, match="task: 'in1k' in the state, 'inat18' for this job"):
        ResumableState(_finetune_job(tmp_path, task="inat18"), info).load(*_net())
    (tmp_path / "index.parquet").write_bytes(b"index v2, other images")
    with pytest.raises(ckpt.ResumeMismatchError, match=r"data\.train_index_sha256: sha256 "):
        ResumableState(_finetune_job(tmp_path), info).load(*_net())
    (tmp_path / "index.parquet").write_bytes(b"index v1")
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "cell.pt")  # the cell was pre-trained again
    with pytest.raises(ckpt.ResumeMismatchError, match=r"checkpoint_sha256: sha256 .* Nothing was deleted"):
        ResumableState(_finetune_job(tmp_path), info).load(*_net())
    assert [i for i, _ in ckpt.rolling_checkpoints(tmp_path / "resume")] == [3]
    # a state from before job identities (main's format) cannot show whose it is: refused too
    state = ckpt.load(tmp_path / "resume" / "iter_000000003.pt")
    del state["job_identity"]
    ckpt.save_atomic(state, tmp_path / "resume" / "iter_000000003.pt")
    with pytest.raises(ckpt.ResumeMismatchError, match="records no job identity"):
        ResumableState(_finetune_job(tmp_path), info).load(*_net())


# --- item 6: a damaged newest rolling checkpoint falls back to the previous one ----------------


def test_a_truncated_newest_rolling_checkpoint_falls_back_to_the_previous_one(
    tmp_path: Path, tiny_data: dict, tiny_recipe: dict, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    recipe = {**tiny_recipe, "checkpoint_every": 2}
    run_pretrain(job(tmp_path, tiny_data, recipe, "ref", 8, 7), progress=False)
    j = job(tmp_path, tiny_data, recipe, "cell", 8, 7)
    run_until(monkeypatch, j, 6)
    newest = j.resume_dir / "iter_000000006.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # e.g. a full disk during a copy
    with caplog.at_level(logging.WARNING):
        summary = run_pretrain(j, progress=False)
    assert summary["resumed_from"].endswith("iter_000000004.pt")
    assert any(str(newest) in r.getMessage() and "unusable" in r.getMessage() for r in caplog.records)
    damaged = newest.with_name(newest.name + ".damaged")
    assert damaged.read_bytes() == data[: len(data) // 2]  # kept, not deleted
    ref, out = ckpt.load(tmp_path / "ref.pt")["model"], ckpt.load(j.out)["model"]
    assert all(torch.equal(ref[k], out[k]) for k in ref)


def test_a_truncated_newest_finetune_state_falls_back_to_the_previous_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from mimlib.finetune.common import ResumableState

    info = DistInfo()
    model, opt = _net()
    state = ResumableState(_finetune_job(tmp_path), info)
    state.save(2, model, opt, {"at": 2})
    state.save(3, model, opt, {"at": 3})
    newest = tmp_path / "resume" / "iter_000000003.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        assert ResumableState(_finetune_job(tmp_path), info).load(*_net()) == (2, {"at": 2})
    assert any(str(newest) in r.getMessage() for r in caplog.records)
    assert newest.with_name(newest.name + ".damaged").exists()
    # the next save prunes only intact rolling checkpoints; the damaged one stays
    state.save(4, model, opt, {"at": 4})
    assert [i for i, _ in ckpt.rolling_checkpoints(tmp_path / "resume")] == [2, 4]
    assert newest.with_name(newest.name + ".damaged").exists()


# --- item 4: corrupt_images and its limit count over the cell -----------------------------------


def _corrupt(tiny_data: dict, tmp: Path, positions: list[int]) -> Path:
    """A copy of the tiny manifest whose images drawn at these epoch-0 positions are unreadable
    (32 images, global batch 8: positions 0-15 are iterations 0-1, 16-31 iterations 2-3)."""
    root = tmp / "train"
    if not root.exists():
        shutil.copytree(tiny_data["root"] / "train", root)
    df, _, meta = read_manifest(tiny_data["manifest"])
    order = SampleOrder(len(df), seed=0)
    for pos in positions:
        (root / df["path"][order(pos)]).write_bytes(b"GIF89a truncated")
    manifest = tmp / "corrupt.parquet"
    write_manifest(df, manifest, root, {"kind": meta["kind"]})
    return manifest


def test_corrupt_images_accumulate_over_a_cells_trunk_and_branch(
    tmp_path: Path, tiny_data: dict, tiny_recipe: dict
) -> None:
    recipe = {**tiny_recipe, "max_corrupt_fraction": 0.1}  # 3.2 of 32 images
    manifest = _corrupt(tiny_data, tmp_path, [1, 6, 12])  # all three drawn by the trunk only
    run_pretrain(job(tmp_path, tiny_data, recipe, "trunk", 2, manifest=manifest), progress=False)
    assert read_jsonl(tmp_path / "trunk.jsonl")[-2]["corrupt_images"] == 3
    branch = job(tmp_path, tiny_data, recipe, "branch", 4, 3, manifest=manifest, init=tmp_path / "trunk.pt",
                 metrics_out=tmp_path / "metrics.json", save_optimizer=False)
    summary = run_pretrain(branch, progress=False)
    assert summary["corrupt_images"] == 3
    assert json.loads((tmp_path / "metrics.json").read_text())["corrupt_images"] == 3
    assert [r["corrupt_images"] for r in read_jsonl(tmp_path / "branch.jsonl") if "corrupt_images" in r][-1] == 3
    assert len(ckpt.load(tmp_path / "trunk.pt")["failed_files"]) == 3  # how it reaches the branch


def test_the_corrupt_image_limit_applies_to_the_cell(tmp_path: Path, tiny_data: dict, tiny_recipe: dict) -> None:
    recipe = {**tiny_recipe, "max_corrupt_fraction": 0.1}  # 3.2 of 32 images
    manifest = _corrupt(tiny_data, tmp_path, [1, 6, 12, 20])  # 3 in the trunk, 1 more in the branch
    run_pretrain(job(tmp_path, tiny_data, recipe, "trunk", 2, manifest=manifest), progress=False)
    branch = job(tmp_path, tiny_data, recipe, "branch", 4, 3, manifest=manifest, init=tmp_path / "trunk.pt")
    with pytest.raises(TooManyCorruptImagesError, match=r"4 of 32 images .* max_corrupt_fraction=0\.1"):
        run_pretrain(branch, progress=False)


@pytest.mark.slow
def test_two_ranks_count_each_unreadable_file_once_and_carry_them_all(
    tmp_path: Path, tiny_data: dict, tiny_recipe: dict
) -> None:
    """Each rank decodes its own slots: the count is of distinct files over all ranks (not a
    sum of per-rank sets, which double counts what the trunk point carried), and rank 0's
    checkpoint carries every rank's files to the branch."""
    import subprocess

    from launching import mimlib_cmd, pretrain_args, rank_free_env

    recipe = {**tiny_recipe, "max_corrupt_fraction": 0.1, "micro_batch": 2}  # 3.2 of 32 images
    manifest = _corrupt(tiny_data, tmp_path, [1, 6, 12])  # rank 0 draws slots 0-3, rank 1 slots 4-7
    trunk = job(tmp_path, tiny_data, recipe, "trunk", 2, manifest=manifest)
    branch = job(tmp_path, tiny_data, recipe, "branch", 4, 3, manifest=manifest, init=trunk.out,
                 metrics_out=tmp_path / "metrics.json", save_optimizer=False)
    root = Path(__file__).resolve().parents[1]
    extra = {trunk.out: [], branch.out: ["--init", str(trunk.out), "--metrics-out", str(branch.metrics_out),
                                         "--no-optimizer"]}
    for j in (trunk, branch):
        done = subprocess.run(mimlib_cmd(pretrain_args(j) + extra[j.out], ranks=2), cwd=root, env=rank_free_env(),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    assert len(ckpt.load(trunk.out)["failed_files"]) == 3
    assert json.loads((tmp_path / "metrics.json").read_text())["corrupt_images"] == 3


@pytest.mark.slow
def test_two_ranks_fall_back_past_a_damaged_rolling_checkpoint_together(
    tmp_path: Path, tiny_data: dict, tiny_recipe: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess

    from launching import mimlib_cmd, pretrain_args, rank_free_env

    recipe = {**tiny_recipe, "checkpoint_every": 2, "micro_batch": 2, "drop_path": 0.0}
    j = job(tmp_path, tiny_data, recipe, "cell", 8, 7)
    run_until(monkeypatch, j, 6)  # one process; the rerun has two ranks (the state does not depend on it)
    newest = j.resume_dir / "iter_000000006.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    done = subprocess.run(mimlib_cmd(pretrain_args(j), ranks=2), cwd=Path(__file__).resolve().parents[1],
                          env=rank_free_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "iterations 4 -> 8 from" in done.stderr and "is unusable" in done.stderr, done.stderr[-3000:]
    assert newest.with_name(newest.name + ".damaged").exists() and j.out.exists()


@pytest.mark.slow
def test_after_a_kill_and_a_seed_change_the_workflow_job_stops_instead_of_resuming(tmp_path: Path) -> None:
    """The issue's scenario through Snakemake: interrupt a trunk job, change ``seed`` (which also
    rebuilds the manifest with other images), run the same target: the job stops, its log says
    what differs and how to start over, and the rolling state is still there."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    root = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((root / "config" / "smoke.yaml").read_text())
    cfg["lengths"] = [256]
    cfg["datasets"] = {"half": cfg["datasets"]["half"]}
    cfg.pop("finetune")
    cfg["pretrain"].update(checkpoint_every=4, val_every=32)
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(cfg))
    target = "results/pretrain/swinv2_pico/half/trunk/224.pt"
    cmd = [sys.executable, "-m", "snakemake", "-s", str(root / "Snakefile"), "-d", str(tmp_path),
           "--cores", "1", target, "--configfile", str(config)]
    rel = "results/.resume/pretrain/swinv2_pico/half/trunk_224"  # as the job sees it (Snakemake's -d)
    resume = tmp_path / rel
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(resume.glob("iter_*.pt")):
        time.sleep(0.1)
    assert proc.poll() is None, "the workflow ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)  # a node failure: nothing gets to clean up
    proc.wait(timeout=120)
    kept = sorted(p.name for p in resume.glob("iter_*.pt"))
    assert kept

    config.write_text(yaml.safe_dump({**cfg, "seed": 1}))
    subprocess.run(cmd + ["--unlock"], cwd=root, check=True, capture_output=True, timeout=300)  # SIGKILL left the lock
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0, done.stderr[-3000:]
    log = (tmp_path / "results/logs/pretrain/swinv2_pico/half/trunk_224.log").read_text()
    assert "mimscale: error: resume state" in log and "seed: 0 in the state, 1 for this job" in log, log[-3000:]
    assert "manifest_sha256" in log and f"mv {rel} {rel}.old" in log, log[-3000:]
    assert sorted(p.name for p in resume.glob("iter_*.pt")) == kept  # nothing deleted
    assert not (tmp_path / target).exists()


def test_a_finished_jobs_final_state_is_checked_like_any_resume_state(tmp_path: Path) -> None:
    """The final state a finished job keeps (docs/reliability.md, "Interrupts") re-creates outputs
    only for the same job: after a seed change the rerun stops instead of publishing them."""
    from mimlib.finetune.common import ResumableState

    info = DistInfo()
    ResumableState(_finetune_job(tmp_path), info)._keep_final(5, {"metrics": {"top1": 0.5}})
    step, extra = ResumableState(_finetune_job(tmp_path), info).load(*_net())
    assert step == 5 and extra  # the same job: the final state is found
    with pytest.raises(ckpt.ResumeMismatchError, match="seed: 0 in the state, 1 for this job"):
        ResumableState(_finetune_job(tmp_path, seed=1), info).load(*_net())
