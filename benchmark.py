"""Throughput, latency and memory benchmarks: ``python benchmark.py mode=train|inference|data|eval``.

Examples::

    python benchmark.py mode=train trainer=gpu trainer.precision=bf16-mixed data.batch_size=128 \
        data.root=/coco
    python benchmark.py mode=inference trainer=gpu trainer.precision=bf16-mixed 'benchmark.batch_sizes=[64]'
    python benchmark.py mode=data data.root=/coco 'benchmark.splits=[train,val]'
    python benchmark.py mode=eval
    python benchmark.py mode=train experiment=quickstart 'benchmark.batch_sizes=[8,32]' benchmark.repeats=3

Prints a table and writes ``benchmark.json`` to the run directory. Configuration: ``conf/benchmark.yaml``
(the training config plus ``benchmark.*`` and ``fastpath.*``); results and targets: ``benchmarks/README.md``.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ssd_lightning.runtime.entry import run_entry_point, run_task


@hydra.main(version_base="1.3", config_path="conf", config_name="benchmark")
def main(cfg: DictConfig) -> None:
    # lazy: torch, Lightning and DALI load once Hydra has composed the config (a config error is instant)
    from ssd_lightning.tasks.benchmark import run_benchmark

    run_task(run_benchmark, cfg)


if __name__ == "__main__":
    # Hydra's config errors and the errors a user can cause end in one line: ssd_lightning.runtime.entry
    run_entry_point(main)
