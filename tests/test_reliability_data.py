"""Issue 12, items 2 and 6 (data): one label map per dataset, window sizes that tile every
stage, unreadable images and folder entries reported by name (docs/reliability.md, "Data")."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mimlib.data.classification import load_classification_splits, read_inat_split
from mimlib.data.index import (
    CLASSES_KEY,
    ROOT_KEY,
    build_index,
    read_label_map,
    read_parquet_with_meta,
    write_parquet_with_meta,
)


def _jpeg(path: Path, colour: tuple[int, int, int], size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path, "JPEG")


def _image_folder(root: Path, classes: dict[str, int]) -> Path:
    for k, (name, n) in enumerate(sorted(classes.items())):
        for i in range(n):
            _jpeg(root / name / f"{name}_{i}.JPEG", (40 * k % 256, 10 * i, 128))
    return root


def _indexed(tmp_path: Path, train: dict[str, int], val: dict[str, int]) -> dict[str, str]:
    """Each split indexed on its own, as the workflow's `index` rule does (one job per split)."""
    base = tmp_path / "ds"
    build_index(_image_folder(base / "train", train), base / "index_train.parquet")
    build_index(_image_folder(base / "val", val), base / "index_val.parquet")
    return {"train_index": str(base / "index_train.parquet"), "val_index": str(base / "index_val.parquet")}


def _labels_by_class(split) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for path, label in zip(split.paths, split.labels.tolist()):
        out.setdefault(Path(path).parent.name, set()).add(label)
    return out


