"""The environment contract.

An environment is an agentic decision process: it poses a question, then either serves a stream of chunks (a
*stream* environment: the agent reads) or answers tool calls (a *tool* environment: the agent acts). In both the
agent may extract (free text, parsed into QA-pair supervision for its fast weights) when its working context is
over budget, and ends the episode by answering (scored by the environment).

A new environment subclasses `Environment`, implements `__len__`, `task` and `score` (a tool environment also
`tools` and `call_tool`), and registers under the entry point group ``tmem_rl.envs`` (or calls `register_env`).
The episode runner drives it only through `reset` / `step`, so an environment never sees the model and the runner
never needs to know which environment it is driving. docs/environments.md walks through both kinds.
"""

from __future__ import annotations

import enum
import functools
import numbers
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from tmem_rl.errors import InputError
from tmem_rl.records import QAPair


class ContractError(InputError):
    """An environment gave a task or result of the wrong type. The message names the environment, the task, the
    field and what the contract expects; the command line prints it as one line and exits 2."""


class ActionKind(str, enum.Enum):
    READ = "read"
    EXTRACT = "extract"
    ANSWER = "answer"
    TOOL = "tool"


@dataclass(frozen=True)
class Question:
    """One of the questions a task asks about its reading (`Task.questions`)."""

    question: str
    answers: tuple[str, ...]
    metadata: dict[str, Any] = field(default_factory=dict)
    """What scoring needs of this question (category, question_id, ...); laid over the task's own metadata."""


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
    questions: tuple[Question, ...] = ()
    """Several questions about one reading (stream environments): every one is answered after the stream, under
    the same fast weights, and the episode's reward is the mean of their scores. `question` is then what the agent
    has in mind while reading ("": nothing in particular, as when a conversation's questions come later) and
    `answers` is not scored. Empty: the task asks `question` alone."""

    @property
    def question_id(self) -> Any:
        """What records name this question by: its metadata's "question_id" (LoCoMo's "conv-26/q3", or one
        `asked()` gives), else the task's id."""
        return self.metadata.get("question_id", self.task_id)

    def asked(self) -> tuple["Task", ...]:
        """The questions answered after the reading, each as a task of its own that `Environment.score` and
        `Environment.answer_prompt` take (same chunks and reference pairs): this task itself when it asks one
        question, else one per item of `questions`, with ids "<task_id>/q<i>" unless their metadata names one."""
        if not self.questions:
            return (self,)
        return tuple(
            Task(task_id=str(q.metadata.get("question_id", f"{self.task_id}/q{i}")), question=q.question,
                 chunks=self.chunks, answers=q.answers, reference_pairs=self.reference_pairs,
                 metadata={**self.metadata, "sample_id": self.metadata.get("sample_id", self.task_id),
                           "question_id": f"{self.task_id}/q{i}", **q.metadata})
            for i, q in enumerate(self.questions)
        )


@dataclass(frozen=True)
class Observation:
    """What the agent sees after reset or a read: the question, or the next chunk of the stream."""

    kind: str  # "question" | "chunk" | "end" | "tool" (a tool's result)
    text: str
    index: int = -1  # chunk position in the stream; -1 for the question and the end marker


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    text: str = ""
    """The answer (ANSWER), or the tool's argument (TOOL)."""
    tool: str = ""
    """The tool called (TOOL only): a key of `Environment.tools`."""
    question: int = 0
    """Which of the task's questions an ANSWER answers: an index into `Task.asked()`."""


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
    tool_calls: int = 0  # tool actions executed so far
    answered: set[int] = field(default_factory=set)  # indices of the questions answered so far; the episode
    # ends when every one of `task.asked()` is

    @property
    def stream_finished(self) -> bool:
        return self.cursor >= len(self.task.chunks)


# ---- the contract, checked ----------------------------------------------------------------------------------------


