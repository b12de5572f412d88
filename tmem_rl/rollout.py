"""Moved to `tmem_rl.episode` (the episode as a package: config, records, context, sampler, memory, runner); this
module re-exports it for one release."""

from tmem_rl.episode import *  # noqa: F401,F403
from tmem_rl.episode import __all__  # noqa: F401
