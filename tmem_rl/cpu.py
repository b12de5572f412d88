"""How many CPU threads torch uses, chosen so that a busy machine does not slow every run down several times.

torch's intra-op threads wait for each other at the end of every parallel region by spinning. When another process
holds one of the cores a thread was counting on, every region waits for a descheduled thread: on a 2-core machine
with one competing process `tmem-rl demo --episodes 4` took 649 s against 215 s quiet. Leaving one core free for
the rest of the machine removes that stall, and costs nothing measurable when quiet at this project's sizes
(small matrices gain little from a second thread: 214 s with 1 thread, 215 s with 2). `OMP_WAIT_POLICY=PASSIVE`
also removes the stall but costs ~11% when quiet (238 s), and must be set before torch starts, so it is not the
default. See docs/demo.md for the measurements.

`OMP_NUM_THREADS` (read by torch at start), else `TMEM_RL_THREADS` (read here), set by the user win; under a multi-process launcher the cores are shared
among the processes of this node.
"""

from __future__ import annotations

import os

THREADS_ENV = "TMEM_RL_THREADS"
_configured = False


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask: what a container or `taskset` leaves it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads(cores: int, local_processes: int = 1) -> int:
    """One core left to the rest of the machine, the remaining ones shared by this node's processes."""
    return max(1, (cores - 1) // max(local_processes, 1))


def configure_cpu_threads() -> int | None:
    """Set torch's thread count once per process, unless the user chose it; returns the count set, or None.

    An invalid `TMEM_RL_THREADS` is an InputError naming it."""
    global _configured
    if _configured:
        return None
    _configured = True
    import torch

    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return None  # torch read it at start; launchers such as torchrun set it per process
    chosen = os.environ.get(THREADS_ENV, "").strip()
    if chosen:
        if not chosen.isdigit() or int(chosen) < 1:
            from tmem_rl.errors import InputError

            _configured = False
            raise InputError(f"{THREADS_ENV}={chosen!r}: expected a positive integer (torch's CPU thread count)")
        threads = int(chosen)
    else:
        threads = default_threads(usable_cores(), int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    torch.set_num_threads(threads)
    return threads
