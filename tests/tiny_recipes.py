"""The smallest fine-tuning recipes that run a whole engine on CPU in seconds, shared by the
engine tests and the tracking tests (one copy, so a recipe change reaches both)."""

# COCO: crop 64, window 4, tiny heads.
COCO_TINY = {
    "img_size": 64, "window_size": 4, "test_size": [64, 96], "epochs": 1, "warmup_iters": 2,
    "global_batch": 4, "micro_batch": 2, "lr": 1e-4, "step_epochs": [1], "num_workers": 0,
    "log_every": 1, "checkpoint_every": 1, "threads": 1, "eval_batch": 4, "fpn_channels": 16,
    "representation_size": 32, "mask_head_channels": 16, "mask_head_convs": 1,
    "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 20, "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 20, "rpn_batch_size_per_image": 32, "box_batch_size_per_image": 16,
    "box_detections_per_img": 10, "anchor_sizes": [8, 16, 32, 64, 128],
}

# ADE20K: 4 classes, 128-px crops, 2 iterations, no evaluation mid-run.
ADE_TINY = dict(
    num_classes=4, img_size=128, window_size=8, scale=[256, 128], slide_crop=128, slide_stride=96,
    test_short_side=128, test_long_side=256, iters=2, warmup_iters=1, lr=1e-3, layer_decay=0.9,
    global_batch=2, micro_batch=2, channels=32, aux_channels=32, num_workers=0, log_every=1,
    eval_every=0, checkpoint_every=0, threads=None,
)
