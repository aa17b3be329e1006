"""Tracking (mimlib/train/tracking.py): every training job's records as TensorBoard scalars (and
W&B, MLflow when asked) at its global iteration, read back from what each backend wrote --
TensorBoard event files, W&B's offline run files, an MLflow file store -- and compared with
the job's JSON-lines log; a killed and resumed job continues its runs without duplicates."""

from __future__ import annotations

import json
import math
import shlex
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from mimlib.finetune import classification as cls
from mimlib.finetune.common import FinetuneJob
from mimlib.train import pretrain as pretrain_engine
from mimlib.train.metrics import read_jsonl
from mimlib.train.pretrain import PretrainJob, run_pretrain
from mimlib.train.tracking import TrackingError, open_tracker, scalars, tag

import tiny_recipes

ROOT = Path(__file__).resolve().parents[1]
TB_ONLY = {"tensorboard": True}


# ----------------------------------------------------------------------------- readers


def tb_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} as TensorBoard shows the folder's run (purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def tb_raw_steps(folder: Path, name: str) -> list[int]:
    """Every step of one tag in the folder's event files as written (no purging)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for f in sorted(folder.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(f)).Load():
            steps += [event.step for v in event.summary.value if v.tag == name]
    return steps


def expected(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} the job's log says each backend should hold."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        step, values = scalars(r)
        for name, v in values.items():
            out.setdefault(name, []).append((step, v))
    return {k: sorted(v) for k, v in out.items()}


def assert_same_points(got: dict[str, list[tuple[int, float]]], want: dict[str, list[tuple[int, float]]],
                       steps_only: tuple[str, ...] = ()) -> None:
    """Every step of every tag once, none missing, the values of the log (those of
    ``steps_only`` not compared: a clock's, logged by a killed job and again by its rerun)."""
    assert set(got) == set(want), (sorted(got), sorted(want))
    for name in want:
        g = sorted(got[name])
        assert [s for s, _ in g] == [s for s, _ in want[name]], name
        if name in steps_only:
            continue
        for (step, a), (_, b) in zip(g, want[name]):
            assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b)), (name, step, a, b)


def wandb_history(wandb_dir: Path) -> tuple[list[dict], list[dict]]:
    """(run records, history rows) of every offline run under ``wandb_dir`` (the .wandb files:
    LevelDB-log framing, 32 KiB blocks, each record a wandb_internal_pb2.Record)."""
    from wandb.proto import wandb_internal_pb2 as pb

    runs, rows = [], []
    files = sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert files, f"no offline W&B run under {wandb_dir}"
    for path in files:
        data, pos, pending = path.read_bytes(), 7, b""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            if left < 7:
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if kind == 0:
                pos += left
                continue
            chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (2, 3):  # first, middle
                pending += chunk
                continue
            raw, pending = pending + chunk, b""
            record = pb.Record()
            record.ParseFromString(raw)
            which = record.WhichOneof("record_type")
            if which == "run":
                runs.append({"id": record.run.run_id, "name": record.run.display_name, "tags": list(record.run.tags),
                             "group": record.run.run_group, "project": record.run.project, "file": path})
            elif which == "history":
                rows.append({"_step": record.history.step.num,
                             **{item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in record.history.item}})
    return runs, rows


# ----------------------------------------------------------------------------- jobs


def pretrain_job(base: Path, data: dict, recipe: dict, folder: str, name: str, end: int, decay_at: int | None,
                 tracking: dict | None = TB_ONLY, **kw) -> PretrainJob:
    return PretrainJob(model="swinv2_pico", recipe=recipe, manifest=data["manifest"], end_iter=end, decay_at=decay_at,
                       out=base / folder / f"{name}.pt", log_out=base / folder / f"{name}.jsonl",
                       resume_dir=base / ".resume" / folder / name, val_index=data["index_val"], tracking=tracking, **kw)


class _Killed(Exception):
    pass


