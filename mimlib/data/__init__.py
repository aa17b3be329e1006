"""Data: folder index, subset manifests, robust decoding, demo-data generator.

Public names are re-exported lazily (PEP 562), so ``import mimlib.data`` loads neither
pandas nor torch; each submodule is imported on first use of one of its names.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    # index
    "scan_image_folder": "index",
    "write_index": "index",
    "read_index": "index",
    "build_index": "index",
    "read_label_map": "index",
    # manifests
    "fraction_subset": "manifests",
    "class_subset": "manifests",
    "whole_dataset": "manifests",
    "make_subset": "manifests",
    "write_manifest": "manifests",
    "read_manifest": "manifests",
    "build_manifest": "manifests",
    # decode
    "CorruptImageError": "decode",
    "UnreadableImageError": "decode",
    "load_rgb": "decode",
    "decode_rgb_tensor": "decode",
    "decode_for_crop": "decode",
    # demo
    "ClassificationDemoSpec": "demo",
    "write_classification_demo": "demo",
    "render_scene": "demo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
