"""COCO fine-tuning: demo set, reader + large-scale jitter, Mask R-CNN on SwinV2, evaluation."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")

from mimlib.data.coco import CocoInstances, coco_paths, large_scale_jitter, load_coco, masks_to_boxes  # noqa: E402
from mimlib.data.demo_coco import CocoDemoSpec, category_id, write_coco_demo  # noqa: E402
from mimlib.finetune import detection as D  # noqa: E402
from mimlib.finetune.common import FinetuneJob, build_optimizer  # noqa: E402
from mimlib.models.detection import ENCODER_PREFIX, build_mask_rcnn  # noqa: E402
from mimlib.train.layer_decay import num_layer_ids  # noqa: E402
from tiny_recipes import COCO_TINY  # noqa: E402

TINY = COCO_TINY


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the models are tiny, and spare threads only fight for shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def coco_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("coco") / "demo"
    write_coco_demo(out, CocoDemoSpec(num_classes=3, train_images=24, val_images=6, image_size=96, seed=0))
    return out


def _ckpt(path: Path, model: str = "swinv2_pico", img_size: int = 96, window: int = 6) -> Path:
    from mimlib.models.simmim import build_simmim

    torch.manual_seed(1)
    simmim = build_simmim(model, img_size=img_size, window_size=window, drop_path_rate=0.0)
    torch.save({"model": simmim.state_dict(), "model_name": model,
                "recipe": {"img_size": img_size, "window_size": window}, "iteration": 0}, path)
    return path


# ----------------------------------------------------------------------------- demo set


def test_demo_set_layout_and_determinism(coco_demo: Path, tmp_path: Path) -> None:
    paths = coco_paths(coco_demo)
    train = json.loads(Path(paths["train_json"]).read_text())
    assert [c["id"] for c in train["categories"]] == [category_id(k) for k in range(3)] == [1, 3, 7]
    assert train["images"][0]["id"] == 1 and train["annotations"][0]["id"] == 1
    kinds = set()
    for a in train["annotations"]:
        s = a["segmentation"]
        kinds.add("polygon" if isinstance(s, list) else ("rle_str" if isinstance(s["counts"], str) else "rle_list"))
        assert a["iscrowd"] == 0 and a["area"] > 0 and len(a["bbox"]) == 4
    assert kinds == {"polygon", "rle_str", "rle_list"}
    # every encoding decodes to a mask whose extent is the bbox and whose size is the area
    coco = load_coco(train)
    for a in train["annotations"][:40]:
        m = coco.annToMask(a)
        ys, xs = np.nonzero(m)
        assert m.sum() == a["area"]
        assert [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()] == a["bbox"]
    for split in ("train2017", "val2017"):
        assert len(list((coco_demo / split).glob("*.jpg"))) == (24 if split == "train2017" else 6)
    again = tmp_path / "again"
    write_coco_demo(again, CocoDemoSpec(num_classes=3, train_images=24, val_images=6, image_size=96, seed=0))
    assert (again / "annotations/instances_val2017.json").read_bytes() == (coco_demo / "annotations/instances_val2017.json").read_bytes()
    assert (again / "val2017/000000000003.jpg").read_bytes() == (coco_demo / "val2017/000000000003.jpg").read_bytes()
    assert not (tmp_path / "again.tmp").exists()
    with pytest.raises(FileExistsError):
        write_coco_demo(again, CocoDemoSpec(num_classes=3, train_images=2, val_images=1, image_size=64))


# ----------------------------------------------------------------------------- (a) evaluation


def _gt_as_predictions(gt: dict) -> list[dict]:
    coco = load_coco(gt)
    preds = []
    for a in gt["annotations"]:
        rle = coco.annToRLE(a)
        counts = rle["counts"].decode() if isinstance(rle["counts"], bytes) else rle["counts"]
        preds.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]),
                      "score": 1.0, "segmentation": {"size": list(rle["size"]), "counts": counts}})
    return preds


def _erode(m: np.ndarray, n: int) -> np.ndarray:
    m = m.astype(bool)
    for _ in range(n):
        e = m.copy()
        e[1:] &= m[:-1]
        e[:-1] &= m[1:]
        e[:, 1:] &= m[:, :-1]
        e[:, :-1] &= m[:, 1:]
        m = e
    return m


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_coco_evaluate_ground_truth_is_perfect_and_perturbations_are_not(coco_demo: Path, backend: str) -> None:
    if backend == "faster_coco_eval":
        pytest.importorskip("faster_coco_eval")
    from pycocotools import mask as mask_utils

    gt_path = coco_paths(coco_demo)["val_json"]
    gt = json.loads(Path(gt_path).read_text())
    preds = _gt_as_predictions(gt)
    perfect = D.coco_evaluate(gt_path, preds, backend=backend)
    for kind in ("box", "mask"):
        assert perfect[f"{kind}_ap"] == pytest.approx(100.0)
        assert perfect[f"{kind}_ap50"] == pytest.approx(100.0)
        assert perfect[f"{kind}_ap75"] == pytest.approx(100.0)
    assert set(perfect) == {f"{k}_{n}" for k in ("box", "mask") for n in D.METRIC_NAMES}
    # json-safe: RLE counts are str, metrics are numbers or None
    json.dumps(preds)
    json.dumps(perfect)

    shifted = [dict(p, bbox=[p["bbox"][0] + 0.3 * p["bbox"][2], p["bbox"][1], p["bbox"][2], p["bbox"][3]]) for p in preds]
    worse_box = D.coco_evaluate(gt, shifted, backend=backend)
    assert worse_box["box_ap"] < 90.0 and worse_box["mask_ap"] == pytest.approx(100.0)

    eroded = []
    for p in preds:
        m = _erode(mask_utils.decode(p["segmentation"]), 4)
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        eroded.append(dict(p, segmentation={"size": list(rle["size"]), "counts": rle["counts"].decode()}))
    worse_mask = D.coco_evaluate(gt, eroded, backend=backend)
    assert worse_mask["mask_ap"] < 90.0 and worse_mask["box_ap"] == pytest.approx(100.0)

    empty = D.coco_evaluate(gt, [], backend=backend)
    assert empty["box_ap"] == 0.0 and empty["mask_ap"] == 0.0


def test_outputs_to_coco_maps_labels_and_encodes_masks() -> None:
    from pycocotools import mask as mask_utils

    masks = torch.zeros(2, 1, 20, 30)
    masks[0, 0, 2:8, 3:9] = 0.9
    masks[1, 0, 10:15, 0:4] = 0.7
    out = {"boxes": torch.tensor([[3.0, 2, 9, 8], [0, 10, 4, 15]]), "scores": torch.tensor([0.9, 0.5]),
           "labels": torch.tensor([1, 3]), "masks": masks}
    res = D.outputs_to_coco([out], [42], {1: 1, 2: 3, 3: 7})
    assert [r["category_id"] for r in res] == [1, 7] and res[0]["image_id"] == 42
    assert res[0]["bbox"] == [3.0, 2.0, 6.0, 6.0]
    assert isinstance(res[0]["segmentation"]["counts"], str)
    assert mask_utils.decode(res[1]["segmentation"]).sum() == 20
    json.dumps(res)


# ----------------------------------------------------------------------------- (b) pre-trained backbone


def test_pretrained_checkpoint_loads_into_detection_backbone(tmp_path: Path) -> None:
    path = _ckpt(tmp_path / "pico.pt", img_size=192, window=12)  # the paper's pre-training geometry
    model, info = build_mask_rcnn("swinv2_pico", path, 3, img_size=128, window_size=4, drop_path=0.1,
                                  min_size=96, max_size=160, fpn_channels=16, representation_size=32,
                                  mask_head_channels=16)
    assert info["format"] == "mimscale" and info["pretrained_window_sizes"] == (12, 12, 12, 6)
    assert info["stage_windows"] == [(4, 4)] * 4
    saved = torch.load(path, weights_only=True)["model"]
    own = model.state_dict()
    enc_keys = [k for k in saved if k.startswith("encoder.") and not k.startswith(("encoder.norm.", "encoder.head."))]
    assert enc_keys
    for k in enc_keys:
        assert torch.equal(own["backbone.body." + k], saved[k]), k
    assert not any(k.startswith(ENCODER_PREFIX + "norm.") for k in own)  # final norm replaced by per-level norms
    assert all(f"backbone.body.norms.{i}.weight" in own for i in range(4))
    # a test-size image of another shape runs with the windows set up for the crop
    model.eval()
    with torch.no_grad():
        feats = model.backbone(torch.rand(1, 3, 96, 160))
        (out,) = model([torch.rand(3, 70, 130)])
    assert list(feats) == ["0", "1", "2", "3", "pool"] and feats["0"].shape[-2:] == (24, 40)
    assert model.backbone.out_channels == 16 and feats["3"].shape[1] == 16
    assert out["masks"].shape[-2:] == (70, 130)
    # a checkpoint of another size is refused
    with pytest.raises((ValueError, RuntimeError)):
        build_mask_rcnn("swinv2_nano", path, 3, img_size=128, window_size=4)


def test_paper_scale_windows_are_kept_for_test_images() -> None:
    model, info = build_mask_rcnn("swinv2_pico", None, 80, img_size=1024, window_size=14, drop_path=0.0)
    assert info["stage_windows"] == [(14, 14)] * 4
    enc = model.backbone.body.encoder
    assert enc.patch_embed.strict_img_size is False
    assert model.transform.min_size == (800,) and model.transform.max_size == 1333


# ----------------------------------------------------------------------------- (c) reader + LSJ


def test_lsj_keeps_boxes_and_masks_consistent(coco_demo: Path) -> None:
    paths = coco_paths(coco_demo)
    gt = json.loads(Path(paths["train_json"]).read_text())
    # a crowd annotation must not reach the training targets
    crowd = dict(gt["annotations"][0], id=10_000, iscrowd=1)
    gt["annotations"].append(crowd)
    ds = CocoInstances(paths["train_images"], gt, train=True, crop_size=96, scale_range=(0.1, 2.0), hflip=0.5)
    assert ds.cat_ids == [1, 3, 7] and ds.label_to_cat == {1: 1, 2: 3, 3: 7}
    for i in range(len(ds)):
        image, t = ds[(i, 1000 + i)]
        assert image.shape == (3, 96, 96) and image.dtype == torch.uint8
        assert t["masks"].shape == (len(t["boxes"]), 96, 96) and t["masks"].dtype == torch.uint8
        assert len(t["labels"]) == len(t["boxes"]) and bool(((t["labels"] >= 1) & (t["labels"] <= 3)).all())
        assert torch.equal(t["boxes"], masks_to_boxes(t["masks"]))  # boxes are the masks' extents
        assert bool((t["masks"].flatten(1).amax(1) > 0).all())
    first, again = ds[(0, 7)], ds[(0, 7)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1]["boxes"], again[1]["boxes"])

    # The same draw with the geometric boxes (v2 BoundingBoxes, clamped to the crop): every
    # transformed mask lies inside its transformed box (1 px slack), and for objects the crop
    # does not cut, the two agree within 1 px when upscaling (downscaling may drop thin tips).
    plain = CocoInstances(paths["train_images"], gt, train=False)
    n_inside = 0
    for i in range(len(plain)):
        image, t = plain[i]
        t["labels"] = torch.arange(len(t["labels"]))  # instance ids, filtered like labels
        for seed, scales in ((i, (0.1, 2.0)), (100 + i, (1.0, 2.0))):
            _, geo = large_scale_jitter(image, t, np.random.default_rng(seed), 96, scales, 0.5, recompute_boxes=False)
            _, tight = large_scale_jitter(image, t, np.random.default_rng(seed), 96, scales, 0.5)
            geo_boxes = dict(zip(geo["labels"].tolist(), geo["boxes"]))
            for k, mb in zip(tight["labels"].tolist(), tight["boxes"]):
                gb = geo_boxes[k]
                assert bool((mb[:2] >= gb[:2] - 1).all() and (mb[2:] <= gb[2:] + 1).all()), (gb, mb)
                if scales[0] >= 1.0 and bool((gb[:2] > 0.5).all() and (gb[2:] < 95.5).all()):
                    # A tip thinner than a pixel is in the annotation's box but not in its
                    # rasterised mask; upscaling (at most 2x) stretches that pixel to 2.
                    assert torch.allclose(gb, mb, atol=1.0 + scales[1]), (gb, mb)
                    n_inside += 1
    assert n_inside > 5

    image, t = plain[0]
    anns = [a for a in gt["annotations"] if a["image_id"] == int(t["image_id"]) and not a["iscrowd"]]
    assert len(t["boxes"]) == len(anns)  # crowd left out
    info = plain.coco.imgs[int(t["image_id"])]
    assert image.shape == (3, info["height"], info["width"])
    assert [plain.label_to_cat[int(x)] for x in t["labels"]] == [a["category_id"] for a in anns]


def test_batch_sampler_shards_the_global_batch() -> None:
    one = list(D.batch_sampler(10, 0, 6, 4, 2, seed=3))
    assert len(one) == 12  # 6 iterations x 2 micro-steps
    per_iter = [sorted(one[2 * k] + one[2 * k + 1]) for k in range(6)]
    for rank in range(2):
        shard = list(D.batch_sampler(10, 0, 6, 4, 1, seed=3, rank=rank, world_size=2))
        assert len(shard) == 12
    both = [list(D.batch_sampler(10, 0, 6, 4, 1, seed=3, rank=r, world_size=2)) for r in range(2)]
    for k in range(6):
        union = sorted(both[0][2 * k] + both[0][2 * k + 1] + both[1][2 * k] + both[1][2 * k + 1])
        assert union == per_iter[k]
    # an epoch (2 iterations of 4 from 10 images) has no repeats; a resumed sampler agrees
    epoch0 = [i for k in range(2) for i, _ in per_iter[k]]
    assert len(set(epoch0)) == 8
    assert list(D.batch_sampler(10, 3, 6, 4, 2, seed=3)) == one[6:]


# ----------------------------------------------------------------------------- (d) training


def test_one_training_step_gives_finite_losses(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, _ = build_mask_rcnn("swinv2_pico", None, 3, img_size=128, window_size=4, drop_path=0.1,
                               min_size=128, max_size=128, fpn_channels=32, representation_size=64,
                               mask_head_channels=32, box_batch_size_per_image=32)
    model.train()
    masks = torch.zeros(2, 128, 128, dtype=torch.uint8)
    masks[0, 10:60, 20:90] = 1
    masks[1, 70:120, 5:50] = 1
    target = {"boxes": torch.tensor([[20.0, 10, 90, 60], [5, 70, 50, 120]]), "labels": torch.tensor([1, 3]), "masks": masks}
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 128, 128, dtype=torch.uint8)}
    opt = build_optimizer(model, {**D.DEFAULT_RECIPE, "lr": 1e-4}, torch.device("cpu"), ENCODER_PREFIX, "swinv2_pico")
    losses = model([torch.rand(3, 128, 128), torch.rand(3, 128, 128)], [target, empty])
    assert set(losses) == set(D._LOSS_NAMES)
    loss = sum(losses.values())
    assert all(math.isfinite(float(v.detach())) for v in losses.values())
    loss.backward()
    enc = model.backbone.body.encoder
    assert enc.patch_embed.proj.weight.grad is not None and enc.patch_embed.proj.weight.grad.abs().sum() > 0
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, no_grad[:5]
    opt.step()


def test_run_trains_evaluates_and_resumes(coco_demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from mimlib.train import checkpoint as ckpt_io

    ckpt = _ckpt(tmp_path / "pico.pt")

    def job(name: str) -> FinetuneJob:
        return FinetuneJob(task="coco", model="swinv2_pico", recipe=dict(TINY, checkpoint_every=2),
                           data=coco_paths(coco_demo), out_dir=tmp_path / name / "out",
                           resume_dir=tmp_path / name / "resume", checkpoint=ckpt, device="cpu")

    finish = D.ResumableState.finish

    def keep_then_finish(self: D.ResumableState) -> None:  # keep the full run's rolling state
        shutil.copytree(self.job.resume_dir, tmp_path / "kept")
        finish(self)

    with monkeypatch.context() as m:
        m.setattr(D.ResumableState, "finish", keep_then_finish)
        record = D.run(job("full"), progress=False)
    metrics = record["metrics"]
    assert set(metrics) == {f"{k}_{n}" for k in ("box", "mask") for n in D.METRIC_NAMES}
    assert all(v is None or 0.0 <= v <= 100.0 for v in metrics.values())
    assert record["iterations"] == 6 and record["encoder"]["format"] == "mimscale"
    saved = json.loads((tmp_path / "full/out/metrics.json").read_text())
    assert saved["metrics"] == metrics and saved["task"] == "coco"
    logs = [json.loads(x) for x in (tmp_path / "full/out/log.jsonl").read_text().splitlines()]
    train_logs = {r["iter"]: r for r in logs if "loss" in r}
    assert sorted(train_logs) == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["loss_mask"]) for r in train_logs.values())
    assert train_logs[1]["lr"] == pytest.approx(1e-4 * 0.001)
    with gzip.open(tmp_path / "full/out/predictions.json.gz", "rt") as f:
        preds = json.load(f)
    assert all(p["category_id"] in (1, 3, 7) for p in preds)

    # A job killed after iteration 4 resumes from its rolling state and ends where the
    # uninterrupted run ended.
    assert not (tmp_path / "full/resume").exists()  # rolling state removed when done
    assert [i for i, _ in ckpt_io.rolling_checkpoints(tmp_path / "kept")] == [4, 6]
    (tmp_path / "cut/resume").mkdir(parents=True)
    shutil.copy(tmp_path / "kept/iter_000000004.pt", tmp_path / "cut/resume/")
    shutil.copy(tmp_path / "kept/log.jsonl", tmp_path / "cut/resume/")  # has the eval record too: cut back
    resumed = D.run(job("cut"), progress=False)
    cut_logs = [json.loads(x) for x in (tmp_path / "cut/out/log.jsonl").read_text().splitlines()]
    timeless = lambda rs: [{k: v for k, v in r.items() if k not in ("images_per_s", "eval_s")} for r in rs]  # noqa: E731
    assert timeless(cut_logs) == timeless(logs)
    assert resumed["metrics"] == metrics
    assert not (tmp_path / "cut/resume").exists()
    # killed in evaluation: the state saved after the last iteration skips straight to it
    (tmp_path / "eval/resume").mkdir(parents=True)
    shutil.copy(tmp_path / "kept/iter_000000006.pt", tmp_path / "eval/resume/")
    assert D.run(job("eval"), progress=False)["metrics"] == metrics
    assert [r["iter"] for r in map(json.loads, (tmp_path / "eval/out/log.jsonl").read_text().splitlines())] == [6]


def test_sigterm_mid_interval_saves_and_the_rerun_matches(coco_demo: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM in iteration 2 of 6 -> state saved after it (with the open log interval's sums),
    Preempted; the rerun ends with the uninterrupted run's weights, log and AP."""
    import os
    import signal

    from mimlib.train import checkpoint as ckpt_io
    from mimlib.train.preemption import Preempted

    ckpt = _ckpt(tmp_path / "pico.pt")
    recipe = dict(TINY, log_every=3, checkpoint_every=6, save_weights=True)  # only SIGTERM saves mid-run

    def job(name: str) -> FinetuneJob:
        return FinetuneJob(task="coco", model="swinv2_pico", recipe=recipe, data=coco_paths(coco_demo),
                           out_dir=tmp_path / name / "out", resume_dir=tmp_path / name / "resume",
                           checkpoint=ckpt, device="cpu")

    ref = D.run(job("full"), progress=False)
    original, calls = D._to_device, {"n": 0}

    def terminated(*args):  # once per micro-batch, 2 per iteration
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args)

    with monkeypatch.context() as m:
        m.setattr(D, "_to_device", terminated)
        with pytest.raises(Preempted, match="iteration 2 of 6"):
            D.run(job("term"), progress=False)
    (saved,) = ckpt_io.rolling_checkpoints(tmp_path / "term/resume")
    assert saved[0] == 2 and ckpt_io.load(saved[1])["extra"]["interval_iters"] == 2
    resumed = D.run(job("term"), progress=False)
    assert resumed["metrics"] == ref["metrics"]
    a = torch.load(tmp_path / "full/out/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "term/out/last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    timeless = lambda p: [{k: v for k, v in json.loads(x).items() if k not in ("images_per_s", "eval_s")}  # noqa: E731
                          for x in p.read_text().splitlines()]
    assert timeless(tmp_path / "term/out/log.jsonl") == timeless(tmp_path / "full/out/log.jsonl")


@pytest.mark.slow
def test_two_cpu_ranks_train_and_evaluate(coco_demo: Path, tmp_path: Path) -> None:
    """2 gloo ranks through launch.sh (as a 2-GPU Slurm job starts them): each trains on its shard
    of every global batch, predictions of both ranks' val shards are gathered and scored once."""
    import subprocess

    from launching import ROOT, finetune_args, mimlib_cmd, rank_free_env

    out, resume = tmp_path / "out", tmp_path / "resume"
    job = FinetuneJob(task="coco", model="swinv2_pico", recipe=dict(TINY, global_batch=4, micro_batch=1),  # 2 x 1 x 2
                      data=coco_paths(coco_demo), out_dir=out, resume_dir=resume, device="cpu")
    proc = subprocess.run(mimlib_cmd(finetune_args(job), ranks=2), cwd=ROOT, env=rank_free_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "metrics.json").read_text())
    assert record["world_size"] == 2 and record["iterations"] == 6
    assert all(v is None or 0.0 <= v <= 100.0 for v in record["metrics"].values())
    with gzip.open(out / "predictions.json.gz", "rt") as f:
        image_ids = {p["image_id"] for p in json.load(f)}
    val_ids = {im["id"] for im in json.loads(Path(coco_paths(coco_demo)["val_json"]).read_text())["images"]}
    assert image_ids <= val_ids and len(image_ids) > len(val_ids) // 2  # both ranks' shards are in
    assert not resume.exists()