def run_killed_then_resumed(monkeypatch: pytest.MonkeyPatch, job: PretrainJob, kill_after: int) -> None:
    """Run ``job`` until update ``kill_after`` is logged (its last rolling checkpoint is before
    it), die, then rerun it: the rerun resumes from the checkpoint and logs those updates again."""
    original = pretrain_engine.PretrainTraining.after_update

    def after_update_then_die(self, u):
        postfix = original(self, u)
        if u.done == kill_after:
            raise _Killed(u.done)
        return postfix

    monkeypatch.setattr(pretrain_engine.PretrainTraining, "after_update", after_update_then_die)
    with pytest.raises(_Killed):
        run_pretrain(job, progress=False)
    monkeypatch.setattr(pretrain_engine.PretrainTraining, "after_update", original)
    run_pretrain(job, progress=False)


# ----------------------------------------------------------------------------- TensorBoard


def test_trunk_segments_and_branch_line_up_at_the_global_iteration(
    tmp_path: Path, tiny_data: dict, tiny_recipe: dict
) -> None:
    # L = 16: a trunk cut into two jobs (0 -> 7 -> 14) in one folder, then the x0.1 branch 14 -> 16
    base = tmp_path / "pretrain"
    run_pretrain(pretrain_job(base, tiny_data, tiny_recipe, "trunk", "7", 7, None), progress=False)
    run_pretrain(pretrain_job(base, tiny_data, tiny_recipe, "trunk", "14", 14, None, init=base / "trunk" / "7.pt"),
                 progress=False)
    run_pretrain(pretrain_job(base, tiny_data, tiny_recipe, "16", "log", 16, 14, init=base / "trunk" / "14.pt",
                              save_optimizer=False), progress=False)
    trunk_log = read_jsonl(base / "trunk" / "7.jsonl") + read_jsonl(base / "trunk" / "14.jsonl")
    trunk = tb_scalars(base / "trunk")
    assert_same_points(trunk, expected(trunk_log))
    for name in ("train/loss", "train/lr", "train/grad_norm", "train/images_per_s", "val/loss", "val/trivial_loss"):
        assert name in trunk, name
    # the second segment continued the first one's axis: steps 2 .. 14, each once
    assert [s for s, _ in trunk["train/loss"]] == [2, 4, 6, 7, 8, 10, 12, 14]
    branch = tb_scalars(base / "16")
    assert_same_points(branch, expected(read_jsonl(base / "16" / "log.jsonl")))
    assert [s for s, _ in branch["train/loss"]] == [16]  # after the trunk point, on the same axis
    assert branch["train/lr"][0][1] < trunk["train/lr"][-1][1]  # the x0.1 step shows


