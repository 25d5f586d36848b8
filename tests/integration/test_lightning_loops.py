"""Lightning's test and predict loops: ``trainer.test`` reports the validation's COCO numbers as test/*,
``SSDModule.predict_step`` is ``SSD300.detect``, and the picture data module gives each rank its own files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from ssd_lightning.data.pictures import PicturesDataModule, collate_pictures, decode_picture
from ssd_lightning.evaluation import METRIC_NAMES
from ssd_lightning.model import SSD300
from ssd_lightning.runtime.builders import build_datamodule, build_trainer
from ssd_lightning.tasks.evaluate import check_data_classes, load_for_evaluation
from ssd_lightning.training.module import SSDModule

from .hydra_helpers import compose_config


@pytest.mark.parametrize("num_files", [0, 1, 7, 10])
def test_every_file_on_exactly_one_rank(num_files):
    data = PicturesDataModule([Path(f"{i}.jpg") for i in range(num_files)])
    for world in (1, 2, 3, 4):
        shards = [list(data.shard(rank, world)) for rank in range(world)]
        assert [i for shard in shards for i in shard] == list(range(num_files))  # in order, each once
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_batch_of_readable_and_unreadable_pictures(tmp_path):
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a.png")
    (tmp_path / "b.jpg").write_bytes(b"not a picture")
    batch = collate_pictures([decode_picture(0, tmp_path / "a.png"), decode_picture(1, tmp_path / "b.jpg")])
    assert batch["images"].shape == (1, 3, 300, 300) and batch["images"].dtype == torch.float32
    assert batch["index"] == [0] and batch["sizes"] == [(30, 40)]
    assert batch["originals"][0].shape == (30, 40, 3)
    unreadable = "not an image file (or a format PIL cannot read)"
    assert batch["failed"] == [(1, str(tmp_path / "b.jpg"), unreadable)]
    empty = collate_pictures([decode_picture(1, tmp_path / "b.jpg")])
    assert empty["images"].shape == (0, 3, 300, 300) and empty["index"] == []


def test_predict_step_is_ssd300_detect():
    torch.manual_seed(0)
    module = SSDModule("resnet18", num_classes=4, score_threshold=0.3, max_detections=7).eval()
    images = torch.randn(2, 3, 300, 300, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got = module.predict_step({"images": images}, 0)
        want = module.model.detect(images, score_threshold=0.3, iou_threshold=0.5, max_detections=7)
        assert module.predict_step({"images": images[:0]}, 0) == []
    assert len(got) == 2
    for g, w in zip(got, want, strict=True):
        assert len(w["scores"]) > 0
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(g[key], w[key]), key


def test_trainer_test_reports_the_coco_metrics_as_test(synthetic_coco, tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "model.pt"
    torch.save({"model": SSD300("resnet18", num_classes=4).state_dict()}, ckpt)
    overrides = [
        "experiment=quickstart",
        f"data.root={synthetic_coco}",
        "data.batch_size=4",
        f"ckpt_path={ckpt}",
        "trainer.precision=32-true",
        "+trainer.enable_progress_bar=false",
    ]
    cfg = compose_config("evaluate", overrides, tmp_path / "run")
    module = load_for_evaluation(cfg, str(ckpt))
    datamodule = build_datamodule(cfg, 0)
    check_data_classes(str(ckpt), module, datamodule)
    trainer = build_trainer(cfg, [], [])
    (validated,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    validation_detections = module.val_detections
    (tested,) = trainer.test(module, datamodule=datamodule, verbose=False)
    assert tested and all(name.startswith("test/") for name in tested)  # nothing logged as val/ by the test
    for name in METRIC_NAMES:
        assert tested[f"test/{name}"] == pytest.approx(validated[f"val/{name}"], abs=1e-12), name
        assert tested[f"test/{name}"] == pytest.approx(module.val_metrics[name], abs=1e-12), name
    assert module.val_detections == validation_detections and validation_detections  # the same 10 images
