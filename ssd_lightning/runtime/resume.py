"""``train.py ckpt_path=<a run's checkpoint>`` resumes that run by itself: its config, its directory.

Hydra composes the config from the command line, so the run's config is reused by rewriting the command line
before ``@hydra.main`` reads it (:func:`resume_argv`, called by the root ``train.py``):

1. ``ckpt_path`` is a file inside a run directory (``<run>/checkpoints/last.ckpt``,
   ``<run>/hpc_ckpt_<n>.ckpt``) that has Hydra's ``.hydra/overrides.yaml``; ``ckpt_path=last`` is found first
   (:func:`ssd_lightning.rundirs.find_last_checkpoint`: ``hydra.run.dir``'s checkpoint, else the newest run
   under ``<paths.log_dir>/<task_name>/runs``);
2. the command becomes the run's saved overrides, then this command's overrides on top (same key: the new
   value wins), then ``hydra.run.dir=<run>`` unless the command gives its own; Hydra composes that as usual,
   so the resumed run writes to the same directory (and saves the merged overrides for the next resume);
3. an override the checkpoint cannot follow (another network or recipe: :data:`FIXED`) is refused with one
   :class:`~ssd_lightning.errors.ConfigError` line; another data set's categories are refused later by
   :func:`ssd_lightning.checkpoints.check_resume`. Hydra has rewritten the run's ``.hydra/`` by then: unless
   the task accepted the resume (:func:`accept_resumed_run`, once the checkpoint fits), the root script puts
   the run's files back (:func:`restore_refused_run`), so a refused override never becomes the run's config.

A checkpoint outside a run directory, a multirun (``-m``: each job resumes its own directory) and a command
without ``ckpt_path`` are left as they are. Light on purpose (no torch): it runs before every ``train.py``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import OmegaConf

from ssd_lightning.errors import ConfigError
from ssd_lightning.fileio import atomic_write
from ssd_lightning.rundirs import find_last_checkpoint, run_dir_of

__all__ = [
    "FIXED",
    "Resumed",
    "accept_resumed_run",
    "hydra_override_quote",
    "log_resumed_run",
    "restore_refused_run",
    "resume_argv",
]

log = logging.getLogger("ssd_lightning")

#: config groups and keys a resumed checkpoint cannot follow: its network and the recipe it was trained with
FIXED = ("experiment", "model", "model.backbone", "model.num_classes")
# Hydra flags followed by a value (the rest of the command line are overrides)
_FLAGS_WITH_VALUE = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--cfg", "-c",
                     "--package", "-p", "--experimental-rerun"}  # fmt: skip
_MULTIRUN = {"-m", "--multirun"}
# the files Hydra writes into <run>/.hydra/ at the start of every run
_HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")


@dataclass
class Resumed:
    """A resumed run: its directory, its saved overrides, the new ones applied on top, and its ``.hydra/``
    files as they were (put back if the resume is refused)."""

    run_dir: Path
    saved: tuple[str, ...]
    new: tuple[str, ...]
    files: dict[str, str] = field(default_factory=dict)
    accepted: bool = False


#: this process's resumed run (set by :func:`resume_argv`, logged by the task once logging is set up)
RESUMED: list[Resumed] = []


def hydra_override_quote(value: str) -> str:
    """``value`` as a quoted Hydra override value (paths with spaces, ``=`` or quotes)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _split(args: list[str]) -> tuple[list[str], list[str]]:
    """Hydra's flags (with their values) and the overrides of a command line (without the script)."""
    flags, overrides = [], []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-"):
            flags.append(arg)
            if arg in _FLAGS_WITH_VALUE and i + 1 < len(args):
                flags.append(args[i + 1])
                i += 1
        else:
            overrides.append(arg)
        i += 1
    return flags, overrides


def _key(override: Override) -> str:
    return override.key_or_group + (f"@{override.package}" if override.package else "")


def _find_checkpoint(
    value: str, overrides: list[Override], config_dir: Path, config_name: str
) -> Path | None:
    """The checkpoint file ``ckpt_path=value`` names (``last`` looked up as train.py would), else None."""
    if value != "last":
        return Path(value)
    run_dir = next((o.value() for o in overrides if _key(o) == "hydra.run.dir"), None)
    if run_dir is not None:
        return find_last_checkpoint(str(run_dir), None)
    plain = [o.input_line for o in overrides if not _key(o).startswith("hydra.")]
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=plain)
    return find_last_checkpoint(None, Path(cfg.paths.log_dir) / str(cfg.task_name) / "runs")


