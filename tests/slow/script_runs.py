"""Run one of the repository's scripts in a subprocess for a slow test (shared by the DDP tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_script(script: str, tmp_path: Path, run: str, *overrides: str) -> tuple[Path, str]:
    """``python <script>.py <overrides> hydra.run.dir=<tmp_path>/<run>`` from ``tmp_path``; asserts exit code
    0 (showing the output's tail otherwise) and returns the run directory and the standard output."""
    out = tmp_path / run
    proc = subprocess.run(
        [sys.executable, str(REPO / f"{script}.py"), *overrides, f"hydra.run.dir={out}"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout
