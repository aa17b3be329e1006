"""Index an image folder in ImageNet layout (``<root>/<class_name>/<file>``) into Parquet.

The index is the single source of truth for which files a dataset has; subsets
(:mod:`mimlib.data.manifests`) are drawn from it. Scanning uses ``os.scandir`` only (no
``stat`` per file, no image opening) so 1.28M ImageNet files index in seconds, and rows are
sorted by ``(class_name, path)`` so the same tree always yields the same bytes.

The label map (class name -> label: the position in the sorted list of class folders) is
stored with the index (``mimscale.classes``, :func:`read_label_map`). Fine-tuning labels both
splits through the *train* index's map (:mod:`mimlib.data.classification`), so a class folder
that only one split has cannot shift the other split's labels.

An entry the scan cannot examine (a symlink loop, a folder or link it may not read) is not
skipped: the scan collects every such entry and raises one ``ValueError`` naming them.
"""

from __future__ import annotations

import errno
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
    "CLASSES_KEY",
    "build_index",
    "class_folders",
    "read_index",
    "read_label_map",
    "read_parquet_with_meta",
    "scan_image_folder",
    "write_index",
    "write_parquet_with_meta",
]

#: Lower-case suffixes accepted as images; the check is case-insensitive (ImageNet uses .JPEG).
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpeg", ".jpg", ".png"})
#: Parquet schema-metadata key holding the absolute dataset root the relative paths hang off.
ROOT_KEY = "mimscale.root"
#: Parquet schema-metadata key holding the label map: the JSON list of class names by label.
CLASSES_KEY = "mimscale.classes"

_COLUMNS = ("path", "class_name", "label")


def _is_image_name(name: str) -> bool:
    # Suffix test on the bare name: cheaper than Path objects at 1M+ files.
    if name.startswith("."):
        return False
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in IMAGE_EXTENSIONS


def _describe(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return f"a symlink loop ({exc.strerror})"
    if isinstance(exc, PermissionError):
        return f"not readable ({exc.strerror})"
    return f"{type(exc).__name__}: {exc.strerror or exc}"


class _Unreadable:
    """Entries of a folder walk that could not be examined, reported together at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.entries: list[tuple[str, str]] = []

    def add(self, path: str | os.PathLike[str], exc: OSError) -> None:
        self.entries.append((os.fspath(path), _describe(exc)))

    def raise_if_any(self) -> None:
        if not self.entries:
            return
        shown = "; ".join(f"{p!r}: {why}" for p, why in self.entries[:5])
        more = f" (and {len(self.entries) - 5} more)" if len(self.entries) > 5 else ""
        raise ValueError(
            f"image folder {str(self.root)!r}: {len(self.entries)} "
            f"{'entry' if len(self.entries) == 1 else 'entries'} cannot be read: {shown}{more}; "
            f"fix or remove them (the index lists every image the folder has, so none is skipped silently)"
        )


def _is_dir(entry: os.DirEntry, bad: _Unreadable) -> bool:
    try:
        return entry.is_dir()  # follows symlinks: a class folder may be a link into another disk
    except OSError as exc:  # a symlink loop (ELOOP), a link into a folder it may not read
        bad.add(entry.path, exc)
        return False


def _class_dirs(root: Path, bad: _Unreadable) -> list[str]:
    try:
        with os.scandir(root) as it:
            return sorted(e.name for e in it if not e.name.startswith(".") and _is_dir(e, bad))
    except OSError as exc:  # the root itself cannot be listed
        raise ValueError(f"image folder {str(root)!r} cannot be listed: {_describe(exc)}") from exc


def class_folders(root: str | os.PathLike[str]) -> list[str]:
    """The sorted (non-hidden) class folders of an ImageNet-layout ``root``; the label map
    :func:`scan_image_folder` gives it. Entries that cannot be examined raise ``ValueError``."""
    root = Path(root)
    bad = _Unreadable(root)
    found = _class_dirs(root, bad)
    bad.raise_if_any()
    return found


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
    return _scan(root, classes)[0]


def _scan(root: str | os.PathLike[str], classes: Sequence[str] | None) -> tuple[pd.DataFrame, list[str]]:
    """:func:`scan_image_folder` and the label map (class names by label) it used."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder root {str(root)!r} is not a directory")
    bad = _Unreadable(root)
    found = _class_dirs(root, bad)
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
    if not found and not bad.entries:
        raise ValueError(f"image folder {str(root)!r} has no class folders")
    label_of = {name: i for i, name in enumerate(class_list)}

    paths: list[str] = []
    names: list[str] = []
    labels: list[int] = []
    for cls in found:
        files: list[str] = []
        try:
            with os.scandir(root / cls) as it:
                for e in it:
                    if not _is_image_name(e.name):
                        continue
                    # d_type from scandir answers is_file() without a stat for regular files.
                    try:
                        if e.is_file():
                            files.append(e.name)
                    except OSError as exc:  # e.g. x.JPEG -> x.JPEG
                        bad.add(e.path, exc)
        except OSError as exc:  # a class folder it may not list
            bad.add(root / cls, exc)
        files.sort()
        prefix = cls + "/"
        paths.extend(prefix + f for f in files)
        names.extend([cls] * len(files))
        labels.extend([label_of[cls]] * len(files))
    bad.raise_if_any()
    if not paths:
        raise ValueError(f"image folder {str(root)!r} has no images ({len(found)} class folders)")
    # Classes were visited in sorted order and files sorted within each, so rows are already
    # ordered by (class_name, path); no global sort of 1M+ strings is needed.
    df = pd.DataFrame(
        {
            "path": pd.Series(paths, dtype=str),
            "class_name": pd.Series(names, dtype=str),
            "label": np.asarray(labels, dtype=np.int32),
        }
    )
    return df, class_list


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


