"""The training loader's epoch-boundary gap: time from the last batch of one epoch to the first of the next.

Usage::

    python benchmarks/epoch_gap.py DATA_ROOT [--batches 40] [--epochs 4] [--batch-size 32] [--threads 2]
        [--cache-dir DIR] [--json OUT.json]

``COCODataModule(DATA_ROOT, device="cpu")`` is set up (the annotation index comes from ``--cache-dir``, built
there first if needed) and its training loader is iterated for ``--epochs`` epochs of ``--batches`` batches
each: every ``iter()`` is a new epoch with its own pipeline (exact resume), so each boundary is a real one
(the pipeline of epoch e + 1 over the whole set, this rank's full shard, is what the next ``iter()`` needs).
An epoch is cut after ``--batches`` batches to keep the run short; they must take longer than building a
pipeline for the one built ahead to be ready, as in a real epoch (thousands of batches on COCO).

Two modes, one after the other on the same data module: ``built at iter()`` (``TrainLoader.background =
False``: the pipeline of the next epoch is built when the epoch starts, the behaviour before this loader
built ahead) and ``built ahead`` (the default: built in a background thread while the previous epoch runs).
Reported per mode: the median and largest gap over the boundaries, and the median time between two batches
inside an epoch (the gap a stall-free boundary would have).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from ssd_lightning.data import COCODataModule


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path, help="a COCO-format set (data.root)")
    p.add_argument("--batches", type=int, default=40, help="batches per epoch (the epoch is cut there)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per mode (epochs - 1 boundaries)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="DALI threads")
    p.add_argument("--cache-dir", type=Path, default=None, help="data.cache_dir (default: the default)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p.parse_args(argv)


def measure(loader, epochs: int, batches: int) -> dict:
    gaps, steps = [], []
    last = None
    for _ in range(epochs):
        it = iter(loader)
        for k in range(batches):
            next(it)
            now = time.perf_counter()
            if last is not None:
                (steps if k else gaps).append(now - last)
            last = now
        it.close()  # a cut epoch: the next iter() is the next epoch
    return {
        "gap_median_s": round(statistics.median(gaps), 3),
        "gap_max_s": round(max(gaps), 3),
        "gaps_s": [round(g, 3) for g in gaps],
        "step_median_s": round(statistics.median(steps), 3),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dm = COCODataModule(
        args.root,
        batch_size=args.batch_size,
        num_threads=args.threads,
        device="cpu",
        cache_dir=args.cache_dir,
        check_images=True,
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    print(f"{dm.num_train_images:,} training images, {len(loader):,} batches of {args.batch_size} per epoch")
    results = {}
    for mode, background in (("built at iter()", False), ("built ahead", True)):
        loader.background = background
        loader.release()
        results[mode] = measure(loader, args.epochs, args.batches)
        r = results[mode]
        print(
            f"{mode:16s} gap median {r['gap_median_s']:.3f} s, max {r['gap_max_s']:.3f} s "
            f"(gaps {r['gaps_s']}); median step {r['step_median_s']:.3f} s",
            flush=True,
        )
    loader.release()
    if args.json:
        doc = {
            "root": str(args.root),
            "train_images": dm.num_train_images,
            "args": {k: str(v) for k, v in vars(args).items()},
            "load_average": list(os.getloadavg()),
            "results": results,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
