"""Memory methods compared side by side on the same model, prompts and decoding.

Every method gets a batch of *readings* (a stream to read; its question when the protocol reveals it) and, per
reading, the questions to answer afterwards. What differs is only what the answer prompt's context holds and
whether fast weights are live:

    none            nothing: the question alone
    full-context    the most recent stream text that fits the context budget
    summary         a running summary rewritten after every L_max tokens of stream (MemAgent-style)
    retrieval       BM25 over the stream's chunks (turns), top-k in stream order
    tmem            fast weights written by the agent's own extractions + the working context left at the end
    tmem+explicit   tmem, plus the extracted pairs retrieved by BM25 as explicit notes
    tmem-reference  tmem with the environment's reference pairs absorbed in place of the agent's extractions:
                    the gold supervision's own score through the same fast weights (environments that know it,
                    such as facts); a policy can beat it by writing fewer pairs that interfere less

In a tool environment every method runs the same turn loop (`EpisodeRunner.act`); what differs is what happens
when the working context exceeds L_max (`EpisodeConfig.memory`):

    none            the context keeps its most recent turns that fit L_max ("window")
    full-context    nothing is cut: no budget ("full")
    summary         running notes are rewritten from the context, which is then cleared ("summary")
    tmem            extraction and absorb into fast weights, then the context is cleared ("fast_weights")
    tmem+explicit   tmem, and the absorbed pairs that best match the question shown as notes in every later turn
                    ("fast_weights" with explicit_notes = retrieval_k)
    tmem-reference  tmem, absorbing the environment's reference pairs grounded in the context
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from tmem_rl.envs.base import Environment, Task
from tmem_rl.errors import InputError, did_you_mean
from tmem_rl.extraction import summary_messages
from tmem_rl.retrieval import bm25_top_k
from tmem_rl.episode import EpisodeRunner
from tmem_rl.episode.memory import pair_notes


@dataclass
class Answered:
    task: Task
    prediction: str
    seconds: float  # this question's share of the wall time (reading shared by its questions + answering)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodSettings:
    context_budget: int = 4096
    """Tokens of stream text a full-context prompt may hold."""
    retrieval_k: int = 10
    """Chunks (turns) retrieved per question; also the number of extracted pairs tmem+explicit retrieves."""
    answer_batch_size: int = 8
    """Streams read in lockstep (one fast-weight slot each) and question rows answered together."""

    def __post_init__(self):
        for name in ("context_budget", "retrieval_k", "answer_batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"MethodSettings.{name}={getattr(self, name)}: expected a positive number")


class MemoryMethod:
    name = "base"
    uses_fast_weights = False
    agent_memory: str | None = None
    """EpisodeConfig.memory of this method in a tool environment; None: the method does not apply to one."""

    def __init__(self, runner: EpisodeRunner, env: Environment, settings: MethodSettings):
        self.runner = runner
        self.env = env
        self.settings = settings
        self.tokenizer = runner.tokenizer

    def run(self, readings: list[Task], questions: list[list[Task]]) -> list[list[Answered]]:
        if self.env.tools:
            return self.act(readings)
        self.runner.reseed()  # every batch samples the same way whatever ran before it
        start = time.perf_counter()
        slots, contexts, extras = self.prepare(readings, questions)
        read_seconds = time.perf_counter() - start
        share = read_seconds / max(sum(len(q) for q in questions), 1)
        # Every (reading, question) row of the batch is answered together, each under its reading's fast weights.
        rows = [(g, i) for g, qs in enumerate(questions) for i in range(len(qs))]
        out: list[list[Answered]] = [[] for _ in questions]
        for begin in range(0, len(rows), self.settings.answer_batch_size):
            batch = rows[begin : begin + self.settings.answer_batch_size]
            tasks = [questions[g][i] for g, i in batch]
            contexts_of_batch = [contexts[g][i] for g, i in batch]
            results = self.runner.answer(self.env, [slots[g] for g, _ in batch], tasks, contexts_of_batch)
            for (g, _), task, context, generated in zip(batch, tasks, contexts_of_batch, results):
                extra = dict(extras[g])
                extra["context_tokens"] = self._tokens(context)
                out[g].append(Answered(task, generated.text, share + generated.seconds / len(batch), extra))
        return out

    def act(self, tasks: list[Task]) -> list[list[Answered]]:
        """Tool environments: one episode per task, in lockstep, with this method's memory at the budget."""
        given = self.runner.config
        self.runner.config = dataclasses.replace(given, memory=self.agent_memory, **self.agent_settings())
        try:
            batch = self.runner.run(self.env, tasks)
        finally:
            self.runner.config = given
        out = []
        for task, traj in zip(tasks, batch.trajectories):
            extra = {
                # What the environment measured while the episode ran (a search's recall, failed tool calls).
                **{key: value for key, value in traj.metrics.items() if key not in ("reward", "f1", "em")},
                "turns": traj.turns, "tool_calls": traj.tool_calls, "malformed_actions": traj.malformed_actions,
                "forced_answer": traj.forced_answer, "actions": [asdict(a) for a in traj.actions],
                "extractions": [asdict(e) for e in traj.extractions],
                "pairs_absorbed": sum(len(e.supervision.pairs) for e in traj.extractions if e.absorbed),
                "summaries": sum(s.kind == "summary" for s in traj.segments),
            }
            out.append([Answered(task, traj.prediction, traj.timings["episode"] / len(tasks), extra)])
        return out

    def agent_settings(self) -> dict[str, Any]:
        """Further EpisodeConfig settings of this method in a tool environment."""
        return {}

    def prepare(self, readings, questions):
        """-> (fast-weight slot per reading, answer contexts per reading per question, extra record fields)."""
        contexts = [[self.context_for(reading, q) for q in qs] for reading, qs in zip(readings, questions)]
        return [-1] * len(readings), contexts, [{} for _ in readings]

    def context_for(self, reading: Task, question: Task) -> str:
        return ""

    def _tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0


