"""Shared test fixtures. Keep this file small: fixtures used by several test folders only."""

from __future__ import annotations

from pathlib import Path

import pytest

from ssd_lightning.data.synthetic import write_synthetic_coco
from ssd_lightning.runtime.entry import freeze_imported_objects


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
    import os

    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))


@pytest.fixture(scope="session", autouse=True)
def _frozen_imports() -> None:
    """What the scripts do once their task is imported (``freeze_imported_objects``): the modules the
    collected tests imported are left out of the cyclic garbage collector's full passes, which otherwise walk
    torch's and Lightning's ~500k objects again and again during the in-process runs."""
    freeze_imported_objects()
