"""The training data of an epoch depends on the seed and the epoch number only (exact resume), and a
mid-epoch loader state continues the epoch with the batches the uninterrupted run had."""

from __future__ import annotations

import torch

from ssd_lightning.data import COCODataModule
from ssd_lightning.data.sharding import augmentation_seed, epoch_permutation


def _loader(root, epoch_source=None, seed=0):
    dm = COCODataModule(
        root,
        batch_size=2,
        num_threads=1,
        device="cpu",
        seed=seed,
        train_image_ids=True,
        prefetch_queue_depth=1,
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader._epoch_source = epoch_source
    return loader


def _epoch(loader) -> list[dict[str, torch.Tensor]]:
    return list(loader)


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x["image_ids"], y["image_ids"]) and torch.equal(x["images"], y["images"])
        for x, y in zip(a, b, strict=True)
    )


def test_an_epoch_is_a_function_of_the_seed_and_its_number(synthetic_coco):
    straight = _loader(synthetic_coco)
    epochs = [_epoch(straight) for _ in range(3)]  # no trainer: epochs 0, 1, 2 by iter() count
    assert straight.epoch == 2 and all(len(e) == 15 // 2 for e in epochs)
    ids = [torch.cat([b["image_ids"] for b in e]).tolist() for e in epochs]
    assert ids[0] != ids[1] != ids[2]  # re-shuffled every epoch, the first one too
    # a "resumed" loader that starts at epoch 2 sees what the uninterrupted one saw in its epoch 2
    resumed = _loader(synthetic_coco, epoch_source=lambda: 2)
    assert _same(_epoch(resumed), epochs[2])
    assert not _same(_epoch(_loader(synthetic_coco, epoch_source=lambda: 2, seed=1)), epochs[2])


def test_a_mid_epoch_state_continues_the_epoch_exactly(synthetic_coco):
    full = _loader(synthetic_coco, epoch_source=lambda: 1)
    batches = _epoch(full)
    partial = _loader(synthetic_coco, epoch_source=lambda: 1)
    it = iter(partial)
    next(it), next(it)
    state = partial.state_dict()
    assert state == {"epoch": 1, "batches": 2}  # no trainer: the batches it yielded
    resumed = _loader(synthetic_coco, epoch_source=lambda: 1)
    resumed.load_state_dict(state)
    rest = _epoch(resumed)
    assert len(rest) == len(batches) - 2 and _same(rest, batches[2:])  # replayed: augmentation included
    assert len(_epoch(resumed)) == len(batches)  # the state applies once
    # a state of another epoch (an epoch-end checkpoint read at the next epoch) is ignored
    other = _loader(synthetic_coco, epoch_source=lambda: 1)
    other.load_state_dict({"epoch": 0, "batches": 7})
    assert _same(_epoch(other), batches)


def test_shards_of_an_epoch_partition_its_permutation():
    order = epoch_permutation(0, 3, 10)
    assert sorted(order.tolist()) == list(range(10))
    assert order.tolist() == epoch_permutation(0, 3, 10).tolist() != epoch_permutation(0, 4, 10).tolist()
    seeds = {augmentation_seed(0, e, r) for e in range(3) for r in range(4)}
    assert len(seeds) == 12 and all(0 <= s < 2**31 for s in seeds)


def test_the_next_epoch_built_ahead_gives_the_same_data(synthetic_coco):
    ahead = _loader(synthetic_coco)
    first = iter(ahead)
    batches = [next(first)]
    assert ahead._ahead is not None and ahead._ahead[0] == 1  # epoch 1 is being built while epoch 0 runs
    batches += list(first)
    built_ahead = ahead._ahead[1]
    second = _epoch(ahead)  # takes over the pipeline built ahead
    assert built_ahead.done() and ahead._ahead[0] == 2
    plain = _loader(synthetic_coco)
    plain.background = False
    assert _same(_epoch(plain), batches) and _same(_epoch(plain), second) and plain._ahead is None
    # a loader asked for another epoch than the one built ahead drops it and builds the right one
    jumping = _loader(synthetic_coco, epoch_source=lambda: 1)
    assert _same(_epoch(jumping), second) and _same(_epoch(jumping), second)
