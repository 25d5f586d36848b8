"""The annotation index: the cold work once (one process at a time), reloaded from the cache by later data
modules and launches, missed when the annotation file or a setting changes; and the preprocessed annotation
files DALI reads instead of the JSON carry exactly what its JSON parser gives (same images, boxes, labels,
order)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from dali_helpers import ann_file, copy_set, image_dir, load_json, save_json

from ssd_lightning.boxes import ssd300_default_boxes
from ssd_lightning.data import COCODataModule, DataWarning
from ssd_lightning.data.index import entry_dir, load_index
from ssd_lightning.data.pipelines import eval_pipeline, train_pipeline
from ssd_lightning.data.reader_files import write_preprocessed_annotations

DATA_LOGGER = "ssd_lightning.data"


def _dm(root, cache, **kw):
    args = dict(batch_size=2, val_batch_size=2, num_threads=1, device="cpu", cache_dir=cache)
    args.update(kw)
    return COCODataModule(root, **args)


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith(DATA_LOGGER)]


def _count(messages: list[str], text: str) -> int:
    return sum(text in m for m in messages)


def test_the_cold_work_is_cached_and_a_changed_setting_misses_only_what_it_changes(
    synthetic_coco, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger=DATA_LOGGER)
    cold = _dm(synthetic_coco, tmp_path / "cache")
    cold.setup("fit")
    first = _messages(caplog)
    assert _count(first, "indexed in") == 2 and _count(first, "checked (header, trailer, size)") == 2
    caplog.clear()

    warm = _dm(synthetic_coco, tmp_path / "cache")
    warm.setup("fit")
    second = _messages(caplog)
    assert _count(second, "from the cache") == 2 and _count(second, "already checked") == 2
    assert _count(second, "indexed in") == 0 and _count(second, "checked (header") == 0
    for split in ("train", "val"):
        a, b = cold._ann[split], warm._ann[split]
        assert a.categories == b.categories and a.report == b.report
        for name in ("image_ids", "raw_sizes", "name_blob", "ann_image", "ann_label", "ann_box", "ann_crowd"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert warm.val_image_ids == cold.val_image_ids and warm.num_train_images == cold.num_train_images == 15
    doc = load_json(ann_file(synthetic_coco))
    assert warm._ann["train"].file_names[doc["images"][3]["id"]] == doc["images"][3]["file_name"]
    caplog.clear()

    # another selection of val images (only annotated ones) is checked again; the index is reused
    _dm(synthetic_coco, tmp_path / "cache", val_include_empty=False).setup("validate")
    third = _messages(caplog)
    assert _count(third, "from the cache") == 1 and _count(third, "checked (header") == 1
    caplog.clear()
    _dm(synthetic_coco, tmp_path / "cache", check_images=False).setup("validate")
    assert _count(_messages(caplog), "files found in") == 1


def test_a_changed_annotation_file_misses_the_cache(synthetic_coco, tmp_path, caplog):
    root = copy_set(synthetic_coco, tmp_path / "set")
    cache = tmp_path / "cache"
    _dm(root, cache).setup("fit")
    doc = load_json(ann_file(root))
    gone = doc["annotations"][0]["image_id"]
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] != gone]
    save_json(ann_file(root), doc)
    caplog.set_level(logging.INFO, logger=DATA_LOGGER)
    dm = _dm(root, cache)
    dm.setup("fit")
    assert _count(_messages(caplog), "indexed in") == 1  # train again, val from the cache
    assert dm.num_train_images == 14 and gone not in dm._reader_ids("train")
    folder = entry_dir(cache, ann_file(root))
    assert len(list(folder.glob("index-*.npz"))) == 1  # the stale entry is gone
    caplog.clear()
    stat = ann_file(root).stat()
    os.utime(ann_file(root), ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same bytes, new mtime
    _dm(root, cache).setup("fit")
    assert _count(_messages(caplog), "indexed in") == 1


def test_a_read_only_data_root_works_with_the_default_cache(synthetic_coco, tmp_path, monkeypatch):
    root = copy_set(synthetic_coco, tmp_path / "set")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))

    def listing() -> dict[str, int]:
        return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}

    before = listing()
    for p in [root, *root.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)
    try:
        dm = COCODataModule(root, batch_size=2, num_threads=1, device="cpu")
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
    finally:
        for p in [root, *root.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)
    assert batch["images"].shape == (2, 3, 300, 300)
    assert listing() == before  # nothing written into data.root
    assert list((tmp_path / "xdg" / "ssd_lightning" / "data").glob("*/index-*.npz"))


def test_the_repair_report_reaches_the_log_also_when_warnings_are_ignored(synthetic_coco, tmp_path, caplog):
    root = copy_set(synthetic_coco, tmp_path / "set")
    doc = load_json(ann_file(root))
    doc["annotations"][0]["category_id"] = 999
    save_json(ann_file(root), doc)
    caplog.set_level(logging.INFO, logger=DATA_LOGGER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        _dm(root, tmp_path / "cache").setup("fit")
    reports = [r for r in caplog.records if "category 999" in r.getMessage()]
    assert len(reports) == 1 and reports[0].levelno == logging.WARNING
    assert str(ann_file(root)) in reports[0].getMessage()
    caplog.clear()
    with pytest.warns(DataWarning, match="category 999"):  # a warm start reports it again
        _dm(root, tmp_path / "cache").setup("fit")
    assert _count(_messages(caplog), "category 999") == 1


_WORKER = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
from ssd_lightning.data import COCODataModule
dm = COCODataModule(sys.argv[1], batch_size=2, num_threads=1, device="cpu", cache_dir=sys.argv[2])
dm.setup("fit")
print("images", dm.num_train_images)
"""


