"""predict.py, export.py and ``python -m ssd_lightning.summary`` with real Hydra composition, on small models
(ResNet-18 trunk) and tiny generated pictures; NVIDIA-layout checkpoints through the same entry points."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from ssd_lightning.categories import COCO2017_CATEGORY_IDS, COCO2017_CLASS_NAMES
from ssd_lightning.checkpoints import CheckpointError, LoadedCheckpoint, load_weights_into
from ssd_lightning.checkpoints.reading import checkpoint_categories
from ssd_lightning.data.pipelines import eval_pipeline
from ssd_lightning.errors import ConfigError, ExportError
from ssd_lightning.evaluation import METRIC_NAMES
from ssd_lightning.images import IMAGENET_STD, preprocess, read_image
from ssd_lightning.model import SSD300
from ssd_lightning.model.onnx_file import OnnxSSD300
from ssd_lightning.runtime.builders import build_datamodule, build_module
from ssd_lightning.runtime.entry import user_error
from ssd_lightning.summary import main
from ssd_lightning.tasks.evaluate import evaluate
from ssd_lightning.tasks.export import EXPORT_FORMATS, METADATA_FILE, _run_program, export, export_model
from ssd_lightning.tasks.predict import predict
from ssd_lightning.training.module import SSDModule

from .hydra_helpers import compose_config

REPO = Path(__file__).resolve().parents[2]
CATEGORY_IDS = [7, 9]
CLASS_NAMES = ["circle", "square"]
READABLE = ["cmyk.jpg", "gray.png", "gray16.png", "palette.png", "rgb.jpg", "rgba.png"]
UNREADABLE = ["broken.jpg", "notes.txt"]


def _compose(name: str, overrides: list[str]):
    """``conf/<name>.yaml`` as the entry point sees it (the overrides set ``paths.output_dir``)."""
    return compose_config(name, overrides)


def _run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = (
        [sys.executable, str(REPO / script)] if script.endswith(".py") else [sys.executable, "-m", script]
    )
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def _model(num_classes: int, seed: int = 0) -> SSD300:
    torch.manual_seed(seed)
    return SSD300("resnet18", num_classes=num_classes).eval()


def _save_lightning(model: SSD300, path: Path, **hparams) -> Path:
    hp = {"backbone": model.backbone_name, "num_classes": model.num_classes, **hparams}
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "hyper_parameters": hp}, path
    )
    return path


def _save_nvidia(model: SSD300, path: Path, label_map: dict[int, str] | None) -> Path:
    content = {"model": {"module." + k: v for k, v in model.state_dict().items()}, "epoch": 64}
    if label_map is not None:
        content["label_map"] = label_map
    torch.save(content, path)
    return path


def _picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x, y = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
        w, h = int(rng.integers(6, width // 2)), int(rng.integers(6, height // 2))
        draw.ellipse((x, y, x + w, y + h), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    noise = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))  # photo-like texture
    return Image.blend(img, noise, 0.15).filter(ImageFilter.GaussianBlur(1))


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> Path:
    """JPEG/PNG of several sizes and modes, a truncated JPEG, a text file and a hidden file (ignored)."""
    folder = tmp_path_factory.mktemp("pictures")
    _picture(96, 64, 0).save(folder / "rgb.jpg", quality=92)
    _picture(50, 70, 1).convert("L").save(folder / "gray.png")
    _picture(80, 60, 2).convert("CMYK").save(folder / "cmyk.jpg", quality=92)
    _picture(64, 40, 3).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    rgba = _picture(40, 64, 4).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "rgba.png")
    gray16 = (np.asarray(_picture(48, 48, 5).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(gray16).save(folder / "gray16.png")
    (folder / "broken.jpg").write_bytes((folder / "rgb.jpg").read_bytes()[:300])
    (folder / "notes.txt").write_text("not a picture\n")
    (folder / ".DS_Store").write_bytes(b"\0\1\2")
    return folder


@pytest.fixture(scope="module")
def small_model() -> SSD300:
    return _model(num_classes=3)


@pytest.fixture(scope="module")
def small_ckpt(small_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "small.ckpt"
    return _save_lightning(small_model, path, category_ids=CATEGORY_IDS, class_names=CLASS_NAMES)


# ---------------------------------------------------------------------------------------------------------
# predict
# ---------------------------------------------------------------------------------------------------------


def test_images_of_any_mode_decode_to_rgb(pictures):
    for name in READABLE:
        image = read_image(pictures / name)
        with Image.open(pictures / name) as original:
            assert tuple(image.shape) == (3, original.height, original.width), name
        assert image.dtype == torch.uint8
    gray = read_image(pictures / "gray.png")
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    gray16 = read_image(pictures / "gray16.png")
    assert torch.equal(gray16[0], torch.from_numpy(np.array(_picture(48, 48, 5).convert("L"))))
    x = preprocess(read_image(pictures / "rgb.jpg"))
    assert x.shape == (3, 300, 300) and x.dtype == torch.float32


def test_predict_folder_writes_drawings_and_coco_results(pictures, small_ckpt, small_model, tmp_path, caplog):
    out = tmp_path / "run"
    cfg = _compose(
        "predict",
        [
            f"ckpt_path={small_ckpt}",
            f"input={pictures}",
            f"paths.output_dir={out}",
            "batch_size=8",
            "max_detections=5",
            "device=cpu",
            "progress_bar=false",
        ],
    )
    result = predict(cfg)

    # every unreadable file is reported by name and skipped; hidden files are not inputs
    skipped = {Path(s["file_name"]).name for s in result.skipped}
    assert skipped == set(UNREADABLE)
    for name in UNREADABLE:
        assert any(name in r.getMessage() and r.levelname == "WARNING" for r in caplog.records), name
    assert ".DS_Store" not in caplog.text

    files = sorted(p for p in pictures.iterdir() if not p.name.startswith("."))
    ids = {p.name: i + 1 for i, p in enumerate(files)}  # 1..N in file order (stems are not numbers)
    index = json.loads(result.images_file.read_text())
    assert [Path(e["file_name"]).name for e in index["images"]] == READABLE
    assert index["categories"] == [{"id": 7, "name": "circle"}, {"id": 9, "name": "square"}]
    rows = json.loads(result.detections_file.read_text())
    assert rows == result.detections and rows

    # one PNG per readable picture, at the original size
    for entry in index["images"]:
        drawing = out / entry["drawing"]
        with Image.open(drawing) as png, Image.open(entry["file_name"]) as original:
            assert png.format == "PNG" and png.size == original.size and png.mode == "RGB"

    # the detections are SSD300.detect's on the same preprocessed batch, in original pixels, clipped
    good = [pictures / n for n in READABLE]
    batch = torch.stack([preprocess(read_image(p)) for p in good])
    expected = small_model.detect(batch, score_threshold=0.3, iou_threshold=0.5, max_detections=5)
    for path, det in zip(good, expected, strict=True):
        mine = [r for r in rows if r["image_id"] == ids[path.name]]
        assert len(mine) == len(det["scores"]) > 0, path.name
        with Image.open(path) as original:
            w, h = original.size
        ltrb = det["boxes"].double().clamp(0, 1) * torch.tensor([w, h, w, h], dtype=torch.float64)
        xywh = torch.cat([ltrb[:, :2], ltrb[:, 2:] - ltrb[:, :2]], 1)
        torch.testing.assert_close(torch.tensor([r["bbox"] for r in mine], dtype=torch.float64), xywh)
        torch.testing.assert_close(
            torch.tensor([r["score"] for r in mine], dtype=torch.float64), det["scores"].double()
        )
        assert [r["category_id"] for r in mine] == [CATEGORY_IDS[int(c) - 1] for c in det["labels"]]


def test_nvidia_checkpoint_through_predict_py(pictures, tmp_path):
    """predict.py with an NVIDIA DeepLearningExamples-layout file: COCO category ids, the file's names."""
    label_map = {0: "background", **{i: f"thing{i}" for i in range(1, 81)}}
    ckpt = _save_nvidia(_model(num_classes=81, seed=1), tmp_path / "nvidia.pt", label_map)
    run_dir = tmp_path / "run"
    proc = _run(
        "predict.py",
        f"ckpt_path={ckpt}",
        f"input={pictures}/*.*",
        "batch_size=2",  # several batches: decoding runs one batch ahead
        "max_detections=3",
        "score_threshold=0.01",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Model summary: " in proc.stdout and "Model FLOPs: " in proc.stdout
    log = proc.stdout + proc.stderr  # Hydra's console log handler writes to stdout
    assert "skipped " in log and "broken.jpg" in log and "notes.txt" in log
    index = json.loads((run_dir / "images.json").read_text())
    assert [c["id"] for c in index["categories"]] == list(COCO2017_CATEGORY_IDS)
    assert [c["name"] for c in index["categories"]] == [f"thing{i}" for i in range(1, 81)]
    assert len(index["images"]) == len(READABLE)
    rows = json.loads((run_dir / "detections.json").read_text())
    assert rows and {r["category_id"] for r in rows} <= set(COCO2017_CATEGORY_IDS)
    assert len(list((run_dir / "images").glob("*.png"))) == len(READABLE)


def test_class_metadata_of_checkpoints():
    coco = checkpoint_categories(LoadedCheckpoint({}, "resnet50", 81))
    assert coco.dataset_ids == list(COCO2017_CATEGORY_IDS) and coco.names[:2] == ["person", "bicycle"]
    assert len(set(coco.dataset_ids)) == 80 and coco.dataset_ids[-1] == 90 and 12 not in coco.dataset_ids
    plain = checkpoint_categories(LoadedCheckpoint({}, "resnet18", 4))
    assert plain.dataset_ids == [1, 2, 3] and plain.names == ["class 1", "class 2", "class 3"]
    named = checkpoint_categories(LoadedCheckpoint({}, "resnet18", 3, [5, 6], ["a", "b"]))
    assert (named.dataset_ids, named.names) == ([5, 6], ["a", "b"])
    with pytest.raises(CheckpointError, match="3 classes .* 3 class names"):
        checkpoint_categories(LoadedCheckpoint({}, "resnet18", 3, None, ["a", "b", "c"]))


@pytest.mark.parametrize(
    ("make_input", "message"),
    [
        (lambda d: d.mkdir() or d, "the folder is empty"),
        (lambda d: d / "missing", "no such file or folder"),
        (lambda d: d.mkdir() or d / "*.jpg", "matches no file"),
    ],
)
def test_empty_or_missing_input_says_so(make_input, message, small_ckpt, tmp_path):
    spec = make_input(tmp_path / "in")
    cfg = _compose("predict", [f"ckpt_path={small_ckpt}", f"input={spec}", f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=message):
        predict(cfg)


def test_folder_without_readable_images_fails_with_one_line(pictures, small_ckpt, tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    for name in UNREADABLE:
        (folder / name).write_bytes((pictures / name).read_bytes())
    cfg = _compose(
        "predict",
        [f"ckpt_path={small_ckpt}", f"input={folder}", f"paths.output_dir={tmp_path}", "progress_bar=false"],
    )
    with pytest.raises(ConfigError, match="none of the 2 files is a readable image"):
        predict(cfg)
    assert not (tmp_path / "detections.json").exists() and not (tmp_path / "images").exists()


def test_checkpoint_of_another_kind_fails_with_one_line(pictures, tmp_path):
    bad = tmp_path / "other.pt"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, bad)
    proc = _run(
        "predict.py", f"ckpt_path={bad}", f"input={pictures}", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert (
        lines[-1].startswith("error: ") and "not an SSD300 checkpoint" in lines[-1] and str(bad) in lines[-1]
    )
    assert "Traceback" not in proc.stderr


def test_nvidia_checkpoint_through_evaluate(synthetic_coco, tmp_path):
    """evaluate.py's task with an NVIDIA-layout file sized to the data set (3 categories: ids 3, 7, 11)."""

    ckpt = _save_nvidia(_model(num_classes=4, seed=4), tmp_path / "nvidia.pt", label_map=None)
    overrides = [
        "experiment=quickstart",
        f"data.root={synthetic_coco}",
        "data.batch_size=4",
        f"ckpt_path={ckpt}",
    ]
    cfg = compose_config("evaluate", overrides, tmp_path / "run")
    metrics = evaluate(cfg)
    assert list(metrics) == list(METRIC_NAMES)
    rows = json.loads((tmp_path / "run" / "detections.json").read_text())
    assert rows and {r["category_id"] for r in rows} <= {3, 7, 11}


def _coco_categories_root(synthetic_coco: Path, root: Path) -> Path:
    """The synthetic set (categories 3, 7, 11) re-labelled as a COCO 2017 set: the 80 COCO categories,
    listed in reverse order (NVIDIA's labels follow the sorted ids, not a file's listing order)."""
    root.mkdir()
    (root / "images").symlink_to(synthetic_coco / "images")
    (root / "annotations").mkdir()
    coco = list(zip(COCO2017_CATEGORY_IDS, COCO2017_CLASS_NAMES, strict=True))
    order = range(len(coco) - 1, -1, -1)
    for split in ("train", "val"):
        name = f"instances_{split}2017.json"
        data = json.loads((synthetic_coco / "annotations" / name).read_text())
        data["categories"] = [{"id": coco[i][0], "name": coco[i][1], "supercategory": "x"} for i in order]
        (root / "annotations" / name).write_text(json.dumps(data))
    return root


def test_nvidia_coco_checkpoint_on_a_coco_val_set(synthetic_coco, tmp_path):
    """An 81-class NVIDIA checkpoint (no category ids) on a COCO-format set with the 80 COCO categories:
    label l is COCO id COCO2017_CATEGORY_IDS[l - 1] (the sorted ids, NVIDIA's label order)."""

    root = _coco_categories_root(synthetic_coco, tmp_path / "coco")
    model = _model(num_classes=81, seed=7)
    label = 80  # toothbrush, COCO id 90; the only class scoring above the threshold
    with torch.no_grad():
        for conv in model.conf:
            conv.weight.zero_()
            per_class = conv.bias.view(81, -1)  # output channels: class-major, boxes per cell minor
            per_class.fill_(-10.0)
            per_class[label].fill_(10.0)
    ckpt = _save_nvidia(model, tmp_path / "nvidia.pt", label_map=None)
    overrides = [
        "experiment=quickstart",
        f"data.root={root}",
        "data.batch_size=4",
        f"ckpt_path={ckpt}",
        "trainer.precision=32-true",
    ]
    evaluate(compose_config("evaluate", overrides, tmp_path / "run"))
    rows = json.loads((tmp_path / "run" / "detections.json").read_text())
    assert rows and {r["category_id"] for r in rows} == {COCO2017_CATEGORY_IDS[label - 1]} == {90}


# ---------------------------------------------------------------------------------------------------------
# preprocessing = the DALI validation pipeline's
# ---------------------------------------------------------------------------------------------------------


def test_preprocessing_matches_the_dali_validation_pipeline(tmp_path):

    pictures = {  # down- and up-scaling, both aspect ratios, CMYK JPEG, grayscale PNG
        "down.jpg": _picture(640, 480, 10),
        "up.jpg": _picture(120, 90, 11),
        "wide.jpg": _picture(700, 233, 12),
        "cmyk.jpg": _picture(333, 457, 13).convert("CMYK"),
        "gray.png": _picture(200, 350, 14).convert("L"),
    }
    entries = []
    for i, (name, img) in enumerate(pictures.items()):
        img.save(tmp_path / name, **({"quality": 90} if name.endswith(".jpg") else {}))
        entries.append({"id": i + 1, "file_name": name, "width": img.width, "height": img.height})
    annotations = {
        "images": entries,
        "annotations": [
            {
                "id": e["id"],
                "image_id": e["id"],
                "category_id": 1,
                "bbox": [1, 1, 8, 8],
                "area": 64,
                "iscrowd": 0,
            }
            for e in entries
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(annotations))
    pipe = eval_pipeline(
        images_dir=str(tmp_path),
        annotation_file=str(tmp_path / "instances.json"),
        file_names=list(pictures),
        batch_size=1,
        num_threads=1,
        device_id=None,
    )
    pipe.build()
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for name in pictures:
        dali = torch.as_tensor(np.array(pipe.run()[0][0]))
        mine = preprocess(read_image(tmp_path / name))
        levels = (dali - mine).abs() * std * 255  # the difference in grey levels (0..255)
        # measured: 0.1 level on average, <= 2 levels except a few pixels of the last row/column (up to 5):
        # the resampling kernels treat the border differently
        assert float(levels.mean()) <= 0.25, name
        assert float((levels > 2.01).float().mean()) <= 1e-3, name
        assert float(levels.max()) <= 8.01, name


# ---------------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_onnx(small_ckpt, tmp_path_factory) -> Path:
    """``small_ckpt`` through export.py's task (format=onnx, the dynamo exporter), in a run directory of its
    own."""
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("onnx") / "run"
    cfg = _compose(
        "export", [f"ckpt_path={small_ckpt}", "format=onnx", "batch_size=2", f"paths.output_dir={out}"]
    )
    result = export(cfg)
    assert result.path == out / "ssd300_resnet18.onnx" and result.max_abs_diff < 1e-4
    assert [p.name for p in out.iterdir()] == ["ssd300_resnet18.onnx"]  # no temporary or external-data file
    return result.path


def test_onnx_export_round_trip(small_model, small_onnx):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    session = ort.InferenceSession(str(small_onnx), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["locs", "confs"]
    for batch in (1, 3):  # the batch dimension is dynamic (exported at 2)
        images = torch.randn(batch, 3, 300, 300, generator=torch.Generator().manual_seed(batch))
        locs, confs = session.run(["locs", "confs"], {"images": images.numpy()})
        with torch.inference_mode():
            want_locs, want_confs = small_model(images)
        assert locs.shape == (batch, 4, 8732) and confs.shape == (batch, 3, 8732)
        assert np.abs(locs - want_locs.numpy()).max() < 1e-4
        assert np.abs(confs - want_confs.numpy()).max() < 1e-4
    meta = {p.key: p.value for p in onnx.load(str(small_onnx)).metadata_props}
    assert json.loads(meta["class_names"]) == CLASS_NAMES and json.loads(meta["category_ids"]) == CATEGORY_IDS
    assert meta["backbone"] == "resnet18"
    # what predict.py reads back
    runner = OnnxSSD300(small_onnx)
    assert (runner.backbone, runner.num_classes) == ("resnet18", 3)
    assert (runner.categories.dataset_ids, runner.categories.names) == (CATEGORY_IDS, CLASS_NAMES)


def _same_detections(got: list[dict], want: list[dict]) -> None:
    """Row sets equal up to float noise: per image, category and score (1e-4), box (1e-2 pixels). Rows of
    nearly equal scores may come in another order."""
    assert len(got) == len(want) > 0
    unmatched = list(want)
    for row in got:
        match = next(
            (
                w
                for w in unmatched
                if (w["image_id"], w["category_id"]) == (row["image_id"], row["category_id"])
                and abs(w["score"] - row["score"]) < 1e-4
                and max(abs(a - b) for a, b in zip(w["bbox"], row["bbox"], strict=True)) < 1e-2
            ),
            None,
        )
        assert match is not None, row
        unmatched.remove(match)


def test_onnx_predict_equals_checkpoint_predict(pictures, small_ckpt, small_onnx, tmp_path):
    common = [f"input={pictures}", "batch_size=4", "max_detections=5", "num_workers=0", "progress_bar=false"]
    results = {}
    for name, model in (("ckpt", small_ckpt), ("onnx", small_onnx)):
        out = tmp_path / name
        results[name] = predict(
            _compose("predict", [f"ckpt_path={model}", f"paths.output_dir={out}", *common])
        )
    ckpt, onnx = results["ckpt"], results["onnx"]
    _same_detections(
        json.loads(onnx.detections_file.read_text()), json.loads(ckpt.detections_file.read_text())
    )
    index = {name: json.loads(r.images_file.read_text()) for name, r in results.items()}
    assert (
        index["onnx"]["categories"]
        == index["ckpt"]["categories"]
        == [
            {"id": 7, "name": "circle"},
            {"id": 9, "name": "square"},
        ]
    )
    assert (
        index["onnx"]["images"] == index["ckpt"]["images"]
        and index["onnx"]["skipped"] == index["ckpt"]["skipped"]
    )
    assert index["onnx"]["checkpoint"] == str(small_onnx)
    assert sorted(p.name for p in onnx.drawings_dir.iterdir()) == sorted(
        p.name for p in ckpt.drawings_dir.iterdir()
    )


def test_onnx_file_without_class_metadata_fails_with_one_line(pictures, small_onnx, tmp_path):
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(small_onnx))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    cfg = _compose("predict", [f"ckpt_path={bare}", f"input={pictures}", f"paths.output_dir={tmp_path}/run"])
    with pytest.raises(
        CheckpointError, match=r"bare.onnx: the ONNX file has no 'category_ids' in its metadata"
    ):
        predict(cfg)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    cfg = _compose("predict", [f"ckpt_path={tmp_path}/junk.onnx", f"input={pictures}"])
    with pytest.raises(CheckpointError, match=r"junk.onnx: onnxruntime cannot load it as a model"):
        predict(cfg)


def test_exported_program_round_trip(small_model, tmp_path):
    path = tmp_path / f"model{EXPORT_FORMATS['exported_program']}"
    meta = {"class_names": CLASS_NAMES}
    result = export_model(small_model, path, "exported_program", metadata=meta, batch_size=1)
    assert result.max_abs_diff < 1e-4 and result.check_batch == 2
    images = torch.randn(3, 3, 300, 300, generator=torch.Generator().manual_seed(0))
    extra = {METADATA_FILE: ""}
    loaded = torch.export.load(str(path), extra_files=extra).module()
    assert json.loads(extra[METADATA_FILE]) == meta
    with torch.inference_mode():
        for got, want in zip(loaded(images), small_model(images), strict=True):
            assert (got - want).abs().max() < 1e-4


def test_torchscript_is_retired_with_one_line(small_ckpt, small_model, tmp_path):
    with pytest.raises(
        ConfigError, match=r"format=torchscript: .* deprecated .* use format=exported_program"
    ):
        export_model(small_model, tmp_path / "model.pt", "torchscript")
    proc = _run(
        "export.py", f"ckpt_path={small_ckpt}", "format=torchscript", f"output={tmp_path}/m.pt", cwd=tmp_path
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: format=torchscript: TorchScript")
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "m.pt").exists()


def test_export_that_fails_its_check_writes_nothing(small_model, tmp_path, monkeypatch):
    real = _run_program
    monkeypatch.setattr(
        "ssd_lightning.tasks.export._run_program", lambda p, x: tuple(t + 1e-2 for t in real(p, x))
    )
    with pytest.raises(ExportError, match="differs from PyTorch by up to 0.01"):
        export_model(small_model, tmp_path / "model.pt2", "exported_program", batch_size=1)
    assert list(tmp_path.iterdir()) == []


def test_nvidia_checkpoint_through_export_py(tmp_path):
    pytest.importorskip("onnxruntime")
    ckpt = _save_nvidia(_model(num_classes=4, seed=2), tmp_path / "nvidia.pt", label_map=None)
    proc = _run("export.py", f"ckpt_path={ckpt}", "format=onnx", f"output={tmp_path}/m.onnx", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checked with onnxruntime against PyTorch" in proc.stdout and "max abs difference" in proc.stdout
    assert (tmp_path / "m.onnx").is_file()


# ---------------------------------------------------------------------------------------------------------
# fine-tuning from a checkpoint (model.init_from) and the summary command
# ---------------------------------------------------------------------------------------------------------


def test_load_weights_into_from_nvidia_checkpoint(tmp_path):
    source = _model(num_classes=81, seed=3)
    ckpt = _save_nvidia(source, tmp_path / "nvidia.pt", {0: "background", 1: "person"})
    same = SSD300("resnet18", num_classes=81)
    assert load_weights_into(same, ckpt) == []
    for key, value in source.state_dict().items():
        assert torch.equal(same.state_dict()[key], value), key

    other = SSD300("resnet18", num_classes=3)
    fresh_conf = {k: v.clone() for k, v in other.state_dict().items() if k.startswith("conf.")}
    kept = load_weights_into(other, ckpt)
    assert set(kept) == set(fresh_conf)
    for key, value in other.state_dict().items():
        want = fresh_conf[key] if key in fresh_conf else source.state_dict()[key]
        assert torch.equal(value, want), key
    with pytest.raises(CheckpointError, match="81 classes but the model has 3"):
        load_weights_into(other, ckpt, strict_classes=True)
    with pytest.raises(CheckpointError, match="resnet18 trunk .* set model.backbone=resnet18"):
        load_weights_into(SSD300("resnet34", num_classes=81), ckpt)


def _conf_keys(state: dict) -> set[str]:
    return {k for k in state if k.startswith("conf.")}


@pytest.mark.parametrize("num_classes", [3, 81])
def test_ssd_module_init_from_an_nvidia_checkpoint(num_classes, tmp_path):
    """model.init_from: trunk, extra blocks and box heads copied exactly; conf heads too for the same class
    count, else they keep the fresh initialisation. ImageNet backbone weights are not loaded then."""

    source = _model(num_classes=81, seed=3).state_dict()
    ckpt = _save_nvidia(_model(num_classes=81, seed=3), tmp_path / "nvidia.pt", label_map=None)
    torch.manual_seed(5)
    fresh = SSDModule("resnet18", num_classes=num_classes, backbone_weights=None).model.state_dict()
    torch.manual_seed(5)
    module = SSDModule("resnet18", num_classes=num_classes, backbone_weights="imagenet_v1", init_from=ckpt)
    assert module.hparams.init_from == str(ckpt) and type(module.hparams.init_from) is str
    state = module.model.state_dict()
    copied = [k for k in state if k not in _conf_keys(state)]
    assert any(k.startswith("feature_extractor.") for k in copied)
    assert any(k.startswith("additional_blocks.") for k in copied)
    assert any(k.startswith("loc.") for k in copied) and _conf_keys(state)
    for key in copied:
        assert torch.equal(state[key], source[key]), key
    for key in _conf_keys(state):
        want = source[key] if num_classes == 81 else fresh[key]
        assert torch.equal(state[key], want), key
        if num_classes != 81:
            assert state[key].shape[0] != source[key].shape[0]


def test_init_from_through_the_train_config(synthetic_coco, tmp_path):
    """``model.init_from=FILE`` of conf/model/ssd300.yaml reaches SSDModule; a bad file is one clear error."""

    source = _model(num_classes=81, seed=6)
    ckpt = _save_nvidia(source, tmp_path / "nvidia.pt", label_map=None)
    overrides = ["experiment=quickstart", f"data.root={synthetic_coco}", f"model.init_from={ckpt}"]
    cfg = compose_config("train", overrides, tmp_path / "run")
    assert cfg.model.init_from == str(ckpt)
    module = build_module(cfg, build_datamodule(cfg, 0))
    assert module.hparams.num_classes == 4 and module.hparams.init_from == str(ckpt)
    want = source.state_dict()
    for key, value in module.model.state_dict().items():
        if not key.startswith("conf."):
            assert torch.equal(value, want[key]), key
    missing = tmp_path / "missing.pt"
    cfg = compose_config("train", [*overrides[:2], f"model.init_from={missing}"], tmp_path / "run")
    with pytest.raises(Exception) as info:
        build_module(cfg, build_datamodule(cfg, 0))
    cause = user_error(info.value)
    assert isinstance(cause, CheckpointError)
    assert f"model.init_from={missing}" in str(cause) and "not found" in str(cause)


def test_summary_command(tmp_path, capsys):

    assert main(["model.backbone=resnet18", "model.num_classes=5"]) == 0
    out = capsys.readouterr().out
    params = sum(p.numel() for p in SSD300("resnet18", num_classes=5).parameters())
    assert "SSD300(backbone=resnet18, num_classes=5)" in out and f"{params} parameters" in out
    with pytest.raises(ConfigError, match="unknown backbone 'resnet99'"):
        main(["model.lr=1", "model.backbone=resnet99"])
    with pytest.raises(ConfigError, match="unknown key 'trainer.devices'"):
        main(["trainer.devices=2"])
    # as a command: one line and exit code 1, as every script
    bad = _run("ssd_lightning.summary", "model.backbone=resnet99", cwd=tmp_path)
    assert bad.returncode == 1, bad.stderr
    backbones = "resnet18, resnet34, resnet50, resnet101, resnet152"
    expected = f"unknown backbone 'resnet99': expected one of {backbones}"
    assert bad.stderr.strip().splitlines() == [f"error: {expected}"]

    proc = _run("ssd_lightning.summary", "model.backbone=resnet18", "model.num_classes=5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"Model summary: 102 layers, {params} parameters" in proc.stdout
