"""Index an image folder in ImageNet layout (``<root>/<class_name>/<file>``) into Parquet.

The index is the single source of truth for which files a dataset has; subsets
(:mod:`mimlib.data.manifests`) are drawn from it. Scanning uses ``os.scandir`` only (no
``stat`` per file, no image opening) so 1.28M ImageNet files index in seconds, and rows are
sorted by ``(class_name, path)`` so the same tree always yields the same bytes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "IMAGE_EXTENSIONS",
    "ROOT_KEY",
    "build_index",
    "read_index",
    "read_parquet_with_meta",
    "scan_image_folder",
    "write_index",
    "write_parquet_with_meta",
]

#: Lower-case suffixes accepted as images; the check is case-insensitive (ImageNet uses .JPEG).
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpeg", ".jpg", ".png"})
#: Parquet schema-metadata key holding the absolute dataset root the relative paths hang off.
ROOT_KEY = "mimscale.root"

_COLUMNS = ("path", "class_name", "label")


def _is_image_name(name: str) -> bool:
    # Suffix test on the bare name: cheaper than Path objects at 1M+ files.
    if name.startswith("."):
        return False
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in IMAGE_EXTENSIONS


def _class_dirs(root: Path) -> list[str]:
    with os.scandir(root) as it:
        # is_dir() follows symlinks, so a class folder may be a link into another disk.
        return sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())


def scan_image_folder(
    root: str | os.PathLike[str], classes: Sequence[str] | None = None
) -> pd.DataFrame:
    """List the images under ``root`` as a DataFrame ``path, class_name, label``.

    ``path`` is relative to ``root`` and posix (``<class>/<file>``); ``label`` (int32) is the
    position of ``class_name`` in the sorted list of (non-hidden) class folders, empty folders
    included, as torchvision's ``ImageFolder`` does. Only direct children of class folders
    are listed (ImageNet-1K/22K are flat). Pass ``classes`` (e.g. the train split's classes)
    to label another split consistently; folders not in it raise ``ValueError``.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder root {str(root)!r} is not a directory")
    found = _class_dirs(root)
    if classes is None:
        class_list = found
    else:
        class_list = sorted(classes)
        unknown = sorted(set(found) - set(class_list))
        if unknown:
            raise ValueError(
                f"image folder {str(root)!r} has class folders not in the given class list: "
                f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
            )
    if not found:
        raise ValueError(f"image folder {str(root)!r} has no class folders")
    label_of = {name: i for i, name in enumerate(class_list)}

    paths: list[str] = []
    names: list[str] = []
    labels: list[int] = []
    for cls in found:
        with os.scandir(root / cls) as it:
            # d_type from scandir answers is_file() without a stat for regular files.
            files = sorted(e.name for e in it if _is_image_name(e.name) and e.is_file())
        prefix = cls + "/"
        paths.extend(prefix + f for f in files)
        names.extend([cls] * len(files))
        labels.extend([label_of[cls]] * len(files))
    if not paths:
        raise ValueError(f"image folder {str(root)!r} has no images ({len(found)} class folders)")
    # Classes were visited in sorted order and files sorted within each, so rows are already
    # ordered by (class_name, path); no global sort of 1M+ strings is needed.
    return pd.DataFrame(
        {
            "path": pd.Series(paths, dtype=str),
            "class_name": pd.Series(names, dtype=str),
            "label": np.asarray(labels, dtype=np.int32),
        }
    )


def _atomic_write_table(table: pa.Table, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    # Same-directory temp file so os.replace is an atomic rename on one filesystem; a crash
    # leaves at worst a stray hidden temp file, never a half-written Parquet at ``out``.
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_parquet_with_meta(
    df: pd.DataFrame, out: str | os.PathLike[str], meta: Mapping[str, str]
) -> None:
    """Write ``df`` (index dropped) to Parquet atomically, adding ``meta`` to the schema metadata."""
    table = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
    merged = dict(table.schema.metadata or {})
    merged.update({k.encode(): v.encode() for k, v in meta.items()})
    _atomic_write_table(table.replace_schema_metadata(merged), Path(out))


def read_parquet_with_meta(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, dict[str, str]]:
    """Read a Parquet file; return the DataFrame and its ``mimscale.*`` schema metadata."""
    table = pq.read_table(path)
    raw = table.schema.metadata or {}
    meta = {
        k.decode(): v.decode() for k, v in raw.items() if k.decode().startswith("mimscale.")
    }
    return table.to_pandas(), meta


def _check_columns(df: pd.DataFrame, required: Iterable[str] = _COLUMNS) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"index DataFrame lacks columns {missing}; has {list(df.columns)}")


def write_index(df: pd.DataFrame, out: str | os.PathLike[str], root: str | os.PathLike[str]) -> None:
    """Write an index to Parquet atomically, storing the absolute ``root`` under ``mimscale.root``."""
    _check_columns(df)
    write_parquet_with_meta(
        df[list(_COLUMNS)],
        out,
        # Root is a plain string; every other mimscale.* value is JSON (as in manifests).
        {ROOT_KEY: str(Path(root).absolute()), "mimscale.kind": json.dumps("index")},
    )


def read_index(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, Path]:
    """Read an index written by :func:`write_index`; return ``(df, root)``."""
    df, meta = read_parquet_with_meta(path)
    if ROOT_KEY not in meta:
        raise ValueError(f"{str(path)!r} has no {ROOT_KEY!r} metadata; not a mimscale index")
    _check_columns(df)
    return df, Path(meta[ROOT_KEY])


def build_index(
    root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    classes: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Scan ``root`` and write its index to ``out``; return the index."""
    df = scan_image_folder(root, classes=classes)
    write_index(df, out, root)
    return df
