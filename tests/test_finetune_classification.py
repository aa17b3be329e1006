"""Classification fine-tuning (IN-1K / iNat-18): checkpoint loading at the task size, reference
layer decay, the iNat json reader and demo set, training steps, kill/resume equality, errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from launching import finetune_args, mimlib_cmd, rank_free_env

from mimlib.data.classification import load_classification_splits, read_inat_split
from mimlib.data.demo_inat import InatDemoSpec, train_counts, write_inat_demo
from mimlib.finetune import classification as cls
from mimlib.finetune.common import FinetuneJob, ResumableState
from mimlib.train import checkpoint as ckpt
from mimlib.train.metrics import read_jsonl
from mimlib.train.preemption import Preempted

TINY = {  # swinv2_pico at 64 px / window 4, batch 4, every augmentation of Table 11 on
    "img_size": 64, "window_size": 4, "epochs": 1, "warmup_epochs": 0, "global_batch": 4, "micro_batch": 4,
    "base_lr": 0.5, "warmup_lr": 1e-3, "min_lr": 1e-3, "layer_decay": 0.8, "num_workers": 0, "threads": 1,
    "drop_path": 0.1,
}


@pytest.fixture(scope="module")
def pico_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mimscale-format SimMIM checkpoint of swinv2_pico pre-trained at 96 px / window 6."""
    from mimlib.models.simmim import build_simmim

    torch.manual_seed(1)
    simmim = build_simmim("swinv2_pico", img_size=96, window_size=6, drop_path_rate=0.0)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    torch.save({"model": simmim.state_dict(), "model_name": "swinv2_pico", "iteration": 0,
                "recipe": {"img_size": 96, "window_size": 6}}, path)
    return path


@pytest.fixture(scope="module")
def inat_demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("inat") / "inat2018"
    spec = InatDemoSpec(num_classes=3, max_train_per_class=8, min_train_per_class=2, val_per_class=2,
                        min_size=48, max_size=72, seed=3)
    counts = write_inat_demo(out, spec)
    return {"root": str(out), "train_json": str(out / "train2018.json"), "val_json": str(out / "val2018.json"),
            "counts": counts, "spec": spec}


def _in1k_data(tiny_data: dict) -> dict:
    return {"train_index": str(tiny_data["index_train"]), "val_index": str(tiny_data["index_val"]), "num_classes": 4}


def _job(tmp: Path, name: str, task: str, data: dict, recipe: dict, checkpoint: Path | None) -> FinetuneJob:
    return FinetuneJob(task=task, model="swinv2_pico", recipe=recipe, data=data, out_dir=tmp / name,
                       resume_dir=tmp / ".resume" / name, checkpoint=checkpoint, seed=0, device="cpu")


def _encoder_weights(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)["model"]
    return {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}


# (a) ------------------------------------------------------------------------------------------
def test_pretrained_state_loads_strictly_at_another_size(pico_checkpoint: Path) -> None:
    from mimlib.models.pretrained import build_finetune_encoder

    model, info = build_finetune_encoder("swinv2_pico", pico_checkpoint, 64, 4, 0.1, num_classes=7)
    assert info["format"] == "mimscale" and info["pretrained_window_sizes"] == (6, 6, 6, 3)
    assert model.layers[0].blocks[0].attn.pretrained_window_size == (6, 6)
    assert model.layers[0].blocks[0].attn.window_size == (4, 4)
    enc = _encoder_weights(pico_checkpoint)
    state = model.state_dict()
    assert set(state) - set(enc) == {"head.fc.weight", "head.fc.bias"}
    for k, v in enc.items():
        assert torch.equal(state[k], v), k
    assert state["head.fc.weight"].shape == (7, 192)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


