"""Shared fixtures: a tiny generated image folder, its indexes and a manifest, and a recipe."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from mimlib.data.demo import ClassificationDemoSpec, write_classification_demo
    from mimlib.data.index import build_index
    from mimlib.data.manifests import build_manifest

    base = tmp_path_factory.mktemp("tiny")
    spec = ClassificationDemoSpec(num_classes=4, train_per_class=8, val_per_class=2, min_size=64, max_size=96, seed=0)
    write_classification_demo(base / "images", spec)
    build_index(base / "images" / "train", base / "index_train.parquet")
    build_index(base / "images" / "val", base / "index_val.parquet")
    build_manifest(base / "index_train.parquet", base / "manifest.parquet", "whole")
    return {
        "root": base / "images",
        "index_train": base / "index_train.parquet",
        "index_val": base / "index_val.parquet",
        "manifest": base / "manifest.parquet",
    }


@pytest.fixture(scope="session")
def smoke_config() -> dict:
    with open(ROOT / "config" / "smoke.yaml") as f:
        return yaml.safe_load(f)


@pytest.fixture()
def tiny_recipe(smoke_config: dict) -> dict:
    """The smoke study's recipe for swinv2_pico (64 px, window 4, global batch 8 = 2 x 4)."""
    from mimlib.config import pretrain_recipe, validate_config

    cfg = validate_config(copy.deepcopy(smoke_config))
    return pretrain_recipe(cfg, "swinv2_pico")
