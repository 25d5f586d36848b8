"""The quickstart recipe over seeds and folder sizes: AP (mean and spread) and wall time per run.

Runs ``python train.py experiment=quickstart seed=S`` end to end (a subprocess each: start-up, data checks,
training, final validation) on

* the built-in synthetic set (the quickstart's own generator and settings: 512 train / 64 val images), and
* a second generated set of another size (240 / 60 images, another generator seed: other images, boxes and
  category ids' order), given with ``data.root``,

for every seed, then prints one Markdown table per set (AP, AP50, wall time of each run; mean, sample standard
deviation, min-max). Results are recorded in benchmarks/results/quickstart.md.

Usage::

    python benchmarks/quickstart_seeds.py [--out DIR] [--seeds 0,1,2] [--builtin 512 64] [--second 240 60]
        [overrides ...]

    # the pipeline end to end in minutes (a tiny check, not a measurement)
    python benchmarks/quickstart_seeds.py --out /tmp/qs --builtin 16 8 --second 24 8 --seeds 0,1 \
        trainer.max_steps=4 data.batch_size=4 data.num_threads=1

The overrides go to every run (e.g. ``trainer.precision=32-true``). Every run has its own directory
``<out>/<set>/seed<S>``; AP and AP50 are read from its ``csv/metrics.csv`` (the last validation).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ssd_lightning.data.synthetic import write_synthetic_coco  # noqa: E402


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else the platform's machine type."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
    return names[0] if names else platform.machine()


def last_validation(run_dir: Path) -> dict[str, float]:
    """``val/AP`` and ``val/AP50`` of the last validation logged in ``<run_dir>/csv/metrics.csv``."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("val/AP")]
    if not rows:
        raise SystemExit(f"{run_dir}: no val/AP in csv/metrics.csv (the run did not validate)")
    return {"AP": float(rows[-1]["val/AP"]), "AP50": float(rows[-1]["val/AP50"])}


def train_once(run_dir: Path, overrides: list[str]) -> dict[str, float]:
    """One ``train.py`` run in ``run_dir``: its AP, AP50 and wall time (seconds, end to end)."""
    command = [sys.executable, str(REPO / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {**last_validation(run_dir), "seconds": seconds}


def spread(values: list[float]) -> str:
    """``mean ± sample standard deviation (min-max)``."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f} ({min(values):.4f}–{max(values):.4f})"


def table(name: str, runs: dict[int, dict[str, float]]) -> str:
    lines = [f"#### {name}", "", "| seed | AP | AP50 | wall time |", "|---|---|---|---|"]
    for seed, r in runs.items():
        lines.append(f"| {seed} | {r['AP']:.4f} | {r['AP50']:.4f} | {r['seconds'] / 60:.1f} min |")
    minutes = [r["seconds"] / 60 for r in runs.values()]
    lines.append(
        f"| **mean ± sd (min–max)** | {spread([r['AP'] for r in runs.values()])} | "
        f"{spread([r['AP50'] for r in runs.values()])} | {statistics.mean(minutes):.1f} min "
        f"({min(minutes):.1f}–{max(minutes):.1f}) |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "quickstart_seeds")
    parser.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0, 1, 2])
    parser.add_argument("--builtin", type=int, nargs=2, default=[512, 64], metavar=("TRAIN", "VAL"))
    parser.add_argument("--second", type=int, nargs=2, default=[240, 60], metavar=("TRAIN", "VAL"))
    parser.add_argument(
        "--sets",
        type=lambda v: v.split(","),
        default=["builtin", "second"],
        help="which sets to run, in this order (builtin, second)",
    )
    parser.add_argument("overrides", nargs="*", help="train.py overrides given to every run")
    args = parser.parse_args()
    out = args.out.resolve()

    second = out / "data" / f"second_{args.second[0]}_{args.second[1]}"
    if not (second / "annotations" / "instances_val2017.json").is_file():
        write_synthetic_coco(second, num_train=args.second[0], num_val=args.second[1], seed=1)
    builtin = out / "data" / f"builtin_{args.builtin[0]}_{args.builtin[1]}"
    sets = {
        # the quickstart's own synthetic set (written by the first run, as a fresh clone does)
        f"built-in set ({args.builtin[0]} / {args.builtin[1]})": [
            f"synthetic.root={builtin}",
            f"synthetic.num_train={args.builtin[0]}",
            f"synthetic.num_val={args.builtin[1]}",
        ],
        f"second set ({args.second[0]} / {args.second[1]}, generator seed 1)": [f"data.root={second}"],
    }
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}; overrides: {' '.join(args.overrides) or 'none'}",
        flush=True,
    )
    tags = dict(zip(("builtin", "second"), sets.items(), strict=True))
    unknown = sorted(set(args.sets) - set(tags))
    if unknown:
        raise SystemExit(f"--sets: unknown set(s) {', '.join(unknown)}; use builtin, second")
    for tag in args.sets:
        name, data = tags[tag]
        runs = {}
        for seed in args.seeds:
            overrides = ["experiment=quickstart", *data, f"seed={seed}", *args.overrides]
            runs[seed] = train_once(out / tag / f"seed{seed}", overrides)
            r = runs[seed]
            print(
                f"{tag} seed {seed}: AP {r['AP']:.4f} AP50 {r['AP50']:.4f} in {r['seconds']:.0f} s",
                flush=True,
            )
        print("\n" + table(name, runs) + "\n", flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
