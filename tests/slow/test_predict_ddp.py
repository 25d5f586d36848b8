"""predict.py through Lightning's trainer.predict on 2 CPU processes (DDP, gloo): every picture predicted by
exactly one process, and the same files written as by one process; also with one picture for two processes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from script_runs import run_script

from ssd_lightning.model import SSD300

pytestmark = pytest.mark.slow


def _predict(tmp_path: Path, run: str, *overrides: str) -> tuple[Path, str]:
    return run_script("predict", tmp_path, run, *overrides)


def test_two_process_predict_covers_every_picture_once(tmp_path):
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    rng = np.random.default_rng(0)
    for i in range(7):  # 7 readable + 1 unreadable: shards of 4 and 4, a partial last batch on each rank
        size = (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(pictures / f"{i:03d}.jpg")
    (pictures / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    torch.manual_seed(0)
    ckpt = tmp_path / "model.pt"
    torch.save({"model": SSD300("resnet18", num_classes=4).state_dict()}, ckpt)
    common = [f"ckpt_path={ckpt}", f"input={pictures}", "batch_size=3", "num_workers=0", "progress_bar=false"]
    one, _ = _predict(tmp_path, "one", *common)
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
    two, stdout = _predict(tmp_path, "two", *common, *ddp)

    assert re.search(r"7 images, \d+ detections .*1 file skipped .* on 2 processes \[4, 4\]", stdout), stdout
    assert (two / "detections.json").read_text() == (one / "detections.json").read_text()
    index_one, index_two = (json.loads((d / "images.json").read_text()) for d in (one, two))
    assert index_two == index_one
    assert [Path(e["file_name"]).name for e in index_two["images"]] == [f"{i:03d}.jpg" for i in range(7)]
    assert [Path(s["file_name"]).name for s in index_two["skipped"]] == ["broken.jpg"]
    assert sorted(p.name for p in (two / "images").iterdir()) == [f"{i:03d}.png" for i in range(7)]
    assert (two / "predict_rank1.log").is_file()  # rank 1 ran in the same run directory

    # fewer files than processes: rank 0's share is empty (Lightning refuses an empty loader by default)
    single = [f"ckpt_path={ckpt}", f"input={pictures}/003.jpg", "num_workers=0", "progress_bar=false"]
    lone, stdout = _predict(tmp_path, "lone", *single, *ddp)
    assert "1 images," in stdout and "on 2 processes [0, 1]" in stdout, stdout
    rows = json.loads((lone / "detections.json").read_text())
    want = [r for r in json.loads((one / "detections.json").read_text()) if r["image_id"] == 4]  # 4th file
    assert rows == [{**r, "image_id": 3} for r in want] and rows  # alone, the file's number is its id
