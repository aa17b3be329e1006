"""ADE20K fine-tuning: metric, sliding windows, checkpoint loading, labels, a training step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimlib.data.ade20k import ADE20KTrain, collate_train, list_pairs, load_label, reduce_zero_label
from mimlib.data.demo_ade20k import Ade20kDemoSpec, write_ade20k_demo
from mimlib.finetune import segmentation as seg
from mimlib.finetune.common import FinetuneJob, build_optimizer
from mimlib.models.simmim import build_simmim
from mimlib.models.upernet import ENCODER_PREFIX, build_upernet
from mimlib.train import checkpoint as ckpt
from mimlib.train.step import NonFiniteLossError
from tiny_recipes import ADE_TINY

# A tiny demo-scale recipe: 128 px crops, window 8, 32-channel heads.
TINY = ADE_TINY


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ade") / "demo"
    write_ade20k_demo(out, Ade20kDemoSpec(num_classes=4, train_images=6, val_images=2, min_size=96, max_size=144))
    return out / "ADEChallengeData2016"


# (a) ---------------------------------------------------------------------------------------
def test_miou_matches_hand_computation_and_ignores_255() -> None:
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 2]])  # the prediction under 255 must not count
    conf = seg.ConfusionMatrix(num_classes=4)  # class 3 appears nowhere -> NaN, skipped
    conf.update(pred, target)
    # rows = truth: 0 -> {0: 1, 1: 1}; 1 -> {1: 2}; 2 -> {0: 1}
    expected = torch.zeros(4, 4, dtype=torch.int64)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[2, 0] = 1, 1, 2, 1
    assert torch.equal(conf.mat, expected)
    m = seg.miou_from_confusion(conf.mat)
    # IoU: class 0 = 1 / (2 + 2 - 1) = 1/3; class 1 = 2 / (2 + 3 - 2) = 2/3; class 2 = 0 / 1 = 0
    assert m["per_class_iou"][:3] == pytest.approx([100 / 3, 200 / 3, 0.0])  # percent
    assert math.isnan(m["per_class_iou"][3])
    assert m["miou"] == pytest.approx(100 / 3)  # (1/3 + 2/3 + 0) / 3, in percent
    assert m["acc"] == pytest.approx(60.0)  # 3 right of 5 labelled pixels
    # Dataset-wide: a second image is added to the same matrix, not averaged per image.
    conf.update(torch.tensor([3, 3]), torch.tensor([3, 255]))
    m2 = seg.miou_from_confusion(conf.mat)
    assert m2["miou"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 0 + 1) / 4)
    assert m2["acc"] == pytest.approx(100 * 4 / 6)
    with pytest.raises(ValueError, match="outside"):
        conf.update(torch.tensor([0]), torch.tensor([7]))


# (b) ---------------------------------------------------------------------------------------
class _Pointwise(torch.nn.Module):
    """A per-pixel function of the input: any stitching must reproduce the full-image result."""

    def __init__(self, crop: int):
        super().__init__()
        self.crop = crop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-2:] == (self.crop, self.crop)
        return torch.stack([x[:, 0] * 2 + 1, x[:, 1] - x[:, 2]], dim=1)


class _RowIndex(torch.nn.Module):
    """Logit = the row index inside the window (position encoding): shows the averaging."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(x.shape[-2], dtype=torch.float32).view(1, 1, -1, 1)
        return rows.expand(x.shape[0], 1, x.shape[-2], x.shape[-1])


