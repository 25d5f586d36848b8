"""benchmark.py: every mode runs a few iterations on the CPU through the real config (conf/benchmark.yaml,
which inherits conf/train.yaml) and writes a valid benchmark.json; user errors are one line."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssd_lightning.data import COCODataModule
from ssd_lightning.errors import ConfigError
from ssd_lightning.tasks.benchmark import run_benchmark
from ssd_lightning.tasks.benchmark.common import percentile, summarize
from ssd_lightning.tasks.benchmark.train import DeviceBatches
from ssd_lightning.training.module import SSDModule

from .hydra_helpers import REPO, compose_config

QUICK = ["benchmark.warmup=1", "benchmark.repeats=2", "benchmark.steps_per_repeat=1", "benchmark.threads=1"]
TINY_DATA = ["experiment=quickstart", "data.num_threads=1", "trainer.precision=32-true"]


def _run(overrides: list[str], run_dir: Path) -> tuple[dict, str]:
    cfg = compose_config("benchmark", overrides, run_dir)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = run_benchmark(cfg)
    written = json.loads((run_dir / "benchmark.json").read_text())
    assert written == json.loads(json.dumps(result))  # what was returned is what was written
    return written, out.getvalue()


def _benchmark_py(out: Path, *overrides: str, via: tuple[str, ...] = (), timeout: int = 600):
    """``python [via...] benchmark.py overrides`` in a subprocess writing to ``out``; (process, JSON)."""
    proc = subprocess.run(
        [sys.executable, *via, str(REPO / "benchmark.py"), *overrides, f"hydra.run.dir={out}"],
        cwd=out.parent,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads((out / "benchmark.json").read_text())


def _check_common(result: dict, mode: str, runs: int) -> None:
    assert result["mode"] == mode
    machine = result["machine"]
    assert machine["cpu_count"] >= 1 and machine["torch"] and machine["device"] == "cpu"
    assert len(result["load_average"]["before"]) == 3
    assert len(result["runs"]) == runs
    for run in result["runs"]:
        ips = run["images_per_s"]
        assert ips["n"] >= 1 and ips["median"] > 0 and ips["min"] <= ips["median"] <= ips["max"]
        assert run["memory"]["peak_rss_bytes"] > 0


def test_train_mode_times_the_lightning_step_on_dali(synthetic_coco, tmp_path):
    result, stdout = _run(
        [
            *TINY_DATA,
            f"data.root={synthetic_coco}",
            "mode=train",
            "benchmark.batch_sizes=[2,4]",
            "benchmark.warmup=2",
            "benchmark.repeats=2",
            "benchmark.steps_per_repeat=1",
            "benchmark.steps_per_epoch=2",  # 4 steps: one epoch boundary
            "fastpath.optimizer=fused",  # foreach would make the non-finite guard read its flags every step
            "fastpath.channels_last=true",
            "benchmark.profiler=simple",
        ],
        tmp_path,
    )
    _check_common(result, "train", runs=2)
    for run in result["runs"]:  # Lightning's simple profiler: one report per batch size, and the data wait
        profile = run["profile"]
        assert profile["file"] == str(tmp_path / f"fit-profile_b{run['batch_size']}.txt")
        assert "train_dataloader_next" in Path(profile["file"]).read_text()
        assert 0 < profile["data_wait_share"] < 1 and profile["training_batch_ms_median"] > 0
    assert [r["batch_size"] for r in result["runs"]] == [2, 4]
    for run in result["runs"]:
        assert run["world_size"] == 1 and run["precision"] == "32-true" and run["data_device"] == "cpu"
        assert run["steps"] == {"warmup": 2, "timed": 2}
        assert run["step_ms"]["median"] > 0
        # one warm-up step was counted; the dict names where each host read came from
        assert isinstance(run["host_syncs_per_step"], dict)
        assert all(k.startswith("progress_bar_host_read") for k in run["host_syncs_per_step"])
        assert run["blocking_host_syncs_per_step"] == 0
        # train.py's loop: across an epoch boundary, with its callbacks (the checkpoints of each epoch)
        assert run["epochs"] == 2 and len(run["epoch_boundary_gap_s"]) == 1
        assert 0 < run["epoch_boundary_gap_s"][0] < 60 and 0 <= run["data_wait_share"] < 1
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    model = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert model["optimizer_states"][0]["param_groups"][0]["fused"] is True  # callbacks.fastpath
    assert result["settings"]["fastpath"]["channels_last"] is True
    assert "| train x1 (cpu data) | 2 |" in stdout and "| train x1 (cpu data) | 4 |" in stdout


# Runs a script with every ``nvidia.dali`` import failing, as on a machine without DALI.
NO_DALI = """
import runpy, sys
class NoDali:
    def find_spec(self, name, path=None, target=None):
        if name == "nvidia.dali" or name.startswith("nvidia.dali."):
            raise ImportError("No module named " + repr(name))