def _refuse_fixed(new: list[Override], run_dir: Path, ckpt: Path) -> None:
    """One ConfigError line when ``new`` changes what the checkpoint holds (:data:`FIXED`), compared with what
    the run's ``.hydra/`` says (a value in ``config.yaml``, a group's option in ``hydra.yaml``)."""
    saved = OmegaConf.merge(
        *(OmegaConf.load(f) for f in (run_dir / ".hydra").glob("*.yaml") if f.name != "overrides.yaml")
    )
    for override in new:
        key = _key(override)
        if key not in FIXED:
            continue
        where = key if "." in key else f"hydra.runtime.choices.{key}"
        before = OmegaConf.select(saved, where, default=None)
        after = None if override.is_delete() else override.value()
        if str(before) != str(after):
            raise ConfigError(
                f"{override.input_line} would change the model or recipe of the run {run_dir} "
                f"({key}={before} in its .hydra/): {ckpt} cannot resume with it; drop the override, or "
                f"fine-tune a new run with model.init_from={ckpt}"
            )


def _merge(saved: list[Override], new: list[Override]) -> list[str]:
    """The saved overrides with the new ones on top: a key given again takes the new value, in place."""
    merged = {_key(o): o.input_line for o in saved}
    for override in new:
        line = override.input_line
        before = next((o for o in saved if _key(o) == _key(override)), None)
        if (
            before is not None
            and (before.is_add() or before.is_force_add())
            and not line.startswith(("+", "~"))
        ):
            line = "++" + line  # the key exists only because the run added it
        merged[_key(override)] = line
    return list(merged.values())


def resume_argv(argv: list[str], config_dir: str | Path, config_name: str = "train") -> list[str]:
    """``argv`` (``sys.argv``) rewritten to resume the run ``ckpt_path`` belongs to (module docstring).

    Example: ``train.py ckpt_path=R/checkpoints/last.ckpt trainer.max_steps=640`` after a run
    ``train.py experiment=quickstart data.root=D`` in ``R`` becomes ``train.py experiment=quickstart
    data.root=D ckpt_path=R/checkpoints/last.ckpt trainer.max_steps=640 hydra.run.dir='R'``.
    """
    flags, lines = _split(list(argv[1:]))
    if _MULTIRUN & set(flags):
        return list(argv)
    parser = OverridesParser.create()
    overrides = parser.parse_overrides(lines)
    value = next((o.value() for o in reversed(overrides) if _key(o) == "ckpt_path"), None)
    if not value:
        return list(argv)
    if value != "last" and "://" not in str(value) and not Path(str(value)).exists():
        # said before the model is built (which may ask for ImageNet weights the resumed run would not use)
        raise ConfigError(
            f"ckpt_path {value} not found: pass a train.py checkpoint (<run dir>/checkpoints/last.ckpt)"
        )
    ckpt = _find_checkpoint(str(value), overrides, Path(config_dir), config_name)
    run_dir = run_dir_of(ckpt) if ckpt is not None else None
    if run_dir is None:
        return list(argv)
    saved_lines = [
        str(line) for line in yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
    ]
    saved = parser.parse_overrides(saved_lines)
    _refuse_fixed(overrides, run_dir, ckpt)
    merged = _merge(saved, overrides)
    if not any(_key(o) == "hydra.run.dir" for o in overrides):
        merged.append(f"hydra.run.dir={hydra_override_quote(str(run_dir))}")
    changed = tuple(
        o.input_line for o in overrides if o.input_line not in saved_lines and _key(o) != "ckpt_path"
    )
    files = {
        n: (run_dir / ".hydra" / n).read_text() for n in _HYDRA_FILES if (run_dir / ".hydra" / n).is_file()
    }
    RESUMED[:] = [Resumed(run_dir, tuple(saved_lines), changed, files)]
    return [argv[0], *flags, *merged]


def log_resumed_run() -> None:
    """Say (once Hydra has set up logging, so it lands in the run's ``train.log``) which run is resumed with
    which new overrides."""
    for resumed in RESUMED:
        log.info(
            "resuming the run %s with its config (%s); new overrides: %s",
            resumed.run_dir,
            " ".join(resumed.saved) or "no overrides",
            " ".join(resumed.new) or "none",
        )


def accept_resumed_run() -> None:
    """The checkpoint fits the composed config: the merged overrides Hydra saved are the run's from now on."""
    for resumed in RESUMED:
        resumed.accepted = True


def restore_refused_run() -> None:
    """Put back the ``.hydra/`` files of a run whose resume ended before :func:`accept_resumed_run` (on global
    rank 0 only: the other ranks do not write them)."""
    if os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) != "0":
        return
    for resumed in RESUMED:
        if resumed.accepted:
            continue
        for name, text in resumed.files.items():
            with atomic_write(resumed.run_dir / ".hydra" / name, "w") as f:
                f.write(text)
