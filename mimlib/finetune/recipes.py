"""Fine-tuning recipes (paper Tables 11-14): typed, with their defaults, in one torch-free place.

Each task's recipe is a frozen, strictly typed dataclass (pydantic): a field's annotation says
its type and bounds, its default is the paper's value. The study config overrides fields per
task (``finetune.<task>.recipe``) and per model (``finetune.<task>.per_model``); config
validation checks every task's recipe for every model before any job starts, without
importing the engines (which check again when run on their own).

One contract for every check (:func:`check_classification`, :func:`check_detection`,
:func:`check_segmentation`): reject unknown keys, complete the recipe over the defaults, check
each value's type and bounds, then the combinations that cannot work, and return the completed
recipe as a dict of the values given (so its hash, :func:`mimlib.provenance.recipe_hash`, does
not depend on how a number was written). A :class:`RecipeError` (a ValueError) names every
bad key and value.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Callable, Literal, Mapping, Optional

from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

# Strict: "1" is not an int, 1 is not a bool (an int is a float); unknown keys are errors.
_STRICT = ConfigDict(strict=True, extra="forbid")

Pos = Annotated[int, Field(gt=0)]  # a count or a size
NonNeg = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Prob = Annotated[float, Field(ge=0, le=1)]
Pair = Annotated[list[float], Field(min_length=2, max_length=2)]
Betas = Annotated[list[Annotated[float, Field(ge=0, lt=1)]], Field(min_length=2, max_length=2)]
Precision = Literal["auto", "bf16", "fp32"]


class RecipeError(ValueError):
    """A fine-tuning recipe value is wrong; the message names the key and the value."""


def _list(*values: Any) -> Any:
    return dataclasses.field(default_factory=lambda: list(values))


@dataclass(frozen=True, config=_STRICT)
class ClassificationRecipe:
    """Table 11 (ImageNet-1K); iNaturalist-18 (Table 12) changes base_lr and weight_decay in the config."""

    img_size: Pos = 224
    window_size: Pos = 14
    epochs: Pos = 100
    warmup_epochs: NonNegFloat = 20
    layer_decay: PosFloat = 0.8
    global_batch: Pos = 2048
    micro_batch: Pos = 64  # per rank and forward pass; accumulation fills the global batch
    base_lr: PosFloat = 1.25e-3  # per 512 images: 5e-3 at 2048
    warmup_lr: NonNegFloat = 2.5e-7  # per 512 images
    min_lr: NonNegFloat = 2.5e-7  # per 512 images
    weight_decay: NonNegFloat = 0.05
    betas: Betas = _list(0.9, 0.999)
    eps: PosFloat = 1e-8
    clip_grad: Optional[NonNegFloat] = 5.0  # max grad norm; 0/None = no clipping
    drop_path: Prob = 0.2
    label_smoothing: Prob = 0.1
    crop_scale: Pair = _list(0.08, 1.0)
    crop_ratio: Pair = _list(0.75, 4 / 3)
    hflip: Prob = 0.5
    color_jitter: NonNegFloat = 0.4  # timm ignores it while RandAugment is on (as the reference)
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"  # null = no RandAugment
    reprob: Prob = 0.25
    remode: Literal["pixel", "rand", "const"] = "pixel"
    mixup: NonNegFloat = 0.8  # Mixup alpha (0 = off)
    cutmix: NonNegFloat = 1.0  # CutMix alpha (0 = off)
    mixup_switch_prob: Prob = 0.5
    mixup_prob: Prob = 1.0
    eval_resize_ratio: Annotated[float, Field(gt=0, le=1)] = 224 / 256  # eval: resize short side to img_size / ratio, centre crop
    num_workers: NonNeg = 8
    precision: Precision = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    fused_attention: bool = True  # SDPA window attention (mimlib.models.attention)
    compile: bool = False  # torch.compile the training forward
    log_every: Pos = 50  # updates between progress-bar refreshes (the log is per epoch)
    threads: Optional[Pos] = None  # torch CPU threads (None = torch's default)

    def problems(self) -> list[str]:
        out = []
        if self.warmup_epochs > self.epochs:
            out.append(f"warmup_epochs {self.warmup_epochs} is more than epochs {self.epochs}")
        if mixup_active(dataclasses.asdict(self)) and self.micro_batch % 2:
            out.append(f"Mixup/CutMix (mixup={self.mixup}, cutmix={self.cutmix}) needs an even micro_batch, got "
                       f"{self.micro_batch}; make micro_batch even or set mixup and cutmix to 0")
        for key in ("crop_scale", "crop_ratio"):
            lo, hi = getattr(self, key)
            if not 0 < lo <= hi:
                out.append(f"{key} {[lo, hi]} must be 0 < low <= high")
        return out


@dataclass(frozen=True, config=_STRICT)
class DetectionRecipe:
    """Table 13 (COCO, Mask R-CNN)."""

    img_size: Pos = 1024  # training crop (large-scale jitter) and the size the encoder's windows are set up for
    window_size: Pos = 14
    test_size: Annotated[list[Pos], Field(min_length=2, max_length=2)] = _list(800, 1333)  # short side, long-side cap
    epochs: Pos = 36
    warmup_iters: NonNeg = 500
    warmup_ratio: Annotated[float, Field(gt=0, le=1)] = 0.001  # warmup starts at lr * warmup_ratio (mmdetection's linear warmup)
    global_batch: Pos = 32
    micro_batch: Pos = 2
    lr: PosFloat = 8.0e-5  # absolute peak lr at this global_batch (not rescaled with it)
    weight_decay: NonNegFloat = 0.05
    betas: Betas = _list(0.9, 0.999)
    eps: PosFloat = 1.0e-8
    step_epochs: list[Pos] = _list(27, 33)
    step_ratio: PosFloat = 0.1
    drop_path: Prob = 0.1
    hflip: Prob = 0.5
    scale_jitter: Pair = _list(0.1, 2.0)
    layer_decay: PosFloat = 1.0  # Table 13 lists none
    clip_grad: Optional[NonNegFloat] = None
    # engine
    precision: Precision = "auto"  # bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile the training forward (the shared loop, mimlib.train.loop)
    num_workers: NonNeg = 4
    log_every: Pos = 50
    checkpoint_every: Pos = 1000
    threads: Optional[Pos] = None
    eval_batch: Pos = 2
    eval_backend: Literal["pycocotools", "faster_coco_eval"] = "pycocotools"
    fused_attention: bool = True
    grad_checkpointing: bool = False
    save_weights: bool = False  # also write out_dir/last.pt (model state dict)
    max_train_images: Optional[Pos] = None
    max_val_images: Optional[Pos] = None
    # detector (reference Mask R-CNN sizes)
    fpn_channels: Pos = 256
    representation_size: Pos = 1024
    mask_head_channels: Pos = 256
    mask_head_convs: Pos = 4
    # One size per FPN level: stages + 1 (P2-P6 for 4 stages); the model build checks the count.
    anchor_sizes: Annotated[list[Pos], Field(min_length=2)] = _list(32, 64, 128, 256, 512)
    rpn_batch_size_per_image: Pos = 256
    rpn_pre_nms_top_n_train: Pos = 2000
    rpn_post_nms_top_n_train: Pos = 1000
    rpn_pre_nms_top_n_test: Pos = 1000
    rpn_post_nms_top_n_test: Pos = 1000
    box_batch_size_per_image: Pos = 512
    box_detections_per_img: Pos = 100
    box_score_thresh: Prob = 0.05

    def problems(self) -> list[str]:
        out = []
        if self.test_size[0] > self.test_size[1]:
            out.append(f"test_size {self.test_size} must be [short side, long-side cap]")
        lo, hi = self.scale_jitter
        if not 0 < lo <= hi:
            out.append(f"scale_jitter {self.scale_jitter} must be 0 < low <= high")
        if self.step_epochs != sorted(self.step_epochs) or any(e > self.epochs for e in self.step_epochs):
            out.append(f"step_epochs {self.step_epochs} must be increasing, within 1..epochs={self.epochs}")
        if self.img_size % 32:
            out.append(f"img_size {self.img_size} is not a multiple of the stride 32")
        if self.checkpoint_every % self.log_every:
            out.append(f"checkpoint_every {self.checkpoint_every} is not a multiple of log_every {self.log_every}")
        return out


@dataclass(frozen=True, config=_STRICT)
class SegmentationRecipe:
    """Table 14 (ADE20K, UPerNet; mmseg's UPerNet-Swin ADE20K config at 640)."""

    num_classes: Annotated[int, Field(ge=1, le=255)] = 150  # ADE20K's 150 (labels 1..150, 0 = other -> ignored; 255 = ignore)
    # --- input (Table 14) ---
    img_size: Pos = 640
    window_size: Pos = 20
    scale: Annotated[list[Pos], Field(min_length=2, max_length=2)] = _list(2560, 640)  # base (long, short) of the training rescale (mmseg img_scale)
    ratio_range: Pair = _list(0.5, 2.0)  # scale jittering
    cat_max_ratio: Annotated[float, Field(gt=0, le=1)] = 0.75  # mmseg RandomCrop: re-draw crops dominated by one class
    hflip: Prob = 0.5
    photometric: bool = True  # mmseg PhotoMetricDistortion
    test_short_side: Pos = 640  # test size (2560, 640): short side 640, long side at most 2560
    test_long_side: Pos = 2560
    slide_crop: Pos = 640  # sliding-window size; must equal img_size (the model's input size)
    slide_stride: Pos = 426
    # --- optimisation (Table 14) ---
    iters: Pos = 80000
    warmup_iters: NonNeg = 750
    warmup_ratio: Annotated[float, Field(gt=0, le=1)] = 1.0e-6
    lr: PosFloat = 1.0e-4  # absolute at global batch 32; the paper searched [1e-4, 3e-4]
    min_lr: NonNegFloat = 0.0
    lr_power: PosFloat = 1.0  # poly power 1.0 = linear
    layer_decay: PosFloat = 0.95  # S/B; 0.9 for L (config per_model)
    weight_decay: NonNegFloat = 0.05
    betas: Betas = _list(0.9, 0.999)
    eps: PosFloat = 1.0e-8
    clip_grad: Optional[NonNegFloat] = None  # mmseg's Swin configs do not clip
    global_batch: Pos = 32
    micro_batch: Pos = 4
    drop_path: Prob = 0.1
    # --- UPerNet (mmseg UPerHead + FCNHead) ---
    channels: Pos = 512
    aux_channels: NonNeg = 256
    aux_weight: NonNegFloat = 0.4
    dropout: Prob = 0.1
    sync_bn: bool = True  # SyncBatchNorm in the heads under DDP on GPUs (mmseg); no effect in one process or on CPU
    # --- engineering ---
    fused_attention: bool = True  # window attention through SDPA (mimlib.models.attention)
    precision: Precision = "auto"  # bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile the training forward (the shared loop, mimlib.train.loop)
    num_workers: NonNeg = 4
    log_every: Pos = 50  # iterations
    eval_every: Optional[NonNeg] = 8000  # iterations between validation runs; 0/None = only the final one
    checkpoint_every: Optional[NonNeg] = 1000  # rolling resume state, iterations; 0/None = only on SIGTERM
    max_val_images: Optional[Pos] = None  # first N validation images (sorted); None = all 2000
    max_train_images: Optional[Pos] = None  # first N training images (sorted); None = all 20210
    save_weights: bool = False  # also write out_dir/last.pt (model weights) at the end
    threads: Optional[Pos] = None  # torch.set_num_threads; None leaves torch's default

    def problems(self) -> list[str]:
        out = []
        crop, window = self.img_size, self.window_size
        if crop % 32:
            out.append(f"img_size {crop} is not a multiple of 32 (patch 4, four stages)")
        else:
            for i in range(4):
                res = crop // 4 // 2**i
                if res % min(window, res):
                    out.append(f"window_size {window} does not tile stage {i} ({res}x{res} tokens) of a {crop} crop")
                    break
        if self.slide_crop != crop:
            out.append(f"slide_crop {self.slide_crop} must equal img_size {crop} (the model's fixed input size)")
        if self.slide_stride > crop:
            out.append(f"slide_stride {self.slide_stride} must be in (0, img_size]")
        lo, hi = self.ratio_range
        if not 0 < lo <= hi:
            out.append(f"ratio_range {self.ratio_range} must satisfy 0 < low <= high")
        if self.aux_weight and not self.aux_channels:
            out.append("aux_weight > 0 needs aux_channels")
        return out


def _defaults(cls: type) -> dict[str, Any]:
    return dataclasses.asdict(cls())


#: the defaults as plain dicts (what the config and the engines complete a recipe over)
CLASSIFICATION: dict[str, Any] = _defaults(ClassificationRecipe)
DETECTION: dict[str, Any] = _defaults(DetectionRecipe)
SEGMENTATION: dict[str, Any] = _defaults(SegmentationRecipe)


# ------------------------------------------------------------------ checks
def mixup_active(r: Mapping[str, Any]) -> bool:
    return (r["mixup"] > 0 or r["cutmix"] > 0) and r["mixup_prob"] > 0


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def check(cls: type, recipe: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``recipe`` completed over ``cls``'s defaults, every value and combination checked."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise RecipeError(f"unknown {what} recipe key(s) {unknown}; known: {sorted(known)}")
    try:
        typed = cls(**recipe)
    except ValidationError as exc:
        bad = [f"{'.'.join(str(p) for p in e['loc'])} = {_show(e['input'])}: {e['msg']}" for e in exc.errors()]
        raise RecipeError(f"invalid {what} recipe: " + "; ".join(bad)) from None
    problems = typed.problems()
    if typed.global_batch % typed.micro_batch:  # the world size is checked when the job starts
        problems.insert(0, f"global_batch {typed.global_batch} is not a multiple of micro_batch {typed.micro_batch}")
    if problems:
        raise RecipeError(f"invalid {what} recipe: " + "; ".join(problems))
    return {**_defaults(cls), **recipe}


def check_classification(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """IN-1K / iNat-18 (Tables 11-12)."""
    return check(ClassificationRecipe, recipe, "classification")


def check_detection(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """COCO Mask R-CNN (Table 13)."""
    return check(DetectionRecipe, recipe, "coco")


def check_segmentation(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """ADE20K UPerNet (Table 14)."""
    return check(SegmentationRecipe, recipe, "ade20k")


#: default recipe name (mimlib.finetune.TASKS[...].recipe) -> its check
CHECKS: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "CLASSIFICATION": check_classification, "DETECTION": check_detection, "SEGMENTATION": check_segmentation,
}
