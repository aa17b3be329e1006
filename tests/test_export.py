"""``mimscale export``: a cell's encoder for timm (safetensors + timm's config) and in the
reference SimMIM checkpoint layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models.swin_transformer_v2 import SwinTransformerV2

from mimlib.cli import main
from mimlib.models import (
    REFERENCE_BUFFERS,
    MaskGenerator,
    SimMIM,
    build_encoder,
    build_simmim,
    load_reference_checkpoint,
    to_reference_state_dict,
)
from mimlib.models.export import TIMM_NAMES, export_cell, export_reference
from mimlib.models.pretrained import build_finetune_encoder
from mimlib.train.pretrain import PretrainJob, _state


def _recipe(tiny_recipe: dict, img_size: int, window_size: int, **kw) -> dict:
    return {**tiny_recipe, "img_size": img_size, "window_size": window_size, **kw}


def _cell(tmp_path: Path, model_name: str, recipe: dict, seed: int = 0) -> tuple[Path, SimMIM]:
    """A cell checkpoint in pre-training's own format, with the parameters that timm's init
    sets to constants (biases, norms, logit scales) made random: equal values would hide a
    mis-mapped key. The weight matrices are random already."""
    torch.manual_seed(seed)
    model = build_simmim(model_name, img_size=recipe["img_size"], window_size=recipe["window_size"],
                         drop_path_rate=0.0, decoder=recipe["decoder"], loss=recipe["loss"],
                         norm_target_window=recipe["norm_target_window"]).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2 or name.endswith("logit_scale"):
                p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / "results" / "pretrain" / model_name / "in1k_10" / "96" / "checkpoint.pt"
    path.parent.mkdir(parents=True)
    job = PretrainJob(model=model_name, recipe=recipe, manifest=tmp_path / "m.parquet", end_iter=96,
                      out=path, resume_dir=tmp_path / "resume")
    torch.save(_state(model, None, 96, job), path)
    return path, model


def _features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval().forward_features(x)


@pytest.mark.parametrize(("model_name", "img", "win"), [("swinv2_pico3", 96, 6), ("swinv2_nano", 128, 4)])
def test_timm_export_of_an_unregistered_size_gives_the_same_features(tmp_path, tiny_recipe, model_name, img, win):
    ckpt, model = _cell(tmp_path, model_name, _recipe(tiny_recipe, img, win))
    out = export_cell(ckpt, tmp_path / "export", ("timm",))["timm"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] is None  # no timm name builds this size
    assert cfg["num_classes"] == 0 and cfg["pretrained_cfg"]["input_size"] == [3, img, img]
    assert cfg["mimscale"]["dataset"] == "in1k_10" and cfg["mimscale"]["iteration"] == 96
    # Only timm and the two files: the JSON kwargs build the class, the file loads strictly.
    timm_model = SwinTransformerV2(**cfg["model_args"])
    timm_model.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    x = torch.randn(2, 3, img, img, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_features(timm_model, x), _features(model.encoder, x), rtol=0, atol=0)


def test_timm_export_of_a_registered_size_loads_by_name_strictly(tmp_path, tiny_recipe):
    # Swin-S at 64 px / window 4 (stage maps 16/8/4/2): timm's name plus the size keywords.
    ckpt, model = _cell(tmp_path, "swinv2_s", _recipe(tiny_recipe, 64, 4))
    out = export_cell(ckpt, tmp_path / "export", ("timm",))["timm"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == TIMM_NAMES["swinv2_s"] == "swinv2_small_window8_256"
    assert cfg["model_args"]["window_size"] == 4 and cfg["model_args"]["img_size"] == [64, 64]
    assert cfg["pretrained_cfg"]["tag"] == "mimscale_in1k_10_96"
    file = out / "model.safetensors"
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    want = _features(model.encoder, x)
    by_name = timm.create_model(cfg["architecture"], pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(file), num_classes=0), **cfg["model_args"])
    torch.testing.assert_close(_features(by_name, x), want, rtol=0, atol=0)
    local = timm.create_model(f"local-dir:{out}", pretrained=True)
    torch.testing.assert_close(_features(local, x), want, rtol=0, atol=0)

    # The documented load is strict: a stray tensor in the file fails it.
    stray = load_file(file)
    stray["layers.0.extra"] = torch.zeros(1)
    save_file(stray, tmp_path / "stray.safetensors")
    with pytest.raises(RuntimeError, match="layers.0.extra"):
        timm.create_model(cfg["architecture"], pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "stray.safetensors"), num_classes=0),
                          **cfg["model_args"])


@pytest.mark.parametrize("model_name", sorted(TIMM_NAMES))
def test_timm_names_have_our_architecture_at_192_w12(model_name):
    # Every registered size, on the meta device (no weights allocated): same keys and shapes.
    with torch.device("meta"):
        ours = build_encoder(model_name, img_size=192, window_size=12).state_dict()
        theirs = timm.create_model(TIMM_NAMES[model_name], img_size=192, window_size=12, num_classes=0).state_dict()
    assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in ours.items()}


def _batch(img: int, mask_patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mg = MaskGenerator(img, mask_patch, 4, 0.6)
    return torch.randn(2, 3, img, img, generator=g), torch.stack([mg(g) for _ in range(2)])


def test_reference_export_round_trip_gives_the_same_loss(tmp_path, tiny_recipe):
    # 128 px / window 4: stage 2 (8x8) is shifted, so the export carries attention masks.
    recipe = _recipe(tiny_recipe, 128, 4, norm_target_window=47)
    ckpt, model = _cell(tmp_path, "swinv2_nano", recipe)
    path = export_cell(ckpt, tmp_path / "export", ("reference",))["reference"]
    saved = torch.load(path, map_location="cpu", weights_only=True)  # no pickled objects
    assert "encoder.mask_token" in saved["model"] and "encoder.layers.0.downsample.reduction.weight" in saved["model"]
    assert "encoder.layers.2.blocks.1.attn_mask" in saved["model"]
    assert saved["config"]["MODEL"]["SWINV2"]["EMBED_DIM"] == 32
    assert saved["config"]["DATA"]["IMG_SIZE"] == 128 and saved["config"]["MODEL"]["SWINV2"]["WINDOW_SIZE"] == 4
    # The reference's persistent buffers: the values timm computes for the trained model.
    want_buffers = to_reference_state_dict(model, include_buffers=True)
    buffers = [k for k in want_buffers if k.rsplit(".", 1)[-1] in REFERENCE_BUFFERS]
    assert len(buffers) == 2 * 6 + 1  # two tables in each of the 6 blocks, one mask (the shifted block)
    for k in buffers:
        assert torch.equal(saved["model"][k], want_buffers[k]), k
    x, mask = _batch(128, 32)
    torch.manual_seed(5)
    fresh = build_simmim("swinv2_nano", img_size=128, window_size=4, drop_path_rate=0.0).eval()
    with torch.no_grad():
        want = model(x, mask)
        assert fresh(x, mask) != want
        report = load_reference_checkpoint(path, fresh)
        got = fresh(x, mask)
    assert report["missing"] == report["unexpected"] == report["mismatched"] == []
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_reference_export_refuses_a_decoder_the_reference_lacks(tmp_path, tiny_recipe):
    torch.manual_seed(0)
    model = build_simmim("swinv2_pico", img_size=64, window_size=4, decoder="blocks4")
    with pytest.raises(ValueError, match="only the linear decoder.*blocks4"):
        export_reference(model, "swinv2_pico", tmp_path / "ref.pth", _recipe(tiny_recipe, 64, 4, decoder="blocks4"))
    assert not (tmp_path / "ref.pth").exists()


def test_finetuning_from_a_reference_export_uses_its_pretraining_windows(tmp_path, tiny_recipe):
    # A 96 px / window 6 export: the position bias must be normalised by (6, 6, 6), not by
    # the paper's 192 / 12 that a reference checkpoint without config implies.
    ckpt, model = _cell(tmp_path, "swinv2_pico3", _recipe(tiny_recipe, 96, 6))
    path = export_cell(ckpt, tmp_path / "export", ("reference",))["reference"]
    encoder, info = build_finetune_encoder("swinv2_pico3", path, img_size=96, window_size=6, drop_path_rate=0.0)
    assert (info["pretrain_img_size"], info["pretrain_window_size"]) == (96, 6)
    assert info["pretrained_window_sizes"] == (6, 6, 6)
    direct, _ = build_finetune_encoder("swinv2_pico3", ckpt, img_size=96, window_size=6, drop_path_rate=0.0)
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_features(encoder, x), _features(direct, x), rtol=0, atol=0)


def test_docs_finetuning_recipe_builds_the_encoder_mimscale_finetunes(tmp_path, tiny_recipe):
    # docs/export.md: the task's size + the exported pre-training windows, headless strict
    # load, then reset_classifier: the same encoder as mimscale's own fine-tuning start.
    ckpt, _ = _cell(tmp_path, "swinv2_pico3", _recipe(tiny_recipe, 96, 6))
    out = export_cell(ckpt, tmp_path / "export", ("timm",))["timm"]
    cfg = json.loads((out / "config.json").read_text())
    size = dict(img_size=128, window_size=8, pretrained_window_sizes=cfg["mimscale"]["finetune_pretrained_window_sizes"])
    model = SwinTransformerV2(**{**cfg["model_args"], **size}, drop_path_rate=0.2)
    model.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    model.reset_classifier(10)
    ours, info = build_finetune_encoder("swinv2_pico3", ckpt, img_size=128, window_size=8, drop_path_rate=0.2)
    assert tuple(size["pretrained_window_sizes"]) == info["pretrained_window_sizes"] == (6, 6, 6)
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(_features(model, x), _features(ours, x), rtol=0, atol=0)
    with torch.no_grad():
        assert model(x).shape == (2, 10)


def test_cli_export_writes_both_formats(tmp_path, tiny_recipe, capsys):
    ckpt, _ = _cell(tmp_path, "swinv2_pico3", _recipe(tiny_recipe, 96, 6))
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "e")]) == 0
    assert (tmp_path / "e" / "timm" / "model.safetensors").is_file()
    assert (tmp_path / "e" / "timm" / "config.json").is_file()
    assert (tmp_path / "e" / "reference" / "checkpoint.pth").is_file()
    assert "timm:" in capsys.readouterr().out


def test_cli_export_names_a_file_that_is_not_a_cell(tmp_path, capsys):
    bad = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, bad)
    assert main(["export", "--checkpoint", str(bad), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "not a mimscale pre-training checkpoint" in err
    assert main(["export", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "e")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    assert main(["export", "--checkpoint", str(text), "--out", str(tmp_path / "e")]) == 2
    assert f"cannot read {text}" in capsys.readouterr().err
    unknown = tmp_path / "unknown.pt"
    torch.save({"model": {}, "model_name": "swinv2_xxl", "recipe": {}}, unknown)
    assert main(["export", "--checkpoint", str(unknown), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert str(unknown) in err and "unknown model 'swinv2_xxl'" in err
    assert not (tmp_path / "e").exists()
