"""torch.compile through the shared loop: for one update of each task (SimMIM pre-training,
classification, detection, segmentation), the compiled training forward gives the eager
loss and gradients to float tolerance. CPU, so CI runs it: pre-training (the study's main cost) with inductor's C++ kernels, the
fine-tuning tasks with Dynamo + AOTAutograd on eager kernels (seconds instead of minutes)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import mimlib.train.loop as loop
from mimlib.data.demo_ade20k import Ade20kDemoSpec, write_ade20k_demo
from mimlib.data.demo_coco import CocoDemoSpec, write_coco_demo
from mimlib.data.coco import coco_paths
from mimlib.finetune import classification, detection, segmentation
from mimlib.finetune.common import FinetuneJob
from mimlib.train.pretrain import PretrainJob, run_pretrain

pytestmark = pytest.mark.slow


def first_update(run: Callable[[bool], Any], monkeypatch: pytest.MonkeyPatch) -> tuple[float, list[torch.Tensor]]:
    """(loss, gradients) of the first optimiser update of ``run(compile)``, read in the loop."""
    seen: list[tuple[float, list[torch.Tensor]]] = []
    original = loop.checked_step

    def spy(optimizer, loss, grad_norm, *args):
        if not seen:
            grads = [p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            seen.append((float(loss.reshape(-1)[0]), grads))
        return original(optimizer, loss, grad_norm, *args)

    with monkeypatch.context() as m:
        m.setattr(loop, "checked_step", spy)
        run()
    return seen[0]


def assert_compiled_matches_eager(run: Callable[[bool], Any], monkeypatch: pytest.MonkeyPatch,
                                  backend: str = "inductor") -> None:
    """``backend`` 'inductor' is what a job runs (C++ kernels on CPU, ~1 min to compile here);
    'aot_eager' traces the same graphs (Dynamo + AOTAutograd: graph breaks, guards, the
    backward) and runs them with eager kernels, in seconds."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager_loss, eager_grads = first_update(lambda: run(False), monkeypatch)
    assert not counters["stats"]["unique_graphs"]
    with monkeypatch.context() as m:
        m.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
        compiled_loss, compiled_grads = first_update(lambda: run(True), monkeypatch)
    assert counters["stats"]["unique_graphs"] >= 1  # the training forward really went through Dynamo
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    assert len(compiled_grads) == len(eager_grads) > 10
    flat = lambda grads: torch.cat([g.flatten() for g in grads])  # noqa: E731
    assert float((flat(compiled_grads) - flat(eager_grads)).norm() / flat(eager_grads).norm()) < 1e-4
    # each tensor to tolerance, except those whose gradient is zero up to rounding (e.g. a
    # parameter followed by a normalisation: ~1e-10 here, its relative error meaningless)
    scale = max(float(g.norm()) for g in eager_grads)
    for i, (a, b) in enumerate(zip(compiled_grads, eager_grads)):
        if float(b.norm()) > 1e-6 * scale:
            assert float((a - b).norm() / b.norm()) < 1e-3, i


def test_pretrain_compiled_equals_eager(tmp_path: Path, tiny_data: dict, tiny_recipe: dict,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def run(compile_model: bool) -> None:
        name = "compiled" if compile_model else "eager"
        run_pretrain(PretrainJob(model="swinv2_pico", recipe={**tiny_recipe, "compile": compile_model},
                                 manifest=tiny_data["manifest"], end_iter=1, out=tmp_path / name / "out.pt",
                                 resume_dir=tmp_path / name / "resume", device="cpu"), progress=False)

    assert_compiled_matches_eager(run, monkeypatch, backend="inductor")


def test_classification_compiled_equals_eager(tmp_path: Path, tiny_data: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = dict(img_size=64, window_size=4, epochs=1, warmup_epochs=0, global_batch=16, micro_batch=8,
                  mixup=0.0, cutmix=0.0, num_workers=0, threads=1)

    def run(compile_model: bool) -> None:
        name = "compiled" if compile_model else "eager"
        classification.run(FinetuneJob(
            task="in1k", model="swinv2_pico", recipe={**recipe, "compile": compile_model},
            data={"train_index": str(tiny_data["index_train"]), "val_index": str(tiny_data["index_val"]),
                  "num_classes": 4},
            out_dir=tmp_path / name / "out", resume_dir=tmp_path / name / "resume", device="cpu"), progress=False)

    assert_compiled_matches_eager(run, monkeypatch, backend="aot_eager")


def test_segmentation_compiled_equals_eager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_ade20k_demo(tmp_path / "ade", Ade20kDemoSpec(num_classes=4, train_images=4, val_images=1, min_size=64,
                                                       max_size=96))
    recipe = dict(num_classes=4, img_size=64, window_size=4, scale=[256, 64], slide_crop=64, slide_stride=64,
                  test_short_side=64, test_long_side=128, iters=1, warmup_iters=0, lr=1e-3, global_batch=2,
                  micro_batch=2, channels=16, aux_channels=16, num_workers=0, log_every=1, eval_every=0,
                  checkpoint_every=0, threads=1)

    def run(compile_model: bool) -> None:
        name = "compiled" if compile_model else "eager"
        segmentation.run(FinetuneJob(
            task="ade20k", model="swinv2_pico", recipe={**recipe, "compile": compile_model},
            data={"root": str(tmp_path / "ade" / "ADEChallengeData2016")},
            out_dir=tmp_path / name / "out", resume_dir=tmp_path / name / "resume", device="cpu"), progress=False)

    assert_compiled_matches_eager(run, monkeypatch, backend="aot_eager")


def test_detection_compiled_equals_eager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_coco_demo(tmp_path / "coco", CocoDemoSpec(num_classes=2, train_images=2, val_images=1, image_size=64))
    recipe = dict(img_size=64, window_size=4, test_size=[64, 64], epochs=1, warmup_iters=0, global_batch=2,
                  micro_batch=2, lr=1e-4, step_epochs=[1], num_workers=0, log_every=1, checkpoint_every=1,
                  threads=1, eval_batch=1, fpn_channels=16, representation_size=32, mask_head_channels=16,
                  mask_head_convs=1, rpn_pre_nms_top_n_train=50, rpn_post_nms_top_n_train=20,
                  rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=10, rpn_batch_size_per_image=32,
                  box_batch_size_per_image=16, box_detections_per_img=5, anchor_sizes=[8, 16, 32, 64, 128])

    def run(compile_model: bool) -> None:
        name = "compiled" if compile_model else "eager"
        detection.run(FinetuneJob(
            task="coco", model="swinv2_pico", recipe={**recipe, "compile": compile_model},
            data=coco_paths(tmp_path / "coco"), out_dir=tmp_path / name / "out",
            resume_dir=tmp_path / name / "resume", device="cpu"), progress=False)

    assert_compiled_matches_eager(run, monkeypatch, backend="aot_eager")