def test_two_processes_at_once_do_the_cold_work_once(synthetic_coco, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "-c", _WORKER, str(synthetic_coco), str(tmp_path / "cache")]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)]
    procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    both = "".join(outputs)
    assert both.count("indexed in") == 2 and both.count("from the cache") == 2  # train and val, once each
    assert both.count("checked (header") == 2 and both.count("already checked") == 2
    assert both.count("images 15") == 2


# ----------------------------------------------------------------------------------------------------
# DALI's preprocessed annotation files against its JSON parser


@pytest.fixture()
def awkward(synthetic_coco, tmp_path) -> Path:
    """The synthetic set with float boxes, boxes over the edge (repaired), crowd boxes and crowd-only
    images."""
    root = copy_set(synthetic_coco, tmp_path / "awkward")
    doc = load_json(ann_file(root))
    sizes = {im["id"]: (im["width"], im["height"]) for im in doc["images"]}
    for k, a in enumerate(doc["annotations"]):
        x, y, w, h = a["bbox"]
        a["bbox"] = [x + 0.37, y + 0.11, w * 0.93, h * 0.71]
        a["iscrowd"] = int(k % 4 == 1)
        if k % 5 == 2:
            width, height = sizes[a["image_id"]]
            a["bbox"] = [width - 20.25, height / 3, 40.5, 10.1]  # reaches outside: clipped
    save_json(ann_file(root), doc)
    return root


def _outputs(pipe, iterations: int) -> list[list[np.ndarray]]:
    pipe.build()
    out = []
    for _ in range(iterations):
        out.append([[np.asarray(t.at(i)) for i in range(len(t))] for t in pipe.run()])
    return out


def _assert_same(a, b) -> None:
    for batch_a, batch_b in zip(a, b, strict=True):
        for out_a, out_b in zip(batch_a, batch_b, strict=True):
            for x, y in zip(out_a, out_b, strict=True):
                assert x.dtype == y.dtype and np.array_equal(x, y)


