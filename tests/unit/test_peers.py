"""A dead DDP rank is reported in one line by whichever notices first: the collective's error in the main
thread (tests/slow/test_faults.py) or Lightning's child-process watcher, replaced by ours (here)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from ssd_lightning.training.peers import is_peer_loss

WATCHER = textwrap.dedent(
    """
    import signal, subprocess, sys, time
    from types import SimpleNamespace
    import ssd_lightning.training.peers as peers

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    trainer = SimpleNamespace(
        strategy=SimpleNamespace(launcher=SimpleNamespace(procs=[child])), node_rank=0, num_devices=2,
        local_rank=0, global_rank=0, world_size=2, current_epoch=3, global_step=42, checkpoint_callbacks=[],
    )
    report = peers.PeerLossReport()
    report.setup(trainer, None, "fit")
    peers._ReportingObserver(main_pid=0, child_processes=[child], sleep_period=0.2).start()
    child.send_signal(signal.SIGKILL)
    time.sleep(30)  # the main thread "hangs in a collective": the watcher must end the process
    """
)


def test_the_watcher_reports_the_dead_rank_and_exits_1():
    proc = subprocess.run([sys.executable, "-c", WATCHER], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: rank 0 of 2 lost rank 1 (killed by SIGKILL) at epoch 3, step 42; the run cannot go on "
        "without it: start it again (no checkpoint was written yet)"
    )


def test_peer_loss_errors_are_recognised_through_their_cause():
    gloo = RuntimeError(
        "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [::1]:7"
    )
    wrapped = RuntimeError("training failed")
    wrapped.__cause__ = gloo
    assert is_peer_loss(gloo) and is_peer_loss(wrapped)
    assert is_peer_loss(torch.distributed.DistBackendError("NCCL watchdog timeout"))
    assert not is_peer_loss(RuntimeError("CUDA out of memory")) and not is_peer_loss(None)