# (b) ------------------------------------------------------------------------------------------
def test_layer_decay_follows_the_reference_ids_for_swinv2_s() -> None:
    from mimlib.finetune.common import build_optimizer
    from mimlib.models.swinv2 import build_encoder

    model = build_encoder("swinv2_s", img_size=224, window_size=14, num_classes=1000, device="meta")
    opt = build_optimizer(model, {**cls.DEFAULT_RECIPE, "weight_decay": 0.05, "layer_decay": 0.8, "lr": 1.0}, torch.device("meta"),
                          "", "swinv2_s")
    scale = {n: g["lr_scale"] for g in opt.param_groups for n in g["names"]}
    decay = {n: g["weight_decay"] for g in opt.param_groups for n in g["names"]}
    assert set(scale) == {n for n, _ in model.named_parameters()}
    d = 0.8
    assert scale["patch_embed.proj.weight"] == pytest.approx(d**25)
    assert scale["layers.0.blocks.0.mlp.fc1.weight"] == pytest.approx(d**24)
    assert scale["layers.0.blocks.1.attn.qkv.weight"] == pytest.approx(d**23)
    assert scale["layers.1.downsample.reduction.weight"] == pytest.approx(d**23)  # stage-0 last block, id 2
    assert scale["layers.2.blocks.17.attn.proj.weight"] == pytest.approx(d**3)  # id 22
    assert scale["layers.3.downsample.norm.weight"] == pytest.approx(d**3)
    assert scale["layers.3.blocks.1.mlp.fc2.weight"] == pytest.approx(d**1)  # id 24
    assert scale["norm.weight"] == scale["head.fc.weight"] == scale["head.fc.bias"] == 1.0
    assert decay["head.fc.weight"] == 0.05 and decay["head.fc.bias"] == 0.0
    assert decay["layers.0.blocks.0.attn.logit_scale"] == 0.0


# (c) ------------------------------------------------------------------------------------------
def test_inat_reader_maps_category_ids_and_resolves_paths(tmp_path: Path) -> None:
    cats = [{"id": 17, "name": "b", "supercategory": "Aves"}, {"id": 4, "name": "a", "supercategory": "Fungi"},
            {"id": 30, "name": "c", "supercategory": "Aves"}]
    train = {"images": [{"id": 10, "file_name": "train_val2018/Aves/17/10.jpg"},
                        {"id": 11, "file_name": "train_val2018/Fungi/4/11.jpg"},
                        {"id": 12, "file_name": "train_val2018/Aves/30/12.jpg"}],
             "annotations": [{"id": 1, "image_id": 10, "category_id": 17}, {"id": 2, "image_id": 11, "category_id": 4},
                             {"id": 3, "image_id": 12, "category_id": 30}],
             "categories": cats}
    val = {"images": [{"id": 20, "file_name": "train_val2018/Aves/30/20.jpg"}],
           "annotations": [{"id": 4, "image_id": 20, "category_id": 30}], "categories": list(reversed(cats))}
    (tmp_path / "train2018.json").write_text(json.dumps(train))
    (tmp_path / "val2018.json").write_text(json.dumps(val))
    splits = load_classification_splits({"root": str(tmp_path), "train_json": str(tmp_path / "train2018.json"),
                                         "val_json": str(tmp_path / "val2018.json")})
    assert splits.num_classes == 3 and splits.class_names == ["a", "b", "c"]
    assert splits.train.labels.tolist() == [1, 0, 2]
    assert splits.train.paths[0] == str(tmp_path / "train_val2018/Aves/17/10.jpg")
    assert splits.val.labels.tolist() == [2]
    del val["annotations"][0]
    (tmp_path / "bad.json").write_text(json.dumps(val))
    with pytest.raises(ValueError, match="no annotation"):
        read_inat_split(tmp_path, tmp_path / "bad.json")


def test_inat_demo_layout_long_tail_and_determinism(inat_demo: dict, tmp_path: Path) -> None:
    root, spec = Path(inat_demo["root"]), inat_demo["spec"]
    train = json.loads((root / "train2018.json").read_text())
    val = json.loads((root / "val2018.json").read_text())
    counts = train_counts(spec)
    assert sorted(counts, reverse=True) == [8, 4, 3] and min(counts) >= spec.min_train_per_class
    assert inat_demo["counts"] == {"num_classes": 3, "train": sum(counts), "val": 6}
    for doc in (train, val):
        assert {c["id"] for c in doc["categories"]} == {0, 1, 2}
        for img, ann in zip(doc["images"], doc["annotations"]):
            assert ann["image_id"] == img["id"]
            parts = Path(img["file_name"]).parts
            assert parts[0] == "train_val2018" and parts[2] == str(ann["category_id"])
            assert parts[3] == f"{img['id']}.jpg" and (root / img["file_name"]).is_file()
    assert train["annotations"][0]["id"] == 1
    assert len({i["id"] for i in train["images"] + val["images"]}) == len(train["images"]) + len(val["images"])
    again = write_inat_demo(tmp_path / "again", spec)
    assert again == inat_demo["counts"]
    assert (tmp_path / "again" / "train2018.json").read_bytes() == (root / "train2018.json").read_bytes()
    name = train["images"][-1]["file_name"]
    assert (tmp_path / "again" / name).read_bytes() == (root / name).read_bytes()
    assert not (tmp_path / "again.tmp").exists()


