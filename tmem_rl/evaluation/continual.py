"""Continual learning: fast weights carried across a sequence of episodes (`tmem-rl eval --continual`).

The tasks are dealt into S sequences, one per fast-weight slot (S = the batch size), read in lockstep: position
i of every sequence is one batch. Each fast-weight method is measured in four phases, each a row of the report:

    <method>:fresh          every episode from the base model: the usual protocol, the reference
    <method>:carried        right after its episode, read with the fast weights the sequence's earlier episodes
                            left (EpisodeConfig.carry_fast_weights), answered as usual (its residual context too)
    <method>:carried-only   at the same moment, answered from the fast weights alone (no context)
    <method>:end            after the sequence's last episode, from the fast weights alone

    forward transfer = mean over positions i >= 1 of F1(carried) - F1(fresh)   (same questions; at position 0
                       the two are the same episode)
    retention        = F1(end) / F1(carried-only) over positions before the last  (1: nothing forgotten)
    forgetting       = F1(carried-only) - F1(end) over the same questions
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from tmem_rl.envs.base import Environment, Task
from tmem_rl.errors import InputError
from tmem_rl.evaluation.methods import METHODS, Answered

PHASES = ("fresh", "carried", "carried-only", "end")
CONTINUAL = "continual.json"


def phase_label(row: str, phase: str) -> str:
    return f"{row}:{phase}"


def check_continual(config, env: Environment, tasks: list[Task]) -> None:
    """One line for what a continual run (of an EvalConfig over `tasks`) cannot do."""
    num_tasks = len(tasks)
    no_weights = [m for m in config.methods if not METHODS[m].uses_fast_weights]
    if no_weights:
        usable = [name for name, cls in METHODS.items() if cls.uses_fast_weights]
        raise InputError(f"--continual carries fast weights across episodes; method(s) {', '.join(no_weights)} have "
                         f"none (available: {', '.join(usable)})")
    if env.tools:
        raise InputError(f"--continual reads stream environments; {env.name!r} is a tool environment")
    if config.resume:
        raise InputError("--continual cannot --resume: the carried fast weights are not saved between runs; "
                         "start again with another --out")
    if config.episode_unit != "question":
        raise InputError(f"--continual reads one episode per question; episode_unit={config.episode_unit!r} does "
                         "not apply")
    several = next((t for t in tasks if t.questions), None)
    if several is not None:
        raise InputError(f"--continual scores one question per episode; task {several.task_id!r} of {env.name!r} "
                         f"asks {len(several.questions)}")
    slots = config.methods_settings.answer_batch_size
    if num_tasks < 2 * slots:
        raise InputError(f"--continual: {num_tasks} task(s) in {slots} sequences (--batch-size) leave a sequence "
                         f"with one episode and nothing to carry; give at least {2 * slots} tasks or a smaller "
                         "--batch-size")


def sequences(tasks: list[Task], slots: int) -> list[list[Task]]:
    """Batches by position: batch i holds position i of every sequence (sequence s is tasks s, s+S, s+2S, ...).
    Tasks past the last whole batch are left out, so that every sequence has the same length."""
    length = len(tasks) // slots
    return [tasks[i * slots : (i + 1) * slots] for i in range(length)]


def evaluate_continual(method_name: str, runner, env: Environment, settings, batches: list[list[Task]],
                       record) -> None:
    """Run the four phases of one method; `record(phase, position, answers)` stores a batch's answers, the
    answer of sequence s at index s."""
    method = METHODS[method_name](runner, env, settings)
    for position, batch in enumerate(batches):
        record("fresh", position, [a[0] for a in method.run(batch, [[t] for t in batch])])
    given = runner.config
    runner.config = dataclasses.replace(given, carry_fast_weights=True)
    try:
        runner.reset_fast_weights()
        for position, batch in enumerate(batches):
            record("carried", position, [a[0] for a in method.run(batch, [[t] for t in batch])])
            record("carried-only", position, _from_weights(runner, env, batch))
        for position, batch in enumerate(batches):
            record("end", position, _from_weights(runner, env, batch))
    finally:
        runner.config = given
        runner.reset_fast_weights()


def _from_weights(runner, env: Environment, batch: list[Task]) -> list[Answered]:
    """Each slot answers its task with no context: what its fast weights hold."""
    generated = runner.answer(env, list(range(len(batch))), batch, [""] * len(batch))
    return [Answered(task, out.text, out.seconds / len(batch), {"fast_weight_version": runner.fast.versions[g]})
            for g, (task, out) in enumerate(zip(batch, generated))]


def continual_summary(records: list[dict[str, Any]], row: str) -> dict[str, Any]:
    """Forward transfer, retention and forgetting of one row from its phase records (see the module docstring)."""
    f1 = {phase: {} for phase in PHASES}
    for r in records:
        if r.get("continual_row") == row:
            f1[r["phase"]][(r["sequence"], r["position"])] = float(r["f1"])
    if not f1["fresh"]:
        return {}
    last = max(position for _, position in f1["fresh"])
    later = [k for k in f1["carried"] if k[1] >= 1 and k in f1["fresh"]]
    earlier = [k for k in f1["end"] if k[1] < last and k in f1["carried-only"]]

    def mean(phase, keys):
        return sum(f1[phase][k] for k in keys) / len(keys) if keys else None

    learned, kept = mean("carried-only", earlier), mean("end", earlier)
    by_position = {phase: [mean(phase, [k for k in f1[phase] if k[1] == i]) for i in range(last + 1)]
                   for phase in PHASES}
    return {
        "sequences": len({s for s, _ in f1["fresh"]}),
        "length": last + 1,
        "forward_transfer": (None if not later else mean("carried", later) - mean("fresh", later)),
        "retention": (kept / learned) if learned else None,
        "forgetting": (learned - kept) if learned is not None else None,
        "f1_by_position": by_position,
    }


def continual_markdown(summaries: dict[str, dict[str, Any]]) -> str:
    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    lines = ["| method | sequences x length | forward transfer | retention | forgetting |", "|---|---|---|---|---|"]
    for row, s in summaries.items():
        lines.append(f"| {row} | {s['sequences']} x {s['length']} | {fmt(s['forward_transfer'])} | "
                     f"{fmt(s['retention'])} | {fmt(s['forgetting'])} |")
    return "\n".join(lines)


def write_continual_reports(out: Path, summaries: dict[str, dict[str, Any]]) -> None:
    """continual.json, and the table under summary.md's."""
    (out / CONTINUAL).write_text(json.dumps(summaries, indent=2))
    with open(out / "summary.md", "a") as fh:
        fh.write("\n" + continual_markdown(summaries) + "\n")
