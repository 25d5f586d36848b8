"""DDP inside Hydra: every rank runs the current job's own config, in the job's own directory.

Lightning's DDP launcher starts ranks 1..N-1 by re-running ``sys.argv``: inside a Hydra multirun that starts
the whole sweep again in every child (other directories, other sampled values).
:func:`install_ddp_sweep_support` makes the launcher start a single run of this job's overrides instead, and
:class:`JobScope` clears what one job leaves in the process (process group, launcher environment variables)
before the next job starts.
"""

from __future__ import annotations

import os
import sys

import lightning_fabric.strategies.launchers.subprocess_script as fabric_launcher
import pytorch_lightning.strategies.launchers.subprocess_script as pl_launcher
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_original_cwd, to_absolute_path

from ssd_lightning.runtime.resume import hydra_override_quote

# What Lightning's DDP launcher (and seed_everything) put in os.environ for one run.
_LAUNCH_ENV = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "NODE_RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "PL_GLOBAL_SEED",
    "PL_SEED_WORKERS",
)


def _config_source_args(argv: list[str]) -> list[str]:
    """The ``--config-path/--config-name/--config-dir`` (and short) arguments of a command line."""
    keep: list[str] = []
    flags = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd"}
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if name in flags:
            keep.append(arg)
            if "=" not in arg and i + 1 < len(argv):
                keep.append(argv[i + 1])
                i += 1
        i += 1
    return keep


def _hydra_subprocess_cmd(local_rank: int) -> tuple[list[str], str]:
    """The command and cwd that start DDP rank ``local_rank`` of the current Hydra job.

    Lightning's own version re-runs ``sys.argv``: inside a multirun that starts the whole sweep again (other
    directories, other sampled values). This one starts a single run of this job's own overrides in this job's
    output directory; for a single run it equals Lightning's (``sys.argv`` plus the run directory).
    """

    import __main__

    hydra_cfg = HydraConfig.get()
    if __main__.__spec__ is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    if hydra_cfg.mode == RunMode.MULTIRUN:
        command += _config_source_args(sys.argv[1:]) + list(hydra_cfg.overrides.task)
    else:
        command += sys.argv[1:]
    command += [
        f"hydra.run.dir={hydra_override_quote(str(hydra_cfg.runtime.output_dir))}",
        f"hydra.job.name={hydra_cfg.job.name}_rank{local_rank}",
        "hydra.output_subdir=null",
        "hydra.mode=RUN",
    ]
    return command, get_original_cwd()


def install_ddp_sweep_support() -> None:
    """Make Lightning start DDP ranks with the current Hydra job's config (single runs and sweep jobs alike).

    Both ``lightning_fabric``'s launcher module and ``pytorch_lightning``'s (which keeps its own reference to
    the function it imported) are patched. Idempotent.
    """

    for module in (fabric_launcher, pl_launcher):
        if getattr(module, "_hydra_subprocess_cmd", None) is not _hydra_subprocess_cmd:
            module._hydra_subprocess_cmd = _hydra_subprocess_cmd


def in_multirun() -> bool:

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


class JobScope:
    """Undo what one training job leaves in the process, so that the next sweep job starts clean."""

    def __enter__(self) -> JobScope:
        self.env = {k: os.environ.get(k) for k in _LAUNCH_ENV}
        self.multirun = in_multirun()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.multirun:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in self.env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
