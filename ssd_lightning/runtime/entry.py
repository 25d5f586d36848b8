"""The one way every script starts and ends: user errors as one line, bugs with their traceback.

Every script (``train.py``, ``evaluate.py``, ``predict.py``, ``export.py``, ``benchmark.py``) and
``python -m ssd_lightning.summary`` is ``run_entry_point(main)``:

* Hydra's own composition errors (an unknown key such as ``nosuchgroup.misspelt_key=1``, a misspelt option,
  an unparsable override) become ``error: <one line naming the key and the fix>``, exit code 1;
* the errors a user can cause (:data:`ssd_lightning.errors.USER_ERRORS`, OmegaConf value errors, and a
  ``ValueError``/``TypeError``/``OSError`` raised while Hydra instantiates an object from the config) the
  same, from :func:`run_task` inside each Hydra job (so that each job of a sweep reports its own);
* ``hydra/launcher=slurm`` on a machine that is not on a SLURM cluster (submitit finds no ``srun``), or a job
  that ``sbatch`` refuses, ends in one line saying so and how to run the sweep here instead;
* anything else is a bug and keeps its full traceback.

It also keeps third-party chatter off the console first (:mod:`ssd_lightning.runtime.quiet`).
"""

from __future__ import annotations

import difflib
import gc
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from hydra.errors import ConfigCompositionException, InstantiationException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from ssd_lightning.errors import USER_ERRORS
from ssd_lightning.runtime.quiet import quiet_third_party_output

__all__ = [
    "freeze_imported_objects",
    "hydra_error_line",
    "one_line",
    "run_entry_point",
    "run_task",
    "slurm_error_line",
    "user_error",
]

_OURS = (*USER_ERRORS, OmegaConfBaseException)


def user_error(err: BaseException) -> BaseException | None:
    """The user-caused error behind ``err`` (itself, or the cause of a Hydra instantiation error), else None.

    User errors: :data:`~ssd_lightning.errors.USER_ERRORS`, OmegaConf errors (missing or wrong config values),
    and a ``ValueError``/``TypeError``/``OSError`` raised while instantiating an object from the config (a bad
    argument value, an unknown key, a missing file).
    """
    if isinstance(err, _OURS):
        return err
    if isinstance(err, InstantiationException):
        cause = err.__cause__ or err.__context__
        while isinstance(cause, InstantiationException) and (cause.__cause__ or cause.__context__):
            cause = cause.__cause__ or cause.__context__
        # lazy: Lightning takes seconds to import, and a config error must be reported without it
        from lightning_fabric.utilities.exceptions import MisconfigurationException

        if isinstance(cause, _OURS + (ValueError, TypeError, OSError, MisconfigurationException)):
            return cause
        if cause is None:
            return err
    return None


def one_line(err: BaseException) -> str:
    """``str(err)`` on one line (the exception's name when it has no message)."""
    text = " ".join(line.strip() for line in str(err).strip().splitlines() if line.strip())
    return text or type(err).__name__


def _exit_with(line: str) -> None:
    print(f"error: {line}", file=sys.stderr, flush=True)
    sys.exit(1)


def freeze_imported_objects() -> None:
    """Move every object alive now (the ~500k of torch, Lightning, DALI and the task's modules, imported by
    the script once Hydra composed the config) out of the cyclic garbage collector's view, once per process
    (``gc.freeze``). Full collections, and the interpreter's at exit, then skip them: a train.py process
    exits in 0.8 s instead of 3.4 s. Only the first job of a sweep freezes, so one job's garbage is never
    frozen for the next."""
    if gc.get_freeze_count() == 0:
        gc.freeze()


