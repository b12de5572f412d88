"""Environments: the contract in `base`, a registry that also reads the ``tmem_rl.envs`` entry point group."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Callable

from tmem_rl.envs.base import (  # noqa: F401  (re-exported contract)
    Action,
    ActionKind,
    Environment,
    EpisodeState,
    Observation,
    StepResult,
    Task,
)
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
    if name not in _REGISTRY and name in BUILTIN_ENVS:
        module, cls = BUILTIN_ENVS[name].split(":")
        _REGISTRY[name] = getattr(importlib.import_module(module), cls)
    if name not in _REGISTRY:
        for ep in entry_points(group="tmem_rl.envs"):
            if ep.name == name:
                _REGISTRY[name] = ep.load()
                break
        else:
            raise KeyError(f"unknown environment {name!r}; available: {', '.join(available_envs())}")
    return _REGISTRY[name](**kwargs)
