"""Fault tolerance of train.py: atomic checkpoints, ``ckpt_path=last``, preemption, config checks.

* :class:`AtomicCheckpointIO` (``trainer.plugins``): every checkpoint file is complete or absent. It is
  written to ``<path>.tmp``, flushed to disk (fsync) and renamed over ``<path>`` (``os.replace``, atomic on
  POSIX file systems), so a process killed at any moment (``kill -9``, out of memory, node failure) leaves the
  previous ``last.ckpt`` intact; a ``.tmp`` left behind by a kill is overwritten by the next save.
* :func:`resolve_ckpt_path`: ``ckpt_path=last`` is this run directory's ``checkpoints/last.ckpt`` (or the
  newest SLURM ``hpc_ckpt_*.ckpt`` there) if it has one, else the most recent ``checkpoints/last.ckpt`` under
  ``<paths.log_dir>/<task_name>/runs/``; with none, training starts from scratch (as Lightning's ``"last"``:
  a job script can always pass it).
* :func:`exit_preempted`: after a SIGTERM (see :class:`ssd_lightning.callbacks.PreemptionCheckpoint`) the
  process exits with code :data:`PREEMPTED_EXIT_CODE` (143 = 128 + SIGTERM: not 0, the training did not
  finish, so a scheduler that restarts failed jobs restarts it).
* :func:`check_config`: the composed config's values have the types the classes they configure take, and
  ``trainer.devices`` fits the machine; one-line :class:`~ssd_lightning.cli.ConfigError` otherwise.
* :func:`run_entry_point`: Hydra's own composition errors (an unknown key, a misspelt option) as one line.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import logging
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

__all__ = [
    "PREEMPTED_EXIT_CODE",
    "AtomicCheckpointIO",
    "NonFiniteLossError",
    "check_config",
    "exit_preempted",
    "find_last_checkpoint",
    "keep_previous_metrics",
    "resolve_ckpt_path",
    "run_entry_point",
]

log = logging.getLogger("ssd_lightning")

#: exit status of train.py after a SIGTERM that was turned into a checkpoint (128 + 15, as a shell reports it)
PREEMPTED_EXIT_CODE = 143
# rank 0's resolution of ckpt_path=last, inherited by the DDP ranks Lightning starts (same file everywhere)
_LAST_ENV = "SSD_LIGHTNING_RESUME_LAST"


class NonFiniteLossError(RuntimeError):
    """Training stopped: too many optimizer steps in a row with a non-finite loss or gradients."""


# ----------------------------------------------------------------------------------------------------
# Atomic checkpoint files
# ----------------------------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (no-op where directories cannot be opened, e.g. Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`TorchCheckpointIO` whose checkpoint files are always complete.

    ``save_checkpoint`` writes ``<path>.tmp`` next to ``<path>``, fsyncs it, renames it over ``<path>`` with
    ``os.replace`` and fsyncs the directory. Killed before the rename, ``<path>`` is the previous complete
    checkpoint; after it, the new one. A failed write (disk full, an exception) removes the ``.tmp`` and
    raises. Remote paths (``s3://`` ...) go through Lightning's own writer.

    Lightning's default writer is not enough: it writes to a temporary file in the system temp folder and
    moves it, which is a copy (not atomic) when that folder is on another file system, and it never fsyncs.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                self._write(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        _fsync_dir(path.parent)

    def _write(self, checkpoint: dict[str, Any], f: typing.BinaryIO) -> None:
        """Serialise ``checkpoint`` into the open temporary file (the seam the kill tests slow down)."""
        torch.save(checkpoint, f)


# ----------------------------------------------------------------------------------------------------
# ckpt_path=last
# ----------------------------------------------------------------------------------------------------


def _newest(paths: Sequence[Path]) -> Path | None:
    stamped = []
    for p in paths:
        with contextlib.suppress(OSError):
            stamped.append((p.stat().st_mtime_ns, str(p), p))
    return max(stamped)[2] if stamped else None


def find_last_checkpoint(output_dir: str | os.PathLike, runs_dir: str | os.PathLike | None) -> Path | None:
    """What ``ckpt_path=last`` resumes from (see the module docstring); None when there is nothing."""
    own = Path(output_dir)
    mine = [own / "checkpoints" / "last.ckpt", *own.glob("hpc_ckpt_*.ckpt")]
    found = _newest([p for p in mine if p.is_file()])
    if found is not None or runs_dir is None:
        return found
    return _newest([p for p in Path(runs_dir).glob("*/checkpoints/last.ckpt") if p.is_file()])


def resolve_ckpt_path(cfg: Any) -> str | None:
    """``cfg.ckpt_path`` with ``last`` resolved to a file (logged), or None (start from scratch)."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None and str(ckpt_path) != "last" and Path(str(ckpt_path)).is_dir():
        from ssd_lightning.cli import ConfigError

        folder = Path(str(ckpt_path))
        inside = [p for p in (folder / "checkpoints" / "last.ckpt", folder / "last.ckpt") if p.is_file()]
        hint = f"ckpt_path={inside[0]}" if inside else "ckpt_path=<run dir>/checkpoints/last.ckpt"
        raise ConfigError(f"ckpt_path={folder} is a folder, not a checkpoint file: pass {hint}")
    if ckpt_path is None or str(ckpt_path) != "last":
        return None if ckpt_path in (None, "") else str(ckpt_path)
    inherited = os.environ.get(_LAST_ENV)
    if inherited is not None and os.environ.get("LOCAL_RANK", "0") != "0":
        return inherited or None  # a DDP rank Lightning started from rank 0: rank 0's file (or none)
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    runs_dir = None
    if not multirun:  # a sweep job resumes its own directory only
        runs_dir = Path(cfg.paths.log_dir) / str(cfg.get("task_name", "train")) / "runs"
    found = find_last_checkpoint(cfg.paths.output_dir, runs_dir)
    if found is None:
        where = f"{cfg.paths.output_dir}/checkpoints" + (f" or {runs_dir}/*/checkpoints" if runs_dir else "")
        log.warning("ckpt_path=last: no last.ckpt in %s: training starts from scratch", where)
        os.environ[_LAST_ENV] = ""
        return None
    log.info("ckpt_path=last: resuming from %s", found)
    os.environ[_LAST_ENV] = str(found)
    return str(found)


