"""Robust decoding: odd-but-valid files decode to RGB, broken ones raise CorruptImageError."""

from __future__ import annotations

import io
import math
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from mimlib.data.decode import (
    CorruptImageError,
    _jpeg_size,
    decode_for_crop,
    decode_rgb_tensor,
    draft_factor,
    load_rgb,
)

# torchvision 0.29 warns that its codecs are deprecated; decode.py silences that one message
# globally, but pytest resets filters per test.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

W, H = 96, 64  # non-square so a swapped width/height shows


def _smooth_rgb(w: int = W, h: int = H) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1).astype(np.uint8)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("decode")
    rgb = Image.fromarray(_smooth_rgb())
    out: dict[str, Path] = {}

    def save(name: str, img: Image.Image, fmt: str, **kw: object) -> None:
        out[name] = d / name
        img.save(out[name], fmt, **kw)

    save("rgb.JPEG", rgb, "JPEG", quality=95)
    save("cmyk.JPEG", rgb.convert("CMYK"), "JPEG", quality=95)
    save("gray.JPEG", rgb.convert("L"), "JPEG", quality=95)
    save("progressive.jpg", rgb, "JPEG", quality=95, progressive=True)
    save("rgba.png", rgb.convert("RGBA"), "PNG")
    save("la.png", rgb.convert("LA"), "PNG")
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    save("palette_transparent.png", pal, "PNG", transparency=0)
    save("png_named.JPEG", rgb, "PNG")  # ImageNet has these
    save("gray16.png", Image.fromarray((_smooth_rgb()[..., 0].astype(np.uint16) * 257)), "PNG")
    save("one_bit.png", rgb.convert("1"), "PNG")
    save("jpeg_named.png", rgb, "JPEG", quality=95)  # the other way round
    save("big.JPEG", Image.fromarray(_smooth_rgb(1200, 900)), "JPEG", quality=90)
    save("big_cmyk.JPEG", Image.fromarray(_smooth_rgb(1200, 900)).convert("CMYK"), "JPEG", quality=90)
    save("big_gray.JPEG", Image.fromarray(_smooth_rgb(1200, 900)).convert("L"), "JPEG", quality=90)

    noisy = np.random.default_rng(1).integers(0, 256, (H, W, 4), dtype=np.uint8)
    save("noisy.png", Image.fromarray(noisy, "RGBA"), "PNG")  # big enough to cut in half

    good = out["rgb.JPEG"].read_bytes()
    for name, data in {
        "truncated_half.JPEG": good[: len(good) // 2],
        "truncated_eoi.JPEG": good[:-2],
        "header_only.JPEG": good[:200],
        "garbage.JPEG": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "jpeg_magic_garbage.JPEG": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8,
        "empty.JPEG": b"",
        "truncated.png": out["noisy.png"].read_bytes()[: out["noisy.png"].stat().st_size // 2],
    }.items():
        out[name] = d / name
        out[name].write_bytes(data)
    return out


GOOD = [
    "rgb.JPEG", "cmyk.JPEG", "gray.JPEG", "progressive.jpg", "rgba.png", "la.png",
    "palette_transparent.png", "png_named.JPEG", "gray16.png", "one_bit.png", "jpeg_named.png",
]
BAD = [
    "truncated_half.JPEG", "truncated_eoi.JPEG", "header_only.JPEG", "garbage.JPEG",
    "jpeg_magic_garbage.JPEG", "empty.JPEG", "truncated.png",
]


@pytest.mark.parametrize("name", GOOD)
def test_load_rgb_gives_rgb_of_right_size(files: dict[str, Path], name: str) -> None:
    img = load_rgb(files[name])
    assert img.mode == "RGB"
    assert img.size == (W, H)
    arr = np.asarray(img).astype(int)
    assert arr.std() > 10  # not a blank/grey fill


@pytest.mark.parametrize("name", ["cmyk.JPEG", "rgba.png", "png_named.JPEG", "palette_transparent.png"])
def test_colour_is_preserved(files: dict[str, Path], name: str) -> None:
    err = np.abs(np.asarray(load_rgb(files[name])).astype(int) - _smooth_rgb().astype(int)).mean()
    limit = 25 if name.startswith("palette") else 6  # a 16-colour palette is lossy
    assert err < limit, err


def test_gray16_is_rescaled_not_clipped(files: dict[str, Path]) -> None:
    arr = np.asarray(load_rgb(files["gray16.png"])).astype(int)
    assert np.abs(arr[..., 0] - _smooth_rgb()[..., 0]).max() <= 1
    assert (arr[..., 0] == arr[..., 2]).all()


@pytest.mark.parametrize("name", GOOD)
def test_tensor_decode_matches_pillow(files: dict[str, Path], name: str) -> None:
    t = decode_rgb_tensor(files[name])
    assert t.dtype == torch.uint8 and t.shape == (3, H, W)
    ref = torch.from_numpy(np.array(load_rgb(files[name]))).permute(2, 0, 1)
    assert torch.equal(t, ref)
    t2 = decode_for_crop(files[name], 192)  # small images: no reduction
    assert torch.equal(t2, ref)


@pytest.mark.parametrize("name", BAD)
@pytest.mark.parametrize("fn", [load_rgb, decode_rgb_tensor, decode_for_crop])
def test_broken_files_raise_corrupt_image_error(files: dict[str, Path], name: str, fn: object) -> None:
    with pytest.raises(CorruptImageError) as info:
        fn(files[name])  # type: ignore[operator]
    assert info.value.path == str(files[name])
    assert str(files[name]) in str(info.value)
    assert info.value.reason


def test_corrupt_error_pickles(files: dict[str, Path]) -> None:
    # DataLoader workers send exceptions through pickle.
    err = CorruptImageError(files["garbage.JPEG"], "bad")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, CorruptImageError) and back.path == err.path and str(back) == str(err)


def test_missing_file_is_not_corruption(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_rgb(tmp_path / "nope.JPEG")


def test_truncation_flag_is_guarded(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # nothing imported so far flipped it
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        load_rgb(files["rgb.JPEG"])
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode_for_crop(files["rgb.JPEG"])


def test_draft_factor() -> None:
    assert draft_factor(500, 375, 192) == 1
    assert draft_factor(1200, 900, 192) == 2  # sqrt(1.08M * 0.5025) / 192 = 3.84
    assert draft_factor(4000, 3000, 192) == 8
    assert draft_factor(4000, 3000, 192, min_scale=0.08) == 4  # small crops need more pixels
    for w, h in [(600, 500), (1200, 900), (2400, 300), (4000, 3000)]:
        k = draft_factor(w, h, 192)
        # The smallest RandomResizedCrop window on the reduced image still has >= 192 px a side.
        assert math.sqrt(math.ceil(w / k) * math.ceil(h / k) * 0.67 * 0.75) >= 192


@pytest.mark.parametrize("name", ["big.JPEG", "big_cmyk.JPEG", "big_gray.JPEG"])
def test_decode_for_crop_reduces_big_jpegs_only(files: dict[str, Path], name: str) -> None:
    big = files[name]
    full = load_rgb(big)
    assert full.size == (1200, 900) and full.mode == "RGB"
    t = decode_for_crop(big, 192)
    assert t.dtype == torch.uint8 and tuple(t.shape) == (3, 450, 600)  # 1/2 scale
    small = np.asarray(full.resize((600, 450), Image.Resampling.BOX)).astype(int)
    assert np.abs(t.permute(1, 2, 0).numpy().astype(int) - small).mean() < 3  # same picture
    assert load_rgb(big, crop_size=192).size == (600, 450)
    assert tuple(decode_rgb_tensor(big).shape) == (3, 900, 1200)  # no crop_size: full size
    assert tuple(decode_for_crop(big, 448).shape) == (3, 900, 1200)  # a large crop: no reduction


def test_tensor_path_falls_back_to_pillow(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # A torchvision without its (deprecated) codecs must not break decoding.
    import mimlib.data.decode as decode

    expected = {n: decode_rgb_tensor(files[n]) for n in ("rgb.JPEG", "cmyk.JPEG", "png_named.JPEG")}
    monkeypatch.setattr(decode, "_torchvision_decode_jpeg", lambda: None)
    for name, ref in expected.items():
        assert torch.equal(decode.decode_for_crop(files[name]), ref)
    with pytest.raises(CorruptImageError):
        decode.decode_for_crop(files["truncated_half.JPEG"])


def test_jpeg_size_reads_sof(files: dict[str, Path]) -> None:
    img = Image.fromarray(_smooth_rgb(77, 123))
    exif = img.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", progressive=True, exif=exif, icc_profile=b"x" * 5000)
    assert _jpeg_size(buf.getvalue()) == (77, 123)
    assert _jpeg_size(files["big.JPEG"].read_bytes()) == (1200, 900)
    assert _jpeg_size(files["header_only.JPEG"].read_bytes()[:4]) is None


def test_import_mimlib_data_stays_light() -> None:
    code = (
        "import sys, mimlib.data, mimlib.data.decode, mimlib.data.demo, mimlib.data.index, "
        "mimlib.data.manifests; from mimlib.data import load_rgb, read_manifest; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
