"""Encoder FLOPs (fvcore, multiply-add = 1) against the reference.md table."""

from __future__ import annotations

import pytest

from mimlib.models import encoder_gflops


@pytest.mark.parametrize(
    "name,img,window,ref",
    [("swinv2_s", 224, 14, 9.54), ("swinv2_b", 192, 12, 11.88)],
)
def test_encoder_gflops(name: str, img: int, window: int, ref: float) -> None:
    got = encoder_gflops(name, img, window)
    assert abs(got - ref) / ref < 0.03, got


def test_gflops_cached_and_scales() -> None:
    a = encoder_gflops("swinv2_pico", 128, 8)
    assert encoder_gflops.cache_info().currsize >= 1
    assert encoder_gflops("swinv2_pico", 128, 8) is a
    # nano is about twice pico's cost (demo sizes are picked that way)
    assert 1.6 < encoder_gflops("swinv2_nano", 128, 8) / a < 2.4
