"""User errors end with one line ``error: ...`` on stderr and exit code 1; bugs keep their traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ssd_lightning.model import SSD300
from ssd_lightning.runtime.entry import hydra_error_line, run_task
from ssd_lightning.tasks.evaluate import evaluate
from ssd_lightning.tasks.train import train

from .hydra_helpers import REPO, TINY, compose_config


def _entry_point(script: str, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(REPO / script), *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _assert_one_error_line(stderr: str, *fragments: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, stderr
    assert lines[-1] == errors[0], stderr
    assert "Traceback" not in stderr, stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def test_train_py_with_a_missing_data_root(tmp_path):
    missing = tmp_path / "no_such_dir"
    proc = _entry_point(
        "train.py", "experiment=quickstart", f"data.root={missing}", f"hydra.run.dir={tmp_path}/run"
    )
    assert proc.returncode == 1, proc.stderr
    _assert_one_error_line(proc.stderr, "data.root", str(missing))


def test_evaluate_py_with_a_missing_checkpoint(synthetic_coco, tmp_path):
    missing = tmp_path / "missing.ckpt"
    proc = _entry_point(
        "evaluate.py",
        "experiment=quickstart",
        f"data.root={synthetic_coco}",
        f"ckpt_path={missing}",
        f"hydra.run.dir={tmp_path}/run",
    )
    assert proc.returncode == 1, proc.stderr
    _assert_one_error_line(proc.stderr, str(missing), "not found")


def _fails_with(task, cfg, capsys, *fragments: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_task(task, cfg)
    assert exit_info.value.code == 1
    return _assert_one_error_line(capsys.readouterr().err, *fragments)


def _train_cfg(root, tmp_path, *extra: str):
    return compose_config("train", [*TINY, f"data.root={root}", *extra], tmp_path / "run")


def test_resume_from_a_file_that_is_not_a_checkpoint(synthetic_coco, tmp_path, capsys):
    bogus = tmp_path / "notes.ckpt"
    bogus.write_text("not a checkpoint")
    cfg = _train_cfg(synthetic_coco, tmp_path, f"ckpt_path={bogus}")
    _fails_with(train, cfg, capsys, str(bogus), "not an SSD300 checkpoint")


def test_resume_from_a_checkpoint_of_another_model(synthetic_coco, tmp_path, capsys):
    ckpt = tmp_path / "other.ckpt"
    state = {f"model.{k}": v for k, v in SSD300("resnet18", num_classes=4).state_dict().items()}
    hparams = {"backbone": "resnet18", "num_classes": 4, "category_ids": [3, 7, 11], "class_names": None}
    torch.save({"state_dict": state, "hyper_parameters": hparams, "optimizer_states": [], "loops": {}}, ckpt)
    cfg = _train_cfg(synthetic_coco, tmp_path, f"ckpt_path={ckpt}", "model.backbone=resnet34")
    _fails_with(train, cfg, capsys, "backbone=resnet18", "backbone=resnet34")


def test_a_bad_config_value(synthetic_coco, tmp_path, capsys):
    _fails_with(train, _train_cfg(synthetic_coco, tmp_path, "model.backbone=resnet99"), capsys, "resnet99")
    _fails_with(
        train, _train_cfg(synthetic_coco, tmp_path, "model.num_classes=2"), capsys, "model.num_classes"
    )
    _fails_with(train, _train_cfg(synthetic_coco, tmp_path, "optim.warmup_steps=-5"), capsys, "warmup_steps")


def test_a_broken_annotation_file(synthetic_coco, tmp_path, capsys):
    root = tmp_path / "broken"
    (root / "annotations").mkdir(parents=True)
    (root / "images").symlink_to(synthetic_coco / "images")
    (root / "annotations" / "instances_val2017.json").write_text(
        (synthetic_coco / "annotations" / "instances_val2017.json").read_text()
    )
    (root / "annotations" / "instances_train2017.json").write_text('{"images": [')
    _fails_with(train, _train_cfg(root, tmp_path), capsys, "instances_train2017.json", "not valid JSON")


def test_evaluate_needs_a_checkpoint_or_detections(synthetic_coco, tmp_path, capsys):
    cfg = compose_config("evaluate", [f"data.root={synthetic_coco}"], tmp_path)
    _fails_with(evaluate, cfg, capsys, "ckpt_path=", "detections=")
    missing = tmp_path / "dets.json"
    cfg = compose_config("evaluate", [f"data.root={synthetic_coco}", f"detections={missing}"], tmp_path)
    _fails_with(evaluate, cfg, capsys, str(missing))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_id": 1}]))
    cfg = compose_config("evaluate", [f"data.root={synthetic_coco}", f"detections={bad}"], tmp_path)
    _fails_with(evaluate, cfg, capsys, "bbox")


def test_bugs_are_not_swallowed(synthetic_coco, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr("ssd_lightning.tasks.train.build_module", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        run_task(train, _train_cfg(synthetic_coco, tmp_path))


def test_evaluate_an_nvidia_format_checkpoint(synthetic_coco, tmp_path):
    """NVIDIA DeepLearningExamples files ({"model": state_dict}, keys prefixed module.) evaluate as is."""
    torch.manual_seed(0)
    model = SSD300("resnet18", num_classes=4)
    nvidia = tmp_path / "nvidia.pt"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 65}, nvidia)
    overrides = [
        "experiment=quickstart",
        f"data.root={synthetic_coco}",
        "data.batch_size=4",
        f"ckpt_path={nvidia}",
    ]
    metrics = evaluate(compose_config("evaluate", overrides, tmp_path))
    assert set(metrics) >= {"AP", "AP50", "ARl"}
    assert (tmp_path / "detections.json").is_file() and (tmp_path / "metrics.json").is_file()


def test_evaluate_a_checkpoint_of_another_data_set(synthetic_coco, tmp_path, capsys):
    ckpt = tmp_path / "other_data.ckpt"
    state = {f"model.{k}": v for k, v in SSD300("resnet18", num_classes=4).state_dict().items()}
    hparams = {
        "backbone": "resnet18",
        "num_classes": 4,
        "category_ids": [1, 2, 3],
        "class_names": ["a", "b", "c"],
    }
    torch.save({"state_dict": state, "hyper_parameters": hparams}, ckpt)
    overrides = ["experiment=quickstart", f"data.root={synthetic_coco}", f"ckpt_path={ckpt}"]
    cfg = compose_config("evaluate", overrides, tmp_path)
    _fails_with(
        evaluate, cfg, capsys, "trained on 3 categories", "the data set the checkpoint was trained on"
    )


def test_evaluate_py_with_a_checkpoint_of_another_class_count(synthetic_coco, tmp_path):
    """An 81-class NVIDIA checkpoint on a 3-category set would score AP ~0 silently: one line instead."""
    model = SSD300("resnet18", num_classes=81)
    nvidia = tmp_path / "nvidia.pt"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, nvidia)
    run_dir = tmp_path / "run"
    proc = _entry_point(
        "evaluate.py",
        "experiment=quickstart",
        f"data.root={synthetic_coco}",
        f"ckpt_path={nvidia}",
        f"hydra.run.dir={run_dir}",
    )
    assert proc.returncode == 1, proc.stderr
    ann = synthetic_coco / "annotations" / "instances_val2017.json"
    _assert_one_error_line(
        proc.stderr,
        f"error: {nvidia} has 80 classes (num_classes=81) but the dataset {ann} has 3 categories; "
        f"evaluate on the dataset it was trained on or fine-tune with model.init_from={nvidia}",
    )
    assert not (run_dir / "detections.json").exists() and not (run_dir / "metrics.json").exists()


# ----------------------------------------------------------------------------------------------------
# Config mistakes (README "Reliability"): one line naming the key and the fix


def test_train_py_with_an_unknown_key(tmp_path):
    proc = _entry_point("train.py", "data.batchsize=8", f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 1, proc.stderr
    _assert_one_error_line(
        proc.stderr, "data.batchsize is not a config key", "did you mean data.batch_size", "+data.batchsize=8"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("script", ["train.py", "evaluate.py", "predict.py", "export.py", "benchmark.py"])
def test_every_script_answers_an_unknown_group_in_one_line(script, tmp_path):
    # one entry function (ssd_lightning.runtime.entry.run_entry_point) for all five scripts
    proc = _entry_point(script, "nosuchgroup.misspelt_key=1", f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 1, proc.stderr
    _assert_one_error_line(
        proc.stderr, "nosuchgroup.misspelt_key is not a config key", "+nosuchgroup.misspelt_key=1"
    )
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("data.batchsize=8", ["data.batchsize is not a config key", "data.batch_size", "+data.batchsize=8"]),
        ("experiment=quick", ["no config option 'experiment/quick'", "nvidia_v1_1, quickstart"]),
        ("optim.lr=[1", ["cannot parse the override 'optim.lr=[1'", "override_grammar"]),
    ],
)
def test_hydra_composition_errors_become_one_line(override, fragments):

    with pytest.raises(Exception) as err:
        compose_config("train", [override])
    line = hydra_error_line(err.value)
    assert "\n" not in line
    for fragment in fragments:
        assert fragment in line, line


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        (
            "data.batch_size=abc",
            ["data.batch_size='abc' is not an integer", "set data.batch_size to an integer"],
        ),
        ("optim.lr=fast", ["optim.lr='fast' is not a number", "default optim.lr=0.0026"]),
        ("trainer.max_epochs=1.5", ["trainer.max_epochs=1.5 is not an integer"]),
        ("trainer.precision=fp16", ["trainer.precision='fp16' is not a valid value", "bf16-mixed"]),
        ("seed=abc", ["seed='abc' is not an integer"]),
        ("callbacks.non_finite.max_bad_steps=many", ["callbacks.non_finite.max_bad_steps='many'"]),
        ("+data.batchsize=3", ["data.batchsize is not an argument of COCODataModule", "data.batch_size"]),
        ("+trainer.max_epoch=3", ["trainer.max_epoch is not an argument of Trainer", "trainer.max_epochs"]),
    ],
)
def test_a_value_of_the_wrong_type(synthetic_coco, tmp_path, capsys, override, fragments):
    _fails_with(train, _train_cfg(synthetic_coco, tmp_path, override), capsys, *fragments)


def test_more_devices_than_the_machine_has(synthetic_coco, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gpu = ["trainer.accelerator=gpu", "trainer.precision=16-mixed"]
    _fails_with(train, _train_cfg(synthetic_coco, tmp_path, *gpu), capsys, "no CUDA device", "trainer=cpu")
    auto = _train_cfg(synthetic_coco, tmp_path, "trainer.accelerator=auto", "trainer.devices=4")
    _fails_with(train, auto, capsys, "trainer.devices=4", "trainer.accelerator=cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cfg = _train_cfg(synthetic_coco, tmp_path, *gpu, "trainer.devices=8")
    _fails_with(train, cfg, capsys, "trainer.devices=8 but this machine has 2 CUDA device(s)", "devices=2")
    cfg = _train_cfg(synthetic_coco, tmp_path, *gpu, "trainer.devices=[0,3]")
    _fails_with(train, cfg, capsys, "trainer.devices=[0, 3]", "2 CUDA device(s)")


def test_a_batch_size_the_data_cannot_fill(synthetic_coco, tmp_path, capsys):
    _fails_with(train, _train_cfg(synthetic_coco, tmp_path, "data.batch_size=0"), capsys, "data.batch_size")
    cfg = _train_cfg(synthetic_coco, tmp_path, "data.batch_size=32")  # 15 annotated train images
    _fails_with(train, cfg, capsys, "15 annotated images", "data.batch_size=32", "lower data.batch_size")


def test_resume_from_a_missing_checkpoint(synthetic_coco, tmp_path, capsys):
    missing = tmp_path / "nope" / "last.ckpt"
    cfg = _train_cfg(synthetic_coco, tmp_path, f"ckpt_path={missing}")
    _fails_with(train, cfg, capsys, f"ckpt_path {missing} not found", "checkpoints/last.ckpt")
    (tmp_path / "old_run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "old_run" / "checkpoints" / "last.ckpt").write_bytes(b"")
    cfg = _train_cfg(synthetic_coco, tmp_path, f"ckpt_path={tmp_path / 'old_run'}")
    _fails_with(train, cfg, capsys, "is a folder", f"ckpt_path={tmp_path}/old_run/checkpoints/last.ckpt")


def test_resume_from_a_checkpoint_of_another_class_count(synthetic_coco, tmp_path, capsys):
    ckpt = tmp_path / "six_classes.ckpt"
    state = {f"model.{k}": v for k, v in SSD300("resnet18", num_classes=6).state_dict().items()}
    hparams = {"backbone": "resnet18", "num_classes": 6, "category_ids": [1, 2, 3, 4, 5], "class_names": None}
    torch.save({"state_dict": state, "hyper_parameters": hparams, "optimizer_states": [], "loops": {}}, ckpt)
    cfg = _train_cfg(synthetic_coco, tmp_path, f"ckpt_path={ckpt}")
    _fails_with(train, cfg, capsys, "num_classes=6", "num_classes=4", "resume with the checkpoint's config")
