"""Robust image decoding for training.

Real folders hold odd files (ImageNet-1K: a few CMYK JPEGs and PNGs named ``.JPEG``), so the
format is taken from the file's content, never its extension, every mode is brought to RGB,
and an undecodable file raises :class:`CorruptImageError` naming it instead of yielding a
half-grey picture. A file that exists but cannot be read (no read permission, a symlink loop,
an I/O error) raises :class:`UnreadableImageError`, a ``CorruptImageError``, so every
consumer counts and reports it as it does a corrupt file (pre-training skips it within its
limit); only a missing file stays ``FileNotFoundError`` (an index older than its folder).
Truncated files must fail: Pillow's global ``ImageFile.LOAD_TRUNCATED_IMAGES`` has to stay
``False`` (we check it on every call, since any imported library could flip it).

Two entry points, both RGB:

* :func:`load_rgb` — a ``PIL.Image.Image``. With ``crop_size`` it lets libjpeg decode a large
  JPEG at 1/2, 1/4 or 1/8 scale (Pillow's ``draft``) when even the smallest
  RandomResizedCrop window would still have at least ``crop_size`` pixels a side, so the
  crop is never upsampled compared with a full decode.
* :func:`decode_rgb_tensor` / :func:`decode_for_crop` — a uint8 ``(3, H, W)`` tensor:
  ``torchvision.io.decode_jpeg`` for JPEGs, Pillow ``draft`` instead when the crop allows a
  DCT reduction, Pillow for everything else. ``decode_for_crop`` is the pre-training path
  (numbers behind the choice: ``benchmarks/bench_decode.py``). torch is imported only when
  these are called, so ``import mimlib.data`` stays light.
"""

from __future__ import annotations

import errno
import functools
import io
import math
import os
import struct
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile

if TYPE_CHECKING:  # keep torch out of the import path of mimlib.data
    import torch

__all__ = [
    "CorruptImageError",
    "UnreadableImageError",
    "decode_for_crop",
    "decode_rgb_tensor",
    "draft_factor",
    "load_rgb",
]

_JPEG_MAGIC = b"\xff\xd8\xff"
# What Pillow raises for bad data: OSError (incl. UnidentifiedImageError, "truncated"),
# SyntaxError (bad PNG chunks), EOFError, ValueError/struct.error/IndexError from header
# parsers, DecompressionBombError for absurd sizes (not corrupt, but equally unusable).
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    EOFError,
    ValueError,
    struct.error,
    IndexError,
    Image.DecompressionBombError,
)


class CorruptImageError(Exception):
    """An image file that cannot be decoded; ``.path`` names it and ``.reason`` says why."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"cannot decode image {self.path!r}: {reason}")

    def __reduce__(self) -> tuple[type[CorruptImageError], tuple[str, str]]:
        # DataLoader workers pickle exceptions; the default reduce would pass only the message.
        return (type(self), (self.path, self.reason))


class UnreadableImageError(CorruptImageError):
    """An image file that exists but cannot be read (permission, symlink loop, I/O error)."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(path, reason)
        self.args = (f"cannot read image {self.path!r}: {reason}",)  # the message str() shows


def _read_bytes(path: str | os.PathLike[str]) -> bytes:
    """The file's bytes; a missing file raises ``FileNotFoundError``, any other failure to open
    or read it :class:`UnreadableImageError`."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise
    except OSError as e:
        why = "a symlink loop" if e.errno == errno.ELOOP else type(e).__name__
        raise UnreadableImageError(path, f"{why}: {e.strerror or e}") from e


def _check_truncation_flag() -> None:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by some imported code): truncated "
            "images would decode silently as partly grey; set it back to False"
        )


def draft_factor(
    width: int, height: int, crop_size: int, min_scale: float = 0.67, min_ratio: float = 3 / 4
) -> int:
    """Largest JPEG DCT reduction (1, 2, 4 or 8) that keeps every RandomResizedCrop window >= crop_size.

    The smallest window RandomResizedCrop(scale=(min_scale, .), ratio=(min_ratio, 1/min_ratio))
    can draw has sides ``sqrt(area * min_scale * min_ratio)`` (short side); after a reduction
    by ``k`` that must still be at least ``crop_size``.
    """
    ratio = min(min_ratio, 1.0 / min_ratio)
    k_max = math.sqrt(width * height * min_scale * ratio) / crop_size
    for k in (8, 4, 2):
        if k <= k_max:
            return k
    return 1


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit/float greyscale: Pillow's convert would clip at 255, so rescale to 8 bit.
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max() if arr.size else 0.0
        if top > 255:
            arr = arr * (255.0 / (65535.0 if top <= 65535 else top))
        arr8 = np.clip(arr, 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(arr8[..., None], 3, axis=2), "RGB")
    if img.mode == "P" and "transparency" in img.info:
        # Going through RGBA avoids Pillow's palette-transparency warning.
        img = img.convert("RGBA")
    # Alpha is dropped (not composited), as torchvision's default ImageFolder loader does.
    return img.convert("RGB")


def load_rgb(
    path: str | os.PathLike[str],
    *,
    crop_size: int | None = None,
    min_scale: float = 0.67,
    min_ratio: float = 3 / 4,
) -> Image.Image:
    """Decode ``path`` by content into an RGB ``PIL.Image`` (fully loaded).

    With ``crop_size`` a JPEG may come back smaller than stored (1/2, 1/4, 1/8 scale, see
    :func:`draft_factor`); other formats always decode at full size. A missing file raises
    ``FileNotFoundError``; an unreadable one :class:`UnreadableImageError`; an undecodable one
    :class:`CorruptImageError`.
    """
    _check_truncation_flag()
    data = _read_bytes(path)
    return _pil_from_bytes(data, path, crop_size, min_scale, min_ratio)


def _pil_from_bytes(
    data: bytes,
    path: str | os.PathLike[str],
    crop_size: int | None,
    min_scale: float,
    min_ratio: float,
) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        if crop_size is not None and img.format == "JPEG":
            k = draft_factor(img.width, img.height, crop_size, min_scale, min_ratio)
            if k > 1:
                # draft picks the largest power-of-two reduction whose result is >= the size
                # asked for; asking for size // k makes that reduction exactly k.
                img.draft(img.mode, (max(1, img.width // k), max(1, img.height // k)))
        img.load()  # force the full decode here, inside the try
        rgb = _to_rgb(img)
    except _DECODE_ERRORS as e:
        raise CorruptImageError(path, f"{type(e).__name__}: {e}") from e
    if rgb.width < 1 or rgb.height < 1:
        raise CorruptImageError(path, f"empty image {rgb.size}")
    return rgb


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's SOF marker, or None; a few microseconds, no decode."""
    i, n = 2, len(data)
    while i + 9 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length
            i += 2
            continue
        seg_len = (data[i + 2] << 8) | data[i + 3]
        # SOF0..SOF15 except DHT (C4), JPG (C8), DAC (CC) carry the frame size.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h = (data[i + 5] << 8) | data[i + 6]
            w = (data[i + 7] << 8) | data[i + 8]
            return (w, h) if w and h else None
        i += 2 + seg_len
    return None


