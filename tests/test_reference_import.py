"""Import of checkpoints in the reference (microsoft/Swin-Transformer SimMIM) layout."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from mimlib.models import (
    CheckpointMismatchError,
    MaskGenerator,
    SimMIM,
    build_simmim,
    load_reference_checkpoint,
    to_reference_state_dict,
)

DEPTHS = (1, 1, 3, 1)  # swinv2_nano

# Hand-written from the reference's swin_transformer_v2.py (SwinTransformerBlock, WindowAttention,
# Mlp): the parameter keys of one block, here stage 2 block 2. Not derived from our mapping.
REF_BLOCK_2_2 = {
    "encoder.layers.2.blocks.2.norm1.weight",
    "encoder.layers.2.blocks.2.norm1.bias",
    "encoder.layers.2.blocks.2.attn.logit_scale",
    "encoder.layers.2.blocks.2.attn.q_bias",
    "encoder.layers.2.blocks.2.attn.v_bias",
    "encoder.layers.2.blocks.2.attn.cpb_mlp.0.weight",
    "encoder.layers.2.blocks.2.attn.cpb_mlp.0.bias",
    "encoder.layers.2.blocks.2.attn.cpb_mlp.2.weight",
    "encoder.layers.2.blocks.2.attn.qkv.weight",
    "encoder.layers.2.blocks.2.attn.proj.weight",
    "encoder.layers.2.blocks.2.attn.proj.bias",
    "encoder.layers.2.blocks.2.norm2.weight",
    "encoder.layers.2.blocks.2.norm2.bias",
    "encoder.layers.2.blocks.2.mlp.fc1.weight",
    "encoder.layers.2.blocks.2.mlp.fc1.bias",
    "encoder.layers.2.blocks.2.mlp.fc2.weight",
    "encoder.layers.2.blocks.2.mlp.fc2.bias",
}
REF_TOP = {
    "encoder.mask_token",
    "encoder.patch_embed.proj.weight",
    "encoder.patch_embed.proj.bias",
    "encoder.patch_embed.norm.weight",
    "encoder.patch_embed.norm.bias",
    "encoder.norm.weight",
    "encoder.norm.bias",
    "decoder.0.weight",
    "decoder.0.bias",
    # the reference downsamples at the END of stages 0, 1, 2
    "encoder.layers.0.downsample.reduction.weight",
    "encoder.layers.0.downsample.norm.weight",
    "encoder.layers.0.downsample.norm.bias",
    "encoder.layers.1.downsample.reduction.weight",
    "encoder.layers.1.downsample.norm.weight",
    "encoder.layers.1.downsample.norm.bias",
    "encoder.layers.2.downsample.reduction.weight",
    "encoder.layers.2.downsample.norm.weight",
    "encoder.layers.2.downsample.norm.bias",
}


def _ref_param_keys() -> set[str]:
    keys = set(REF_TOP)
    for i, d in enumerate(DEPTHS):
        for j in range(d):
            keys |= {k.replace("layers.2.blocks.2.", f"layers.{i}.blocks.{j}.") for k in REF_BLOCK_2_2}
    return keys


def _model(seed: int) -> SimMIM:
    torch.manual_seed(seed)
    # 128 px / window 4: stage 2 runs at 8x8 > 4, so its odd block is shifted and the
    # reference stores an attn_mask for it.
    return build_simmim("swinv2_nano", img_size=128, window_size=4, drop_path_rate=0.0).eval()


def _add_reference_buffers(sd: dict[str, torch.Tensor], model: SimMIM) -> None:
    # The reference keeps these as persistent buffers, under the block's own name.
    for i, stage in enumerate(model.encoder.layers):
        for j, blk in enumerate(stage.blocks):
            p = f"encoder.layers.{i}.blocks.{j}."
            sd[p + "attn.relative_coords_table"] = blk.attn.relative_coords_table.clone()
            sd[p + "attn.relative_position_index"] = blk.attn.relative_position_index.clone()
            if blk.attn_mask is not None:
                sd[p + "attn_mask"] = blk.attn_mask.clone()


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mg = MaskGenerator(128, 32, 4, 0.6)
    return torch.randn(2, 3, 128, 128, generator=g), torch.stack([mg(g) for _ in range(2)])


def test_export_uses_reference_names() -> None:
    sd = to_reference_state_dict(_model(0))
    assert set(sd) == _ref_param_keys()
    assert {k for k in sd if k.startswith("encoder.layers.2.blocks.2.")} == REF_BLOCK_2_2
    assert sd["encoder.mask_token"].shape == (1, 1, 32)
    assert sd["encoder.layers.2.blocks.2.attn.logit_scale"].shape == (8, 1, 1)  # stage 2 heads
    # stage-0 downsample maps 4*32 -> 64 channels
    assert sd["encoder.layers.0.downsample.reduction.weight"].shape == (64, 128)


def test_round_trip_gives_identical_loss(tmp_path: Path, batch) -> None:
    x, mask = batch
    src, dst = _model(0), _model(1)
    sd = to_reference_state_dict(src)
    _add_reference_buffers(sd, src)
    assert "encoder.layers.2.blocks.1.attn_mask" in sd
    path = tmp_path / "ckpt_epoch_3.pth"
    torch.save({"model": sd, "epoch": 3}, path)
    with torch.no_grad():
        want = src(x, mask)
        assert dst(x, mask) != want
        report = load_reference_checkpoint(path, dst)
        got = dst(x, mask)
    assert got == want
    assert report["missing"] == report["unexpected"] == report["mismatched"] == []
    assert "encoder.layers.2.blocks.1.attn_mask" in report["dropped_buffers"]
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k


def test_missing_block_key_is_named(batch) -> None:
    src, dst = _model(0), _model(1)
    sd = to_reference_state_dict(src)
    _add_reference_buffers(sd, src)
    del sd["encoder.layers.2.blocks.1.attn.q_bias"]
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match=r"encoder\.layers\.2\.blocks\.1\.attn\.q_bias"):
        load_reference_checkpoint({"model": sd}, dst)
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in before.items())  # nothing loaded
    report = load_reference_checkpoint({"model": sd}, dst, strict=False)
    assert report["missing"] == ["encoder.layers.2.blocks.1.attn.q_bias"]


def test_downsample_and_unexpected_keys_are_named() -> None:
    src = _model(0)
    sd = to_reference_state_dict(src)
    del sd["encoder.layers.1.downsample.norm.bias"]
    sd["encoder.absolute_pos_embed"] = torch.zeros(1, 1024, 32)
    with pytest.raises(CheckpointMismatchError) as e:
        load_reference_checkpoint(sd, _model(1))
    msg = str(e.value)
    assert "encoder.layers.1.downsample.norm.bias" in msg  # reported in reference naming
    assert "encoder.absolute_pos_embed" in msg


def test_wrong_size_is_a_shape_error() -> None:
    sd = to_reference_state_dict(_model(0))
    torch.manual_seed(0)
    pico = build_simmim("swinv2_pico", img_size=128, window_size=4)
    with pytest.raises(CheckpointMismatchError, match="shape|mask_token"):
        load_reference_checkpoint(sd, pico)


def test_pickled_config_needs_trust(tmp_path: Path) -> None:
    src = _model(0)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": to_reference_state_dict(src), "config": argparse.Namespace(a=1)}, path)
    with pytest.raises(CheckpointMismatchError, match="trust_pickle"):
        load_reference_checkpoint(path, _model(1))
    load_reference_checkpoint(path, _model(1), trust_pickle=True)


def test_patch_merging_order_matches_reference() -> None:
    # Reference PatchMerging: cat of x[0::2,0::2], x[1::2,0::2], x[0::2,1::2], x[1::2,1::2]
    # (rows, cols), then Linear(4C -> 2C, no bias), then LayerNorm(2C).
    model = _model(0)
    ds = model.encoder.layers[1].downsample
    x = torch.randn(2, 8, 8, 32)
    cat = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    with torch.no_grad():
        torch.testing.assert_close(ds(x), ds.norm(ds.reduction(cat)))