def keep_previous_metrics(cfg: Any) -> list[Path]:
    """Rename ``metrics.csv`` of the configured CSV loggers to ``metrics.<n>.csv`` when it exists: a run
    directory used again (a fixed ``hydra.run.dir``, a requeued SLURM job) keeps what the earlier attempt
    logged (Lightning's CSVLogger deletes ``metrics.csv`` when its folder is not empty). Returns the new
    names."""
    from omegaconf import OmegaConf

    kept = []
    loggers = cfg.get("logger")
    loggers = OmegaConf.to_container(loggers, resolve=True) if OmegaConf.is_config(loggers) else loggers
    for conf in (loggers or {}).values() if isinstance(loggers, Mapping) else ():
        if not isinstance(conf, Mapping) or not str(conf.get("_target_", "")).endswith("CSVLogger"):
            continue
        version = conf.get("version")
        if version is None or not isinstance(conf.get("save_dir"), str):
            continue  # a new version_N folder per run: nothing is overwritten
        log_dir = Path(conf["save_dir"]) / str(conf.get("name", "lightning_logs")) / str(version)
        metrics = log_dir / "metrics.csv"
        if metrics.is_file():
            n = 1
            while (log_dir / f"metrics.{n}.csv").exists():
                n += 1
            metrics.rename(log_dir / f"metrics.{n}.csv")
            kept.append(log_dir / f"metrics.{n}.csv")
            log.info("%s of an earlier attempt in this run directory kept as %s", metrics, kept[-1].name)
    return kept


# ----------------------------------------------------------------------------------------------------
# Preemption
# ----------------------------------------------------------------------------------------------------


def exit_preempted(trainer: Any) -> typing.NoReturn:
    """After Lightning's ``SIGTERMException``: say where the checkpoint is and exit with code 143."""
    from ssd_lightning.callbacks import PreemptionCheckpoint

    saved = [c.saved_path for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint) and c.saved_path]
    if trainer.is_global_zero:
        if trainer.state.fn != "fit":
            log.warning("SIGTERM: %s stopped before its end; nothing was written", trainer.state.fn)
        elif saved:
            log.warning(
                "SIGTERM: stopped at epoch %d, step %d; checkpoint %s; resume with ckpt_path=%s",
                trainer.current_epoch,
                trainer.global_step,
                saved[0],
                saved[0],
            )
        else:
            log.warning(
                "SIGTERM: stopped at epoch %d, step %d (no checkpoint callback configured)",
                trainer.current_epoch,
                trainer.global_step,
            )
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    raise SystemExit(PREEMPTED_EXIT_CODE)


# ----------------------------------------------------------------------------------------------------
# Config checks
# ----------------------------------------------------------------------------------------------------

_UNKNOWN = object()
_ARGS = "<accepted arguments>"