def test_sliding_window_covers_every_pixel_and_averages() -> None:
    torch.manual_seed(0)
    image = torch.randn(1, 3, 50, 77)
    logits, count = seg.slide_inference(_Pointwise(32), image, 2, crop=32, stride=20, batch_size=3, return_count=True)
    full = torch.stack([image[:, 0] * 2 + 1, image[:, 1] - image[:, 2]], dim=1)  # the full-image result
    assert torch.allclose(logits, full, atol=1e-6)
    # Windows by hand: rows [0,32) [18,50); columns [0,32) [20,52) [40,72) [45,77).
    rows = torch.tensor([1] * 18 + [2] * 14 + [1] * 18, dtype=torch.float32)
    cols = torch.tensor([1] * 20 + [2] * 12 + [1] * 8 + [2] * 5 + [3] * 7 + [2] * 20 + [1] * 5, dtype=torch.float32)
    assert torch.equal(count, rows[:, None] * cols[None, :])
    # Averaging: pixel row 20 lies in rows [0,32) (local row 20) and [18,50) (local row 2).
    pos = seg.slide_inference(_RowIndex(), image, 1, crop=32, stride=20)
    assert pos[0, 0, 20, 0].item() == pytest.approx((20 + 2) / 2)
    assert pos[0, 0, 10, 0].item() == pytest.approx(10)
    assert pos[0, 0, 40, 0].item() == pytest.approx(40 - 18)
    # An image smaller than the crop: one zero-padded window, padding dropped.
    small = torch.randn(1, 3, 20, 25)
    out, cnt = seg.slide_inference(_Pointwise(32), small, 2, crop=32, stride=20, return_count=True)
    assert out.shape == (1, 2, 20, 25) and torch.equal(cnt, torch.ones(20, 25))
    assert torch.allclose(out[:, 0], small[:, 0] * 2 + 1)


# (c) ---------------------------------------------------------------------------------------
def test_pretrained_small_window_state_loads_strictly_into_larger_window_model(tmp_path: Path) -> None:
    # Pre-trained like 192/w12 (stage windows 12,12,12,6) at a small size: 96/w6 -> (6,6,6,3);
    # fine-tuned like 640/w20 (every stage tiles with 20): 160/w10 -> stages 40/20/10/5.
    torch.manual_seed(0)
    simmim = build_simmim("swinv2_pico", img_size=96, window_size=6, drop_path_rate=0.0, norm_target_window=None)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": simmim.state_dict(), "model_name": "swinv2_pico",
                "recipe": {"img_size": 96, "window_size": 6}, "iteration": 0}, path)
    model, info = build_upernet("swinv2_pico", path, num_classes=5, img_size=160, window_size=10, drop_path=0.1,
                                channels=16, aux_channels=16)
    assert info["format"] == "mimscale" and tuple(info["pretrained_window_sizes"]) == (6, 6, 6, 3)
    src = {k[len("encoder."):]: v for k, v in simmim.state_dict().items() if k.startswith("encoder.")}
    dst = model.encoder.state_dict()
    assert set(src) == set(dst)  # strict: no missing, no unexpected weights
    for k, v in src.items():
        assert torch.equal(v, dst[k]), k
    assert model.encoder.layers[0].blocks[0].window_size == (10, 10)
    assert model.encoder.layers[3].blocks[0].window_size == (5, 5)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 160, 160)).shape == (1, 5, 160, 160)


# (d) ---------------------------------------------------------------------------------------
def test_reduce_zero_label(tmp_path: Path, ade_root: Path) -> None:
    raw = np.array([[0, 1, 2], [150, 255, 7]], dtype=np.uint8)
    assert reduce_zero_label(raw).tolist() == [[255, 0, 1], [149, 255, 6]]
    Image.fromarray(raw, "L").save(tmp_path / "a.png")
    assert load_label(tmp_path / "a.png").tolist() == [[255, 0, 1], [149, 255, 6]]
    assert load_label(tmp_path / "a.png", reduce_zero=False).tolist() == raw.tolist()
    # The demo set: classes 1..K and 0 = other in the files, 0..K-1 and 255 once read.
    pairs = list_pairs(ade_root, "train")
    assert [p.name for p, _ in pairs][:2] == ["ADE_train_00000001.jpg", "ADE_train_00000002.jpg"]
    raw_demo = np.array(Image.open(pairs[0][1]))
    assert set(np.unique(raw_demo)) <= set(range(5))
    assert set(np.unique(load_label(pairs[0][1]))) <= {0, 1, 2, 3, 255}


def test_demo_set_is_deterministic(tmp_path: Path) -> None:
    spec = Ade20kDemoSpec(num_classes=3, train_images=2, val_images=1, min_size=40, max_size=60, seed=3)
    write_ade20k_demo(tmp_path / "a", spec)
    write_ade20k_demo(tmp_path / "b", spec)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 7  # 3 images + 3 annotations + demo.json
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert not (tmp_path / "a.tmp").exists()


