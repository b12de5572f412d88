"""The environment contract.

An environment is an agentic decision process: it poses a question, then serves a stream of chunks. The agent
acts on it by reading (take the next chunk), extracting (free text, parsed into QA-pair supervision for its fast
weights) and answering (scored by the environment, ends the episode). Tool actions are reserved for environments
that have tools.

A new environment subclasses `Environment`, implements `__len__`, `task` and `score`, and registers under the entry
point group ``tmem_rl.envs`` (or calls `register_env`). The episode runner drives it only through `reset` / `step`,
so an environment never sees the model and the runner never needs to know which environment it is driving.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from tmem_rl.records import QAPair


class ActionKind(str, enum.Enum):
    READ = "read"
    EXTRACT = "extract"
    ANSWER = "answer"
    TOOL = "tool"


@dataclass(frozen=True)
class Task:
    """One episode's material: the question, the stream to read, and what scoring needs."""

    task_id: str
    question: str
    chunks: tuple[str, ...]
    answers: tuple[str, ...]
    metadata: dict[str, Any] = field(default_factory=dict)
    reference_pairs: tuple[QAPair, ...] = ()
    """Gold supervision, when the environment knows it: pairs an ideal extraction would write from the stream
    (the asked fact first). Never shown to the agent; for warm starts and diagnostics."""


@dataclass(frozen=True)
class Observation:
    """What the agent sees after reset or a read: the question, or the next chunk of the stream."""

    kind: str  # "question" | "chunk" | "end" | "tool"
    text: str
    index: int = -1  # chunk position in the stream; -1 for the question and the end marker


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    text: str = ""


@dataclass(frozen=True)
class StepResult:
    observation: Observation
    reward: float = 0.0
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class EpisodeState:
    """The environment-side state of one running episode (one per rollout)."""

    task: Task
    cursor: int = 0  # index of the next chunk to serve
    done: bool = False

    @property
    def stream_finished(self) -> bool:
        return self.cursor >= len(self.task.chunks)


class Environment(ABC):
    """Base class: subclasses provide tasks and a scorer; reading/answering mechanics are shared."""

    name: str = "base"

    @abstractmethod
    def __len__(self) -> int:
        """Number of tasks this environment holds."""

    @abstractmethod
    def task(self, index: int) -> Task:
        """The task at `index` (0 <= index < len(self))."""

    @abstractmethod
    def score(self, task: Task, prediction: str) -> dict[str, float]:
        """Metrics for a final answer; must contain "reward" (the outcome reward used for training)."""

    def tasks(self) -> list[Task]:
        return [self.task(i) for i in range(len(self))]

    def split_key(self, index: int) -> str:
        """What the train / held-out partition hashes (see `tmem_rl.envs.split`): tasks with the same key fall on
        the same side. Override when tasks share material, so that no held-out task was read in training."""
        return self.task(index).task_id

    def summarize(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Benchmark-specific fields for an evaluation summary, from scored records ({"category", "f1", "em", ...});
        the harness already reports F1, EM and F1 by category for every environment."""
        return {}

    def answer_prompt(self, question: str, context: str, task: Task | None = None) -> str:
        """The user turn that asks for the final answer; benchmarks override it with their official QA prompt.

        `task` is None when the inner loop renders an extracted pair's question, so that pairs are learned in the
        shape in which questions are later asked.
        """
        if context.strip():
            return f"Text:\n{context}\n\nQuestion: {question}"
        return f"Question: {question}"

    def reset(self, task: Task) -> tuple[EpisodeState, Observation]:
        return EpisodeState(task=task), Observation(kind="question", text=task.question)

    def step(self, state: EpisodeState, action: Action) -> StepResult:
        if state.done:
            raise RuntimeError(f"episode {state.task.task_id} is over; call reset() for a new one")
        if action.kind == ActionKind.READ:
            if state.stream_finished:
                return StepResult(Observation(kind="end", text=""))
            index = state.cursor
            state.cursor += 1
            return StepResult(Observation(kind="chunk", text=state.task.chunks[index], index=index))
        if action.kind == ActionKind.EXTRACT:
            # Extraction changes the agent, not the world; environments may override to shape rewards.
            return StepResult(Observation(kind="chunk", text="", index=state.cursor - 1))
        if action.kind == ActionKind.ANSWER:
            state.done = True
            metrics = self.score(state.task, action.text)
            return StepResult(Observation(kind="end", text=""), reward=metrics["reward"], done=True, info=metrics)
        raise ValueError(f"environment {self.name!r} has no tools; got action {action.kind.value!r}")