@functools.cache
def _torchvision_decode_jpeg() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``torchvision.io.decode_jpeg`` bound to RGB output, or None where torchvision lacks it.

    torchvision 0.29 deprecates its image codecs in favour of TorchCodec and warns on every
    call; the project pins torchvision <= 0.29.1 and this decoder measured fastest, so that
    one warning is silenced (matched by message, nothing else). A torchvision without the
    codecs sends every JPEG down the Pillow path instead.
    """
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None
    warnings.filterwarnings(
        "ignore",
        message=r"The image decoding and encoding capabilities of TorchVision are deprecated",
        category=DeprecationWarning,
    )

    def tv_decode(buf: torch.Tensor) -> torch.Tensor:
        return decode_jpeg(buf, mode=ImageReadMode.RGB)

    return tv_decode


def decode_rgb_tensor(
    path: str | os.PathLike[str],
    *,
    crop_size: int | None = None,
    min_scale: float = 0.67,
    min_ratio: float = 3 / 4,
) -> torch.Tensor:
    """Decode ``path`` (by content) to a uint8 ``(3, H, W)`` RGB tensor.

    JPEGs go through ``torchvision.io.decode_jpeg`` (libjpeg-turbo; CMYK and greyscale
    handled, pixels identical to Pillow's), except that with ``crop_size`` a JPEG large
    enough for :func:`draft_factor` to allow a 1/2..1/8 reduction is decoded by Pillow's
    ``draft`` instead (cheaper IDCT, smaller resize). Other formats, and JPEGs libjpeg
    rejects for a reason other than truncation, take :func:`load_rgb`'s Pillow path.
    Truncated or garbage files raise :class:`CorruptImageError`.

    The result may be a channels-last view (stride ``(1, 3W, 3)``), as ``decode_jpeg``'s is;
    torch's uint8 resize is fastest on that layout. Call ``.contiguous()`` if you need CHW
    memory.
    """
    import torch

    _check_truncation_flag()
    data = _read_bytes(path)
    if data[:3] == _JPEG_MAGIC:
        size = _jpeg_size(data) if crop_size is not None else None
        tv_decode = _torchvision_decode_jpeg()
        if tv_decode is not None and (
            size is None or draft_factor(*size, crop_size, min_scale, min_ratio) == 1  # type: ignore[arg-type]
        ):
            try:
                return tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            except RuntimeError as e:
                if "truncated" in str(e) or "incomplete" in str(e):
                    raise CorruptImageError(path, f"RuntimeError: {e}") from e
                # Other libjpeg complaints: let Pillow try before calling the file corrupt.
    img = _pil_from_bytes(data, path, crop_size, min_scale, min_ratio)
    # HWC bytes viewed as CHW: no extra copy, same layout decode_jpeg returns.
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def decode_for_crop(
    path: str | os.PathLike[str],
    crop_size: int = 192,
    min_scale: float = 0.67,
    min_ratio: float = 3 / 4,
) -> torch.Tensor:
    """The pre-training decode: uint8 ``(3, H, W)`` RGB tensor for RandomResizedCrop.

    Feed it to ``transforms.v2.RandomResizedCrop(crop_size, scale=(min_scale, 1),
    ratio=(min_ratio, 1/min_ratio), antialias=True)`` and the rest of the v2 tensor
    pipeline. Same as ``decode_rgb_tensor(path, crop_size=crop_size, ...)``; chosen by
    measurement (``benchmarks/bench_decode.py``): fastest of the paths tried at both
    ImageNet-like and large image sizes.
    """
    return decode_rgb_tensor(path, crop_size=crop_size, min_scale=min_scale, min_ratio=min_ratio)
