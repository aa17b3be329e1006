"""Pre-training subsets of an index ("manifests"), deterministic from a seed.

Three kinds, matching the paper's data axes:

* ``fraction`` — the same fraction of every class (IN-1K 10/20/50/100%). Each class's files
  (sorted by path) are ranked by a permutation drawn from a generator seeded with a stable
  hash of ``(seed, class_name)``; a subset is a prefix of that ranking. Hence for a fixed seed
  the subsets are nested (10% ⊂ 20% ⊂ 50% ⊂ 100%), and a class's choice does not depend on
  the other classes.
* ``classes`` — ``num_classes`` whole classes (ImageNet-100 style), also a prefix of a seeded
  permutation of the sorted class names, so 100 classes ⊂ 200 classes for a fixed seed.
* ``whole`` — every image (e.g. IN-22K).

Manifests keep the index's columns unchanged (``path, class_name, label``; labels are *not*
re-indexed for class subsets: pre-training ignores them, and keeping the original ids keeps a
manifest row comparable with its index row). Rows are sorted by ``(class_name, path)`` and
written with a fixed Parquet layout, so the same inputs give byte-identical files.

Seeds go through SHA-256, never Python's ``hash()``, which is salted per process.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mimlib.data.index import (
    ROOT_KEY,
    _check_columns,
    read_index,
    read_parquet_with_meta,
    write_parquet_with_meta,
)

__all__ = [
    "MANIFEST_KINDS",
    "build_manifest",
    "class_subset",
    "fraction_subset",
    "make_subset",
    "per_class_keep",
    "read_manifest",
    "stable_rng",
    "whole_dataset",
    "write_manifest",
]

MANIFEST_KINDS = ("fraction", "classes", "whole")
_META_PREFIX = "mimscale."


def stable_rng(*parts: object) -> np.random.Generator:
    """A numpy Generator seeded from SHA-256 of ``":".join(map(str, parts))`` (process-independent)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    _check_columns(df)
    # Stable mergesort on both keys so ties (should be none) cannot reorder between runs.
    return df.sort_values(["class_name", "path"], kind="mergesort").reset_index(drop=True)


def _class_bounds(df: pd.DataFrame) -> tuple[list[str], np.ndarray]:
    """Class names in order and the row offsets where each class starts (``df`` sorted)."""
    names = df["class_name"].to_numpy()
    if len(names) == 0:
        return [], np.zeros(1, dtype=np.int64)
    change = np.flatnonzero(names[1:] != names[:-1]) + 1
    starts = np.concatenate([[0], change, [len(names)]]).astype(np.int64)
    return [str(names[i]) for i in starts[:-1]], starts


def per_class_keep(fraction: float, n: int) -> int:
    """Images kept from a class of ``n``: ``max(1, round(fraction * n))``.

    Python's ``round`` rounds halves to even (``round(2.5) == 2``); at least one image per
    class is kept so no class vanishes from a small fraction.
    """
    return max(1, round(fraction * n))


def _check_fraction(fraction: float) -> float:
    # Written so NaN fails too (every comparison with NaN is False); bools are not fractions.
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating)):
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
    if not (0.0 < float(fraction) <= 1.0) or math.isnan(float(fraction)):
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    return float(fraction)


