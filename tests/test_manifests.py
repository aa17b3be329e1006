"""Pre-training subsets: exact per-class counts, nesting, determinism, Parquet round trip."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mimlib.data.index import write_index
from mimlib.data.manifests import (
    build_manifest,
    class_subset,
    fraction_subset,
    per_class_keep,
    read_manifest,
    whole_dataset,
    write_manifest,
)

CLASS_SIZES = {"n00": 1, "n01": 3, "n02": 5, "n03": 10, "n04": 25, "n05": 50, "n06": 101, "n07": 333}


@pytest.fixture(scope="module")
def index_df() -> pd.DataFrame:
    rows = []
    for label, (cls, n) in enumerate(sorted(CLASS_SIZES.items())):
        rows += [(f"{cls}/{cls}_{k}.JPEG", cls, label) for k in range(n)]
    df = pd.DataFrame(rows, columns=["path", "class_name", "label"]).astype({"label": "int32"})
    # Shuffled on purpose: subsets must not depend on the input row order.
    return df.sample(frac=1.0, random_state=1).reset_index(drop=True)


def _canon(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["class_name", "path"]).reset_index(drop=True)


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5, 0.7, 1.0])
def test_fraction_counts_are_exact_per_class(index_df: pd.DataFrame, fraction: float) -> None:
    sub = fraction_subset(index_df, fraction, seed=0)
    counts = sub.groupby("class_name").size().to_dict()
    expected = {c: max(1, round(fraction * n)) for c, n in CLASS_SIZES.items()}
    assert counts == expected
    assert set(sub["path"]) <= set(index_df["path"])
    assert not sub["path"].duplicated().any()


def test_per_class_keep_rounding() -> None:
    assert per_class_keep(0.1, 1) == 1  # never drops a class
    assert per_class_keep(0.5, 5) == 2  # round half to even: 2.5 -> 2
    assert per_class_keep(0.5, 7) == 4  # 3.5 -> 4
    assert per_class_keep(0.1, 1300) == 130


def test_fractions_are_nested(index_df: pd.DataFrame) -> None:
    sets = [set(fraction_subset(index_df, f, seed=3)["path"]) for f in (0.1, 0.2, 0.5, 1.0)]
    assert sets[0] < sets[1] < sets[2] < sets[3]
    assert sets[3] == set(index_df["path"])


def test_fraction_is_deterministic_and_seed_dependent(index_df: pd.DataFrame) -> None:
    a = fraction_subset(index_df, 0.2, seed=7)
    b = fraction_subset(index_df.iloc[::-1], 0.2, seed=7)  # input order must not matter
    pd.testing.assert_frame_equal(a, b)
    c = fraction_subset(index_df, 0.2, seed=8)
    assert set(a["path"]) != set(c["path"])
    assert len(a) == len(c)


def test_fraction_output_sorted_and_columns_kept(index_df: pd.DataFrame) -> None:
    sub = fraction_subset(index_df, 0.5, seed=0)
    assert list(sub.columns) == ["path", "class_name", "label"]
    pd.testing.assert_frame_equal(sub, _canon(sub))
    merged = sub.merge(index_df, on="path", suffixes=("", "_idx"))
    assert (merged["label"] == merged["label_idx"]).all()


def test_fraction_golden_selection() -> None:
    # Pins the stable-hash seeding (SHA-256 of "seed:class", never Python's salted hash()):
    # if this changes, every published manifest would silently change too.
    df = pd.DataFrame({"path": [f"n0/f{i:02d}.JPEG" for i in range(10)], "class_name": "n0", "label": 0})
    assert fraction_subset(df, 0.3, seed=0)["path"].tolist() == ["n0/f00.JPEG", "n0/f05.JPEG", "n0/f06.JPEG"]


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, 2, float("nan"), float("inf")])
def test_invalid_fraction_names_the_value(index_df: pd.DataFrame, bad: float) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        fraction_subset(index_df, bad, seed=0)


def test_class_subset_takes_whole_classes(index_df: pd.DataFrame) -> None:
    sub = class_subset(index_df, 3, seed=0)
    classes = set(sub["class_name"])
    assert len(classes) == 3
    expected = _canon(index_df[index_df["class_name"].isin(classes)])
    pd.testing.assert_frame_equal(sub, expected)  # all images, original labels, no new columns
    assert sub.groupby("class_name").size().to_dict() == {c: CLASS_SIZES[c] for c in classes}


def test_class_subset_deterministic_nested_and_seeded(index_df: pd.DataFrame) -> None:
    a = class_subset(index_df, 3, seed=0)
    pd.testing.assert_frame_equal(a, class_subset(index_df.iloc[::-1], 3, seed=0))
    assert set(a["class_name"]) < set(class_subset(index_df, 5, seed=0)["class_name"])
    picks = {frozenset(class_subset(index_df, 3, seed=s)["class_name"]) for s in range(6)}
    assert len(picks) > 1
    assert set(class_subset(index_df, 8, seed=0)["class_name"]) == set(CLASS_SIZES)


@pytest.mark.parametrize("bad", [0, 9, -1])
def test_class_subset_rejects_bad_counts(index_df: pd.DataFrame, bad: int) -> None:
    with pytest.raises(ValueError, match=str(bad)):
        class_subset(index_df, bad, seed=0)


def test_whole_dataset_is_sorted_index(index_df: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(whole_dataset(index_df), _canon(index_df))


def test_manifest_roundtrip_and_byte_identical(index_df: pd.DataFrame, tmp_path: Path) -> None:
    meta = {"kind": "fraction", "seed": 4, "fraction": 0.2}
    a, b = tmp_path / "a.parquet", tmp_path / "m" / "b.parquet"
    write_manifest(fraction_subset(index_df, 0.2, seed=4), a, tmp_path / "root", meta)
    write_manifest(fraction_subset(index_df.iloc[::-1], 0.2, seed=4), b, tmp_path / "root", meta)
    assert a.read_bytes() == b.read_bytes()
    df, root, back = read_manifest(a)
    pd.testing.assert_frame_equal(df, fraction_subset(index_df, 0.2, seed=4))
    assert root == (tmp_path / "root").absolute()
    assert back == {"kind": "fraction", "seed": 4, "fraction": 0.2, "num_images": len(df)}
    assert isinstance(back["seed"], int) and isinstance(back["fraction"], float)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet", "m"]  # no temp debris


def test_write_manifest_rejects_reserved_meta(index_df: pd.DataFrame, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="root"):
        write_manifest(index_df, tmp_path / "x.parquet", tmp_path, {"root": "/elsewhere"})


def test_build_manifest_from_index_file(index_df: pd.DataFrame, tmp_path: Path) -> None:
    idx = tmp_path / "index.parquet"
    write_index(index_df, idx, tmp_path / "imgs")
    out = build_manifest(idx, tmp_path / "in100.parquet", "classes", seed=1, num_classes=2)
    df, root, meta = read_manifest(tmp_path / "in100.parquet")
    pd.testing.assert_frame_equal(df, out)
    assert root == (tmp_path / "imgs").absolute()
    assert meta == {"kind": "classes", "seed": 1, "num_classes": 2, "num_images": len(df)}
    whole = build_manifest(idx, tmp_path / "all.parquet", "whole")
    assert len(whole) == sum(CLASS_SIZES.values())
    with pytest.raises(ValueError, match="unknown manifest kind"):
        build_manifest(idx, tmp_path / "x.parquet", "bogus")


def test_fraction_subset_scales(tmp_path: Path) -> None:
    # 1000 classes x 300 images: the per-class loop must stay cheap (IN-1K/22K sizes).
    n_cls, per = 1000, 300
    cls = np.repeat([f"n{c:08d}" for c in range(n_cls)], per)
    paths = [f"{c}/{k}.JPEG" for c, k in zip(cls, np.tile(np.arange(per), n_cls))]
    df = pd.DataFrame({"path": paths, "class_name": cls, "label": np.repeat(np.arange(n_cls, dtype=np.int32), per)})
    sub = fraction_subset(df, 0.1, seed=0)
    assert len(sub) == n_cls * 30
    assert math.isclose(len(sub) / len(df), 0.1)
