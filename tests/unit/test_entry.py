"""runtime.entry's process-wide set-up: the imported objects frozen once, out of the collector's way."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import gc
from ssd_lightning.runtime.entry import freeze_imported_objects
assert gc.get_freeze_count() == 0
freeze_imported_objects()
frozen = gc.get_freeze_count()
later = [[i] for i in range(10_000)]  # a sweep's next job: new objects stay collectable
freeze_imported_objects()
print(frozen, gc.get_freeze_count())
"""


def test_the_first_call_freezes_what_is_imported_and_later_calls_nothing():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    first, second = map(int, out.split())
    assert first > 10_000  # hydra, omegaconf and the project's modules at least
    assert second == first