@pytest.mark.parametrize("include_crowd", [True, False])
def test_preprocessed_files_give_the_train_pipeline_what_the_json_gives(awkward, tmp_path, include_crowd):
    index = load_index(ann_file(awkward), tmp_path / "cache", "train")
    assert index.report["changed"] and index.reader_file != ann_file(awkward)  # the JSON way reads the repair
    positions = index.usable_positions(include_empty=False, include_crowd=include_crowd)
    order = positions[np.random.default_rng(5).permutation(len(positions))]
    common = dict(
        images_dir=str(image_dir(awkward)),
        annotation_file=str(index.reader_file),
        anchors_ltrb=ssd300_default_boxes().ltrb_list(),
        batch_size=4,
        num_threads=1,
        device_id=None,
        seed=11,
        shuffle_seed=0,
        include_crowd=include_crowd,
        return_image_ids=True,
    )
    folder = write_preprocessed_annotations(index, order, tmp_path / "pre", include_crowd=include_crowd)
    from_json = _outputs(train_pipeline(file_names=index.file_names_at(order), **common), 4)
    from_files = _outputs(train_pipeline(preprocessed_annotations=str(folder), **common), 4)
    _assert_same(from_json, from_files)
    ids = [int(i) for batch in from_files for i in np.concatenate(batch[3])]
    expected = index.image_ids[order].tolist()
    assert ids[: len(expected)] == expected  # in the given order


def test_preprocessed_files_give_the_eval_pipeline_what_the_json_gives(synthetic_coco, tmp_path):
    index = load_index(ann_file(synthetic_coco, "val"), tmp_path / "cache", "val")
    positions = index.usable_positions(include_empty=True)
    folder = write_preprocessed_annotations(index, positions, tmp_path / "pre")
    for shard in (0, 1):
        common = dict(
            images_dir=str(image_dir(synthetic_coco, "val")),
            annotation_file=str(index.reader_file),
            batch_size=3,
            num_threads=1,
            device_id=None,
            shard_id=shard,
            num_shards=2,
        )
        from_json = _outputs(eval_pipeline(file_names=index.file_names_at(positions), **common), 3)
        _assert_same(from_json, _outputs(eval_pipeline(preprocessed_annotations=str(folder), **common), 3))


def test_val_annotations_are_read_and_indexed_once_per_run(synthetic_coco, tmp_path, monkeypatch, caplog):
    import pytorch_lightning as pl

    from ssd_lightning.training import module as module_mod
    from ssd_lightning.training.module import SSDModule

    loads = []
    real = module_mod.load_annotations
    monkeypatch.setattr(module_mod, "load_annotations", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    caplog.set_level(logging.INFO, logger=DATA_LOGGER)
    dm = _dm(synthetic_coco, tmp_path / "cache", batch_size=4, val_batch_size=5)
    model = SSDModule(backbone="resnet18", num_classes=4, batch_size=4, score_threshold=0.5)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=3,
        limit_train_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    trainer.validate(model, datamodule=dm, verbose=False)
    assert len(model.val_metrics) and len(loads) == 1  # 4 validations, one ground-truth load
    val_lines = [m for m in _messages(caplog) if "val annotations" in m]
    messages = [m for m in val_lines if "indexed in" in m or "from the cache" in m]
    assert len(messages) == 1 and "indexed in" in messages[0]  # the data module parsed it once too


def test_the_index_gives_the_image_check_names_and_sizes_in_bulk(synthetic_coco, tmp_path):
    """The bulk look-up equals the per-image views, in the order asked (ids not sorted, one repeated)."""
    index = load_index(ann_file(synthetic_coco), tmp_path, "train")
    ids = index.image_ids.tolist()[::-1] + index.image_ids.tolist()[:1]
    names, sizes = index.names_and_sizes(ids)
    assert names == [index.file_names[i] for i in ids] and sizes == [index.sizes[i] for i in ids]
    assert len(set(names)) == len(ids) - 1 and all(name.endswith(".jpg") for name in names)
