from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from mimlib.data.manifests import read_manifest
from mimlib.data.pretrain_data import PretrainDataset, SampleOrder, ValidationDataset
from mimlib.data.sampling import GlobalBatchSampler, accumulation_steps
from mimlib.data.index import read_index


def test_sample_order_is_epochwise_permutation() -> None:
    order = SampleOrder(10, seed=3)
    first = [order(p) for p in range(10)]
    second = [order(p) for p in range(10, 20)]
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
    assert first != second
    assert [SampleOrder(10, seed=3)(p) for p in range(20)] == first + second
    assert [SampleOrder(10, seed=4)(p) for p in range(10)] != first


@pytest.mark.parametrize("world, micro", [(1, 8), (1, 4), (2, 4), (2, 2), (4, 1)])
def test_every_partition_covers_the_global_batch(world: int, micro: int) -> None:
    keys: list[tuple[int, int]] = []
    for rank in range(world):
        sampler = GlobalBatchSampler(3, 5, global_batch=8, micro_batch=micro, rank=rank, world_size=world)
        assert len(sampler) == 2 * 8 // (world * micro)
        for batch in sampler:
            assert len(batch) == micro
            keys += batch
    assert sorted(keys) == [(k, j) for k in (3, 4) for j in range(8)]


def test_accumulation_must_divide() -> None:
    assert accumulation_steps(2048, 128, 8) == 2
    with pytest.raises(ValueError, match="global_batch 2048 is not a multiple of micro_batch 96 x world_size 8 = 768"):
        accumulation_steps(2048, 96, 8)


def test_samples_are_a_pure_function_of_the_key(tiny_data: dict, tiny_recipe: dict) -> None:
    manifest, root, _ = read_manifest(tiny_data["manifest"])
    a = PretrainDataset(manifest, root, tiny_recipe, seed=0)
    b = PretrainDataset(manifest, root, tiny_recipe, seed=0)
    keys = [(5, 3), (0, 0), (5, 3), (2, 7)]
    out_a = [a[k] for k in keys]
    out_b = [b[k] for k in reversed(keys)][::-1]  # other access order, fresh object
    for x, y in zip(out_a, out_b):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
    assert torch.equal(out_a[0]["image"], out_a[2]["image"])
    assert not torch.equal(out_a[0]["image"], out_a[3]["image"])
    assert out_a[0]["image"].shape == (3, 64, 64)
    assert out_a[0]["mask"].shape == (16, 16)
    # and it leaves the caller's RNG alone
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    a[(9, 1)]
    assert torch.equal(torch.rand(3), expected)
    c = PretrainDataset(manifest, root, tiny_recipe, seed=1)
    assert not torch.equal(c[(5, 3)]["image"], out_a[0]["image"])


def test_corrupt_file_is_replaced_and_reported(tiny_data: dict, tiny_recipe: dict, tmp_path: Path) -> None:
    root = tmp_path / "train"
    shutil.copytree(tiny_data["root"] / "train", root)
    manifest, _, _ = read_manifest(tiny_data["manifest"])
    victim = root / manifest["path"][0]
    victim.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    ds = PretrainDataset(manifest, root, tiny_recipe, seed=0)
    hits = [ds[(0, j)] for j in range(len(manifest))]  # epoch 0 visits every file once
    failed = [p for h in hits for p in h["failed"]]
    assert failed == [str(victim)]
    assert all(h["image"].shape == (3, 64, 64) for h in hits)
    again = [ds[(0, j)] for j in range(len(manifest))]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(hits, again))


def test_validation_set_is_fixed(tiny_data: dict, tiny_recipe: dict) -> None:
    index, root = read_index(tiny_data["index_val"])
    ds = ValidationDataset(index, root, tiny_recipe, seed=0)
    assert len(ds) == len(index)
    x, y = ds[1], ds[1]
    assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
    assert not torch.equal(ds[0]["mask"], ds[1]["mask"]) or not torch.equal(ds[0]["image"], ds[1]["image"])
    sub = ValidationDataset(index, root, tiny_recipe, seed=0, max_images=3)
    assert len(sub) == 3
    assert sub.paths[0] == ds.paths[0] and sub.paths[-1] == ds.paths[-1]


def test_loader_workers_do_not_change_batches(tiny_data: dict, tiny_recipe: dict) -> None:
    from torch.utils.data import DataLoader

    from mimlib.data.pretrain_data import collate

    manifest, root, _ = read_manifest(tiny_data["manifest"])
    ds = PretrainDataset(manifest, root, tiny_recipe, seed=0)

    def batches(workers: int) -> list[torch.Tensor]:
        sampler = GlobalBatchSampler(2, 5, global_batch=8, micro_batch=4)
        loader = DataLoader(ds, batch_sampler=sampler, num_workers=workers, collate_fn=collate)
        return [b["image"] for b in loader]

    serial, parallel = batches(0), batches(2)
    assert len(serial) == 6
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel))


def test_rank_discovery_from_torchrun_and_slurm() -> None:
    from mimlib.train.distributed import env_ranks

    assert env_ranks({}) == (0, 1, 0)
    assert env_ranks({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == (3, 8, 1)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}
    assert env_ranks(slurm) == (0, 1, 0)  # a plain sbatch step: no rendezvous, one process
    assert env_ranks({**slurm, "MASTER_ADDR": "node01"}) == (5, 8, 1)
