"""Environments: the contract in `base`, a registry that also reads the ``tmem_rl.envs`` entry point group."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Callable

from tmem_rl.envs.base import (  # noqa: F401  (re-exported contract)
    Action,
    ActionKind,
    Environment,
    EpisodeState,
    Observation,
    ParseRecord,
    QAPair,
    StepResult,
    Supervision,
    Task,
)

_REGISTRY: dict[str, Callable[..., Environment]] = {}


def register_env(name: str):
    """Class decorator: make an environment available to `make_env` and the CLI under `name`."""

    def decorator(cls):
        _REGISTRY[name] = cls
        return cls

    return decorator


def available_envs() -> list[str]:
    names = set(_REGISTRY)
    names.update(ep.name for ep in entry_points(group="tmem_rl.envs"))
    return sorted(names)


def make_env(name: str, **kwargs) -> Environment:
    if name not in _REGISTRY:
        for ep in entry_points(group="tmem_rl.envs"):
            if ep.name == name:
                _REGISTRY[name] = ep.load()
                break
        else:
            raise KeyError(f"unknown environment {name!r}; available: {', '.join(available_envs())}")
    return _REGISTRY[name](**kwargs)
