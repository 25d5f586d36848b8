"""Test seam for tests/slow/test_preemption.py (not used by the package): a checkpoint writer that stalls
inside one write, after the temporary file is complete and before the rename, so that a test can kill the
process exactly there. Selected with
``'trainer.plugins=[{_target_: tests.slow.stalling_io.StallingCheckpointIO}]'``.

Environment: ``STALL_MARKER`` (a file written when the stall starts), ``STALL_ON_SAVE`` (which save stalls,
1-based; default 2).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ssd_lightning.checkpoints import AtomicCheckpointIO


class StallingCheckpointIO(AtomicCheckpointIO):
    def __init__(self) -> None:
        super().__init__()
        self.saves = 0

    def _write(self, checkpoint, f) -> None:
        super()._write(checkpoint, f)
        self.saves += 1
        if self.saves == int(os.environ.get("STALL_ON_SAVE", "2")):
            f.flush()
            Path(os.environ["STALL_MARKER"]).write_text(str(os.getpid()))
            time.sleep(600)
