"""config/paper.yaml pointed at a fake ImageNet / iNat / COCO / ADE20K layout (empty files and
folders), so Snakemake can plan, and the Slurm plugin submit, the paper's jobs on this machine."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def fake_paper_config(tmp_path: Path) -> tuple[dict, Path]:
    """(the config, its file): every data root exists, nothing is read from them."""
    for split in ("train", "val"):
        for wnid in ("n01440764", "n01443537"):
            d = tmp_path / "imagenet" / split / wnid
            d.mkdir(parents=True)
            (d / f"{wnid}_1.JPEG").write_bytes(b"")
    (tmp_path / "in22k" / "n00004475").mkdir(parents=True)
    cfg = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    cfg["sources"]["in1k"] = {"train": str(tmp_path / "imagenet/train"), "val": str(tmp_path / "imagenet/val")}
    cfg["sources"]["in22k"] = {"train": str(tmp_path / "in22k")}
    for task in ("inat18", "coco", "ade20k"):
        (tmp_path / task).mkdir()
        cfg["finetune"][task]["data"] = {"root": str(tmp_path / task)}
    config = tmp_path / "paper.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return cfg, config