# (e) ---------------------------------------------------------------------------------------
def test_one_training_step_is_finite_with_aux_head(ade_root: Path) -> None:
    recipe = seg.full_recipe(TINY)
    torch.manual_seed(0)
    model, _ = build_upernet("swinv2_pico", None, 4, img_size=128, window_size=8, drop_path=0.1, channels=32,
                             aux_channels=32)
    batch = collate_train([ADE20KTrain(ade_root, recipe, seed=0)[(0, j)] for j in range(2)])
    assert batch["image"].shape == (2, 3, 128, 128) and batch["label"].shape == (2, 128, 128)
    assert set(batch["label"].unique().tolist()) <= {0, 1, 2, 3, 255}
    opt = build_optimizer(model, recipe, torch.device("cpu"), ENCODER_PREFIX, "swinv2_pico")
    model.train()
    logits, aux = model(batch["image"])
    assert logits.shape == aux.shape == (2, 4, 128, 128)
    main, aux_loss = seg.seg_loss(logits, batch["label"]), seg.seg_loss(aux, batch["label"])
    loss = main + 0.4 * aux_loss
    assert torch.isfinite(loss) and main > 0 and aux_loss > 0
    loss.backward()
    assert model.aux_head.conv_seg.weight.grad.abs().sum() > 0
    assert model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    opt.step()
    # All pixels ignored: a zero loss, not NaN (a NaN would stop the run).
    assert seg.seg_loss(logits, torch.full_like(batch["label"], 255)).item() == 0.0


def _job(tmp: Path, root: Path, name: str, **over) -> FinetuneJob:
    return FinetuneJob(task="ade20k", model="swinv2_pico", recipe={**TINY, **over}, data={"root": str(root)},
                       out_dir=tmp / name, resume_dir=tmp / ".resume" / name)