# ------------------------------------------------------------------ item 2: one label map
def test_an_extra_train_class_does_not_shift_val_labels(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """train has `b_extra` (sorted between `a` and `c`), val does not: on main val's `c` got label
    1 and train's `c` label 2, so top-1 counted right answers as wrong without a word."""
    data = _indexed(tmp_path, {"a": 2, "b_extra": 2, "c": 2}, {"a": 1, "c": 1})
    with caplog.at_level(logging.WARNING, logger="mimlib.data.classification"):
        splits = load_classification_splits(data)
    train, val = _labels_by_class(splits.train), _labels_by_class(splits.val)
    assert train == {"a": {0}, "b_extra": {1}, "c": {2}}
    assert val == {"a": {0}, "c": {2}}  # the train split's labels
    assert splits.num_classes == 3 and splits.class_names == ["a", "b_extra", "c"]
    # evaluation is still right, but the class is not evaluated: a warning, kept for metrics.json
    assert splits.classes_without_val_images == ["b_extra"]
    assert "b_extra" in caplog.text and "no val images" in caplog.text


def test_a_val_only_class_is_an_error_naming_it_and_the_folder(tmp_path: Path) -> None:
    data = _indexed(tmp_path, {"a": 2, "c": 2}, {"a": 1, "b_val_only": 1, "c": 1})
    with pytest.raises(ValueError, match=r"b_val_only") as info:
        load_classification_splits(data)
    assert str(tmp_path / "ds" / "val") in str(info.value) and "not class folders of the train split" in str(info.value)


def test_the_label_map_is_stored_with_the_index_empty_folders_included(tmp_path: Path) -> None:
    """An empty train class folder keeps its label (as ImageFolder): the map is stored in the
    index, so val's images of that class are labelled, not called unknown."""
    data = _indexed(tmp_path, {"a": 2, "c": 2}, {"a": 1, "b": 1, "c": 1})
    (tmp_path / "ds" / "train" / "b").mkdir()
    build_index(tmp_path / "ds" / "train", data["train_index"])
    _, _, classes = read_label_map(data["train_index"])
    assert classes == ["a", "b", "c"]
    splits = load_classification_splits(data)
    assert _labels_by_class(splits.val) == {"a": {0}, "b": {1}, "c": {2}}
    assert splits.classes_without_val_images == []  # `b` has no train images, but that is not this list


def test_an_index_without_a_stored_map_is_labelled_by_class_name(tmp_path: Path) -> None:
    """Indexes written before the map was stored: the map is the train rows' (name, label) pairs."""
    data = _indexed(tmp_path, {"a": 2, "b_extra": 2, "c": 2}, {"a": 1, "c": 1})
    for key in ("train_index", "val_index"):  # rewritten as main wrote them: root and kind only
        df, root, _ = read_label_map(data[key])
        write_parquet_with_meta(df, data[key], {ROOT_KEY: str(root), "mimscale.kind": '"index"'})
        assert CLASSES_KEY not in read_parquet_with_meta(data[key])[1]
    splits = load_classification_splits(data)
    assert _labels_by_class(splits.val) == {"a": {0}, "c": {2}}


def test_inat_val_categories_missing_from_train_are_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import json

    def doc(cats: list[int], images: dict[int, int]) -> dict:
        return {"categories": [{"id": c, "name": f"sp{c}"} for c in cats],
                "images": [{"id": i, "file_name": f"x/{i}.jpg"} for i in images],
                "annotations": [{"id": i, "image_id": i, "category_id": c} for i, c in images.items()]}

    (tmp_path / "train.json").write_text(json.dumps(doc([3, 5, 9], {1: 3, 2: 5, 3: 9})))
    (tmp_path / "val.json").write_text(json.dumps(doc([3, 5, 9, 11], {10: 3, 11: 11, 12: 11})))
    _, cat_ids, _ = read_inat_split(tmp_path, tmp_path / "train.json")
    with pytest.raises(ValueError, match=r"val.json: 2 images have 1 category id\(s\) that are not in the "
                                         r"train split's categories: 11"):
        read_inat_split(tmp_path, tmp_path / "val.json", category_ids=cat_ids)
    (tmp_path / "val.json").write_text(json.dumps(doc([3, 5, 9], {10: 3, 11: 9})))
    with caplog.at_level(logging.WARNING, logger="mimlib.data.classification"):
        splits = load_classification_splits({"root": str(tmp_path), "train_json": str(tmp_path / "train.json"),
                                             "val_json": str(tmp_path / "val.json")})
    assert splits.classes_without_val_images == ["sp5"] and "sp5" in caplog.text
    np.testing.assert_array_equal(splits.val.labels, [0, 2])


def test_metrics_json_lists_the_train_classes_without_val_images(tmp_path: Path) -> None:
    """The warning is kept where a reader of the results sees it, not only in the job's log."""
    import json

    from mimlib.finetune import classification as cls
    from mimlib.finetune.common import FinetuneJob

    data = _indexed(tmp_path, {"a": 2, "b_extra": 2, "c": 2}, {"a": 1, "c": 1})
    recipe = {"img_size": 32, "window_size": 2, "epochs": 1, "warmup_epochs": 0, "global_batch": 4, "micro_batch": 4,
              "mixup": 0.0, "cutmix": 0.0, "num_workers": 0, "threads": 1, "auto_augment": None}
    job = FinetuneJob(task="in1k", model="swinv2_pico", recipe=recipe, data=data, out_dir=tmp_path / "out",
                      resume_dir=tmp_path / ".resume", checkpoint=None, seed=0, device="cpu")
    cls.run(job, progress=False)
    record = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert record["classes_without_val_images"] == ["b_extra"] and record["num_classes"] == 3


def test_check_config_names_val_class_folders_the_train_folder_lacks(tmp_path: Path, smoke_config: dict) -> None:
    """Reported before any job (pre-training can take days before fine-tuning reads the indexes)."""
    import copy

    from mimlib.config import ConfigError, validate_config

    train, val = tmp_path / "train", tmp_path / "val"
    for d in (train / "n01", train / "n02", val / "n01", val / "n02", val / "n03_val_only", val / ".hidden"):
        d.mkdir(parents=True)
    cfg = copy.deepcopy(smoke_config)
    cfg["sources"]["imagenet"] = {"train": str(train), "val": str(val)}
    with pytest.raises(ConfigError, match=r"sources.imagenet.val: 1 class folder\(s\) of .* are not in the train "
                                          r"folder .*finetune.in1k could not label them: 'n03_val_only'$"):
        validate_config(cfg)
    (val / "n03_val_only").rmdir()
    (train / "n04_train_only").mkdir()  # evaluation stays right: reported by the job, not refused
    validate_config(cfg)


# ------------------------------------------------------------------ item 6a: windows that tile
def test_a_window_that_does_not_tile_a_stage_is_refused_naming_model_sizes_and_stage() -> None:
    """224 px / window 12: stage 0 is 56x56 tokens, which timm silently padded to 60x60."""
    from mimlib.models.swinv2 import build_encoder

    with pytest.raises(ValueError, match=r"swinv2_b at img_size 224 / window_size 12: the window does not tile "
                                         r"stage 0 \(56x56 tokens; timm would pad it to 60\)"):
        build_encoder("swinv2_b", img_size=224, window_size=12, device="meta")
    with pytest.raises(ValueError, match=r"swinv2_pico3 at img_size 96 / window_size 4: .* stage 2 \(6x6 tokens"):
        build_encoder("swinv2_pico3", img_size=96, window_size=4, device="meta")
    with pytest.raises(ValueError, match=r"img_size 100 is not a multiple of the last stage's stride 32"):
        build_encoder("swinv2_pico", img_size=100, window_size=5, device="meta")


def test_a_window_larger_than_a_small_stage_is_clamped_as_timm_does() -> None:
    """timm shrinks the window of a map no larger than it (`_calc_window_shift`): allowed, and the
    built model has the windows the check assumed. Detection (any input size) is not checked."""
    from mimlib.models.swinv2 import build_encoder

    enc = build_encoder("swinv2_b", img_size=192, window_size=12, device="meta")  # the paper's pre-training
    assert [tuple(s.blocks[0].window_size) for s in enc.layers] == [(12, 12), (12, 12), (12, 12), (6, 6)]
    enc = build_encoder("swinv2_pico", img_size=64, window_size=8, device="meta")  # maps 16, 8, 4, 2
    assert [tuple(s.blocks[0].window_size) for s in enc.layers] == [(8, 8), (8, 8), (4, 4), (2, 2)]
    build_encoder("swinv2_b", img_size=1024, window_size=14, strict_img_size=False, device="meta")  # COCO
    with pytest.raises(ValueError, match="stage 3"):  # timm keeps the window: 6x6 would be padded
        build_encoder("swinv2_b", img_size=192, window_size=12, always_partition=True, device="meta")


@pytest.mark.parametrize("where, mutate, message", [
    ("pretrain", lambda c: c["pretrain"].update(window_size=3),
     r"pretrain \(model swinv2_pico\): swinv2_pico at img_size 64 / window_size 3: the window does not tile stage 0"),
    ("pretrain.per_model", lambda c: c["pretrain"].update(per_model={"swinv2_pico": {"img_size": 96}}),
     r"pretrain \(model swinv2_pico\): swinv2_pico at img_size 96 / window_size 4: .* stage 2 \(6x6 tokens"),
    ("finetune", lambda c: c["finetune"]["in1k"]["recipe"].update(window_size=6),
     r"finetune.in1k.recipe \(model swinv2_pico\): swinv2_pico at img_size 64 / window_size 6: .* stage 0"),
])
def test_check_config_refuses_windows_that_do_not_tile(smoke_config: dict, where: str, mutate, message: str) -> None:
    import copy

    from mimlib.config import ConfigError, validate_config

    cfg = copy.deepcopy(smoke_config)
    mutate(cfg)
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg, check_paths=False)


