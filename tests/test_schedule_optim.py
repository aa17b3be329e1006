from __future__ import annotations

import pytest

from mimlib.train.optim import no_decay_names, param_groups
from mimlib.train.schedule import scaled_lr, step_lr

# Table 10: batch 2048, lr 4e-4 (1e-4 per 512), 6250 warmup, x0.1 at 7/8 of the length.
BASE = scaled_lr(1e-4, 2048)
WARM = scaled_lr(5e-7, 2048)


def lr(k: int, length: int | None) -> float:
    return step_lr(k, BASE, 6250, WARM, None if length is None else length * 7 // 8, 0.1)


def test_scaling() -> None:
    assert BASE == pytest.approx(4e-4)


@pytest.mark.parametrize(
    "length, decay_at", [(125_000, 109_375), (250_000, 218_750), (500_000, 437_500)]
)
def test_paper_key_iterations(length: int, decay_at: int) -> None:
    assert lr(0, length) == pytest.approx(WARM)
    assert lr(3125, length) == pytest.approx((WARM + BASE) / 2)
    assert lr(6249, length) < BASE
    assert lr(6250, length) == pytest.approx(BASE)
    assert lr(decay_at - 1, length) == pytest.approx(BASE)
    assert lr(decay_at, length) == pytest.approx(BASE * 0.1)
    assert lr(length - 1, length) == pytest.approx(BASE * 0.1)


def test_trunk_equals_run_until_decay() -> None:
    for k in (0, 100, 6250, 109_374, 218_749, 437_499):
        assert lr(k, None) == lr(k, 500_000)
    assert lr(437_500, None) == BASE


def test_no_decay_set() -> None:
    from mimlib.models.simmim import build_simmim

    model = build_simmim("swinv2_pico", img_size=64, window_size=4, drop_path_rate=0.1)
    names = set(no_decay_names(model))
    decayed = {n for n, _ in model.named_parameters()} - names
    # the reference's list, matched anywhere in the name (its prefix match misses cpb_mlp/logit_scale)
    for n, p in model.named_parameters():
        if any(k in n for k in ("cpb_mlp", "logit_scale", "mask_token", "relative_position_bias_table")):
            assert n in names, n
        if p.ndim == 1 or n.endswith(".bias"):
            assert n in names, n
    assert any("cpb_mlp.0.weight" in n for n in names)  # 2-D, decayed by the reference's bug
    assert any(n.endswith("logit_scale") for n in names)
    assert any(n.endswith("qkv.weight") for n in decayed)
    assert any(n.endswith("mlp.fc1.weight") for n in decayed)
    assert any(n.startswith("decoder.") and n.endswith("weight") for n in decayed)
    groups = param_groups(model, 0.05)
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_the_decay_rule_has_one_owner() -> None:
    from mimlib.train.schedule import branch_iters, decay_at, length_problem, trunk_points

    assert [decay_at(n) for n in (125_000, 250_000, 500_000)] == [109_375, 218_750, 437_500]
    assert branch_iters(125_000) == 15_625 and decay_at(96) + branch_iters(96) == 96
    assert trunk_points([384, 96, 192, 96]) == [84, 168, 336]
    assert length_problem(96) is None
    assert "100 is not divisible by 8" in length_problem(100)


@pytest.mark.parametrize("total, warmup", [(50, 10), (7, 0), (1, 1), (200, 13), (3, 3)])
def test_cosine_lr_is_timms_cosine_scheduler_bit_for_bit(total: int, warmup: int) -> None:
    """The classification schedule without a scheduler object equals timm's, stepped per update."""
    import torch
    from timm.scheduler import CosineLRScheduler

    from mimlib.train.schedule import cosine_lr

    base, warm, low = 2.5e-3, 5e-7, 1e-6
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)  # the oracle needs one
    timm_sched = CosineLRScheduler(opt, t_initial=max(total - warmup, 1), lr_min=low, warmup_t=warmup,
                                   warmup_lr_init=warm, warmup_prefix=True, cycle_limit=1, t_in_epochs=False)
    for k in range(total + 2):
        timm_sched.step_update(k)
        assert cosine_lr(k, base, total, warmup, warm, low) == opt.param_groups[0]["lr"], k


def test_set_lr_scales_each_group() -> None:
    import torch

    from mimlib.train.schedule import set_lr

    a, b = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    opt = torch.optim.AdamW([{"params": [a], "lr_scale": 0.25}, {"params": [b]}], lr=0.0)
    set_lr(opt, 4e-3)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 4e-3]
