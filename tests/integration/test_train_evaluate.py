"""train.py and evaluate.py end to end on the real stack: Hydra config, DALI CPU pipeline, Lightning loop,
COCO evaluation. One tiny training run (resnet18, 2 epochs of 3 batches of 4) is shared by the tests."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging

import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import ssd_lightning
from ssd_lightning.class_metrics import format_class_table
from ssd_lightning.evaluation import METRIC_NAMES, format_table
from ssd_lightning.tasks.evaluate import evaluate
from ssd_lightning.tasks.train import train
from ssd_lightning.training.module import SSDModule
from ssd_lightning.training.schedule import WarmupMultiStepLR

from .hydra_helpers import TINY, compose_config

STEPS_PER_EPOCH = 3  # 15 annotated train images // batch 4


def _run(task, cfg):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = task(cfg)
    return result, out.getvalue()


@pytest.fixture(scope="module")
def trained(synthetic_coco, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("train_run")
    cfg = compose_config("train", [*TINY, f"data.root={synthetic_coco}", "seed=0"], run_dir)
    (metrics, objects), stdout = _run(train, cfg)
    return {"dir": run_dir, "metrics": metrics, "objects": objects, "stdout": stdout, "root": synthetic_coco}


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eval_run")
    ckpt = trained["dir"] / "checkpoints" / "last.ckpt"
    overrides = [
        "experiment=quickstart",
        f"data.root={trained['root']}",
        "data.batch_size=4",
        f"ckpt_path={ckpt}",
    ]
    cfg = compose_config("evaluate", overrides, run_dir)
    metrics, stdout = _run(evaluate, cfg)
    return {"dir": run_dir, "metrics": metrics, "stdout": stdout}


def test_training_ends_with_the_coco_table(trained):
    model = trained["objects"]["model"]
    trainer = trained["objects"]["trainer"]
    assert trainer.current_epoch == 2 and trainer.global_step == 2 * STEPS_PER_EPOCH
    assert set(model.val_metrics) == set(METRIC_NAMES)
    table = format_table(model.val_metrics)
    assert table in trained["stdout"]
    # the network summary is printed at the start of training (before the table)
    params = sum(p.numel() for p in model.model.parameters())
    summary = f"Model summary: 102 layers, {params} parameters, {params} gradients"
    assert trained["stdout"].index(summary) < trained["stdout"].index(table)
    assert len(table.splitlines()) == 12
    for name in METRIC_NAMES:  # every rank logs the same 12 numbers; val/AP is what checkpoints monitor
        assert trained["metrics"][f"val/{name}"] == pytest.approx(model.val_metrics[name], abs=1e-6)
    for key in ("train/loss_epoch", "train/loss_box_epoch", "train/loss_cls_epoch", "train/throughput_epoch"):
        assert key in trained["metrics"]
    csv = (trained["dir"] / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/lr", "train/loss_step", "val/AP"} <= set(csv)
    assert not [c for c in csv if c.startswith(("lr/", "lr-"))]  # the learning rate is logged once: train/lr
    assert "loss" not in csv  # the progress-bar copy of the loss is not logged twice
    # the progress bar shows the host copy of the step loss only: no device tensor is read per step
    assert "loss" in trainer.progress_bar_metrics
    assert not any(key.startswith("train/") for key in trainer.progress_bar_metrics)


def test_epoch_means_of_the_losses_are_the_means_of_the_steps(trained):
    """train/loss*_epoch (torchmetrics MeanMetric, one process here) equal the mean of the epoch's logged step
    losses (every step is logged: trainer.log_every_n_steps=1, equal batches)."""
    with open(trained["dir"] / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for part in ("loss", "loss_box", "loss_cls"):
        for epoch in (0, 1):
            steps = [
                float(r[f"train/{part}_step"])
                for r in rows
                if r["epoch"] == str(epoch) and r[f"train/{part}_step"]
            ]
            means = [
                float(r[f"train/{part}_epoch"])
                for r in rows
                if r["epoch"] == str(epoch) and r[f"train/{part}_epoch"]
            ]
            assert len(steps) == STEPS_PER_EPOCH and len(means) == 1, (part, epoch)
            assert means[0] == pytest.approx(sum(steps) / len(steps), rel=1e-5), (part, epoch)


def test_validation_logs_the_ap_of_every_class(trained):
    model = trained["objects"]["model"]
    per_class = model.val_evaluation.per_class
    assert list(per_class) == ["red_rectangle", "green_ellipse", "blue_triangle"]
    for name, values in per_class.items():
        assert trained["metrics"][f"val/AP/{name}"] == pytest.approx(values["AP"], abs=1e-6), name
        assert values["num_gt"] > 0


def test_checkpoints_load_with_weights_only(trained):
    ckpt_dir = trained["dir"] / "checkpoints"
    assert (ckpt_dir / "last.ckpt").is_file() and (ckpt_dir / "best.ckpt").is_file()
    ckpt = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert hp["backbone"] == "resnet18" and hp["num_classes"] == 4
    assert hp["category_ids"] == [3, 7, 11] and hp["class_names"] == [
        "red_rectangle",
        "green_ellipse",
        "blue_triangle",
    ]
    assert (
        hp["lr"] == trained["objects"]["cfg"].optim.lr
        and hp["weight_decay"] == 5e-4
        and hp["warmup_steps"] == 2
    )
    assert all(k.startswith(("model.", "loss.")) for k in ckpt["state_dict"])
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 2 * STEPS_PER_EPOCH
    model = ssd_lightning.load_model(ckpt_dir / "last.ckpt")
    assert model.backbone_name == "resnet18" and model.num_classes == 4 and not model.training
    trained_weights = trained["objects"]["model"].model.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, trained_weights[key]), key


def test_evaluate_reproduces_the_training_ap(trained, evaluated):
    assert "Model summary: 102 layers, " in evaluated["stdout"] and "Model FLOPs: " in evaluated["stdout"]
    final = trained["objects"]["model"].val_metrics
    for name in METRIC_NAMES:
        assert evaluated["metrics"][name] == pytest.approx(final[name], abs=1e-9), name
    assert format_table(evaluated["metrics"]) in evaluated["stdout"]
    on_disk = json.loads((evaluated["dir"] / "metrics.json").read_text())
    assert list(on_disk) == [*METRIC_NAMES, "per_class"]
    per_class = on_disk.pop("per_class")
    assert on_disk == pytest.approx(evaluated["metrics"], abs=1e-12)
    # the per-class table: the training's last validation, in metrics.json and printed under the 12 lines
    trained_per_class = trained["objects"]["model"].val_evaluation.per_class
    assert list(per_class) == list(trained_per_class)
    for name, values in per_class.items():
        assert values == pytest.approx(trained_per_class[name], abs=1e-9), name
    table = format_class_table(per_class)
    assert evaluated["stdout"].index(format_table(evaluated["metrics"])) < evaluated["stdout"].index(table)
    with Image.open(evaluated["dir"] / "precision_recall.png") as image:
        assert image.format == "PNG" and image.size[0] > 0


def test_ap_and_table_equal_pycocotools_on_detections_json(trained, evaluated):
    """The official tool on the written detections.json gives the same numbers and prints the same table."""
    ann = trained["root"] / "annotations" / "instances_val2017.json"
    detections = json.loads((evaluated["dir"] / "detections.json").read_text())
    assert detections, "the model detected nothing: the comparison would be vacuous"
    assert {"image_id", "category_id", "bbox", "score"} == set(detections[0])
    assert {d["category_id"] for d in detections} <= {3, 7, 11}  # dataset ids, not labels
    with contextlib.redirect_stdout(io.StringIO()) as out:
        gt = COCO(str(ann))
        coco_eval = COCOeval(gt, gt.loadRes(str(evaluated["dir"] / "detections.json")), iouType="bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        start = out.tell()
        coco_eval.summarize()
    pycocotools_table = out.getvalue()[start:].rstrip("\n")
    for name, value in zip(METRIC_NAMES, coco_eval.stats, strict=True):
        assert evaluated["metrics"][name] == pytest.approx(float(value), abs=1e-4), name
    assert pycocotools_table in evaluated["stdout"]


def test_evaluate_a_detections_file_without_a_model(trained, evaluated, tmp_path):
    overrides = [
        f"data.root={trained['root']}",
        f"detections={evaluated['dir'] / 'detections.json'}",
    ]
    cfg = compose_config("evaluate", overrides, tmp_path)
    metrics, stdout = _run(evaluate, cfg)
    assert metrics == pytest.approx(evaluated["metrics"], abs=1e-12)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert list(on_disk.pop("per_class")) == ["red_rectangle", "green_ellipse", "blue_triangle"]
    assert on_disk == pytest.approx(metrics, abs=1e-12)
    assert format_table(metrics) in stdout
    assert (tmp_path / "precision_recall.png").is_file()
    assert not (tmp_path / "detections.json").exists()


def test_resume_continues_steps_epochs_and_schedule(trained, tmp_path, caplog):
    ckpt = trained["dir"] / "checkpoints" / "last.ckpt"
    overrides = [*TINY, f"data.root={trained['root']}", "seed=0", f"ckpt_path={ckpt}", "trainer.max_epochs=3"]
    # with a sanity check: its partial validation pass must neither be scored nor shift the real one
    cfg = compose_config("train", [*overrides, "trainer.num_sanity_val_steps=1"], tmp_path)
    with caplog.at_level(logging.INFO, logger="ssd_lightning"):
        (metrics, objects), _ = _run(train, cfg)
    assert not [r for r in caplog.records if "validation covered" in r.getMessage()]
    assert (
        len([r for r in caplog.records if r.getMessage().startswith("epoch ")]) == 1
    )  # one scored validation
    trainer, model = objects["trainer"], objects["model"]
    assert trainer.current_epoch == 3 and trainer.global_step == 3 * STEPS_PER_EPOCH
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert isinstance(scheduler, WarmupMultiStepLR)
    assert scheduler.last_epoch == 3 * STEPS_PER_EPOCH and scheduler.epoch == 2
    # optim.lr per 32 images at batch 4; the warmup (2 steps) is over, the milestone (epoch 8) not reached
    lr = cfg.optim.lr * 4 / 32
    assert [g["lr"] for g in trainer.optimizers[0].param_groups] == pytest.approx([lr, lr])
    rows = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    steps = {int(r.split(",")[header.index("step")]) for r in rows[1:] if r.split(",")[header.index("step")]}
    val_rows = [r for r in rows[1:] if r.split(",")[header.index("val/AP")]]
    assert len(val_rows) == 1
    assert min(steps) >= 2 * STEPS_PER_EPOCH  # the resumed run logs from the step the first one stopped at
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert isinstance(model, SSDModule) and "val/AP" in metrics


def test_fast_dev_run_through_the_dali_pipeline(synthetic_coco, tmp_path):
    overrides = [*TINY, f"data.root={synthetic_coco}", "+trainer.fast_dev_run=true"]
    cfg = compose_config("train", overrides, tmp_path)
    (metrics, objects), _ = _run(train, cfg)
    trainer = objects["trainer"]
    assert trainer.global_step == 1
    assert "train/loss" in metrics or "train/loss_step" in metrics
    assert not (tmp_path / "checkpoints").exists()  # fast_dev_run writes no checkpoints