def _shown(value: Any) -> str:
    """A value as an error message quotes it: its type, then its repr cut short (a chunk can be long)."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _check_items(where: str, name: str, value: Any, item: type, noun: str) -> None:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        # A bare string is a sequence too, of single characters: refused, as it is never what was meant.
        bare = " (a bare string would be read one character at a time)" if isinstance(value, str) else ""
        raise ContractError(f"{where}: field '{name}' must be a list or tuple of {noun}, got {_shown(value)}{bare}")
    bad = next((i for i, v in enumerate(value) if not isinstance(v, item)), None)
    if bad is not None:
        raise ContractError(f"{where}: field '{name}' must be a list or tuple of {noun}; item {bad} is "
                            f"{_shown(value[bad])}")


def check_task(where: str, task: Any) -> Task:
    """`task` if it is a `Task` whose fields have the types above, else a ContractError naming `where` (the
    environment and task index) and the field."""
    if not isinstance(task, Task):
        raise ContractError(f"{where}: expected a tmem_rl.envs.base.Task, got {_shown(task)}")
    for name in ("task_id", "question"):
        if not isinstance(getattr(task, name), str):
            raise ContractError(f"{where}: field '{name}' must be a string, got {_shown(getattr(task, name))}")
    _check_items(where, "chunks", task.chunks, str, "strings")
    _check_items(where, "answers", task.answers, str, "strings")
    _check_items(where, "reference_pairs", task.reference_pairs, QAPair, "QAPair")
    _check_items(where, "questions", task.questions, Question, "Question")
    for i, q in enumerate(task.questions):
        if not isinstance(q.question, str):
            raise ContractError(f"{where}: questions[{i}].question must be a string, got {_shown(q.question)}")
        _check_items(where, f"questions[{i}].answers", q.answers, str, "strings")
        if not isinstance(q.metadata, dict):
            raise ContractError(f"{where}: questions[{i}].metadata must be a dict, got {_shown(q.metadata)}")
    if not isinstance(task.metadata, dict):
        raise ContractError(f"{where}: field 'metadata' must be a dict, got {_shown(task.metadata)}")
    return task


def check_metrics(where: str, metrics: Any) -> dict[str, float]:
    """`metrics` if it is a dict of metric name -> number holding "reward", else a ContractError naming `where`."""
    expected = 'a dict of metric name -> number with "reward"'
    if not isinstance(metrics, dict):
        raise ContractError(f"{where}: expected {expected}, got {_shown(metrics)}")
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise ContractError(f"{where}: expected {expected}; the name {_shown(key)} is not a str")
        if not isinstance(value, numbers.Real):
            raise ContractError(f"{where}: expected {expected}; metric {key!r} is {_shown(value)}")
    if "reward" not in metrics:
        raise ContractError(f"{where}: expected {expected}; got only {', '.join(map(repr, metrics)) or 'no metrics'}")
    return metrics


def _label(env: Environment) -> str:
    name = env.name if env.name != Environment.name else type(env).__qualname__  # a plugin may leave `name` unset
    return f"environment {name!r}"


def _checked_task(method):
    @functools.wraps(method)
    def task(self, index):
        return check_task(f"{_label(self)}: task {index}", method(self, index))
    return task


def _checked_score(method):
    @functools.wraps(method)
    def score(self, task, prediction):
        return check_metrics(f"{_label(self)}: score of task {getattr(task, 'task_id', task)!r}",
                             method(self, task, prediction))
    return score


def _checked_step(method):
    @functools.wraps(method)
    def step(self, state, action):
        result = method(self, state, action)
        where = f"{_label(self)}: step of task {state.task.task_id!r}"
        if not isinstance(result, StepResult):
            raise ContractError(f"{where}: expected a StepResult, got {_shown(result)}")
        if not (isinstance(result.observation, Observation) and isinstance(result.observation.text, str)):
            raise ContractError(f"{where}: field 'observation' must be an Observation whose text is a str, got "
                                f"{_shown(result.observation)}")
        if not isinstance(result.reward, numbers.Real):
            raise ContractError(f"{where}: field 'reward' must be a number, got {_shown(result.reward)}")
        return result
    return step


def _checked_call_tool(method):
    @functools.wraps(method)
    def call_tool(self, state, tool, argument):
        text = method(self, state, tool, argument)
        if not isinstance(text, str):
            raise ContractError(f"{_label(self)}: call_tool of tool {tool!r} on task {state.task.task_id!r}: "
                                f"expected a str (the agent's observation), got {_shown(text)}")
        return text
    return call_tool


_CHECKED = {"task": _checked_task, "score": _checked_score, "step": _checked_step, "call_tool": _checked_call_tool}


class Environment(ABC):
    """Base class: subclasses provide tasks and a scorer; reading/answering mechanics are shared.

    What a subclass's `task`, `score`, `step` and `call_tool` return is checked against the contract (see
    `__init_subclass__`): a wrong type is a `ContractError` naming the environment, the task and the field.
    """

    name: str = "base"
    tools: Mapping[str, str] = MappingProxyType({})  # read-only: a shared default must not be written into
    """Tool name -> what it does, one line, shown to the agent. Empty: a stream environment (the agent reads)."""
    max_turns: int = 10
    """Actions a tool environment allows per episode; at the limit the runner asks for the answer."""
    default_l_max: int | None = None
    """The working-context budget this environment is meant to run at: episodes use it when episode.l_max is not
    set (`EpisodeConfig.budget`)."""
    summary_columns: tuple[str, ...] = ()
    """Figures of this environment's `summarize` that `tmem-rl eval` shows as columns of summary.md."""

    def __init_subclass__(cls, **kwargs):
        # Each implementation is wrapped where its class defines it, so that every caller (the trainer, the episode
        # runner, `tmem-rl eval`, the agent) gets checked results without checking them itself, and a plugin's
        # mistake is one line naming it instead of a traceback from deep in a rollout, or a silent misreading
        # (chunks="text" would be read one character at a time).
        super().__init_subclass__(**kwargs)
        for name, checked in _CHECKED.items():
            method = cls.__dict__.get(name)
            if callable(method) and not isinstance(method, (staticmethod, classmethod)) \
                    and not getattr(method, "checks_contract", False):  # not one wrapped already (task = A.task)
                wrapped = checked(method)
                wrapped.checks_contract = True
                setattr(cls, name, wrapped)

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

    def call_tool(self, state: EpisodeState, tool: str, argument: str) -> str:
        """Run `tool` (a key of `tools`) on `argument`; the returned text is the agent's observation."""
        raise NotImplementedError(f"environment {self.name!r} lists tools but does not implement call_tool")

    def prefetch(self, calls: list[tuple[EpisodeState, str, str]]) -> None:
        """The (state, tool, argument) calls a turn of the batch's rollouts is about to make, before `call_tool`
        runs each: an environment whose tool answers batches faster (a retrieval server) can ask for them at once.
        Optional; the default does nothing."""

    def instructions(self, task: Task) -> str:
        """The system prompt of every action turn in a tool environment: what the agent is and how to act."""
        from tmem_rl.actions import action_format

        return ("You answer questions by using tools. Each turn, write exactly one action and nothing else.\n"
                + action_format(self.tools))

    def turn_prompt(self, task: Task, context: str, turns_left: int) -> str:
        """The user turn that asks for the next action: the question, what the agent gathered that is still in its
        working context, and how many actions remain."""
        gathered = context.strip() or "(nothing yet)"
        last = " This is your last action: answer now." if turns_left == 1 else ""
        return (f"Question: {task.question}\n\nWhat you have found so far:\n{gathered}\n\n"
                f"Actions left: {turns_left}.{last} Write your next action.")

    def example_turns(self) -> list[dict[str, str]]:
        """A worked episode shown before every action turn when `EpisodeConfig.examples` is on: alternating user
        (turn prompts) and assistant (actions) chat messages. Small models act far better after one."""
        return []

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
            asked = state.task.asked()
            if not 0 <= action.question < len(asked):
                raise ValueError(f"episode {state.task.task_id} asks {len(asked)} question(s); an answer to question "
                                 f"{action.question} is not one of them")
            state.answered.add(action.question)
            state.done = len(state.answered) == len(asked)
            metrics = self.score(asked[action.question], action.text)
            return StepResult(Observation(kind="end", text=""), reward=metrics["reward"], done=state.done,
                              info=metrics)
        if action.kind == ActionKind.TOOL:
            if action.tool not in self.tools:
                raise ValueError(f"environment {self.name!r} has no tool {action.tool!r}; tools: "
                                 f"{', '.join(self.tools) or 'none'}")
            state.tool_calls += 1
            return StepResult(Observation(kind="tool", text=self.call_tool(state, action.tool, action.text)))
        raise ValueError(f"environment {self.name!r}: unknown action {action.kind!r}")

