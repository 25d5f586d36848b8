"""COCODataModule with the real DALI CPU pipelines: batches, sharding, epochs, Lightning wiring."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from dali_helpers import ann_file, copy_set, load_json, save_json

from ssd_lightning.data import COCODataModule
from ssd_lightning.data.sharding import shard_size


def _dm(root, **kw):
    args = dict(batch_size=2, val_batch_size=3, num_threads=1, device="cpu", seed=0)
    args.update(kw)
    return COCODataModule(root, **args)


def _ids(loader):
    return [i for b in loader for i in b["image_ids"].tolist()]


def test_batches_follow_the_contract(synthetic_coco):
    dm = _dm(synthetic_coco)
    assert dm.num_classes == 4 and dm.categories.dataset_ids == [3, 7, 11]  # before setup
    dm.setup("fit")
    train = dm.train_dataloader()
    assert len(train) == 15 // 2  # 15 annotated images
    batches = list(train)
    assert len(batches) == len(train)
    b = batches[0]
    assert set(b) == {"images", "boxes", "labels"}
    assert b["images"].shape == (2, 3, 300, 300) and b["images"].dtype == torch.float32
    assert b["boxes"].shape == (2, 8732, 4) and b["boxes"].dtype == torch.float32
    assert b["labels"].shape == (2, 8732) and b["labels"].dtype == torch.int64
    assert 0 <= int(b["labels"].min()) and int(b["labels"].max()) <= 3
    val = dm.val_dataloader()
    assert len(val) == 4  # 10 images in batches of 3
    vb = list(val)
    assert [x["images"].shape[0] for x in vb] == [3, 3, 3, 1]  # padding never yielded
    v = vb[0]
    assert set(v) == {"images", "image_ids", "image_sizes"}
    assert v["image_ids"].dtype == torch.int64 and v["image_sizes"].dtype == torch.int64
    assert v["image_sizes"].shape == (3, 2)
    doc = load_json(ann_file(synthetic_coco, "val"))
    sizes = {im["id"]: [im["height"], im["width"]] for im in doc["images"]}
    assert v["image_sizes"].tolist() == [sizes[i] for i in v["image_ids"].tolist()]
    assert dm.val_annotations == ann_file(synthetic_coco, "val")


def test_val_empties_follow_the_protocol_switch(synthetic_coco):
    doc = load_json(ann_file(synthetic_coco, "val"))
    with_ann = {a["image_id"] for a in doc["annotations"]}
    all_ids = sorted(im["id"] for im in doc["images"])
    official = _dm(synthetic_coco)
    official.setup("validate")
    assert official.val_image_ids == all_ids and len(all_ids) == 10
    assert sorted(_ids(official.val_dataloader())) == all_ids
    nvidia = _dm(synthetic_coco, val_include_empty=False)
    nvidia.setup("validate")
    assert nvidia.val_image_ids == sorted(with_ann) and len(with_ann) == 9
    assert sorted(_ids(nvidia.val_dataloader())) == sorted(with_ann)


@pytest.mark.parametrize("batch", [2, 4])
def test_two_shards_partition_the_val_set_every_epoch_even_after_partial_epochs(synthetic_coco, batch):
    loaders = []
    for rank in range(2):
        dm = _dm(synthetic_coco, shard_id=rank, num_shards=2, val_batch_size=batch)
        dm.setup("validate")
        loaders.append(dm.val_dataloader())
    expected = sorted(dm.val_image_ids)
    for epoch in range(3):
        if epoch > 0:  # a sanity check / limit_val_batches consumes one batch, then a full epoch starts
            for loader in loaders:
                next(iter(loader))
        seen = Counter()
        for rank, loader in enumerate(loaders):
            ids = _ids(loader)
            assert len(ids) == shard_size(10, rank, 2)
            assert len(loader) == -(-len(ids) // batch)
            seen.update(ids)
        assert sorted(seen) == expected and set(seen.values()) == {1}, f"epoch {epoch}: {seen}"


def test_more_ranks_than_val_images(synthetic_coco):
    dm = _dm(synthetic_coco, shard_id=0, num_shards=12)  # shard 0 of 12 over 10 images is empty
    dm.setup("validate")
    loader = dm.val_dataloader()
    assert len(loader) == 0 and list(loader) == []


def test_train_shards_are_disjoint_and_equal_length_and_reshuffle(synthetic_coco):
    loaders = []
    for rank in range(2):
        dm = _dm(synthetic_coco, shard_id=rank, num_shards=2, batch_size=3, train_image_ids=True)
        dm.setup("fit")
        loaders.append(dm.train_dataloader())
    assert len(loaders[0]) == len(loaders[1]) == (15 // 2) // 3
    orders = []
    for _epoch in range(3):
        per_rank = [_ids(loader) for loader in loaders]
        assert [len(x) for x in per_rank] == [6, 6]
        assert not set(per_rank[0]) & set(per_rank[1])
        assert all(len(set(x)) == len(x) for x in per_rank)
        orders.append(per_rank[0] + per_rank[1])
    assert orders[0] != orders[1] != orders[2]  # re-shuffled every epoch


def test_train_stream_continues_after_a_partial_epoch(synthetic_coco):
    dm = _dm(synthetic_coco, batch_size=2, train_image_ids=True)
    dm.setup("fit")
    loader = dm.train_dataloader()
    first = next(iter(loader))
    assert first["image_ids"].shape == (2,)
    rest = list(loader)  # a new epoch: still len(loader) full batches
    assert len(rest) == len(loader) and all(b["images"].shape[0] == 2 for b in rest)


def test_seeds_differ_per_rank_and_repeat_per_seed(synthetic_coco):
    def first_images(rank, seed):
        dm = _dm(synthetic_coco, shard_id=rank, num_shards=1, seed=seed)
        dm.shard_id, dm.num_shards = None, None
        dm.trainer = SimpleNamespace(
            global_rank=rank, world_size=2, local_rank=rank, precision="32-true",
            strategy=SimpleNamespace(root_device=torch.device("cpu")),
        )  # fmt: skip
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))["images"]

    a = first_images(0, seed=0)
    assert torch.equal(a, first_images(0, seed=0))
    assert not torch.equal(a, first_images(0, seed=1))
    assert not torch.equal(a, first_images(1, seed=0))  # different shard and augmentation seed


def test_trainer_rank_and_precision_are_used(synthetic_coco):
    dm = _dm(synthetic_coco)
    dm.trainer = SimpleNamespace(
        global_rank=1, world_size=2, local_rank=0, precision="bf16-mixed",
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
    )  # fmt: skip
    dm.setup("fit")
    assert dm._runtime["rank"] == 1 and dm._runtime["world"] == 2 and dm._runtime["decode"] == "cpu"
    val = dm.val_dataloader()
    batches = list(val)
    assert sum(b["images"].shape[0] for b in batches) == 5  # shard 1 of 2
    assert batches[0]["images"].dtype == torch.bfloat16
    dm = _dm(synthetic_coco, precision="16-mixed")
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["images"].dtype == torch.float16


class _Probe(pl.LightningModule):
    """Records what Lightning feeds it."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.val_epochs: list[list[int]] = []
        self.train_batches: Counter = Counter()
        self.dtypes: set = set()

    def training_step(self, batch, batch_idx):
        self.train_batches[self.current_epoch] += 1
        self.dtypes.add(batch["images"].dtype)
        return self.w * batch["images"].float().mean() + (batch["labels"] > 0).float().mean()

    def on_validation_epoch_start(self):
        self.val_epochs.append([])

    def validation_step(self, batch, batch_idx):
        self.val_epochs[-1].extend(batch["image_ids"].tolist())

    def configure_optimizers(self):
        return torch.optim.SGD([self.w], lr=0.01)