def fraction_subset(index_df: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """Keep ``max(1, round(fraction * n_c))`` images of every class ``c`` (nested across fractions)."""
    fraction = _check_fraction(fraction)
    df = _sorted(index_df)
    names, starts = _class_bounds(df)
    chosen: list[np.ndarray] = []
    for name, lo, hi in zip(names, starts[:-1], starts[1:]):
        n = int(hi - lo)
        keep = per_class_keep(fraction, n)
        # The permutation depends only on (seed, class, n), not on the fraction: prefixes nest.
        order = stable_rng(seed, name).permutation(n)
        chosen.append(lo + np.sort(order[:keep]))
    rows = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
    # Rows are class-major and sorted within class, so the result stays (class_name, path)-sorted.
    return df.iloc[rows].reset_index(drop=True)


def class_subset(index_df: pd.DataFrame, num_classes: int, seed: int) -> pd.DataFrame:
    """All images of ``num_classes`` classes drawn by a seeded permutation of the sorted class names.

    The original ``label`` column is kept (not re-indexed); nothing is added.
    """
    df = _sorted(index_df)
    names, _ = _class_bounds(df)
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise ValueError(f"num_classes must be an integer, got {num_classes!r}")
    if not 1 <= num_classes <= len(names):
        raise ValueError(
            f"num_classes must be in [1, {len(names)}] (classes in the index), got {num_classes}"
        )
    order = stable_rng(seed, "class_subset").permutation(len(names))
    keep = {names[i] for i in order[:num_classes]}
    return df[df["class_name"].isin(keep)].reset_index(drop=True)


def whole_dataset(index_df: pd.DataFrame) -> pd.DataFrame:
    """Every image of the index, in canonical ``(class_name, path)`` order."""
    return _sorted(index_df)


def make_subset(
    index_df: pd.DataFrame,
    kind: str,
    seed: int = 0,
    fraction: float | None = None,
    num_classes: int | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Dispatch on ``kind`` (``fraction``/``classes``/``whole``); return the subset and its metadata."""
    if kind == "fraction":
        if fraction is None:
            raise ValueError("kind 'fraction' needs a fraction")
        return fraction_subset(index_df, fraction, seed), {
            "kind": kind, "seed": seed, "fraction": float(fraction)
        }
    if kind == "classes":
        if num_classes is None:
            raise ValueError("kind 'classes' needs num_classes")
        return class_subset(index_df, num_classes, seed), {
            "kind": kind, "seed": seed, "num_classes": int(num_classes)
        }
    if kind == "whole":
        return whole_dataset(index_df), {"kind": kind}
    raise ValueError(f"unknown manifest kind {kind!r}; expected one of {MANIFEST_KINDS}")


def write_manifest(
    df: pd.DataFrame,
    out: str | os.PathLike[str],
    root: str | os.PathLike[str],
    meta: Mapping[str, Any],
) -> None:
    """Write a manifest atomically. ``meta`` values are JSON-encoded under ``mimscale.<key>``.

    ``mimscale.root`` (absolute, plain string as in the index) and ``mimscale.num_images`` are
    added; ``meta`` may not override them.
    """
    clash = {"root", "num_images"} & set(meta)
    if clash:
        raise ValueError(f"manifest meta may not set reserved keys {sorted(clash)}")
    encoded = {
        _META_PREFIX + k: json.dumps(v, sort_keys=True) for k, v in sorted(meta.items())
    }
    encoded[ROOT_KEY] = str(Path(root).absolute())
    encoded[_META_PREFIX + "num_images"] = json.dumps(len(df))
    write_parquet_with_meta(_sorted(df)[["path", "class_name", "label"]], out, encoded)


def read_manifest(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, Path, dict[str, Any]]:
    """Read a manifest; return ``(df, root, meta)`` with ``meta`` keys unprefixed and JSON-decoded."""
    df, raw = read_parquet_with_meta(path)
    if ROOT_KEY not in raw:
        raise ValueError(f"{str(path)!r} has no {ROOT_KEY!r} metadata; not a mimscale manifest")
    _check_columns(df)
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        if key == ROOT_KEY:
            continue
        short = key[len(_META_PREFIX):]
        try:
            meta[short] = json.loads(value)
        except json.JSONDecodeError:
            meta[short] = value  # tolerate hand-written plain strings
    return df, Path(raw[ROOT_KEY]), meta


def build_manifest(
    index_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    kind: str,
    seed: int = 0,
    fraction: float | None = None,
    num_classes: int | None = None,
) -> pd.DataFrame:
    """Read an index, draw the subset, write it to ``out`` (root carried over); return the subset."""
    index_df, root = read_index(index_path)
    df, meta = make_subset(index_df, kind, seed=seed, fraction=fraction, num_classes=num_classes)
    write_manifest(df, out, root, meta)
    return df