class NoMemory(MemoryMethod):
    name = "none"
    agent_memory = "window"


class FullContext(MemoryMethod):
    name = "full-context"
    agent_memory = "full"

    def context_for(self, reading, question):
        kept, used = [], 0
        for chunk in reversed(reading.chunks):
            cost = self._tokens(chunk) + 1
            if used + cost > self.settings.context_budget:
                break
            kept.append(chunk)
            used += cost
        return "\n".join(reversed(kept))

    def prepare(self, readings, questions):
        # The most recent text does not depend on the question: build it once per reading.
        contexts = [[self.context_for(r, None)] * len(qs) for r, qs in zip(readings, questions)]
        return [-1] * len(readings), contexts, [{} for _ in readings]


class Retrieval(MemoryMethod):
    name = "retrieval"

    def prepare(self, readings, questions):
        contexts, extras = [], []
        for reading, qs in zip(readings, questions):
            per_question = []
            hits = {}
            for q in qs:
                top = bm25_top_k(list(reading.chunks), q.question, self.settings.retrieval_k)
                hits[q.task_id] = top
                per_question.append("\n".join(reading.chunks[i] for i in top))
            contexts.append(per_question)
            extras.append({"retrieved_chunks": hits})
        return [-1] * len(readings), contexts, extras


class Summary(MemoryMethod):
    name = "summary"
    agent_memory = "summary"

    def prepare(self, readings, questions):
        budget = self.runner.config.summary_tokens
        notes = [""] * len(readings)
        windows: list[list[str]] = [[] for _ in readings]
        used = [0] * len(readings)
        rewrites = [0] * len(readings)
        longest = max(len(r.chunks) for r in readings)
        for i in range(longest + 1):
            due = []
            for g, reading in enumerate(readings):
                if i < len(reading.chunks):
                    windows[g].append(reading.chunks[i])
                    used[g] += self._tokens(reading.chunks[i])
                    if used[g] > self.runner.config.budget(self.env):
                        due.append(g)
                elif i == len(reading.chunks) and windows[g]:
                    due.append(g)  # the stream's tail
            if not due:
                continue
            sampler = self.runner.sampler
            prompts = [sampler.prompt_ids(summary_messages(readings[g].question, notes[g], "\n".join(windows[g]),
                                                           budget))
                       for g in due]
            outputs = sampler.generate(prompts, [-1] * len(due), budget, False, 1.0)
            for g, ids in zip(due, outputs):
                notes[g] = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
                windows[g], used[g] = [], 0
                rewrites[g] += 1
        contexts = [[f"Notes:\n{notes[g]}"] * len(qs) for g, qs in enumerate(questions)]
        extras = [{"summary": notes[g], "summary_rewrites": rewrites[g]} for g in range(len(readings))]
        return [-1] * len(readings), contexts, extras


class TMEM(MemoryMethod):
    name = "tmem"
    uses_fast_weights = True
    agent_memory = "fast_weights"

    def prepare(self, readings, questions):
        episode = self.runner.read(self.env, readings)
        contexts, extras = [], []
        for g, qs in enumerate(questions):
            residual = episode.rollouts[g].window()
            contexts.append([self.with_explicit(episode.rollouts[g].pairs, q, residual) for q in qs])
            extras.append({
                "extractions": [asdict(e) for e in episode.trajectories[g].extractions],
                "pairs_absorbed": len(episode.rollouts[g].pairs),
                "fast_weight_version": self.runner.fast.versions[g],
            })
        return list(range(len(readings))), contexts, extras

    def with_explicit(self, pairs, question: Task, residual: str) -> str:
        return residual


class TMEMExplicit(TMEM):
    """TMEM, and the absorbed pairs that best match the question (BM25, retrieval_k of them) as notes in the
    prompt: after the reading for each question, or at every turn of a tool environment's episode."""

    name = "tmem+explicit"

    def agent_settings(self):
        return {"explicit_notes": self.settings.retrieval_k}

    def with_explicit(self, pairs, question, residual):
        notes = pair_notes(pairs, question.question, self.settings.retrieval_k)
        if not notes:
            return residual
        return f"Notes:\n{notes}" + (f"\n\n{residual}" if residual else "")


class TMEMReference(TMEM):
    name = "tmem-reference"

    def agent_settings(self):
        return {"extractor": "reference"}

    def prepare(self, readings, questions):
        policy_config = self.runner.config
        self.runner.config = dataclasses.replace(policy_config, extractor="reference")
        try:
            return super().prepare(readings, questions)
        finally:
            self.runner.config = policy_config


METHODS: dict[str, type[MemoryMethod]] = {
    cls.name: cls for cls in (NoMemory, FullContext, Summary, Retrieval, TMEM, TMEMExplicit, TMEMReference)
}


def check_methods(names: list[str]) -> None:
    """Method names as `tmem-rl eval --method` takes them: an unknown one is an InputError with the closest name."""
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        shown = ", ".join(f"{name!r}{did_you_mean(name, METHODS)}" for name in unknown)
        raise InputError(f"unknown method(s) {shown}; available: {', '.join(METHODS)}")
