"""The state of an episode: one working context per rollout, and the rollouts in lockstep."""

from __future__ import annotations

from dataclasses import dataclass, field

from tmem_rl.envs.base import EpisodeState
from tmem_rl.episode.records import Trajectory
from tmem_rl.memory.fast_weights import Snapshot
from tmem_rl.records import QAPair


@dataclass(eq=False)  # one rollout's context is itself, not any other with the same text
class WorkingContext:
    """One rollout's working memory in text: the chunks read (or turns taken) since its last extraction point,
    their token count, every pair it absorbed, its running notes (memory "summary"), and its trajectory."""

    state: EpisodeState
    trajectory: Trajectory
    acting: bool = False  # a tool environment's episode: positions are turns, not chunks
    pieces: list[str] = field(default_factory=list)
    tokens: int = 0
    pairs: list[QAPair] = field(default_factory=list)
    notes: str = ""

    @property
    def rollout(self) -> int:
        return self.trajectory.rollout

    @property
    def task(self):
        return self.state.task

    def add(self, piece: str, tokens: int) -> None:
        self.pieces.append(piece)
        self.tokens += tokens

    def over(self, budget: int) -> bool:
        return self.tokens > budget

    def clear(self) -> None:
        self.pieces, self.tokens = [], 0

    def keep_recent(self, budget: int, tokenizer) -> None:
        """Drop the oldest pieces until the rest fits `budget`; a last piece too long on its own keeps its final
        `budget` tokens."""
        count = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in self.pieces]
        while len(self.pieces) > 1 and sum(count) > budget:
            self.pieces.pop(0)
            count.pop(0)
        if count and count[0] > budget:
            ids = tokenizer(self.pieces[0], add_special_tokens=False)["input_ids"][-budget:]
            self.pieces[0] = tokenizer.decode(ids)
            count[0] = len(tokenizer(self.pieces[0], add_special_tokens=False)["input_ids"])
        self.tokens = sum(count)

    def window(self) -> str:
        """The working context alone: what an extraction reads and grounds its pairs in."""
        return "\n".join(self.pieces)

    def text(self) -> str:
        """What the rollout's prompts show of its memory in text: its notes and its working context."""
        window = self.window()
        if self.notes:
            return f"Notes:\n{self.notes}" + (f"\n\n{window}" if window else "")
        return window

    @property
    def position(self) -> int:
        """Where the rollout is: its last turn in a tool environment, else the last chunk it read."""
        return self.trajectory.turns - 1 if self.acting else self.state.cursor - 1


@dataclass
class Episode:
    """G rollouts in lockstep: after `EpisodeRunner.read`, what answering (and evaluation protocols) need next;
    after `act`, the finished episodes."""

    rollouts: list[WorkingContext]
    snapshots: dict[str, Snapshot] = field(default_factory=dict)  # "rollout/version" -> its fast weights then

    @property
    def trajectories(self) -> list[Trajectory]:
        return [r.trajectory for r in self.rollouts]