# ----------------------------------------------------------------------------- (e) optimiser, recipe


def test_layer_decay_groups_find_the_encoder(tmp_path: Path) -> None:
    model, _ = build_mask_rcnn("swinv2_pico", None, 3, img_size=64, window_size=4, drop_path=0.0,
                               fpn_channels=16, representation_size=32, mask_head_channels=16)
    recipe = {**D.DEFAULT_RECIPE, "layer_decay": 0.9}
    opt = build_optimizer(model, recipe, torch.device("cpu"), ENCODER_PREFIX, "swinv2_pico")
    last = num_layer_ids((1, 1, 2, 1)) - 1
    ids = {n: g["layer_id"] for g in opt.param_groups for n in g["names"]}
    scales = {n: g["lr_scale"] for g in opt.param_groups for n in g["names"]}
    assert set(ids) == {n for n, p in model.named_parameters() if p.requires_grad}
    enc = [n for n in ids if n.startswith(ENCODER_PREFIX)]
    assert enc and all(ids[n] < last for n in enc)
    assert ids[ENCODER_PREFIX + "patch_embed.proj.weight"] == 0
    assert scales[ENCODER_PREFIX + "patch_embed.proj.weight"] == pytest.approx(0.9**last)
    assert ids[ENCODER_PREFIX + "layers.3.blocks.0.mlp.fc1.weight"] == last - 1
    for n in ids:
        if n.startswith(("backbone.fpn.", "backbone.body.norms.", "rpn.", "roi_heads.")):
            assert ids[n] == last and scales[n] == 1.0
    wd = {n: g["weight_decay"] for g in opt.param_groups for n in g["names"]}
    assert wd[ENCODER_PREFIX + "layers.0.blocks.0.attn.logit_scale"] == 0.0
    assert wd["roi_heads.box_head.fc6.weight"] == 0.05 and wd["roi_heads.box_head.fc6.bias"] == 0.0


