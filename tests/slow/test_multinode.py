"""Multi-node training for real on one machine: two torchrun "nodes" (``--nnodes=2 --node_rank=0|1``, one
CPU process each, gloo over localhost) train one model together through ``train.py``.

Lightning detects torchrun's environment (``TorchElasticEnvironment``: RANK, LOCAL_RANK, WORLD_SIZE,
GROUP_RANK, MASTER_ADDR/PORT) and starts no process of its own; each rank reads its own DALI shard, the
gradients are averaged over both, rank 0 alone writes the checkpoints, logs and the COCO table.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssd_lightning.errors import ConfigError
from ssd_lightning.runtime.builders import build_trainer
from ssd_lightning.training.schedule import scaled_lr

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow

BATCH = 2  # per rank: 15 annotated train images -> 7 per rank -> 3 batches of 2 per epoch
EPOCHS = 2
LR = 0.02


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _recorder():
    """``tests/slow/rank_recorder.py`` (what the training processes import from their PYTHONPATH)."""
    return _load(HERE / "rank_recorder.py")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _node(node_rank: int, port: int, tmp_path: Path, overrides: list[str], log) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "1",
        "SSD_LIGHTNING_ROOT": str(tmp_path / "root"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",  # = torchrun
        "--nnodes=2",
        "--nproc_per_node=1",
        f"--node_rank={node_rank}",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        str(REPO / "train.py"),
        *overrides,
    ]
    # a session of its own: the agent and its worker are ended together if the test gives up on them
    return subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def test_two_torchrun_nodes_train_one_model(synthetic_coco, tmp_path):
    run_dir = tmp_path / "run"
    ranks_dir = tmp_path / "ranks"
    overrides = [
        "experiment=quickstart",
        f"data.root={synthetic_coco}",
        f"data.batch_size={BATCH}",
        "data.num_threads=1",
        "+data.train_image_ids=true",
        f"trainer.max_epochs={EPOCHS}",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.num_nodes=2",
        "trainer.precision=32-true",
        "trainer.log_every_n_steps=1",
        "callbacks.progress_bar.refresh_rate=0",
        f"optim.lr={LR}",
        "optim.warmup_steps=2",
        "+callbacks.rank_recorder._target_=rank_recorder.RankRecorder",
        f"+callbacks.rank_recorder.out_dir={ranks_dir}",
        f"hydra.run.dir={run_dir}",  # every node writes to the same run directory
    ]
    port = _free_port()
    logs = [open(tmp_path / f"node{i}.out", "w") for i in (0, 1)]  # closed below
    nodes = [_node(i, port, tmp_path, overrides, logs[i]) for i in (0, 1)]
    try:
        codes = [node.wait(timeout=240) for node in nodes]
    finally:
        for node, log in zip(nodes, logs, strict=True):
            if node.poll() is None:  # a node left waiting for its peer: end its agent and worker
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
            log.close()
    outputs = [(tmp_path / f"node{i}.out").read_text() for i in (0, 1)]
    assert codes == [0, 0], "\n\n".join(f"node {i}:\n{out[-3000:]}" for i, out in enumerate(outputs))

    # both processes are ranks of one 2-process DDP job started by torchrun (not by Lightning)
    records = [json.loads((ranks_dir / f"rank{i}.json").read_text()) for i in (0, 1)]
    for rank, rec in enumerate(records):
        assert rec["global_rank"] == rank and rec["node_rank"] == rank and rec["local_rank"] == 0
        assert rec["world_size"] == 2 and rec["num_nodes"] == 2
        assert rec["cluster_environment"] == "TorchElasticEnvironment" and rec["strategy"] == "DDPStrategy"
        # the learning rate follows the global batch of both nodes: 2x what one process would use
        assert rec["global_batch_size"] == 2 * BATCH
        assert rec["base_lr"] == pytest.approx(scaled_lr(LR, 2 * BATCH)) == 2 * scaled_lr(LR, BATCH)

    # each rank read its own shard: the same number of batches, disjoint images within every epoch
    assert len(records[0]["batches"]) == len(records[1]["batches"]) == 3 * EPOCHS
    for epoch in range(EPOCHS):
        seen = [[i for b in rec["batches"] if b["epoch"] == epoch for i in b["image_ids"]] for rec in records]
        assert len(seen[0]) == len(seen[1]) == 3 * BATCH
        assert not set(seen[0]) & set(seen[1]), (epoch, seen)

    # one model: identical final weights on both ranks, written once (by rank 0) to the shared run dir
    assert records[0]["weights_sha256"] == records[1]["weights_sha256"]
    ckpt_dir = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["best.ckpt", "last.ckpt"]
    ckpt = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3 * EPOCHS  # half the steps one process would take over the same images
    weights = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    assert _recorder().weights_digest(weights) == records[0]["weights_sha256"]

    # rank 0 prints the model summary and the COCO table; rank 1 trains silently
    assert "Model summary: " in outputs[0] and "COCO evaluation after 2 epochs:" in outputs[0]
    assert "Model summary: " not in outputs[1] and "COCO evaluation" not in outputs[1]
    log = (run_dir / "train.log").read_text()
    assert "rank 0 of 2 (fit)" in log and "rank 1 of 2 (fit)" in log


def test_torchrun_processes_must_match_devices_times_nodes(synthetic_coco, tmp_path, monkeypatch):
    """Under torchrun, devices=1 num_nodes=1 would train one model per process: one clear error instead."""

    compose_config = _load(REPO / "tests" / "integration" / "hydra_helpers.py").compose_config

    torchrun_env = {"TORCHELASTIC_RUN_ID": "test", "RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0"}
    torchrun_env |= {
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "1",
    }
    for key, value in torchrun_env.items():
        monkeypatch.setenv(key, value)
    cfg = compose_config("train", ["experiment=quickstart", f"data.root={synthetic_coco}"], tmp_path)
    with pytest.raises(ConfigError) as info:
        build_trainer(cfg, [], [])
    message = str(info.value)
    assert "torchrun started 2 processes (1 per node)" in message
    assert "set trainer.devices=1 trainer.num_nodes=2" in message
    cfg = compose_config("train", ["experiment=quickstart", "trainer.num_nodes=2"], tmp_path)
    assert build_trainer(cfg, [], []).world_size == 2  # as torchrun says: no error
