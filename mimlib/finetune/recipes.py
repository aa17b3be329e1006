"""Default recipes of the fine-tuning engines (paper Tables 11-14), in one torch-free place.

The study config overrides them per task (``finetune.<task>.recipe``) and per model
(``finetune.<task>.per_model``); config validation checks every task's recipe, for every model, with the checks below before any
job starts, without importing the engines (which check again when run on their own).

One contract for every check: reject unknown keys, complete the recipe over the task's
defaults, check the values that cannot work, and return the completed recipe; a ValueError
names the key and the value.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

# Table 11 (ImageNet-1K; iNaturalist-18 = Table 12 changes base_lr and weight_decay in the config)
CLASSIFICATION: dict[str, Any] = {
    "img_size": 224,
    "window_size": 14,
    "epochs": 100,
    "warmup_epochs": 20,
    "layer_decay": 0.8,
    "global_batch": 2048,
    "micro_batch": 64,  # per rank and forward pass; accumulation fills the global batch
    "base_lr": 1.25e-3,  # per 512 images: 5e-3 at 2048
    "warmup_lr": 2.5e-7,  # per 512 images
    "min_lr": 2.5e-7,  # per 512 images
    "weight_decay": 0.05,
    "betas": [0.9, 0.999],
    "eps": 1e-8,
    "clip_grad": 5.0,  # max grad norm; 0/None = no clipping
    "drop_path": 0.2,
    "label_smoothing": 0.1,
    "crop_scale": [0.08, 1.0],
    "crop_ratio": [0.75, 4 / 3],
    "hflip": 0.5,
    "color_jitter": 0.4,  # timm ignores it while RandAugment is on (as the reference)
    "auto_augment": "rand-m9-mstd0.5-inc1",  # null = no RandAugment
    "reprob": 0.25,
    "remode": "pixel",
    "mixup": 0.8,  # Mixup alpha (0 = off)
    "cutmix": 1.0,  # CutMix alpha (0 = off)
    "mixup_switch_prob": 0.5,
    "mixup_prob": 1.0,
    "eval_resize_ratio": 224 / 256,  # eval: resize short side to img_size / ratio, centre crop
    "num_workers": 8,
    "precision": "auto",  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    "fused_attention": True,  # SDPA window attention (mimlib.models.attention)
    "compile": False,  # torch.compile the training forward
    "log_every": 50,  # updates between progress-bar refreshes (the log is per epoch)
    "threads": None,  # torch CPU threads (None = torch's default)
}


# Table 13 (COCO, Mask R-CNN)
DETECTION: dict[str, Any] = {
    # Table 13
    "img_size": 1024,  # training crop (large-scale jitter) and the size the encoder's windows are set up for
    "window_size": 14,
    "test_size": [800, 1333],  # short side, long-side cap
    "epochs": 36,
    "warmup_iters": 500,
    "warmup_ratio": 0.001,  # warmup starts at lr * warmup_ratio (mmdetection's linear warmup)
    "global_batch": 32,
    "micro_batch": 2,
    "lr": 8.0e-5,  # absolute peak lr at this global_batch (not rescaled with it)
    "weight_decay": 0.05,
    "betas": [0.9, 0.999],
    "eps": 1.0e-8,
    "step_epochs": [27, 33],
    "step_ratio": 0.1,
    "drop_path": 0.1,
    "hflip": 0.5,
    "scale_jitter": [0.1, 2.0],
    "layer_decay": 1.0,  # Table 13 lists none
    "clip_grad": None,
    # engine
    "precision": "auto",  # bf16 autocast on CUDA, fp32 on CPU
    "compile": False,  # torch.compile the training forward (the shared loop, mimlib.train.loop)
    "num_workers": 4,
    "log_every": 50,
    "checkpoint_every": 1000,
    "threads": None,
    "eval_batch": 2,
    "eval_backend": "pycocotools",  # or "faster_coco_eval"
    "fused_attention": True,
    "grad_checkpointing": False,
    "save_weights": False,  # also write out_dir/last.pt (model state dict)
    "max_train_images": None,
    "max_val_images": None,
    # detector (reference Mask R-CNN sizes)
    "fpn_channels": 256,
    "representation_size": 1024,
    "mask_head_channels": 256,
    "mask_head_convs": 4,
    "anchor_sizes": [32, 64, 128, 256, 512],
    "rpn_batch_size_per_image": 256,
    "rpn_pre_nms_top_n_train": 2000,
    "rpn_post_nms_top_n_train": 1000,
    "rpn_pre_nms_top_n_test": 1000,
    "rpn_post_nms_top_n_test": 1000,
    "box_batch_size_per_image": 512,
    "box_detections_per_img": 100,
    "box_score_thresh": 0.05,
}


# Table 14 (ADE20K, UPerNet)
SEGMENTATION: dict[str, Any] = {
    "num_classes": 150,  # ADE20K's 150 (labels 1..150, 0 = other -> ignored)
    # --- input (Table 14) ---
    "img_size": 640,
    "window_size": 20,
    "scale": [2560, 640],  # base (long, short) of the training rescale (mmseg img_scale)
    "ratio_range": [0.5, 2.0],  # scale jittering
    "cat_max_ratio": 0.75,  # mmseg RandomCrop: re-draw crops dominated by one class
    "hflip": 0.5,
    "photometric": True,  # mmseg PhotoMetricDistortion
    "test_short_side": 640,  # test size (2560, 640): short side 640, long side at most 2560
    "test_long_side": 2560,
    "slide_crop": 640,  # sliding-window size; must equal img_size (the model's input size)
    "slide_stride": 426,
    # --- optimisation (Table 14) ---
    "iters": 80000,
    "warmup_iters": 750,
    "warmup_ratio": 1.0e-6,
    "lr": 1.0e-4,  # absolute at global batch 32; the paper searched [1e-4, 3e-4]
    "min_lr": 0.0,
    "lr_power": 1.0,  # poly power 1.0 = linear
    "layer_decay": 0.95,  # S/B; 0.9 for L (config per_model)
    "weight_decay": 0.05,
    "betas": [0.9, 0.999],
    "eps": 1.0e-8,
    "clip_grad": None,  # mmseg's Swin configs do not clip
    "global_batch": 32,
    "micro_batch": 4,
    "drop_path": 0.1,
    # --- UPerNet (mmseg UPerHead + FCNHead) ---
    "channels": 512,
    "aux_channels": 256,
    "aux_weight": 0.4,
    "dropout": 0.1,
    "sync_bn": True,  # SyncBatchNorm in the heads under DDP on GPUs (mmseg); no effect in one process or on CPU
    # --- engineering ---
    "fused_attention": True,  # window attention through SDPA (mimlib.models.attention)
    "precision": "auto",  # bf16 autocast on CUDA, fp32 on CPU
    "compile": False,  # torch.compile the training forward (the shared loop, mimlib.train.loop)
    "num_workers": 4,
    "log_every": 50,  # iterations
    "eval_every": 8000,  # iterations between validation runs; 0/None = only the final one
    "checkpoint_every": 1000,  # rolling resume state, iterations
    "max_val_images": None,  # first N validation images (sorted); None = all 2000
    "max_train_images": None,  # first N training images (sorted); None = all 20210
    "save_weights": False,  # also write out_dir/last.pt (model weights) at the end
    "threads": None,  # torch.set_num_threads; None leaves torch's default
}


# ------------------------------------------------------------------ checks
def mixup_active(r: Mapping[str, Any]) -> bool:
    return (r["mixup"] > 0 or r["cutmix"] > 0) and r["mixup_prob"] > 0


def check_classification(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """IN-1K / iNat-18 (Tables 11-12)."""
    unknown = sorted(set(recipe) - set(CLASSIFICATION))
    if unknown:
        raise ValueError(f"unknown classification recipe key(s) {unknown}; known: {sorted(CLASSIFICATION)}")
    r = {**CLASSIFICATION, **recipe}
    if r["epochs"] < 1 or not 0 <= r["warmup_epochs"] <= r["epochs"]:
        raise ValueError(f"need epochs >= 1 and 0 <= warmup_epochs <= epochs, got {r['epochs']}, {r['warmup_epochs']}")
    if r["global_batch"] < 1 or r["micro_batch"] < 1:
        raise ValueError(f"global_batch {r['global_batch']} and micro_batch {r['micro_batch']} must be >= 1")
    if mixup_active(r) and r["micro_batch"] % 2:
        raise ValueError(
            f"Mixup/CutMix (mixup={r['mixup']}, cutmix={r['cutmix']}) needs an even micro_batch, got "
            f"{r['micro_batch']}; make micro_batch even or set mixup and cutmix to 0"
        )
    return r


def check_detection(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """COCO Mask R-CNN (Table 13)."""
    unknown = sorted(set(recipe) - set(DETECTION))
    if unknown:
        raise ValueError(f"unknown coco recipe keys: {', '.join(unknown)} (known: {', '.join(sorted(DETECTION))})")
    r = {**DETECTION, **recipe}
    problems = []
    if r["global_batch"] % r["micro_batch"]:
        problems.append(f"global_batch {r['global_batch']} is not divisible by micro_batch {r['micro_batch']}")
    if len(r["test_size"]) != 2 or r["test_size"][0] > r["test_size"][1]:
        problems.append(f"test_size {r['test_size']} must be [short side, long-side cap]")
    lo, hi = r["scale_jitter"]
    if not 0 < lo <= hi:
        problems.append(f"scale_jitter {r['scale_jitter']} must be 0 < low <= high")
    if list(r["step_epochs"]) != sorted(r["step_epochs"]) or any(not 0 < e <= r["epochs"] for e in r["step_epochs"]):
        problems.append(f"step_epochs {r['step_epochs']} must be increasing, within 1..epochs={r['epochs']}")
    if r["img_size"] % 32:
        problems.append(f"img_size {r['img_size']} is not a multiple of the stride 32")
    # One size per FPN level: stages + 1 (P2-P6 for 4 stages); the model build checks the count.
    if len(r["anchor_sizes"]) < 2 or any(not isinstance(a, int) or a <= 0 for a in r["anchor_sizes"]):
        problems.append(f"anchor_sizes {r['anchor_sizes']} needs a positive size per FPN level (5 for P2-P6)")
    if r["eval_backend"] not in ("pycocotools", "faster_coco_eval"):
        problems.append(f"eval_backend {r['eval_backend']!r} is not pycocotools or faster_coco_eval")
    if r["checkpoint_every"] % r["log_every"]:
        problems.append(f"checkpoint_every {r['checkpoint_every']} is not a multiple of log_every {r['log_every']}")
    if problems:
        raise ValueError("invalid coco recipe: " + "; ".join(problems))
    return r


def check_segmentation(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """ADE20K UPerNet (Table 14)."""
    unknown = sorted(set(recipe) - set(SEGMENTATION))
    if unknown:
        raise ValueError(f"unknown ade20k recipe keys: {', '.join(unknown)} (known: {', '.join(sorted(SEGMENTATION))})")
    r = {**SEGMENTATION, **recipe}
    crop, window = int(r["img_size"]), int(r["window_size"])
    if crop % 32:
        raise ValueError(f"img_size {crop} is not a multiple of 32 (patch 4, four stages)")
    for i in range(4):
        res = crop // 4 // 2**i
        if res % min(window, res):
            raise ValueError(f"window_size {window} does not tile stage {i} ({res}x{res} tokens) of a {crop} crop")
    if int(r["slide_crop"]) != crop:
        raise ValueError(f"slide_crop {r['slide_crop']} must equal img_size {crop} (the model's fixed input size)")
    if not 0 < int(r["slide_stride"]) <= crop:
        raise ValueError(f"slide_stride {r['slide_stride']} must be in (0, img_size]")
    if r["global_batch"] % r["micro_batch"]:
        raise ValueError(f"global_batch {r['global_batch']} is not a multiple of micro_batch {r['micro_batch']}")
    lo, hi = r["ratio_range"]
    if not 0 < lo <= hi:
        raise ValueError(f"ratio_range {r['ratio_range']} must satisfy 0 < low <= high")
    if not 1 <= int(r["num_classes"]) <= 255:
        raise ValueError(f"num_classes {r['num_classes']} must be in [1, 255] (255 is the ignore label)")
    if r["iters"] < 1 or r["warmup_iters"] < 0:
        raise ValueError("iters must be >= 1 and warmup_iters >= 0")
    if r["aux_weight"] and not r["aux_channels"]:
        raise ValueError("aux_weight > 0 needs aux_channels")
    return r


#: default recipe name (mimlib.finetune.TASKS[...].recipe) -> its check
CHECKS: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "CLASSIFICATION": check_classification, "DETECTION": check_detection, "SEGMENTATION": check_segmentation,
}
