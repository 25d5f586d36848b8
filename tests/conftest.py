"""Shared test fixtures. Keep this file small: fixtures used by several test folders only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ssd_lightning.data.synthetic import write_synthetic_coco
from ssd_lightning.runtime.entry import freeze_imported_objects


def _share_the_cores_between_workers() -> None:
    """Under pytest-xdist (``-n N``, the suite's default), each worker and the scripts it starts get an equal
    share of the cores for torch's threads (``OMP_NUM_THREADS``; Lightning's DDP launcher divides it again
    per rank): N workers of all-core thread pools on a 2-core machine run several times slower
    (docs/ARCHITECTURE.md, trap 24)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


_share_the_cores_between_workers()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """tests/slow/ first (each file stays together): its multi-process tests take 30-120 s each, and started
    last they would leave one xdist worker running alone at the end."""
    items.sort(key=lambda item: 0 if item.path.parent.name == "slow" else 1)


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic COCO-format set in the ``images/`` + ``annotations/`` layout (read-only: copy it
    before modifying anything).

    16 train / 10 val JPEGs of 120-200 px, 3 categories with ids 3, 7, 11, non-contiguous image ids, one image
    without annotations per split. ``root/images/{train2017,val2017}``, ``root/annotations/instances_*.json``.
    """

    root = tmp_path_factory.mktemp("synthetic_coco")
    return write_synthetic_coco(root, num_train=16, num_val=10, seed=0, size_range=(120, 200), num_empty=1)


@pytest.fixture(scope="session", autouse=True)
def _private_data_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The data modules' default cache folder (``$XDG_CACHE_HOME/ssd_lightning/data``) inside the session's
    temporary folder, for this process and the scripts it starts, not in the user's home."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))


@pytest.fixture(scope="session", autouse=True)
def _frozen_imports() -> None:
    """What the scripts do once their task is imported (``freeze_imported_objects``): the modules the
    collected tests imported are left out of the cyclic garbage collector's full passes, which otherwise walk
    torch's and Lightning's ~500k objects again and again during the in-process runs."""
    freeze_imported_objects()