sys.meta_path.insert(0, NoDali())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_train_mode_on_device_made_batches_needs_no_dali(tmp_path):
    proc, result = _benchmark_py(
        tmp_path / "run",
        "mode=train",
        "benchmark.input=synthetic",
        "experiment=quickstart",
        "trainer.precision=32-true",
        "model.num_classes=5",
        "benchmark.batch_sizes=[2]",
        "benchmark.warmup=2",
        "benchmark.repeats=2",
        "benchmark.steps_per_repeat=1",
        "benchmark.threads=1",
        via=("-c", NO_DALI),
    )
    _check_common(result, "train", runs=1)
    (run,) = result["runs"]
    assert run["input"] == "synthetic" and run["steps"] == {"warmup": 2, "timed": 2}
    assert "| train x1 (synthetic data) | 2 |" in proc.stdout


def test_device_made_batches_have_the_data_module_format(synthetic_coco, tmp_path):

    datamodule = COCODataModule(
        root=synthetic_coco, batch_size=2, num_threads=1, device="cpu", precision="32"
    )
    datamodule.setup("fit")
    real = next(iter(datamodule.train_dataloader()))
    module = SSDModule(backbone="resnet18", num_classes=4)
    made = list(DeviceBatches(module, batch_size=2, steps=3))
    assert len(made) == 3 and made[0] is made[2]  # one batch, made once
    batch = made[0]
    for key in ("images", "boxes", "labels"):
        assert batch[key].shape == real[key].shape and batch[key].dtype == real[key].dtype, key
    positives = batch["labels"] > 0
    assert 0.005 < positives.float().mean() < 0.02 and int(batch["labels"].max()) <= 3
    anchors = module.model.default_boxes.xywh
    # background rows hold the default box itself, as box_encoder writes them
    assert torch.equal(batch["boxes"][~positives], anchors.expand(2, -1, -1)[~positives])
    loss = module.loss(*module.model(batch["images"]), batch["boxes"].transpose(1, 2), batch["labels"].long())
    assert torch.isfinite(loss) and loss > 0


def test_inference_mode_end_to_end_with_nms(tmp_path):
    result, stdout = _run(
        [
            "mode=inference",
            "model.backbone=resnet18",
            "trainer.accelerator=cpu",
            "benchmark.batch_sizes=[2]",
            *QUICK,
        ],
        tmp_path,
    )
    _check_common(result, "inference", runs=1)
    run = result["runs"][0]
    assert run["input"] == "synthetic" and run["weights"] == "random" and run["num_classes"] == 81
    assert run["postprocess"] == "nms_method=auto"
    assert 0 < run["latency_ms"]["p50"] <= run["latency_ms"]["p99"] <= run["latency_ms"]["max"]
    assert 0 <= run["detections_per_image"] <= 200
    assert run["breakdown_ms"]["network_p50"] > 0 and run["breakdown_ms"]["postprocess_p50"] > 0
    assert "| inference synthetic (nms_method=auto) | 2 | cpu | 32-true |" in stdout


def test_inference_mode_on_the_dali_val_pipeline_with_per_group_nms(synthetic_coco, tmp_path):
    result, _ = _run(
        [
            *TINY_DATA,
            f"data.root={synthetic_coco}",
            "mode=inference",
            "benchmark.input=dali",
            "benchmark.batch_sizes=[4]",
            "benchmark.breakdown=false",
            "fastpath.nms_method=kernel",
            *QUICK,
        ],
        tmp_path,
    )
    run = result["runs"][0]
    assert run["input"] == "dali" and run["postprocess"] == "nms_method=kernel" and "breakdown_ms" not in run
    assert run["backbone"] == "resnet18"