def test_check_config_accepts_the_shipped_configs_and_a_coco_window_that_pads() -> None:
    from mimlib.config import load_config

    root = Path(__file__).resolve().parents[1]
    for name in ("config.yaml", "smoke.yaml", "paper.yaml"):
        load_config(root / "config" / name, check_paths=False)
    paper = load_config(root / "config" / "paper.yaml", check_paths=False)
    assert paper["finetune"]["coco"]["recipe"].get("window_size", 14) == 14  # 1024 px: 256x256 tokens, padded


# ------------------------------------------------------------------ item 6b: unreadable entries
def test_a_symlink_loop_image_is_reported_like_a_corrupt_file(tmp_path: Path) -> None:
    """`x.JPEG -> x.JPEG`: opening it raised a raw OSError (ELOOP) on main."""
    from mimlib.data.decode import CorruptImageError, UnreadableImageError, decode_for_crop, decode_rgb_tensor, load_rgb

    loop = tmp_path / "x.JPEG"
    loop.symlink_to(loop)
    for fn in (load_rgb, decode_rgb_tensor, decode_for_crop):
        with pytest.raises(UnreadableImageError, match=rf"cannot read image '{loop}': a symlink loop") as info:
            fn(loop)
        assert isinstance(info.value, CorruptImageError) and info.value.path == str(loop)
    with pytest.raises(FileNotFoundError):  # a missing file is still not an unreadable one
        load_rgb(tmp_path / "missing.JPEG")


