"""A seeded train / held-out partition of any environment's tasks.

Each task goes to one side by a hash of (seed, its split key), so the partition does not depend on how many tasks
are drawn, in which order, or on which process: training on the "train" side never samples a held-out task, and
evaluation on the "heldout" side sees only tasks training never saw. An environment whose tasks share material
(LoCoMo: many questions about one conversation) overrides `Environment.split_key` so that they fall together.
"""

from __future__ import annotations

import hashlib

from tmem_rl.errors import InputError
from tmem_rl.envs.base import Action, Environment, EpisodeState, Observation, StepResult, Task

SPLITS = ("all", "train", "heldout")


def is_heldout(key: str, heldout_fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < heldout_fraction


class TaskSplit(Environment):
    """The tasks of `env` on one side of the partition; everything else (scoring, prompts, tools) is `env`'s."""

    def __init__(self, env: Environment, split: str, heldout_fraction: float, seed: int = 0):
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1) to split tasks, got {heldout_fraction!r}")
        self.env = env
        self.split = split
        # The base class defines these, so attribute lookup would never reach __getattr__ for them.
        self.name, self.tools, self.max_turns, self.default_l_max = env.name, env.tools, env.max_turns, env.default_l_max
        self.summary_columns = env.summary_columns
        want_heldout = split == "heldout"
        self.indices = [i for i in range(len(env))
                        if is_heldout(env.split_key(i), heldout_fraction, seed) == want_heldout]
        if not self.indices:
            raise InputError(f"environment {env.name!r}: the {split} split of {len(env)} tasks at heldout_fraction "
                             f"{heldout_fraction} is empty; use more tasks or another fraction")

    def __len__(self) -> int:
        return len(self.indices)

    def task(self, index: int) -> Task:
        return self.env.task(self.indices[index])

    def split_key(self, index: int) -> str:
        return self.env.split_key(self.indices[index])

    def score(self, task: Task, prediction: str) -> dict[str, float]:
        return self.env.score(task, prediction)

    def answer_prompt(self, question: str, context: str, task: Task | None = None) -> str:
        return self.env.answer_prompt(question, context, task)

    def summarize(self, records):
        return self.env.summarize(records)

    def instructions(self, task: Task) -> str:
        return self.env.instructions(task)

    def turn_prompt(self, task: Task, context: str, turns_left: int) -> str:
        return self.env.turn_prompt(task, context, turns_left)

    def example_turns(self) -> list[dict[str, str]]:
        return self.env.example_turns()

    def call_tool(self, state: EpisodeState, tool: str, argument: str) -> str:
        return self.env.call_tool(state, tool, argument)

    def prefetch(self, calls: list[tuple[EpisodeState, str, str]]) -> None:
        self.env.prefetch(calls)

    def reset(self, task: Task) -> tuple[EpisodeState, Observation]:
        return self.env.reset(task)

    def step(self, state: EpisodeState, action: Action) -> StepResult:
        return self.env.step(state, action)

    def __getattr__(self, name: str):
        # Environment-specific extras (LoCoMo's questions_by_sample, skipped records) come from the wrapped env.
        if name == "env":
            raise AttributeError(name)
        return getattr(self.env, name)


def split_env(env: Environment, split: str = "all", heldout_fraction: float = 0.0, seed: int = 0) -> Environment:
    """`env` itself for split "all"; otherwise its train or held-out side."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "all":
        return env
    return TaskSplit(env, split, heldout_fraction, seed)