def test_a_resumed_job_has_no_duplicated_steps(
    tmp_path: Path, tiny_data: dict, tiny_recipe: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = {**tiny_recipe, "log_every": 1, "checkpoint_every": 4}
    job = pretrain_job(tmp_path, tiny_data, recipe, "cell", "log", 12, None)
    run_killed_then_resumed(monkeypatch, job, kill_after=10)  # logged 1..10, resumes from 8
    got = tb_scalars(tmp_path / "cell")
    assert_same_points(got, expected(read_jsonl(job.log_out)))
    assert [s for s, _ in got["train/loss"]] == list(range(1, 13))
    # the killed job had written 9 and 10, the resumed one wrote them again: the reader drops the first
    raw = Counter(tb_raw_steps(tmp_path / "cell", "train/loss"))
    assert raw[9] == raw[10] == 2 and raw[8] == raw[11] == 1
    assert len(list((tmp_path / "cell").glob("events.out.tfevents.*"))) == 2


def test_no_tracking_writes_no_event_files(tmp_path: Path, tiny_data: dict, tiny_recipe: dict) -> None:
    run_pretrain(pretrain_job(tmp_path, tiny_data, tiny_recipe, "off", "log", 2, None, tracking=None), progress=False)
    run_pretrain(pretrain_job(tmp_path, tiny_data, tiny_recipe, "tb_off", "log", 2, None,
                              tracking={"tensorboard": False}), progress=False)
    assert (tmp_path / "off" / "log.jsonl").exists()
    assert not list(tmp_path.rglob("events.out.tfevents.*"))


FT_TINY = {"img_size": 64, "window_size": 4, "epochs": 2, "warmup_epochs": 0, "global_batch": 8, "micro_batch": 8,
           "base_lr": 0.5, "warmup_lr": 1e-3, "min_lr": 1e-3, "layer_decay": 0.8, "num_workers": 0, "threads": 1,
           "drop_path": 0.1}


def test_classification_epochs_are_logged_at_their_global_update(tmp_path: Path, tiny_data: dict) -> None:
    data = {"train_index": str(tiny_data["index_train"]), "val_index": str(tiny_data["index_val"]), "num_classes": 4}
    job = FinetuneJob(task="in1k", model="swinv2_pico", recipe=FT_TINY, data=data, out_dir=tmp_path / "in1k",
                      resume_dir=tmp_path / ".resume" / "in1k", seed=0, device="cpu", tracking=TB_ONLY,
                      cell={"model": "swinv2_pico", "dataset": "scratch", "length": 0})
    cls.run(job, progress=False)
    records = read_jsonl(job.out_dir / "log.jsonl")
    updates = 32 // 8  # 4 classes x 8 training images, global batch 8
    assert [r["iter"] for r in records] == [updates, 2 * updates]
    assert all(r["grad_norm"] > 0 and r["images_per_s"] > 0 for r in records)
    got = tb_scalars(job.out_dir)
    assert_same_points(got, expected(records))
    for name in ("train/loss", "train/lr", "train/grad_norm", "train/images_per_s", "val/loss", "val/top1", "val/top5"):
        assert name in got, name


COCO_TINY = dict(tiny_recipes.COCO_TINY, log_every=2, checkpoint_every=100)
ADE_TINY = dict(tiny_recipes.ADE_TINY, iters=4, eval_every=2, threads=1)  # with an evaluation mid-run


@pytest.mark.parametrize("task", ["coco", "ade20k"])
def test_detection_and_segmentation_records_reach_tensorboard(task: str, tmp_path: Path) -> None:
    from mimlib.finetune import engine

    if task == "coco":
        from mimlib.data.coco import coco_paths
        from mimlib.data.demo_coco import CocoDemoSpec, write_coco_demo

        write_coco_demo(tmp_path / "coco", CocoDemoSpec(num_classes=3, train_images=12, val_images=4, image_size=96,
                                                        seed=0))
        data, recipe = coco_paths(tmp_path / "coco"), COCO_TINY
        names = ("train/loss", "train/loss_mask", "train/grad_norm", "train/lr", "train/images_per_s", "val/box_ap")
    else:
        from mimlib.data.demo_ade20k import Ade20kDemoSpec, write_ade20k_demo

        write_ade20k_demo(tmp_path / "ade", Ade20kDemoSpec(num_classes=4, train_images=4, val_images=2, min_size=96,
                                                           max_size=144))
        data, recipe = {"root": str(tmp_path / "ade" / "ADEChallengeData2016")}, ADE_TINY
        names = ("train/loss", "train/aux_loss", "train/grad_norm", "train/lr", "train/images_per_s", "val/miou")
    job = FinetuneJob(task=task, model="swinv2_pico", recipe=recipe, data=data, out_dir=tmp_path / "out",
                      resume_dir=tmp_path / ".resume", seed=0, device="cpu", tracking=TB_ONLY,
                      cell={"model": "swinv2_pico", "dataset": "scratch", "length": 0})
    engine(task).run(job, progress=False)
    records = read_jsonl(job.out_dir / "log.jsonl")
    got = tb_scalars(job.out_dir)
    assert_same_points(got, expected(records))
    for name in names:
        assert name in got, (name, sorted(got))
    last = max(r["iter"] for r in records)
    assert got[names[-1]][-1][0] == last  # the final evaluation at the last iteration
    if task == "ade20k":
        assert [s for s, _ in got["val/miou"]] == [2, 4]  # eval_every, then the end


def test_tags_of_every_engines_records() -> None:
    # pre-training, classification, detection (its evaluation record) and segmentation
    assert scalars({"iter": 4, "loss": 0.5, "lr": 1e-3, "grad_norm": 2.0, "images_per_s": 10.0, "corrupt_images": 0}) \
        == (4, {"train/loss": 0.5, "train/lr": 1e-3, "train/grad_norm": 2.0, "train/images_per_s": 10.0,
                "train/corrupt_images": 0.0})
    assert scalars({"iter": 8, "epoch": 2, "train_loss": 1.0, "top1": 50.0, "top5": 90.0, "val_loss": 1.2})[1] \
        == {"train/epoch": 2.0, "train/loss": 1.0, "val/top1": 50.0, "val/top5": 90.0, "val/loss": 1.2}
    assert scalars({"iter": 6, "eval_s": 1.5, "box_ap": 3.0, "mask_ap50": 4.0, "box_aps": None})[1] \
        == {"val/eval_s": 1.5, "val/box_ap": 3.0, "val/mask_ap50": 4.0}
    assert scalars({"iter": 6, "val_miou": 30.0, "val_acc": 60.0, "aux_loss": 0.1})[1] \
        == {"val/miou": 30.0, "val/acc": 60.0, "train/aux_loss": 0.1}
    assert tag("loss_mask") == "train/loss_mask"


# ----------------------------------------------------------------------------- W&B and MLflow


@pytest.fixture(scope="module")
def tracked_resumed_job(tmp_path_factory: pytest.TempPathFactory, tiny_data: dict, smoke_config: dict) -> dict:
    """A pre-training job with TensorBoard, W&B (offline) and MLflow (file store) on, killed
    after update 10 (last rolling checkpoint at 8) and resumed to 12."""
    import copy

    from mimlib.config import pretrain_recipe, validate_config

    recipe = {**pretrain_recipe(validate_config(copy.deepcopy(smoke_config)), "swinv2_pico"),
              "log_every": 1, "checkpoint_every": 4}
    tmp = tmp_path_factory.mktemp("tracked")
    mp = pytest.MonkeyPatch()
    for k, v in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp), "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
                 "WANDB_CONSOLE": "off", "MLFLOW_ALLOW_FILE_STORE": "true"}.items():
        mp.setenv(k, v)
    tracking = {"tensorboard": True, "wandb": {"enabled": True, "mode": "offline", "project": "mimscale-test",
                                               "dir": str(tmp)},
                "mlflow": {"enabled": True, "tracking_uri": (tmp / "mlruns").as_uri(), "experiment": "mimscale-test"}}
    job = pretrain_job(tmp, tiny_data, recipe, "cell", "log", 12, None, tracking=tracking,
                       cell={"dataset": "tiny"})
    try:
        run_killed_then_resumed(mp, job, kill_after=10)
    finally:
        mp.undo()
    return {"job": job, "tmp": tmp, "records": read_jsonl(job.log_out), "uri": tracking["mlflow"]["tracking_uri"]}


