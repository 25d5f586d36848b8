"""The composed config checked before anything is built: one line per wrong value, naming the key.

Each config node with a ``_target_`` is checked against the signature of the class or function it builds
(types from the annotations, accepted argument names, ``Literal`` choices), so that ``data.batch_size=abc`` or
``optim.milestones=5`` ends in ``error: data.batch_size=abc: expected an integer`` before a data set is read,
not in a stack trace minutes later. ``trainer.devices`` is checked against the machine.
"""

from __future__ import annotations

import difflib
import inspect
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_object
from omegaconf import OmegaConf

from ssd_lightning.errors import ConfigError

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