def test_run_resumes_after_a_nan_stop_to_the_same_weights(tmp_path: Path, ade_root: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    over = dict(iters=3, checkpoint_every=2, save_weights=True)
    ref = seg.run(_job(tmp_path, ade_root, "ref", **over), progress=False)
    assert set(ref["metrics"]) == {"miou", "acc"} and 0.0 <= ref["metrics"]["acc"] <= 100.0
    saved = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    assert len(saved["per_class_iou"]) == 4 and saved["task"] == "ade20k"
    logs = [json.loads(line) for line in (tmp_path / "ref" / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) and r["aux_loss"] > 0 for r in logs if "loss" in r)
    assert not (tmp_path / ".resume" / "ref").exists()

    calls = {"n": 0}
    original = seg.seg_loss

    def poisoned(logits, labels, *a, **k):  # two losses (main, aux) per micro-step
        calls["n"] += 1
        out = original(logits, labels, *a, **k)
        return out * float("nan") if calls["n"] > 4 else out

    job = _job(tmp_path, ade_root, "cut", **over)
    monkeypatch.setattr(seg, "seg_loss", poisoned)
    with pytest.raises(NonFiniteLossError):
        seg.run(job, progress=False)
    assert [i for i, _ in ckpt.rolling_checkpoints(job.resume_dir)] == [2]
    monkeypatch.setattr(seg, "seg_loss", original)
    seg.run(job, progress=False)
    a, b = ckpt.load(tmp_path / "ref" / "last.pt")["model"], ckpt.load(tmp_path / "cut" / "last.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sigterm_saves_and_the_rerun_matches(tmp_path: Path, ade_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM in iteration 2 of 4 -> state saved after it, Preempted, exit path taken before the
    periodic checkpoint; the rerun ends with the uninterrupted run's weights, log and mIoU."""
    import os
    import signal

    from mimlib.train.preemption import Preempted

    over = dict(iters=4, log_every=3, checkpoint_every=0, save_weights=True)  # only SIGTERM saves mid-run
    ref = seg.run(_job(tmp_path, ade_root, "ref", **over), progress=False)
    calls = {"n": 0}
    original = seg.seg_loss

    def terminated(logits, labels, *a, **k):  # two losses (main, aux) per iteration here
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(logits, labels, *a, **k)

    job = _job(tmp_path, ade_root, "term", **over)
    with monkeypatch.context() as m:
        m.setattr(seg, "seg_loss", terminated)
        with pytest.raises(Preempted, match="iteration 2 of 4"):
            seg.run(job, progress=False)
    assert [i for i, _ in ckpt.rolling_checkpoints(job.resume_dir)] == [2]
    assert seg.run(job, progress=False)["metrics"] == ref["metrics"]
    a, b = ckpt.load(tmp_path / "ref" / "last.pt")["model"], ckpt.load(tmp_path / "term" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    timeless = lambda p: [{k: v for k, v in json.loads(x).items() if k != "images_per_s"}  # noqa: E731
                          for x in p.read_text().splitlines()]
    assert timeless(tmp_path / "term" / "log.jsonl") == timeless(tmp_path / "ref" / "log.jsonl")


@pytest.mark.slow
def test_two_cpu_ranks_train_without_sync_bn(tmp_path: Path, ade_root: Path) -> None:
    """2 gloo ranks through launch.sh, sync_bn on (the default): PyTorch's SyncBatchNorm refuses
    CPU tensors, so on CPU the heads keep per-rank BN statistics and say so, instead of failing."""
    import dataclasses
    import subprocess

    from launching import ROOT, finetune_args, mimlib_cmd, rank_free_env

    job = _job(tmp_path, ade_root, "ddp", global_batch=4, micro_batch=2, iters=2, sync_bn=True)
    job = dataclasses.replace(job, device="cpu")
    proc = subprocess.run(mimlib_cmd(finetune_args(job), ranks=2), cwd=ROOT, env=rank_free_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SyncBatchNorm needs GPUs" in proc.stderr
    record = json.loads((job.out_dir / "metrics.json").read_text())
    assert record["world_size"] == 2 and 0.0 <= record["metrics"]["acc"] <= 100.0
    logs = [json.loads(line) for line in (job.out_dir / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in logs if "loss" in r] == [1, 2] and all(math.isfinite(r["loss"]) for r in logs if "loss" in r)


# (f) ---------------------------------------------------------------------------------------
def test_layer_decay_groups_head_at_one_patch_embed_at_decay_power() -> None:
    model, _ = build_upernet("swinv2_pico", None, 4, img_size=128, window_size=8, drop_path=0.0, channels=16,
                             aux_channels=16)
    opt = build_optimizer(model, seg.full_recipe(TINY), torch.device("cpu"), ENCODER_PREFIX, "swinv2_pico")
    scale = {}
    for g in opt.param_groups:
        for n in g["names"]:
            scale[n] = g["lr_scale"]
    L = 1 + 1 + 2 + 1  # swinv2_pico depths (1, 1, 2, 1)
    for name in ("head.conv_seg.weight", "head.psp_modules.0.1.0.weight", "aux_head.conv_seg.bias",
                 "out_norms.0.weight", "encoder.norm.weight"):
        assert scale[name] == 1.0, name
    assert scale["encoder.patch_embed.proj.weight"] == pytest.approx(0.9 ** (L + 1))
    assert scale["encoder.layers.0.blocks.0.attn.qkv.weight"] == pytest.approx(0.9 ** L)
    assert scale["encoder.layers.3.blocks.0.mlp.fc1.weight"] == pytest.approx(0.9 ** 1)
    assert len(scale) == sum(1 for _ in model.parameters())


def test_recipe_checks_and_schedule() -> None:
    with pytest.raises(ValueError, match=r"unknown ade20k recipe key\(s\) \['bogus'\]"):
        seg.check_recipe({**seg.DEFAULT_RECIPE, "bogus": 1})
    with pytest.raises(ValueError, match="window_size"):
        seg.check_recipe({**seg.DEFAULT_RECIPE, "window_size": 12})
    seg.check_recipe(seg.DEFAULT_RECIPE)
    seg.check_recipe(TINY)
    r = seg.DEFAULT_RECIPE
    assert seg.lr_at(0, r) == pytest.approx(1e-4 * 1e-6)
    assert seg.lr_at(750, r) == pytest.approx(1e-4 * (1 - 750 / 80000))
    assert seg.lr_at(40000, r) == pytest.approx(0.5e-4)
    assert seg.lr_at(79999, r) == pytest.approx(1e-4 / 80000)
