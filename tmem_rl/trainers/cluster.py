"""What a run of several processes needs to survive a cluster: a pre-flight check that every rank runs the same
thing, a heartbeat per rank, and collectives that fail within a timeout with a line naming the rank and phase.

A rank that dies or stalls leaves the others blocked in a collective (the gradient all-reduce, a gather of
rewards, the barrier around a checkpoint). The process group's timeout (`outer_loop.collective_timeout_s`) bounds
that wait; `RankMonitor.phase` turns the backend's error into a `RunError` that names the rank, the phase and the
step, and what the other ranks' heartbeats say. The process then exits, the launcher (torchrun --max-restarts,
SLURM --requeue) restarts the job, and `tmem-rl train --resume auto` continues it from its last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from tmem_rl.config_types import dotted_leaves
from tmem_rl.errors import InputError, RunError

HEARTBEATS = "heartbeats"
PHASE_ORDER = ("start", "resume", "rollout", "update", "checkpoint", "done")
# What gloo, NCCL and the TCP store say when a collective timed out or lost its peer; a plain "timeout" of the
# run's own code (a reward server's) is not one of them.
COLLECTIVE_FAILURE_WORDS = ("[gloo]", "/gloo/", "gloo ", "nccl", "timed out waiting", "connection closed by peer",
                            "connection reset by peer", "socket timeout")


def init_process_group(backend: str, timeout_s: float) -> None:
    """Start the process group of a job that torchrun's elastic agent launched, with its keys under this attempt's
    own prefix in the agent's store. Without it, the workers of a restarted job can read the dead workers'
    addresses from the store (they are still there) and never connect: "Gloo connectFullMesh failed ... Connection
    refused", on some restarts and not others (torch 2.13, static and c10d rendezvous alike). Outside an elastic
    launch, on several nodes, or with the group already started, it does nothing and Accelerate starts the group as
    usual."""
    import torch.distributed as dist
    from datetime import timedelta

    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # On several nodes the agents count restarts apart (a node that rejoins or replaces another starts at 0), so
    # the count is no name the whole job shares: there the launcher's own start is kept.
    one_node = os.environ.get("LOCAL_WORLD_SIZE") == str(world)
    if attempt is None or world < 2 or not one_node or dist.is_initialized():
        return
    rank, timeout = int(os.environ["RANK"]), timedelta(seconds=timeout_s)
    # The store torch itself would use: the agent's, or (when the agent does not share its own) one rank 0 hosts.
    hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True) and rank == 0
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size=world,
                          is_master=hosts, timeout=timeout)
    dist.init_process_group(backend, store=dist.PrefixStore(f"tmem_rl/attempt_{attempt}", store), rank=rank,
                            world_size=world, timeout=timeout)


def heartbeat_path(output_dir: str | Path, rank: int) -> Path:
    return Path(output_dir) / HEARTBEATS / f"rank-{rank}.json"


class RankMonitor:
    """This rank's heartbeat (`<output_dir>/heartbeats/rank-<r>.json`: step, phase, since when, pid, host), written
    as each phase starts, and the conversion of a failed collective into a `RunError` naming it."""

    def __init__(self, output_dir: str | Path, rank: int, world: int, timeout_s: float):
        self.output_dir, self.rank, self.world, self.timeout_s = Path(output_dir), rank, world, timeout_s
        self.failed = False
        if rank == 0:  # a run resumed on fewer processes: the ranks it no longer has are not quiet, they are gone
            for path in (self.output_dir / HEARTBEATS).glob("rank-*.json"):
                if path.stem.removeprefix("rank-").isdigit() and int(path.stem.removeprefix("rank-")) >= world:
                    path.unlink(missing_ok=True)

    def beat(self, step: int, phase: str) -> None:
        """Best effort: a heartbeat that cannot be written (a full disk, a read-only folder) warns once and never
        stops training."""
        path = heartbeat_path(self.output_dir, self.rank)
        record = {"rank": self.rank, "world": self.world, "step": step, "phase": phase, "since": time.time(),
                  "pid": os.getpid(), "host": socket.gethostname()}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            staging = path.with_suffix(".tmp")
            staging.write_text(json.dumps(record))
            staging.replace(path)  # a reader sees the old beat or the new one, never half of one
        except OSError as err:
            if not self.failed:
                warnings.warn(f"rank {self.rank}: cannot write its heartbeat {path} ({err}); training goes on "
                              f"without it", stacklevel=2)
            self.failed = True

    @contextmanager
    def phase(self, name: str, step: int) -> Iterator[None]:
        """`step`: the step being run (the run's count of finished steps plus one)."""
        self.beat(step, name)
        started = time.monotonic()
        try:
            yield
        except Exception as err:
            if self.world > 1 and collective_failure(err):
                raise RunError(self._failure(err, name, step, time.monotonic() - started)) from err
            raise

    def _failure(self, err: BaseException, phase: str, step: int, elapsed: float) -> str:
        cause = " ".join(str(err).split())[:160] or type(err).__name__
        others = [b for b in read_heartbeats(self.output_dir) if b["rank"] != self.rank]
        now = time.time()
        heard = "; ".join(f"rank {b['rank']} in {b['phase']} of step {b['step']} since {now - b['since']:.0f} s ago"
                          for b in others) or "no heartbeat from the other ranks"
        return (f"rank {self.rank} of {self.world}: a collective in phase {phase} of step {step} failed after "
                f"{elapsed:.1f} s (collective_timeout_s {self.timeout_s:g}): {cause}. Last heard: {heard}. A rank "
                f"died, hung or is slower than the timeout; restart the job (tmem-rl train --resume auto continues "
                f"from the last checkpoint)")


def collective_failure(err: BaseException) -> bool:
    """Whether `err` is a collective that timed out or lost a peer, as gloo and NCCL report it."""
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(err, dist_error):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(word in text for word in COLLECTIVE_FAILURE_WORDS)


def read_heartbeats(output_dir: str | Path) -> list[dict[str, Any]]:
    """Every rank's last heartbeat, by rank; an unreadable file (being replaced) is skipped."""
    beats = []
    for path in sorted((Path(output_dir) / HEARTBEATS).glob("rank-*.json")):
        try:
            beat = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(beat, dict) and all(isinstance(beat.get(k), (int, float)) for k in ("rank", "step", "since")):
            beats.append({"phase": "?", "host": "?", "pid": "?", **beat})
    return sorted(beats, key=lambda b: b["rank"])


def status(output_dir: str | Path, quiet_after_s: float) -> tuple[str, list[int]]:
    """A table of the ranks' heartbeats and the ranks that look stuck: those behind the others (a step or phase
    earlier while the rest wait for them in a collective) once a beat is older than `quiet_after_s`, and any
    rank quiet for longer than that while the run is not done."""
    beats = read_heartbeats(output_dir)
    if not beats:
        raise InputError(f"{output_dir}: no heartbeats ({HEARTBEATS}/rank-*.json); expected the output_dir of a "
                         f"tmem-rl train run")
    now = time.time()
    progress = {b["rank"]: (b["step"], PHASE_ORDER.index(b["phase"]) if b["phase"] in PHASE_ORDER else 0)
                for b in beats}
    ahead = max(progress.values())
    flagged, rows = [], []
    for b in beats:
        age = now - b["since"]
        note = ""
        if b["phase"] != "done" and age > quiet_after_s:
            behind = progress[b["rank"]] < ahead
            note = "BEHIND: the others wait for it" if behind else "QUIET"
            flagged.append(b["rank"])
        rows.append(f"{b['rank']:>4}  {b['step']:>4}  {b['phase']:<10}  {age:>8.0f}  {b['host']}:{b['pid']}  {note}")
    world = beats[0].get("world", len(beats))
    missing = sorted(set(range(world)) - {b["rank"] for b in beats})
    header = f"{'RANK':>4}  {'STEP':>4}  {'PHASE':<10}  {'SECONDS':>8}  HOST:PID"
    lines = [header, *rows] + [f"{r:>4}  no heartbeat yet" for r in missing]
    return "\n".join(lines), flagged + missing


# ---- pre-flight ----------------------------------------------------------------------------------------------


def code_version() -> str:
    """SHA-256 of the package's Python source as this process imports it: equal on ranks that run the same code,
    whatever the install (a checkout, site-packages) and whether or not a change was committed."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's name, shape, dtype and first and last values: the same checkpoint gives the
    same fingerprint on every machine, another one (or another architecture) a different one, without reading all
    of a large model's weights."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        ends = torch.cat([flat[:8], flat[-8:]]).float().cpu()
        digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}|".encode())
        digest.update(ends.numpy().tobytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    template = getattr(tokenizer, "chat_template", None) or ""
    return hashlib.sha256(json.dumps([vocab, template, tokenizer.all_special_tokens]).encode()).hexdigest()


def preflight(accelerator, facts: Callable[[], dict[str, Any]]) -> None:
    """Every rank's `facts()` (code version, recipe, model and tokenizer fingerprints) against rank 0's: a
    difference stops every rank with one line naming what differs and on which rank. A recipe given as a dict is
    compared key by key, so the line names the setting. A single process has nothing to compare: the facts (a hash
    of the package, of the vocabulary) are not computed."""
    if accelerator.num_processes < 2:
        return
    from accelerate.utils import gather_object

    facts = facts()
    everyone = gather_object([facts])
    first = everyone[0]
    problems = []
    for rank, theirs in enumerate(everyone[1:], start=1):
        for key, value in theirs.items():
            if value != first.get(key):
                problems.append(f"rank {rank} differs from rank 0 in {key} ({_difference(first.get(key), value)})")
    if problems:
        raise InputError(f"pre-flight: {'; '.join(problems[:4])}{'; ...' if len(problems) > 4 else ''}. Every rank "
                         f"must run the same code, recipe and model")


def _difference(ours: Any, theirs: Any) -> str:
    if isinstance(ours, dict) and isinstance(theirs, dict):
        ours, theirs = dotted_leaves(ours), dotted_leaves(theirs)
        keys = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        return ", ".join(f"{k}: {ours.get(k)!r} vs {theirs.get(k)!r}" for k in keys[:3])
    if isinstance(ours, str) and len(ours) > 24:  # a hash: its head is enough to see they differ
        return f"{ours[:12]}... vs {str(theirs)[:12]}..."
    return f"{ours!r} vs {theirs!r}"
