"""Environments: the contract in `base`, a registry that also reads the ``tmem_rl.envs`` entry point group."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable

from tmem_rl.envs.base import (  # noqa: F401  (re-exported contract)
    Action,
    ActionKind,
    Environment,
    EpisodeState,
    Observation,
    StepResult,
    Task,
)
from tmem_rl.errors import InputError
from tmem_rl.records import ParseRecord, QAPair, Supervision  # noqa: F401  (what extraction actions produce)

_REGISTRY: dict[str, Callable[..., Environment]] = {}

# The environments that ship with tmem_rl, imported on first use. They need no installed package metadata, so they
# also work from a source checkout on PYTHONPATH; other packages add theirs through the entry point group.
BUILTIN_ENVS = {"facts": "tmem_rl.envs.facts:FactsEnv", "locomo": "tmem_rl.envs.locomo:LocomoEnv"}


def register_env(name: str):
    """Class decorator: make an environment available to `make_env` and the CLI under `name`."""

    def decorator(cls):
        _REGISTRY[name] = cls
        return cls

    return decorator


def available_envs() -> list[str]:
    names = set(_REGISTRY) | set(BUILTIN_ENVS)
    names.update(ep.name for ep in entry_points(group="tmem_rl.envs"))
    return sorted(names)


def make_env(name: str, **kwargs) -> Environment:
    """The environment registered under `name`, built from `kwargs`; an unknown name or setting is an InputError
    that names the environment, the setting and the accepted ones."""
    if name not in _REGISTRY and name in BUILTIN_ENVS:
        module, cls = BUILTIN_ENVS[name].split(":")
        _REGISTRY[name] = getattr(importlib.import_module(module), cls)
    if name not in _REGISTRY:
        for ep in entry_points(group="tmem_rl.envs"):
            if ep.name == name:
                _REGISTRY[name] = ep.load()
                break
        else:
            raise InputError(f"unknown environment {name!r}; available: {', '.join(available_envs())}")
    factory = _REGISTRY[name]
    _check_settings(name, factory, kwargs)
    return factory(**kwargs)


def _check_settings(name: str, factory: Callable[..., Environment], kwargs: dict[str, Any]) -> None:
    """Setting names against the constructor's signature, so that a typo is named instead of ending in a
    TypeError from deep inside the call. Constructors that take **kwargs check their own."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): the constructor has the last word
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    accepted = [p.name for p in named]
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        raise InputError(f"environment {name!r}: unknown setting(s) {', '.join(map(repr, unknown))}; "
                         f"accepted: {', '.join(accepted) or 'none'}")
    missing = [p.name for p in named if p.default is p.empty and p.name not in kwargs]
    if missing:
        raise InputError(f"environment {name!r}: missing setting(s) {', '.join(map(repr, missing))}")


# ---- user data files -----------------------------------------------------------------------------------------


def printable(name: Any) -> str:
    """A file name or id from user data as it goes into a one-line message: as it is, or quoted with escapes where
    it holds a newline, a control character or a lone surrogate."""
    text = str(name)
    return text if text.isprintable() else repr(text)


def lone_surrogate(text: str) -> int | None:
    """Index of the first lone surrogate in `text` (a JSON "\\ud800" escape decodes to one), or None. Such text has
    no UTF-8 form, so tokenizers and UTF-8 writers fail on it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return None


def read_json_file(path: Any, expected: str, error: type[InputError] = InputError) -> Any:
    """The JSON value in a user's data file. Anything that stops it being read (no such file, bytes that are not
    UTF-8, invalid JSON, a number too long for Python, nesting too deep) is an `error` whose one-line message names
    the file, where in it, and `expected` (what the file should hold)."""
    if not isinstance(path, (str, os.PathLike)):
        raise error(f"data file: expected a file path, got {path!r}")
    name = printable(path)
    try:
        data = Path(path).read_bytes()
    except (OSError, ValueError) as err:  # ValueError: a path the OS cannot take (a NUL, a lone surrogate)
        raise error(f"{name}: cannot read the file ({getattr(err, 'strerror', None) or err}); expected {expected}"
                    ) from err
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark is harmless: accept it
    except UnicodeDecodeError as err:
        raise error(f"{name}: not UTF-8 text (byte offset {err.start}: {data[err.start]:#04x}); expected {expected}"
                    ) from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{name}: not valid JSON at line {err.lineno}, column {err.colno} ({err.msg}); "
                    f"expected {expected}") from err
    except RecursionError as err:
        raise error(f"{name}: JSON nested too deeply to read; expected {expected}") from err
    except ValueError as err:  # an integer literal longer than Python converts
        raise error(f"{name}: an integer has more than {sys.get_int_max_str_digits()} digits, more than Python "
                    f"reads; expected {expected}") from err
