"""Pictures while training (ValidationPictures) and the loggers: TensorBoard's event file holds the picture,
CSV runs get a PNG in the run directory, MLflow (a real local SQLite store) holds the metrics and the PNG."""

from __future__ import annotations

import contextlib
import io
import logging
import re
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

from ssd_lightning.tasks.train import train
from ssd_lightning.training.pictures import ValidationPictures, pick_evenly

from .hydra_helpers import REPO, TINY, compose_config

ONE_EPOCH = [*TINY, "trainer.max_epochs=1", "seed=0", "callbacks.pictures.num_images=4"]  # the default


def _train(overrides: list[str], run_dir: Path) -> tuple[dict, dict]:
    cfg = compose_config("train", overrides, run_dir)
    with contextlib.redirect_stdout(io.StringIO()):
        return train(cfg)


def _pictures(objects: dict) -> ValidationPictures:
    return next(c for c in objects["callbacks"] if isinstance(c, ValidationPictures))


def _grid_shape(count: int) -> tuple[int, int]:
    """(height, width) of make_grid's picture of ``count`` rows of two 300x300 panels, padding 4."""
    return 4 + count * 304, 4 + 2 * 304


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def tensorboard_and_mlflow_run(synthetic_coco, tmp_path_factory):
    root = tmp_path_factory.mktemp("tb_mlflow")
    run_dir = root / "run"
    overrides = [
        *ONE_EPOCH,
        f"data.root={synthetic_coco}",
        "logger=[tensorboard,mlflow]",
        f"paths.log_dir={root}",
    ]
    lightning_mlflow, records = logging.getLogger("pytorch_lightning.loggers.mlflow"), _Records()
    lightning_mlflow.addHandler(records)
    try:
        metrics, objects = _train(overrides, run_dir)
    finally:
        lightning_mlflow.removeHandler(records)
    return {
        "root": root,
        "dir": run_dir,
        "metrics": metrics,
        "objects": objects,
        "mlflow_logs": records.records,
    }


def test_pick_evenly_is_deterministic_and_spread():
    assert pick_evenly([5, 6, 7, 8, 9, 10, 11, 12], 4) == [5, 7, 9, 11]
    assert pick_evenly([3, 4], 4) == [3, 4]


def test_tensorboard_event_file_holds_the_validation_picture(tensorboard_and_mlflow_run):
    events = EventAccumulator(
        str(tensorboard_and_mlflow_run["dir"] / "tensorboard"), size_guidance={IMAGES: 0}
    )
    events.Reload()
    assert "val/pictures" in events.Tags()[IMAGES]
    (event,) = events.Images("val/pictures")  # one validation: after the only epoch
    trainer = tensorboard_and_mlflow_run["objects"]["trainer"]
    assert event.step == trainer.global_step
    picture = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))
    assert picture.shape[:2] == _grid_shape(4)
    # the picture is drawn (ground truth boxes in colour on the panels), not a blank canvas
    assert picture[..., :3].std() > 10
    # TensorBoard on, MLflow on: the PNG is written for MLflow's artifact as well
    assert (tensorboard_and_mlflow_run["dir"] / "pictures" / "epoch_000.png").is_file()


def test_mlflow_holds_the_metrics_and_the_picture(tensorboard_and_mlflow_run):
    root = tensorboard_and_mlflow_run["root"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("train")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.tags["run_dir"] == str(tensorboard_and_mlflow_run["dir"])
    logged = tensorboard_and_mlflow_run["metrics"]
    assert run.data.metrics["val/AP"] == pytest.approx(logged["val/AP"])
    losses = client.get_metric_history(run.info.run_id, "train/loss_step")
    assert len(losses) == tensorboard_and_mlflow_run["objects"]["trainer"].global_step
    assert run.data.params["backbone"] == "resnet18"
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "pictures")]
    assert artifacts == ["pictures/epoch_000.png"]
    assert experiment.artifact_location == str(root / "mlruns")
    # the experiment was made by us (one INFO line), not by Lightning with "not found. Creating it." warning
    assert not [r for r in tensorboard_and_mlflow_run["mlflow_logs"] if r.levelno >= logging.WARNING]


def test_pictures_change_no_rng_and_no_model_mode(tensorboard_and_mlflow_run):
    objects = tensorboard_and_mlflow_run["objects"]
    pictures, trainer, model = _pictures(objects), objects["trainer"], objects["model"]
    model.train()
    rng = torch.get_rng_state()
    picture = pictures.render(trainer, model)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training
    assert picture.dtype == torch.uint8 and tuple(picture.shape) == (3, *_grid_shape(4))


def test_csv_run_writes_the_picture_as_png_and_logs_the_readme_metrics(synthetic_coco, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*ONE_EPOCH, f"data.root={synthetic_coco}", "logger=csv", "callbacks.pictures.num_images=2"]
    _train(overrides, run_dir)
    png = run_dir / "pictures" / "epoch_000.png"
    assert png.is_file()
    assert np.asarray(Image.open(png)).shape[:2] == _grid_shape(2)
    assert not (run_dir / "tensorboard").exists()
    # the README's contract: every `train/...` and `val/...` name it documents is one this run logs (the
    # picture's TensorBoard tag aside: it is an image, checked above)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    names = set(re.findall(r"`((?:train|val)/[A-Za-z0-9][A-Za-z0-9_@.]*)`", readme)) - {"val/pictures"}
    documented = {re.sub(r"_(step|epoch)$", "", name) for name in names}
    assert {"train/loss", "train/loss_box", "val/AP"} <= documented
    header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    logged = {re.sub(r"_(step|epoch)$", "", name) for name in header}
    assert documented <= logged, f"in README.md but not logged: {sorted(documented - logged)}"
