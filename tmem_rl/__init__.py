"""tmem_rl: RL training for LLM agents with fast-weight memory (TMEM).

`import tmem_rl` stays light: `TMEMAgent` (and with it torch and transformers) is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tmem_rl.agent import TMEMAgent  # noqa: F401  (for type checkers; loaded lazily below)

_LAZY = {"TMEMAgent": "tmem_rl.agent"}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'tmem_rl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