def _classes_of(df: pd.DataFrame) -> list[str] | None:
    """The label map a DataFrame's (class_name, label) pairs spell out, or None if they leave
    a label unnamed (an empty class folder) or give one label two names."""
    pairs = set(zip(df["class_name"].tolist(), df["label"].tolist()))
    by_label = {int(label): name for name, label in pairs}
    if len(by_label) != len(pairs) or sorted(by_label) != list(range(len(by_label))):
        return None
    return [by_label[i] for i in range(len(by_label))]


def write_index(
    df: pd.DataFrame,
    out: str | os.PathLike[str],
    root: str | os.PathLike[str],
    classes: Sequence[str] | None = None,
) -> None:
    """Write an index to Parquet atomically, storing the absolute ``root`` under ``mimscale.root``
    and the label map ``classes`` (class names by label; default: the one ``df``'s
    ``class_name``/``label`` pairs give, if they name every label) under ``mimscale.classes``."""
    _check_columns(df)
    # Root is a plain string; every other mimscale.* value is JSON (as in manifests).
    meta = {ROOT_KEY: str(Path(root).absolute()), "mimscale.kind": json.dumps("index")}
    classes = list(classes) if classes is not None else _classes_of(df)
    if classes is not None:
        meta[CLASSES_KEY] = json.dumps(classes)
    write_parquet_with_meta(df[list(_COLUMNS)], out, meta)


def read_index(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, Path]:
    """Read an index written by :func:`write_index`; return ``(df, root)``."""
    df, meta = read_parquet_with_meta(path)
    if ROOT_KEY not in meta:
        raise ValueError(f"{str(path)!r} has no {ROOT_KEY!r} metadata; not a mimscale index")
    _check_columns(df)
    return df, Path(meta[ROOT_KEY])


def read_label_map(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, Path, list[str]]:
    """Read an index; return ``(df, root, classes)``, ``classes`` the label map (class names by
    label). An index written before the map was stored gives the map of its rows'
    ``class_name``/``label`` pairs (an empty class folder's label then has the name ``""``)."""
    df, meta = read_parquet_with_meta(path)
    if ROOT_KEY not in meta:
        raise ValueError(f"{str(path)!r} has no {ROOT_KEY!r} metadata; not a mimscale index")
    _check_columns(df)
    if CLASSES_KEY in meta:
        classes = [str(c) for c in json.loads(meta[CLASSES_KEY])]
    else:
        pairs = dict(zip(df["label"].tolist(), df["class_name"].tolist()))
        n = max(pairs) + 1 if pairs else 0
        classes = [str(pairs.get(i, "")) for i in range(n)]
    return df, Path(meta[ROOT_KEY]), classes


def build_index(
    root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    classes: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Scan ``root`` and write its index, with its label map, to ``out``; return the index."""
    df, class_list = _scan(root, classes)
    write_index(df, out, root, classes=class_list)
    return df