def test_recipe_check_and_schedule() -> None:
    D.check_recipe(D.DEFAULT_RECIPE)
    with pytest.raises(ValueError, match="bogus"):
        D.check_recipe({**D.DEFAULT_RECIPE, "bogus": 1})
    with pytest.raises(ValueError, match="micro_batch"):
        D.check_recipe({"global_batch": 32, "micro_batch": 3})
    r = D.DEFAULT_RECIPE
    ipe = 117266 // 32  # COCO train2017 at batch 32
    assert D.detection_lr(0, r, ipe) == pytest.approx(8e-8)
    assert D.detection_lr(250, r, ipe) == pytest.approx(8e-5 * (0.001 + 0.999 * 0.5))
    assert D.detection_lr(500, r, ipe) == pytest.approx(8e-5)
    assert D.detection_lr(27 * ipe - 1, r, ipe) == pytest.approx(8e-5)
    assert D.detection_lr(27 * ipe, r, ipe) == pytest.approx(8e-6)
    assert D.detection_lr(33 * ipe, r, ipe) == pytest.approx(8e-7)


def test_three_stage_encoder_gets_four_fpn_levels_and_matching_anchors(tmp_path: Path) -> None:
    # The demo's 3-stage sizes (stride 16): FPN levels '0'-'2' + pool, RoI pooling on '0'-'2'.
    path = _ckpt(tmp_path / "pico3.pt", model="swinv2_pico3", img_size=96, window=6)
    model, info = build_mask_rcnn("swinv2_pico3", path, 3, img_size=128, window_size=8, drop_path=0.0,
                                  min_size=128, max_size=128, fpn_channels=16, representation_size=32,
                                  mask_head_channels=16, anchor_sizes=[16, 32, 64, 128])
    assert info["pretrained_window_sizes"] == (6, 6, 6)
    masks = torch.zeros(1, 128, 128, dtype=torch.uint8)
    masks[0, 10:60, 20:90] = 1
    target = {"boxes": torch.tensor([[20.0, 10, 90, 60]]), "labels": torch.tensor([2]), "masks": masks}
    model.train()
    losses = model([torch.rand(3, 128, 128)], [target])
    assert set(losses) == set(D._LOSS_NAMES) and all(math.isfinite(float(v.detach())) for v in losses.values())
    sum(losses.values()).backward()
    # the last stage is in the graph (timm zero-inits the post-norms, so they get the first gradient)
    assert model.backbone.body.encoder.layers[2].blocks[-1].norm1.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        feats = model.backbone(torch.rand(1, 3, 128, 128))
        (out,) = model([torch.rand(3, 100, 120)])
    assert list(feats) == ["0", "1", "2", "pool"] and feats["2"].shape[-2:] == (8, 8)
    assert out["masks"].shape[-2:] == (100, 120)
    # The usual five P2-P6 sizes do not fit 4 levels; the error says how many are needed.
    with pytest.raises(ValueError, match=r"one size per FPN level \(4\)"):
        build_mask_rcnn("swinv2_pico3", None, 3, img_size=128, window_size=8, anchor_sizes=[8, 16, 32, 64, 128])
    with pytest.raises(ValueError, match="give anchor_sizes"):
        build_mask_rcnn("swinv2_pico3", None, 3, img_size=128, window_size=8)
