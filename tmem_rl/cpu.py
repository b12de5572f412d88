"""How many CPU threads torch uses, chosen so that a busy machine does not slow every run down several times.

torch's intra-op threads wait for each other at the end of every parallel region by spinning. When another process
holds a core a thread was counting on, every region waits for a descheduled thread: on a 2-core machine with one
competing process `tmem-rl demo --episodes 4` took 649 s against 215 s quiet with torch's default of one thread per
core. One thread per *free* core removes that stall without giving up the second thread on a quiet machine (which
is worth ~15%: 256 s with 2 threads, 302 s with 1, measured with this version). So the cores other processes keep
busy are measured at start (a quarter of a second of /proc/stat) and left to them. `OMP_WAIT_POLICY=PASSIVE`
also removes the stall, but costs ~11% when quiet and must be set before torch starts. docs/demo.md has the
measurements; a process that starts competing after this one began is not seen.

`OMP_NUM_THREADS` (read by torch at start), else `TMEM_RL_THREADS` (read here), set by the user win; under a
multi-process launcher the free cores are shared among the processes of this node.
"""

from __future__ import annotations

import os
import time

THREADS_ENV = "TMEM_RL_THREADS"
SAMPLE_SECONDS = 0.25
_configured = False


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask: what a container or `taskset` leaves it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (Linux's /proc/stat), or None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle and waiting for I/O
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def cores_busy_elsewhere(seconds: float = SAMPLE_SECONDS) -> float:
    """Cores other processes keep busy, averaged over `seconds` while this one waits (0 where it cannot tell)."""
    start, own = _busy_seconds(), os.times()
    began = time.perf_counter()
    time.sleep(seconds)
    end, own_end = _busy_seconds(), os.times()
    if start is None or end is None:
        return 0.0
    mine = own_end.user + own_end.system - own.user - own.system
    return max(0.0, (end - start - mine) / (time.perf_counter() - began))


def default_threads(cores: int, local_processes: int = 1, busy_elsewhere: float = 0.0) -> int:
    """The free cores (a core counts as taken when another process keeps it busy half the time or more), shared
    by this node's processes; at least one."""
    free = cores - int(busy_elsewhere + 0.5)
    return max(1, free // max(local_processes, 1))


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
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        threads = default_threads(usable_cores(), local, cores_busy_elsewhere())
    torch.set_num_threads(threads)
    return threads
