"""SwinV2 size registry: Table 1 parameter counts, errors, demo sizes."""

from __future__ import annotations

import pytest
import torch

from mimlib.models import (
    MODELS,
    SwinV2Spec,
    backbone_param_count,
    build_decoder,
    build_encoder,
    build_simmim,
    encoder_state_dict,
    register_model,
)

# Table 1 sizes; counts are the bare backbone (reference.md), rounded to 0.01M.
TABLE1 = {
    "swinv2_s": (96, (3, 6, 12, 24), 48.96),
    "swinv2_b": (128, (4, 8, 16, 32), 86.89),
    "swinv2_l": (192, (6, 12, 24, 48), 195.20),
    "swinv2_h": (352, (11, 22, 44, 88), 655.21),
    "swinv2_g": (448, (14, 28, 56, 112), 1060.98),
}


@pytest.mark.parametrize("name", sorted(TABLE1))
def test_table1_specs_and_param_counts(name: str) -> None:
    embed, heads, params_m = TABLE1[name]
    spec = MODELS[name]
    assert (spec.embed_dim, spec.depths, spec.num_heads) == (embed, (2, 2, 18, 2), heads)
    with torch.device("meta"):  # SwinV2-g would otherwise allocate ~4 GB
        enc = build_encoder(name, img_size=192, window_size=12)
    n = backbone_param_count(enc)
    assert round(n / 1e6, 2) == params_m
    assert round(n / 1e6) == spec.paper_params_m  # Table 1 prints whole millions
    assert enc.num_classes == 0


def test_backbone_count_excludes_mask_token_and_decoder() -> None:
    with torch.device("meta"):
        model = build_simmim("swinv2_b")
    assert round(backbone_param_count(model) / 1e6, 2) == 86.89


@pytest.mark.parametrize("decoder,total_m", [("linear", 90.0), ("blocks4", 140.4), ("blocks8", 190.8)])
def test_table8_decoder_param_counts(decoder: str, total_m: float) -> None:
    # Table 8: SwinV2-B + decoder (+ mask token), in millions to one decimal.
    with torch.device("meta"):
        model = build_simmim("swinv2_b", decoder=decoder)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == total_m


def test_linear_decoder_keys_match_reference() -> None:
    dec = build_decoder("linear", in_chans=64, encoder_stride=32)
    assert set(dec.state_dict()) == {"0.weight", "0.bias"}
    assert dec(torch.zeros(1, 64, 2, 3)).shape == (1, 3, 64, 96)


def test_unknown_names_list_known_ones() -> None:
    with pytest.raises(KeyError, match="swinv2_b.*swinv2_pico"):
        build_encoder("swinv2_xxl")
    with pytest.raises(KeyError, match="linear"):
        build_decoder("nope", 64, 32)


def test_register_model() -> None:
    spec = SwinV2Spec("test_tiny_reg", 16, (1, 1, 1, 1), (1, 2, 2, 4))
    register_model(spec)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_model(SwinV2Spec("test_tiny_reg", 32, (1, 1, 1, 1), (1, 2, 2, 4)))
        enc = build_encoder("test_tiny_reg", img_size=64, window_size=4)
        assert enc.num_features == 128
    finally:
        MODELS.pop("test_tiny_reg")
    with pytest.raises(ValueError, match="not divisible"):
        SwinV2Spec("bad", 24, (1, 1, 1, 1), (5, 2, 4, 8))


def test_window_clipping_192_w12() -> None:
    # reference.md: (window, shift) per stage at 192/w12 = (12,6),(12,6),(12,0),(6,0).
    with torch.device("meta"):
        enc = build_encoder("swinv2_s", img_size=192, window_size=12)
    got = [(st.blocks[1].window_size[0], st.blocks[1].shift_size[0]) for st in enc.layers]
    assert got == [(12, 6), (12, 6), (12, 0), (6, 0)]


@pytest.mark.parametrize("name,stride", [("swinv2_pico", 32), ("swinv2_nano", 32), ("swinv2_pico3", 16), ("swinv2_nano3", 16)])
def test_demo_sizes_forward(name: str, stride: int) -> None:
    torch.manual_seed(0)
    model = build_simmim(name, img_size=128, window_size=8)
    assert model.encoder_stride == stride
    x = torch.randn(2, 3, 128, 128)
    mask = torch.zeros(2, 32, 32, dtype=torch.uint8)
    mask[:, :16] = 1
    feats = model.forward_features(x, mask)
    assert feats.shape == (2, MODELS[name].num_features, 128 // stride, 128 // stride)
    loss = model(x, mask)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()


def test_encoder_state_dict_loads_at_other_resolution() -> None:
    # timm's position tables are non-persistent: 128/w8 weights load strictly at 160/w10.
    model = build_simmim("swinv2_pico", img_size=128, window_size=8)
    sd = encoder_state_dict(model)
    assert not any(k.startswith(("mask_token", "decoder", "encoder.")) for k in sd)
    enc = build_encoder("swinv2_pico", img_size=160, window_size=10, pretrained_window_sizes=(8, 8, 8, 4))
    enc.load_state_dict(sd, strict=True)


def test_img_size_must_match_stride() -> None:
    with pytest.raises(ValueError, match="stride 32"):
        build_simmim("swinv2_pico", img_size=100, window_size=5)
    with pytest.raises(ValueError, match="stride 16"):
        build_simmim("swinv2_pico3", img_size=88, window_size=11)


def test_encoder_without_pretraining_windows_fits_any_stage_count() -> None:
    # One 0 per stage by default; an explicit tuple must have one entry per stage.
    enc = build_encoder("swinv2_pico3", img_size=96, window_size=6)
    assert len(enc.layers) == 3 and enc.num_features == MODELS["swinv2_pico3"].num_features
    with pytest.raises(ValueError, match="needs 3 entries"):
        build_encoder("swinv2_pico3", img_size=96, window_size=6, pretrained_window_sizes=(0, 0, 0, 0))