def run_task(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run ``task(cfg)`` (inside a ``@hydra.main`` function); a user error ends the process with one line
    ``error: ...`` on stderr and exit code 1. Anything else propagates with its traceback."""
    freeze_imported_objects()
    try:
        return task(cfg)
    except Exception as err:
        cause = user_error(err)
        if cause is None:
            raise
        _exit_with(one_line(cause))


def _similar_keys(err: BaseException, key: str) -> list[str]:
    cause = err.__cause__ or err.__context__
    parent = getattr(cause, "parent_node", None)
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    try:
        names = [str(k) for k in parent.keys()] if parent is not None else []
    except Exception:
        names = []
    leaf = key.rsplit(".", 1)[-1]
    return [prefix + n for n in difflib.get_close_matches(leaf, names, n=3, cutoff=0.6)]


def hydra_error_line(err: BaseException) -> str:
    """One line for a Hydra composition / override-parsing error, naming the key and the fix."""
    text = str(err)
    cause = err.__cause__ or err.__context__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    match = re.match(r"Could not override '([^']+)'", text)
    if match and "not in struct" in f"{text} {cause}":
        key = match.group(1)
        similar = _similar_keys(err, key)
        hint = f"did you mean {' or '.join(similar)}? " if similar else "check the spelling; "
        append = next((ln for ln in lines if ln.startswith("To append")), "")
        add = append.replace("To append to your config use ", "") or f"+{key}=..."
        return f"{key} is not a config key: {hint}to add a new key write {add}"
    match = re.match(r"In '([^']+)': Could not find '([^']+)'", text)
    if match:
        options = [ln for ln in lines[1:] if not ln.startswith(("Available options", "Config search path"))]
        options = [ln for ln in options if not ln.startswith("provider=")]
        group = match.group(2).rsplit("/", 1)[0]
        known = f": pick one of {', '.join(options)}" if options else ""
        return f"no config option '{match.group(2)}' (config group '{group}'){known}"
    if isinstance(err, OverrideParseException) and getattr(err, "override", None):
        message = [ln.strip() for ln in str(err.message).splitlines() if ln.strip()]
        see = [ln for ln in message if ln.startswith("See ")]
        reason = "; ".join(ln for ln in message if not ln.startswith("See "))
        fix = see[0].replace("See ", "see ").replace(" for details", "") if see else "check its syntax"
        return f"cannot parse the override {err.override!r} ({reason}): {fix}"
    return " ".join(ln for ln in lines if not ln.startswith("provider=")) or type(err).__name__


_RUN_HERE = "to run the sweep on this machine instead, leave out hydra/launcher=slurm"


def slurm_error_line(err: BaseException) -> str | None:
    """One line for submitit's failure to reach SLURM (``hydra/launcher=slurm``), else None."""
    if isinstance(err, RuntimeError) and 'Could not detect "srun"' in str(err):
        return (
            "hydra/launcher=slurm submits every job with sbatch (submitit), but this machine cannot reach a "
            f"SLURM cluster (no srun on PATH): run the command on a SLURM login node; {_RUN_HERE}"
        )
    if type(err).__name__ == "FailedSubmissionError" and type(err).__module__.startswith("submitit"):
        return f"sbatch refused the job (hydra/launcher=slurm): {one_line(err)}; {_RUN_HERE}"
    return None


def run_entry_point(main: Callable[[], Any]) -> Any:
    """Call a script's ``main`` (a ``@hydra.main`` function, or any callable) so that Hydra's config errors
    and user errors end in one line ``error: ...`` on stderr with exit code 1 (see the module docstring).

    Hydra prints its composition errors itself over several lines; with ``HYDRA_FULL_ERROR=1`` it raises them
    instead, which is what this sets. A user who set ``HYDRA_FULL_ERROR`` gets Hydra's own behaviour for them.
    """
    quiet_third_party_output()
    hydra_full = "HYDRA_FULL_ERROR" in os.environ
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        return main()
    except (ConfigCompositionException, OverrideParseException) as err:
        if hydra_full:
            raise
        _exit_with(hydra_error_line(err))
    except Exception as err:
        cause = user_error(err)
        line = one_line(cause) if cause is not None else slurm_error_line(err)
        if line is None:
            raise
        _exit_with(line)
