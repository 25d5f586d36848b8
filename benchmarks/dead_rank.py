"""How long a DDP survivor takes to stop after another rank is killed, and what it says.

    python benchmarks/dead_rank.py [--trials 2] [--work /tmp/dead_rank]

train.py on a small synthetic set, 2 CPU ranks (gloo), batch 2; after the first ``last.ckpt`` (+1 s) rank 1
gets ``kill -9``; prints the seconds until the launching process (rank 0) exits, its exit code and its
``error:`` line. Results: ``benchmarks/results/faults.md``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ssd_lightning.data.synthetic import write_synthetic_coco

REPO = Path(__file__).resolve().parents[1]
# the quickstart recipe, shortened, on 2 CPU DDP ranks (gloo), 3 steps per epoch on the 16-image set
OVERRIDES = [
    "experiment=quickstart",
    "data.num_threads=1",
    "optim.warmup_steps=2",
    "callbacks.progress_bar.refresh_rate=0",
    "data.batch_size=2",
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.precision=32-true",
    "trainer.max_epochs=50",
]


def rank_one(launcher: int, timeout: float = 120) -> int:
    """The pid of the process Lightning's launcher ``launcher`` started with LOCAL_RANK=1."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            if parent == launcher and b"LOCAL_RANK=1\x00" in environ:
                return int(pid)
        time.sleep(0.2)
    raise RuntimeError("rank 1 did not start")


def trial(work: Path, data: Path, n: int) -> tuple[float, int, str]:
    run, log = work / f"run{n}", work / f"train{n}.out"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), *OVERRIDES, f"data.root={data}", f"hydra.run.dir={run}"],
            cwd=work,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"},
        )
        victim = rank_one(proc.pid)
        while not (run / "checkpoints" / "last.ckpt").exists():
            time.sleep(0.1)
        time.sleep(1.0)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        code = proc.wait(timeout=600)
    seconds = time.monotonic() - killed
    errors = [line.strip() for line in log.read_text().splitlines() if line.startswith("error:")]
    return seconds, code, errors[0] if errors else "(no error line)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/dead_rank"))
    args = parser.parse_args()
    data = args.work / "data"
    if not (data / "annotations").exists():
        write_synthetic_coco(data, num_train=16, num_val=10, seed=0, size_range=(120, 200), num_empty=1)
    for n in range(args.trials):
        seconds, code, line = trial(args.work, data, n)
        print(f"trial {n}: the survivor exited with code {code} {seconds:.2f} s after the kill: {line}")


if __name__ == "__main__":
    main()