def test_wandb_offline_run_continues_without_duplicates(tracked_resumed_job: dict) -> None:
    tmp, job = tracked_resumed_job["tmp"], tracked_resumed_job["job"]
    runs, rows = wandb_history(tmp)
    assert len(runs) == 2 and len({r["id"] for r in runs}) == 1  # the killed job's and the resumed job's: one run
    assert {r["name"] for r in runs} == {str(job.log_dir)} and runs[0]["project"] == "mimscale-test"
    assert {"pretrain", "swinv2_pico", "tiny", "trunk"} <= set(runs[0]["tags"])
    assert runs[0]["group"] == "pretrain/swinv2_pico/tiny"
    got: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if not key.startswith("_"):
                got.setdefault(key, []).append((int(row["_step"]), float(value)))
    # W&B keeps the points the killed job logged (9, 10: the same losses; another images/s)
    assert_same_points(got, expected(tracked_resumed_job["records"]), steps_only=("train/images_per_s",))
    assert [s for s, _ in sorted(got["train/loss"])] == list(range(1, 13))
    assert not (job.resume_dir / "tracking.json").exists()  # the job is done: its tracking state is gone


def test_mlflow_run_is_found_again_and_continued(tracked_resumed_job: dict) -> None:
    from mlflow.tracking import MlflowClient

    job = tracked_resumed_job["job"]
    client = MlflowClient(tracking_uri=tracked_resumed_job["uri"])
    exp = client.get_experiment_by_name("mimscale-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1  # the resumed job continued the killed job's run
    run = runs[0]
    assert run.info.run_name == str(job.log_dir) and run.info.status == "FINISHED"
    assert run.data.tags["mimscale.model"] == "swinv2_pico" and run.data.tags["mimscale.dataset"] == "tiny"
    assert run.data.tags["mimscale.job"] == "trunk" and run.data.params["base_lr"] == json.dumps(job.recipe["base_lr"])
    got = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)] for key in run.data.metrics}
    # W&B keeps the points the killed job logged (9, 10: the same losses; another images/s)
    assert_same_points(got, expected(tracked_resumed_job["records"]), steps_only=("train/images_per_s",))
    assert [s for s, _ in sorted(got["train/loss"])] == list(range(1, 13))