# (d) ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["in1k", "inat18"])
def test_one_epoch_trains(task: str, tmp_path: Path, tiny_data: dict, inat_demo: dict, pico_checkpoint: Path) -> None:
    if task == "in1k":  # Mixup + CutMix with soft-target CE (Table 11)
        data, recipe = _in1k_data(tiny_data), dict(TINY)
    else:  # label-smoothing CE only; 14 train images -> 3 updates of 4
        data = {k: inat_demo[k] for k in ("root", "train_json", "val_json")}
        recipe = {**TINY, "mixup": 0.0, "cutmix": 0.0}
    record = cls.run(_job(tmp_path, task, task, data, recipe, pico_checkpoint), progress=False)
    out = tmp_path / task
    (rec,) = read_jsonl(out / "log.jsonl")
    assert rec["epoch"] == 1 and math.isfinite(rec["train_loss"]) and rec["train_loss"] > 0
    assert 0 <= rec["top1"] <= rec["top5"] <= 100
    assert record["metrics"] == {"top1": rec["top1"], "top5": rec["top5"], "top1_last": rec["top1"], "best_epoch": 1}
    assert json.loads((out / "metrics.json").read_text())["metrics"]["top1"] == rec["top1"]
    last = torch.load(out / "last.pt", weights_only=True)["model"]
    before = _encoder_weights(pico_checkpoint)
    changed = [k for k, v in before.items() if v.is_floating_point() and not torch.equal(last[k], v)]
    assert "patch_embed.proj.weight" in changed and "layers.3.blocks.0.mlp.fc2.weight" in changed
    assert (out / "best.pt").exists() and not (tmp_path / ".resume" / task).exists()


# (e) ------------------------------------------------------------------------------------------
# 32 images, global batch 8 = 2 accumulated micro-batches of 4: 4 updates per epoch, 8 in all.
RESUME_RECIPE = {**TINY, "epochs": 2, "warmup_epochs": 1, "global_batch": 8, "base_lr": 0.05}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, tiny_data: dict) -> Path:
    """The reference every interrupted run must end equal to."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    cls.run(_job(tmp, "full", "in1k", _in1k_data(tiny_data), RESUME_RECIPE, None), progress=False)
    return tmp / "full"


def _assert_same_run(ref: Path, out: Path) -> None:
    for name in ("last.pt", "best.pt"):
        a = torch.load(ref / name, weights_only=True)
        b = torch.load(out / name, weights_only=True)
        assert a["epoch"] == b["epoch"] and a.keys() == b.keys()
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), (name, k)

    def log(path: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in read_jsonl(path)]

    full, cut = log(ref / "log.jsonl"), log(out / "log.jsonl")
    assert [r["epoch"] for r in full] == [1, 2] and full == cut
    m_full = json.loads((ref / "metrics.json").read_text())["metrics"]
    assert m_full == json.loads((out / "metrics.json").read_text())["metrics"]


class _Killed(Exception):
    pass


def test_killed_run_resumes_to_the_same_weights_and_log(
    tmp_path: Path, tiny_data: dict, uninterrupted: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original_save, original_load = ResumableState.save, ResumableState.load
    loaded: list[int] = []

    def save_then_die(self, step, *args, **kw):
        original_save(self, step, *args, **kw)
        raise _Killed(step)

    def recording_load(self, *args, **kw):
        step, extra = original_load(self, *args, **kw)
        loaded.append(step)
        return step, extra

    monkeypatch.setattr(ResumableState, "save", save_then_die)
    monkeypatch.setattr(ResumableState, "load", recording_load)
    job = _job(tmp_path, "cut", "in1k", _in1k_data(tiny_data), RESUME_RECIPE, None)
    with pytest.raises(_Killed):
        cls.run(job, progress=False)
    assert [s for s, _ in ckpt.rolling_checkpoints(job.resume_dir)] == [4]  # after epoch 1 = 4 updates
    assert not (job.out_dir / "metrics.json").exists()
    monkeypatch.setattr(ResumableState, "save", original_save)
    cls.run(job, progress=False)
    assert loaded == [0, 4]  # the second call started at epoch 1
    _assert_same_run(uninterrupted, job.out_dir)
    assert not job.resume_dir.exists()


@pytest.mark.parametrize(("signal_in_call", "saved_at"), [(3, 2), (7, 4)], ids=["mid-epoch", "epoch-end"])
def test_sigterm_saves_and_the_rerun_matches_the_uninterrupted_run(
    signal_in_call: int, saved_at: int, tmp_path: Path, tiny_data: dict, uninterrupted: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGTERM during update 2 (criterion call 3; 2 calls per update) stops after that update,
    mid-epoch; during the epoch's last update (call 7) the epoch is evaluated and logged first."""
    from timm.loss import SoftTargetCrossEntropy

    original = SoftTargetCrossEntropy.forward
    calls = {"n": 0}

    def terminated(self, x, target):
        calls["n"] += 1
        if calls["n"] == signal_in_call:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, to the handler the engine installed
        return original(self, x, target)

    job = _job(tmp_path, "term", "in1k", _in1k_data(tiny_data), RESUME_RECIPE, None)
    with monkeypatch.context() as m:
        m.setattr(SoftTargetCrossEntropy, "forward", terminated)
        with pytest.raises(Preempted, match="stopped by SIGTERM"):
            cls.run(job, progress=False)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the engine gave the handler back
    assert [s for s, _ in ckpt.rolling_checkpoints(job.resume_dir)] == [saved_at]
    work_log = job.resume_dir / "log.jsonl"
    assert [r["epoch"] for r in read_jsonl(work_log)] == [1] if saved_at == 4 else not work_log.exists()
    assert not (job.out_dir / "metrics.json").exists()
    cls.run(job, progress=False)
    _assert_same_run(uninterrupted, job.out_dir)