def _literals(tp: Any) -> list[Any]:
    """The values of the ``Literal`` parts of ``tp`` (unions flattened), in order, without duplicates."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return list(typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return list(dict.fromkeys(v for a in typing.get_args(tp) for v in _literals(a)))
    return []


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is typing.Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        literals = _literals(tp)
        parts = [_describe(a) for a in args if typing.get_origin(a) is not typing.Literal]
        if literals:
            parts.insert(0, "one of " + ", ".join(dict.fromkeys(str(v) for v in literals)))
        return " or ".join(dict.fromkeys(parts))
    if origin in (list, tuple, Sequence, typing.Sequence) or tp in (list, tuple):
        return "a list"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _matches(value: Any, tp: Any) -> bool | object:
    """Whether ``value`` (plain config data) fits annotation ``tp`` (``_UNKNOWN``: cannot be told)."""
    if tp is Any or isinstance(tp, typing.TypeVar):
        return _UNKNOWN
    if isinstance(value, Mapping) and "_target_" in value:
        return _UNKNOWN  # an object Hydra builds
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        results = [_matches(value, a) for a in typing.get_args(tp)]
        if any(r is True for r in results):
            return True
        return _UNKNOWN if any(r is _UNKNOWN for r in results) else False
    if tp is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp in (os.PathLike, Path):
        return isinstance(value, str)
    if origin in (list, tuple, Sequence, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, list | tuple):
            return False
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if len(args) != 1:
            return True
        results = [_matches(v, args[0]) for v in value]
        return False if any(r is False for r in results) else True
    if origin in (dict, Mapping, typing.Mapping) or tp is dict:
        return isinstance(value, Mapping) or _UNKNOWN
    return _UNKNOWN


def _signature_hints(target: str) -> tuple[dict[str, Any], dict[str, Any], str] | None:
    """(annotations, defaults, name) of the constructor/function ``target``; None when unreadable."""
    from hydra.utils import get_object

    try:
        obj = get_object(target)
        fn = obj.__init__ if inspect.isclass(obj) else obj
        hints = typing.get_type_hints(fn)
        params = inspect.signature(fn).parameters
    except Exception:  # an unresolvable annotation, a C extension: nothing to check against
        return None
    defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        hints = {**hints, _ARGS: [k for k in params if k != "self"]}  # the only names it accepts
    return hints, defaults, getattr(obj, "__name__", target)


def _check_node(node: Mapping[str, Any], prefix: str, extra: Mapping[str, Mapping[str, Any]] = ()) -> None:
    from ssd_lightning.cli import ConfigError

    target = node.get("_target_")
    if not isinstance(target, str):
        return
    sig = _signature_hints(target)
    if sig is None:
        return
    hints, defaults, name = sig
    values = [(f"{prefix}.{k}", k, v) for k, v in node.items() if not str(k).startswith("_")]
    for group_prefix, group in dict(extra).items():
        values += [(f"{group_prefix}.{k}", k, v) for k, v in group.items()]
    accepted = hints.get(_ARGS)
    for full_key, key, value in values:
        if accepted is not None and key not in accepted:
            similar = difflib.get_close_matches(str(key), accepted, n=2, cutoff=0.6)
            hint = (
                f"did you mean {' or '.join(full_key[: -len(str(key))] + m for m in similar)}? "
                if similar
                else ""
            )
            raise ConfigError(f"{full_key} is not an argument of {name}: {hint}remove it (~{full_key})")
        if isinstance(value, Mapping) and "_target_" in value:
            _check_node(value, full_key)
            continue
        if value is None or key not in hints or _matches(value, hints[key]) is not False:
            continue  # null: "not set", filled in by the code (model.num_classes) or by the class
        default = defaults.get(key)
        example = f" (default {full_key}={default})" if isinstance(default, int | float | str) else ""
        if _literals(hints[key]):
            raise ConfigError(
                f"{full_key}={value!r} is not a valid value ({name} argument {key}): "
                f"set {full_key} to {_describe(hints[key])}{example}"
            )
        raise ConfigError(
            f"{full_key}={value!r} is not {_describe(hints[key])} ({name} argument {key}): "
            f"set {full_key} to {_describe(hints[key])}{example}"
        )


def _requested_devices(devices: Any) -> int | None:
    """How many devices ``trainer.devices`` asks for (None: all / auto / unknown)."""
    if isinstance(devices, bool):
        return None
    if isinstance(devices, int):
        return None if devices < 0 else devices
    if isinstance(devices, list | tuple):
        return max(int(d) for d in devices) + 1 if devices else 0
    if isinstance(devices, str):
        text = devices.strip()
        if text.lstrip("-").isdigit():
            return _requested_devices(int(text))
        parts = [p for p in text.split(",") if p.strip()]
        if "," in text and all(p.strip().isdigit() for p in parts):
            return max(int(p) for p in parts) + 1  # "0,1": device indices
    return None


def _check_devices(trainer: Mapping[str, Any]) -> None:
    from ssd_lightning.cli import ConfigError

    accelerator = str(trainer.get("accelerator", "auto")).lower()
    devices = trainer.get("devices", "auto")
    wanted = _requested_devices(devices)
    if accelerator not in ("gpu", "cuda", "auto"):
        return  # cpu: any number of processes (DDP on CPU); tpu/mps/...: Lightning checks
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if accelerator in ("gpu", "cuda") and available == 0:
        raise ConfigError(
            f"trainer.accelerator={accelerator} but no CUDA device is visible: train on the CPU with "
            "trainer=cpu (or trainer.accelerator=cpu trainer.precision=32-true) or check CUDA_VISIBLE_DEVICES"
        )
    if accelerator == "auto" and available == 0:
        if wanted is not None and wanted > 1:
            raise ConfigError(
                f"trainer.devices={devices} but this machine has no CUDA device (trainer.accelerator=auto "
                f"runs on the CPU): set trainer.accelerator=cpu to run {wanted} CPU processes, or "
                "trainer.devices=1"
            )
        return
    if wanted is not None and wanted > available:
        raise ConfigError(
            f"trainer.devices={devices} but this machine has {available} CUDA device(s): set "
            f"trainer.devices={available} (or -1 for all of them)"
        )


def check_config(cfg: Any, model: bool = True) -> None:
    """Raise a one-line ``ConfigError`` for a config value of the wrong type or a device count the machine
    does not have.

    The types come from the constructors the config nodes instantiate (``data`` -> ``COCODataModule``,
    ``model`` and ``optim`` -> ``SSDModule``, ``trainer`` -> ``Trainer``, ``callbacks.*``, ``logger.*``):
    ``data.batch_size=abc`` is reported as "data.batch_size='abc' is not an integer ...". Values whose
    annotation is not a plain type are left to the constructor.
    """
    from omegaconf import OmegaConf

    from ssd_lightning.cli import ConfigError

    def plain(key: str) -> Any:
        node = cfg.get(key)
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node

    seed = cfg.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ConfigError(
            f"seed={seed!r} is not an integer: set seed to an integer, or null for a random one"
        )
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None and not isinstance(ckpt_path, str):
        raise ConfigError(f"ckpt_path={ckpt_path!r} is not a file path: set ckpt_path=PATH or ckpt_path=last")
    data = plain("data")
    if isinstance(data, Mapping):
        _check_node(data, "data")
    model_cfg = plain("model") if model else None
    if isinstance(model_cfg, Mapping):
        optim = plain("optim")
        _check_node(model_cfg, "model", {"optim": optim} if isinstance(optim, Mapping) else {})
    trainer = plain("trainer")
    if isinstance(trainer, Mapping):
        _check_node(trainer, "trainer")
        _check_devices(trainer)
    for group in ("callbacks", "logger"):
        nodes = plain(group)
        for name, node in (nodes or {}).items() if isinstance(nodes, Mapping) else ():
            if isinstance(node, Mapping):
                _check_node(node, f"{group}.{name}")


# ----------------------------------------------------------------------------------------------------
# Hydra composition errors as one line
# ----------------------------------------------------------------------------------------------------


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
    import re

    from hydra.errors import OverrideParseException

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


def run_entry_point(hydra_main: Callable[[], Any]) -> Any:
    """Call a ``@hydra.main`` function so that Hydra's config errors (unknown key, unknown option, an
    unparsable override) end in one line ``error: ...`` on stderr with exit code 1.

    Hydra prints those itself over several lines; with ``HYDRA_FULL_ERROR=1`` it raises them instead, which
    is what this sets (a bug in the task then shows Hydra's full traceback). A user who set
    ``HYDRA_FULL_ERROR`` gets Hydra's own behaviour.
    """
    from hydra.errors import ConfigCompositionException, OverrideParseException

    if "HYDRA_FULL_ERROR" in os.environ:
        return hydra_main()
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        return hydra_main()
    except (ConfigCompositionException, OverrideParseException) as err:
        print(f"error: {hydra_error_line(err)}", file=sys.stderr, flush=True)
        sys.exit(1)