def test_tensorboard_beside_wandb_and_mlflow(tracked_resumed_job: dict) -> None:
    got = tb_scalars(tracked_resumed_job["job"].log_dir)
    assert_same_points(got, expected(tracked_resumed_job["records"]))


# ----------------------------------------------------------------------------- settings


def test_a_backend_without_its_package_names_the_config_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    from mimlib.config import ConfigError, check_tracking

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(TrackingError, match=r"tracking\.wandb\.enabled"):
        open_tracker({"tensorboard": False, "wandb": {"enabled": True}}, log_dir=tmp_path, state_dir=None, start=0,
                     is_main=True, recipe={}, seed=0, tags={}, group="g")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"--tracking-json\.mlflow\.enabled: true, but the 'mlflow' package"):
        check_tracking({"mlflow": {"enabled": True}}, "--tracking-json")
    assert check_tracking({}, "--tracking-json")["tensorboard"] is True  # defaults: TensorBoard only
    with pytest.raises(ConfigError, match=r"--tracking-json\.wandb\.mode"):
        check_tracking({"wandb": {"mode": "sometimes"}}, "--tracking-json")
    assert open_tracker({"tensorboard": True}, log_dir=tmp_path, state_dir=None, start=0, is_main=False, recipe={},
                        seed=0, tags={}, group="g") is None  # other ranks track nothing


def test_a_bad_tracking_json_is_a_one_line_error_naming_the_key(tmp_path: Path, tiny_data: dict) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mimlib", "pretrain", "--model", "swinv2_pico", "--recipe-json", "{}",
         "--manifest", str(tiny_data["manifest"]), "--end-iter", "2", "--out", str(tmp_path / "x.pt"),
         "--resume-dir", str(tmp_path / "r"), "--tracking-json", '{"wandb": {"enabled": true, "mode": "sometimes"}}'],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "mimscale: error: invalid tracking settings" in proc.stderr and "--tracking-json.wandb.mode" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "r").exists()


def test_configs_have_the_tracking_block_and_the_rules_pass_it(tmp_path: Path) -> None:
    from mimlib.config import load_config

    for name in ("config.yaml", "smoke.yaml", "paper.yaml"):
        cfg = load_config(ROOT / "config" / name, check_paths=False)
        assert cfg["tracking"]["tensorboard"] is True and cfg["tracking"]["wandb"]["enabled"] is False
    import yaml

    study = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    config = tmp_path / "smoke_mlflow.yaml"
    config.write_text(yaml.safe_dump({**study, "tracking": {"mlflow": {"experiment": "x"}}}))
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(tmp_path), "-n", "-p",
         "results/finetune/in1k/swinv2_pico/half/16/metrics.json", "--configfile", str(config)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    commands = [line for line in proc.stdout.splitlines() if "launch.sh" in line]
    kinds = Counter("pretrain" if " pretrain --model " in c else "finetune" if " finetune --task " in c else "?"
                    for c in commands)
    assert kinds == {"pretrain": 3, "finetune": 1}, proc.stdout[-3000:]  # trunk 7, trunk 14, branch 16; in1k
    for c in commands:
        words = shlex.split(c)
        block = json.loads(words[words.index("--tracking-json") + 1])
        assert block["mlflow"]["experiment"] == "x" and block["tensorboard"] is True