def test_data_mode_times_train_and_val_loaders(synthetic_coco, tmp_path):
    result, _ = _run(
        [
            *TINY_DATA,
            f"data.root={synthetic_coco}",
            "mode=data",
            "benchmark.splits=[train,val]",
            "benchmark.batch_sizes=[4]",
            *QUICK,
        ],
        tmp_path,
    )
    _check_common(result, "data", runs=2)
    assert [r["split"] for r in result["runs"]] == ["train", "val"]
    for run in result["runs"]:
        assert run["data_device"] == "cpu" and run["num_threads"] == 1
        assert run["images_per_s_per_thread"] == pytest.approx(run["images_per_s"]["median"])


def test_eval_mode_compares_backends(tmp_path):
    result, _ = _run(
        [
            "mode=eval",
            "benchmark.eval.images=40",
            "benchmark.eval.detections_per_image=20",
            "benchmark.eval.backends=[faster_coco_eval,pycocotools]",
            "benchmark.warmup=0",
            "benchmark.repeats=1",
        ],
        tmp_path,
    )
    _check_common(result, "eval", runs=2)
    fast, plain = result["runs"]
    assert fast["backend"] == "faster_coco_eval" and plain["backend"] == "pycocotools"
    assert fast["detections"] == 40 * 20
    assert fast["max_metric_difference_between_backends"] <= 1e-4
    assert fast["metrics"]["AP"] > 0 and plain["speedup_vs_pycocotools"] == pytest.approx(1.0)


def test_statistics_helpers():
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5
    assert math.isnan(percentile([], 50))
    s = summarize([3.0, 1.0, 2.0])
    assert s["median"] == 2.0 and s["min"] == 1.0 and s["max"] == 3.0 and s["n"] == 3


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("mode=fly", "mode=fly"),
        ("fastpath.optimizer=turbo", "fastpath.optimizer=turbo"),
    ],
)
def test_user_errors_are_one_line(tmp_path, override, fragment):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmark.py"),
            override,
            "mode=eval" if "mode" not in override else override,
            f"hydra.run.dir={tmp_path}/run",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and fragment in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "benchmark.json").exists()


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("benchmark.repeats=0", "benchmark.repeats=0"),
        ("fastpath.nms_method=magic", "fastpath.nms_method=magic"),
        ("benchmark.profiler=magic", "benchmark.profiler=magic"),
    ],
)
def test_bad_settings_raise_config_errors(tmp_path, override, fragment):
    cfg = compose_config("benchmark", ["mode=eval", override], tmp_path)
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        run_benchmark(cfg)
    assert not (tmp_path / "benchmark.json").exists()


def test_benchmark_py_entry_point_writes_json(tmp_path):
    proc, result = _benchmark_py(
        tmp_path / "run",
        "mode=eval",
        "benchmark.eval.images=20",
        "benchmark.eval.detections_per_image=10",
        "benchmark.warmup=0",
        "benchmark.repeats=2",
        timeout=300,
    )
    assert result["mode"] == "eval" and result["runs"][0]["steps"]["timed"] == 2
    assert "mode=eval" in result["overrides"]
    assert "| eval faster_coco_eval | 20 |" in proc.stdout


@pytest.mark.slow
def test_train_mode_with_two_ddp_processes(synthetic_coco, tmp_path):
    _, result = _benchmark_py(
        tmp_path / "run",
        "mode=train",
        *TINY_DATA,
        f"data.root={synthetic_coco}",
        "trainer.devices=2",
        "data.batch_size=2",
        "benchmark.warmup=1",
        "benchmark.repeats=2",
        "benchmark.steps_per_repeat=1",
        "benchmark.count_syncs=false",
    )
    (run,) = result["runs"]
    assert run["world_size"] == 2 and run["global_batch_size"] == 4
    assert len(run["memory_per_rank"]) == 2 and run["images_per_s"]["median"] > 0