def test_cli_exits_143_on_sigterm_to_the_process_group_and_resumes(tmp_path: Path, tiny_data: dict) -> None:
    """What Slurm does at a time limit: SIGTERM to every process of the step (loader workers too).
    The CLI saves, exits 143, and the rerun ends where an uninterrupted run ends."""
    recipe = {**RESUME_RECIPE, "epochs": 6}
    data = _in1k_data(tiny_data)
    cls.run(_job(tmp_path, "full", "in1k", data, recipe, None), progress=False)
    job = _job(tmp_path, "term", "in1k", data, {**recipe, "num_workers": 2}, None)
    cmd = mimlib_cmd(finetune_args(job))
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not ckpt.rolling_checkpoints(job.resume_dir):
        time.sleep(0.02)
    assert proc.poll() is None, "the job ended before SIGTERM: " + (proc.stderr.read() if proc.stderr else "")[-2000:]
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the job hung after SIGTERM (no checkpoint within a grace period)")
    assert proc.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM" in err and "DataLoader worker" not in err
    saved = ckpt.rolling_checkpoints(job.resume_dir)[-1]  # the periodic one (epoch 1) may still be there
    assert 4 < saved[0] < 24  # after epoch 1 (update 4) was saved, before the end (6 epochs x 4)
    subprocess.run(cmd, cwd=root, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for name in ("last.pt", "best.pt"):
        a = torch.load(tmp_path / "full" / name, weights_only=True)["model"]
        b = torch.load(job.out_dir / name, weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path: Path, tiny_data: dict) -> None:
    """2 ranks x micro 2 x 2 accumulation == 1 process x micro 4 x 2 (global batch 8), launched the
    way the workflow launches a 2-rank job. Mixup and drop path draw per rank, so they are off."""
    recipe = {**RESUME_RECIPE, "mixup": 0.0, "cutmix": 0.0, "drop_path": 0.0}
    data = _in1k_data(tiny_data)
    cls.run(_job(tmp_path, "single", "in1k", data, recipe, None), progress=False)
    ddp = _job(tmp_path, "ddp", "in1k", data, {**recipe, "micro_batch": 2}, None)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(mimlib_cmd(finetune_args(ddp), ranks=2), cwd=root, env=rank_free_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = read_jsonl(tmp_path / "single" / "log.jsonl"), read_jsonl(ddp.out_dir / "log.jsonl")
    assert [r["train_loss"] for r in two] == pytest.approx([r["train_loss"] for r in one], rel=1e-5)
    assert [r["val_loss"] for r in two] == pytest.approx([r["val_loss"] for r in one], rel=1e-4)
    assert [r["top1"] for r in two] == [r["top1"] for r in one]
    a = torch.load(tmp_path / "single" / "last.pt", weights_only=True)["model"]
    b = torch.load(ddp.out_dir / "last.pt", weights_only=True)["model"]
    # Weights: equal to the DDP test's tolerance, but AdamW divides each update by the gradient's
    # own scale, so an element whose gradient is ~0 (seen: one of 512 in the last stage's
    # position-bias MLP) turns the ranks' different summation order into a difference of a
    # fraction of one lr step. A real DDP error (a wrong average, a rank left out) moves most
    # elements; so: 99.9% of all elements within the tolerance, every element within one step.
    lr_step = recipe["base_lr"] * recipe["global_batch"] / 512
    close = total = 0
    for k in a:
        diff = (b[k].float() - a[k].float()).abs()
        close += int((diff <= 1e-5 + 1e-4 * a[k].float().abs()).sum())
        total += diff.numel()
        assert float(diff.max()) <= lr_step, (k, float(diff.max()), lr_step)
    assert close >= 0.999 * total, f"{total - close} of {total} weights differ beyond rtol 1e-4 / atol 1e-5"
    assert json.loads((ddp.out_dir / "metrics.json").read_text())["world_size"] == 2


def test_non_finite_loss_names_the_epoch_and_keeps_state(
    tmp_path: Path, tiny_data: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from timm.loss import SoftTargetCrossEntropy

    original = SoftTargetCrossEntropy.forward
    calls = {"n": 0}

    def poisoned(self, x, target):
        calls["n"] += 1
        loss = original(self, x, target)
        return loss * float("nan") if calls["n"] > 8 else loss  # epoch 1 (0-based), first update

    monkeypatch.setattr(SoftTargetCrossEntropy, "forward", poisoned)
    job = _job(tmp_path, "nan", "in1k", _in1k_data(tiny_data), {**TINY, "epochs": 2}, None)
    with pytest.raises(cls.NonFiniteLossError, match=r"epoch 1 \(0-based\), update 0"):
        cls.run(job, progress=False)
    assert [s for s, _ in ckpt.rolling_checkpoints(job.resume_dir)] == [8]  # epoch 1 = 8 updates


# (f) ------------------------------------------------------------------------------------------
def test_recipe_errors() -> None:
    with pytest.raises(ValueError, match="even micro_batch, got 3"):
        cls.check_recipe({"micro_batch": 3})
    cls.check_recipe({"micro_batch": 3, "global_batch": 1536, "mixup": 0.0, "cutmix": 0.0})  # no Mixup: odd is fine
    with pytest.raises(ValueError, match="global_batch 2048 is not a multiple of micro_batch 3"):  # on any world size
        cls.check_recipe({"micro_batch": 3, "mixup": 0.0, "cutmix": 0.0})
    with pytest.raises(ValueError, match="unknown classification recipe key.*'lr_base'"):
        cls.check_recipe({"lr_base": 1.0})
    with pytest.raises(ValueError, match="global_batch 48 is not a multiple of micro_batch 8 x world_size 4"):
        cls.batch_sampler(64, 0, 1, 48, 8, rank=0, world_size=4, seed=0)
    r = cls.DEFAULT_RECIPE
    assert cls.batch_sampler(4096, 0, 2, r["global_batch"], r["micro_batch"], rank=0, world_size=8, seed=0).accum == 4
    with pytest.raises(ValueError, match="training set of 10 images cannot fill a global batch of 16"):
        cls.batch_sampler(10, 0, 1, 16, 8, rank=0, world_size=1, seed=0)


def test_the_batch_sampler_covers_each_epoch_once_on_any_rank_layout() -> None:
    """Epoch e's updates take disjoint global batches of one (seed, e) permutation; the ranks'
    and micro-steps' shares of update k are its global batch whatever the layout; a sampler
    started mid-run (a resumed job) continues the same stream."""
    n, g, epochs = 21, 4, 3  # 5 updates per epoch, one image left out of each
    one = list(cls.batch_sampler(n, 0, epochs * 5, g, 4, rank=0, world_size=1, seed=5))
    assert [len(b) for b in one] == [4] * 15 and {e for b in one for _, e in b} == {0, 1, 2}
    for e in range(epochs):
        images = [i for b in one[5 * e:5 * (e + 1)] for i, ep in b if ep == e]
        assert len(images) == len(set(images)) == 20
    split = [list(cls.batch_sampler(n, 0, epochs * 5, g, 1, rank=r, world_size=2, seed=5)) for r in range(2)]
    for k in range(15):
        assert sorted(split[0][2 * k] + split[0][2 * k + 1] + split[1][2 * k] + split[1][2 * k + 1]) == sorted(one[k])
    assert list(cls.batch_sampler(n, 7, epochs * 5, g, 4, rank=0, world_size=1, seed=5)) == one[7:]


def test_schedule_is_scaled_per_512_with_warmup_then_cosine() -> None:
    r = cls.check_recipe({"epochs": 10, "warmup_epochs": 2, "global_batch": 1024})
    lr_at = cls.lr_schedule(r, updates_per_epoch=5)
    lrs = [lr_at(k) for k in range(50)]
    assert len(lrs) == 50
    assert lrs[0] == pytest.approx(2 * 2.5e-7)
    assert lrs[10] == pytest.approx(2 * 1.25e-3) and max(lrs) == lrs[10]
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] > 2 * 2.5e-7
