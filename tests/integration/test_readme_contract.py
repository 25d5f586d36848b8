"""The README is a contract: its commands compose, its snippets run, its metric names are the logged ones.

The convention is written at the top of README.md (an HTML comment): commands of the five scripts in ```bash
blocks are composed as ``--cfg job`` would compose them (a sweep as its first job) and resolved; ```python
blocks run as written; ``[//]: # (contract: run)`` runs a bash block as written, ``[//]: # (contract: skip
REASON)`` leaves a block out. The commands are read from the README itself, so a section added later is
covered without touching this file. Nothing here trains: the metric names the README documents are checked
against a real run's ``metrics.csv`` in ``test_pictures_loggers.py``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict

import ssd_lightning.runtime.builders  # noqa: F401  (registers the ${ssd.cpu_precision:} resolver)
from ssd_lightning.runtime.config_check import check_config

from .hydra_helpers import REPO, compose_config

README = REPO / "README.md"
SCRIPTS = ("train", "evaluate", "predict", "export", "benchmark")
# the configs whose tasks check their values against the constructors (runtime/config_check.py)
CHECKED = ("train", "evaluate", "benchmark")
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
MARKER = re.compile(r"^\[//\]: # \(contract: (run|skip)\b(.*)\)\s*$")


@dataclass(frozen=True)
class Block:
    """A fenced code block of the README: its language, text, marker (``run``, ``skip`` or '') and line."""

    lang: str
    text: str
    marker: str
    line: int


def readme_blocks(text: str) -> list[Block]:
    """The README's fenced code blocks, each with the contract marker on the line before it (if any)."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, lang = opening.groups()
        previous = next((ln.strip() for ln in reversed(lines[:i]) if ln.strip()), "")
        marker = MARKER.match(previous)
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        body = "\n".join(ln[len(indent) :] if ln.startswith(indent) else ln for ln in lines[i + 1 : end])
        blocks.append(Block(lang, body, marker.group(1) if marker else "", i + 1))
        i = end + 1
    return blocks


def shell_commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comments dropped, ``&&`` chains split."""
    joined = re.sub(r"\\\n", " ", block)
    commands = []
    for line in joined.splitlines():
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if words:
                commands.append(shlex.join(words))
    return commands


def script_call(command: str) -> tuple[str, list[str]] | None:
    """``(config name, overrides)`` of a command that runs one of the five scripts (directly, or under
    srun/torchrun), else None. Placeholders are filled: ``<x>`` -> ``x``, ``${VAR}`` -> ``0``, bare ``...``
    dropped; ``-m``/``--multirun`` and other flags are not overrides."""
    filled = re.sub(r"\$\{[A-Z_][A-Z0-9_]*\}", "0", re.sub(r"<([^<>\s]+)>", r"\1", command))
    words = shlex.split(filled)
    script = next((w for w in words if w.endswith(".py")), None)
    if script is None or Path(script).stem not in SCRIPTS or words[0] not in ("python", "srun", "torchrun"):
        return None
    args = words[words.index(script) + 1 :]
    return Path(script).stem, [a for a in args if a != "..." and not a.startswith("-")]


def first_job(overrides: list[str]) -> list[str]:
    """A sweep's first job: each sweep override (``a=1,2``) by its first value."""
    job = []
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_sweep_override():
            job.append(f"{override.get_key_element()}={next(override.sweep_string_iterator())}")
        else:
            job.append(override.input_line)
    return job


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))
COMPOSED = [
    pytest.param(call, id=f"line{b.line}:{cmd[:60]}")
    for b in BLOCKS
    if b.lang == "bash" and b.marker == ""
    for cmd in shell_commands(b.text)
    if (call := script_call(cmd)) is not None
]
RUN_AS_WRITTEN = [
    pytest.param(cmd, id=f"line{b.line}:{cmd[:60]}")
    for b in BLOCKS
    if b.lang == "bash" and b.marker == "run"
    for cmd in shell_commands(b.text)
]
SNIPPETS = [pytest.param(b.text, id=f"line{b.line}") for b in BLOCKS if b.lang == "python" and b.marker == ""]


def test_the_readme_has_commands_and_snippets_to_check():
    """The parser finds what the README holds (a broken parser would pass every test below vacuously)."""
    assert len(COMPOSED) >= 20
    assert RUN_AS_WRITTEN and SNIPPETS
    assert any(b.marker == "skip" for b in BLOCKS)


@pytest.mark.parametrize("call", COMPOSED)
def test_readme_command_composes(call, tmp_path):
    config_name, overrides = call
    cfg = compose_config(config_name, first_job(overrides), tmp_path)
    job = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    OmegaConf.to_container(job, resolve=True)  # every interpolation resolves
    if config_name in CHECKED:
        with open_dict(job):  # the values' types; the GPU count is the machine's, not the README's
            job.trainer.accelerator = "cpu"
        check_config(job)


@pytest.mark.parametrize("command", RUN_AS_WRITTEN)
def test_readme_command_runs_as_written(command, tmp_path):
    env = {**os.environ, "SSD_LIGHTNING_ROOT": str(tmp_path), "PYTHONPATH": str(REPO)}
    words = shlex.split(command)
    if words[0] == "python":
        words[0] = sys.executable
    done = subprocess.run(words, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("snippet", SNIPPETS)
def test_readme_python_snippet_runs(snippet, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