def test_lightning_fit_sanity_check_then_every_val_image_once_per_epoch(synthetic_coco):
    dm = _dm(synthetic_coco, batch_size=4, val_batch_size=3)
    probe = _Probe()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        num_sanity_val_steps=1,
        precision="bf16-mixed",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(probe, datamodule=dm)
    sanity, *epochs = probe.val_epochs
    assert len(sanity) == 3  # one batch
    assert len(epochs) == 2
    for ids in epochs:
        assert sorted(ids) == dm.val_image_ids
    assert probe.train_batches == {0: 3, 1: 3}  # 15 annotated images // 4
    assert probe.dtypes == {torch.bfloat16}
    # evaluation entry points reuse the datamodule
    trainer.validate(probe, datamodule=dm, verbose=False)
    assert sorted(probe.val_epochs[-1]) == dm.val_image_ids


def test_synthetic_option_writes_the_set_on_first_use(tmp_path):
    root = tmp_path / "data" / "synthetic"
    dm = _dm(root, synthetic={"num_train": 6, "num_val": 4, "size_range": [64, 96]})
    dm.prepare_data()
    assert (root / ".synthetic_complete").is_file()
    dm.setup("fit")
    assert dm.num_classes == 4 and len(dm.val_image_ids) == 4


def test_plain_coco_layout_and_split_overrides(synthetic_coco, tmp_path):
    plain = tmp_path / "coco"
    plain.mkdir()
    copy_set(synthetic_coco / "images" / "train2017", plain / "train2017")
    copy_set(synthetic_coco / "annotations", plain / "annotations")
    dm = _dm(plain, val_images="train2017", val_annotations="annotations/instances_train2017.json")
    dm.setup("fit")
    assert len(dm.val_image_ids) == 16 and len(dm.train_dataloader()) == 7


def test_any_number_of_classes(synthetic_coco, tmp_path):
    root = copy_set(synthetic_coco, tmp_path / "set")
    for split in ("train", "val"):
        doc = load_json(ann_file(root, split))
        doc["categories"] += [{"id": 1000 + k, "name": f"unused{k}"} for k in range(5)]
        save_json(ann_file(root, split), doc)
    dm = _dm(root)
    dm.setup("fit")
    assert dm.num_classes == 9 and dm.categories.dataset_ids[-1] == 1004
    assert int(next(iter(dm.train_dataloader()))["labels"].max()) <= 3


class _RankProbe(_Probe):
    """Writes, per rank, the image ids seen per train/val epoch."""

    def __init__(self, out_dir):
        super().__init__()
        self.out_dir = str(out_dir)
        self.train_ids: list[list[int]] = []

    def on_train_epoch_start(self):
        self.train_ids.append([])

    def training_step(self, batch, batch_idx):
        self.train_ids[-1].extend(batch["image_ids"].tolist())
        return super().training_step(batch, batch_idx)

    def on_fit_end(self):
        import json
        from pathlib import Path

        record = {"val": self.val_epochs, "train": self.train_ids, "batches": dict(self.train_batches)}
        Path(self.out_dir, f"rank{self.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.slow
def test_ddp_two_processes_shard_by_trainer_rank(synthetic_coco, tmp_path):
    dm = _dm(synthetic_coco, batch_size=3, val_batch_size=2, train_image_ids=True)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=2,
        num_sanity_val_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(_RankProbe(tmp_path), datamodule=dm)
    ranks = [load_json(tmp_path / f"rank{r}.json") for r in range(2)]
    expected = sorted(load_json(ann_file(synthetic_coco, "val"))["images"], key=lambda im: im["id"])
    for epoch in (1, 2):  # 0 is the sanity check
        seen = ranks[0]["val"][epoch] + ranks[1]["val"][epoch]
        assert sorted(seen) == [im["id"] for im in expected]
    for epoch in range(2):
        a, b = ranks[0]["train"][epoch], ranks[1]["train"][epoch]
        assert len(a) == len(b) == 6 and not set(a) & set(b)


@pytest.mark.parametrize("include_crowd", [True, False])
def test_crowd_only_images_follow_train_include_crowd(synthetic_coco, tmp_path, include_crowd):
    root = copy_set(synthetic_coco, tmp_path / "set")
    doc = load_json(ann_file(root))
    crowd_image = doc["annotations"][0]["image_id"]
    for a in doc["annotations"]:
        if a["image_id"] == crowd_image:
            a["iscrowd"] = 1
    save_json(ann_file(root), doc)
    dm = _dm(root, batch_size=1, train_include_crowd=include_crowd, train_image_ids=True)
    dm.setup("fit")
    assert dm.num_train_images == (15 if include_crowd else 14)
    loader = dm.train_dataloader()
    assert len(loader) == dm.num_train_images
    ids = _ids(loader)
    assert sorted(ids) == sorted(set(ids)) and len(ids) == dm.num_train_images  # DALI reads what we counted
    assert (crowd_image in ids) == include_crowd


def test_datamodule_pickles_for_ddp_spawn(synthetic_coco):
    import pickle

    dm = _dm(synthetic_coco)
    dm.setup("fit")
    list(dm.val_dataloader())
    clone = pickle.loads(pickle.dumps(dm))
    clone.setup("validate")
    assert sorted(_ids(clone.val_dataloader())) == dm.val_image_ids


def test_yielded_batches_stay_valid_while_the_pipeline_runs_on(synthetic_coco):
    """Batches are not views of buffers DALI reuses: held batches keep their values over later epochs."""
    dm = _dm(synthetic_coco, batch_size=2, val_batch_size=3)
    dm.setup("fit")
    held, sums = [], []
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        for _ in range(2):
            for batch in loader:
                held.append(batch)
                sums.append({k: float(v.double().sum()) for k, v in batch.items()})
    for batch, ref in zip(held, sums, strict=True):
        assert {k: float(v.double().sum()) for k, v in batch.items()} == ref