def test_an_image_without_read_permission_is_reported_like_a_corrupt_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tests run as root, where `chmod 000` does not stop reading, so the PermissionError
    is simulated: `open` in mimlib.data.decode raises it for one path, as it does for a user
    without read permission. On main it escaped as a raw PermissionError."""
    import builtins
    import pickle

    from mimlib.data import decode

    good, locked = tmp_path / "good.JPEG", tmp_path / "locked.JPEG"
    _jpeg(good, (1, 2, 3))
    _jpeg(locked, (4, 5, 6))

    def guarded_open(file, *args, **kw):
        if Path(file) == locked:
            raise PermissionError(13, "Permission denied", str(file))
        return builtins.open(file, *args, **kw)

    monkeypatch.setattr(decode, "open", guarded_open, raising=False)
    assert decode.load_rgb(good).size == (16, 16)
    for fn in (decode.load_rgb, decode.decode_rgb_tensor):
        with pytest.raises(decode.UnreadableImageError, match=rf"'{locked}': PermissionError: Permission denied"):
            fn(locked)
    err = pickle.loads(pickle.dumps(decode.UnreadableImageError(str(locked), "PermissionError: x")))  # loader workers
    assert type(err) is decode.UnreadableImageError and str(locked) in str(err)


def test_pretraining_skips_and_counts_an_unreadable_image(tmp_path: Path, tiny_recipe: dict) -> None:
    """Pre-training replaces an unreadable file by another draw and reports it, as a corrupt one."""
    import pandas as pd

    from mimlib.data.pretrain_data import PretrainDataset

    root = _image_folder(tmp_path / "imgs", {"a": 4})
    (root / "a" / "loop.JPEG").symlink_to(root / "a" / "loop.JPEG")
    paths = sorted(f"a/{p.name}" for p in (root / "a").iterdir())
    manifest = pd.DataFrame({"path": paths, "class_name": "a", "label": 0})
    ds = PretrainDataset(manifest, root, {**tiny_recipe, "img_size": 16, "mask_patch_size": 8, "patch_size": 4}, seed=0)
    failed = [p for slot in range(tiny_recipe["global_batch"]) for p in ds[(0, slot)]["failed"]]
    failed += [p for slot in range(tiny_recipe["global_batch"]) for p in ds[(1, slot)]["failed"]]
    assert set(failed) == {str(root / "a" / "loop.JPEG")}


def test_a_symlink_loop_in_a_dataset_folder_is_named_by_the_index(tmp_path: Path) -> None:
    """A looping class folder and a looping image: one ValueError naming both (main: a raw
    OSError for the first one only)."""
    from mimlib.data.index import scan_image_folder

    root = _image_folder(tmp_path / "imgs", {"a": 1, "b": 1})
    (root / "c_loop").symlink_to(root / "c_loop")
    (root / "a" / "x.JPEG").symlink_to(root / "a" / "x.JPEG")
    (root / "a" / "notes").symlink_to(root / "a" / "notes")  # not an image name: never examined
    with pytest.raises(ValueError, match=r"2 entries cannot be read") as info:
        scan_image_folder(root)
    msg = str(info.value)
    assert f"'{root / 'c_loop'}': a symlink loop" in msg and f"'{root / 'a' / 'x.JPEG'}': a symlink loop" in msg
    assert str(root) in msg and "notes" not in msg


def test_a_class_folder_that_cannot_be_listed_is_named_by_the_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As root a folder with mode 000 can still be listed, so the PermissionError is simulated
    (os.scandir in mimlib.data.index raises it for one class folder)."""
    import os

    from mimlib.data import index

    root = _image_folder(tmp_path / "imgs", {"a": 1, "b": 1})
    real = os.scandir

    def guarded_scandir(path):
        if Path(path) == root / "b":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(index.os, "scandir", guarded_scandir)
    with pytest.raises(ValueError, match=rf"1 entry cannot be read: '{root / 'b'}': not readable \(Permission denied\)"):
        index.scan_image_folder(root)
