"""DDP evaluation on 2 CPU processes: each image is gathered once and scores as in one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from script_runs import run_script

from ssd_lightning.model import SSD300

pytestmark = pytest.mark.slow


def _evaluate(tmp_path: Path, run: str, *overrides: str) -> Path:
    return run_script("evaluate", tmp_path, run, *overrides)[0]


def test_two_process_evaluation_equals_one(synthetic_coco, tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "model.pt"
    torch.save({"model": SSD300("resnet18", num_classes=4).state_dict()}, ckpt)
    common = [
        "experiment=quickstart",
        f"data.root={synthetic_coco}",
        "data.batch_size=3",  # 10 images: uneven shards (5 + 5) and a partial last batch per rank
        "trainer.precision=32-true",
        f"ckpt_path={ckpt}",
    ]
    one = _evaluate(tmp_path, "one", *common)
    two = _evaluate(tmp_path, "two", *common, "trainer.devices=2")
    m1 = json.loads((one / "metrics.json").read_text())
    m2 = json.loads((two / "metrics.json").read_text())
    c1, c2 = m1.pop("per_class"), m2.pop("per_class")
    assert m2 == pytest.approx(m1, abs=1e-9)
    assert list(c2) == list(c1)
    for name in c1:
        assert c2[name] == pytest.approx(c1[name], abs=1e-9), name
    d1 = json.loads((one / "detections.json").read_text())
    d2 = json.loads((two / "detections.json").read_text())
    assert len(d2) == len(d1) > 0

    def key(d):
        return d["image_id"], d["category_id"], round(d["score"], 4)

    assert sorted(map(key, d2)) == sorted(map(key, d1))
    assert (two / "evaluate_rank1.log").is_file()  # rank 1 ran in the same run directory
