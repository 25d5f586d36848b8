"""What a run prints: third-party chatter kept off at its source (runtime/quiet.py), and the one-line error of
``hydra/launcher=slurm`` off a cluster (runtime/entry.py)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import warnings

import pytest
from pytorch_lightning.utilities._pytree import _tree_flatten

from ssd_lightning.runtime.quiet import quiet_third_party_output

from .hydra_helpers import REPO

TIP = "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](...)"


def _leafspec_warnings(quiet: bool) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if quiet:
            quiet_third_party_output()
        _tree_flatten({"images": 1})  # Lightning's CombinedLoader flattening: builds a LeafSpec
    return [w for w in caught if "LeafSpec" in str(w.message)]


def test_lightning_leafspec_deprecation_is_the_only_warning_dropped():
    assert _leafspec_warnings(quiet=False), "Lightning no longer builds LeafSpec: drop the filter in quiet.py"
    assert _leafspec_warnings(quiet=True) == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party_output()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, stacklevel=1)
    assert len(caught) == 1  # the same message from anywhere else still shows


def test_install_tips_and_alembic_info_are_dropped_other_lines_kept(caplog):
    quiet_third_party_output()
    rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    with caplog.at_level(logging.INFO):
        rank_zero.info(TIP)
        rank_zero.info("GPU available: False, used: False")
        logging.getLogger("alembic.runtime.plugins").info("setup plugin alembic.autogenerate.schemas")
        logging.getLogger("alembic.runtime.plugins").warning("a real alembic warning")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["GPU available: False, used: False", "a real alembic warning"]


@pytest.mark.skipif(shutil.which("srun") is not None, reason="this machine is on a SLURM cluster")
def test_slurm_launcher_off_a_cluster_ends_in_one_line(tmp_path):
    env = {**os.environ, "SSD_LIGHTNING_ROOT": str(tmp_path), "PYTHONPATH": str(REPO)}
    command = [sys.executable, "train.py", "-m", "hydra/launcher=slurm", "experiment=quickstart"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: hydra/launcher=slurm "), done.stderr[-2000:]
    assert "cannot reach a SLURM cluster" in lines[0] and "leave out hydra/launcher=slurm" in lines[0]
    readme = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    assert lines[0] in readme  # the README quotes it word for word
