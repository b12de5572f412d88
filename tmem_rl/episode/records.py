"""What an episode records: each generated segment with the fast weights it was generated under, each extraction
point and action turn, each answered question, one trajectory per rollout, and the batch with its fast-weight
snapshots (saved and loaded as a folder)."""

from __future__ import annotations

import json
import numbers
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from tmem_rl.memory.fast_weights import Snapshot
from tmem_rl.records import InnerUpdate, Supervision  # InnerUpdate: re-exported


@dataclass
class Segment:
    """One generated stretch of tokens and the prompt it continued."""

    kind: str  # one of SEGMENT_KINDS; "action": a tool call or a malformed action
    chunk_index: int  # where in the episode: the last chunk read (streams) or the turn (tool environments)
    attempt: int
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    fast_weight_version: int  # number of absorbs into this rollout before generation; 0 = base model
    snapshot: str | None  # key into EpisodeBatch.snapshots; None = base model
    temperature: float  # the temperature the tokens were sampled at: every log-prob of them is taken at it
    logprobs: list[float] | None = None  # per completion token, when EpisodeConfig.record_logprobs
    stop_reason: str | None = None  # extractions: why generation ended, one of extraction.STOP_REASONS
    question: int = 0  # answers: which of the task's questions (an index into Task.asked()) this one answers


@dataclass
class Extraction:
    """One extraction point of a rollout: the supervision written when its working context passed the budget, and
    what absorbing it did."""

    chunk_index: int  # the last chunk read (streams) or the turn (tool environments)
    supervision_kind: str  # EpisodeConfig.supervision: qa_pairs | transcript | summary
    supervision: Supervision
    inner_update: InnerUpdate | None  # None: nothing to absorb (no pair parsed)
    fast_weight_version: int  # the rollout's absorbs so far, this one included when it was kept

    @property
    def absorbed(self) -> bool:
        """The rollout's fast weights hold this supervision (not rolled back, not empty)."""
        return self.inner_update is not None and self.inner_update.absorbed

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Extraction":
        update = data["inner_update"]
        return cls(data["chunk_index"], data["supervision_kind"], Supervision.from_dict(data["supervision"]),
                   update and InnerUpdate(**update), data["fast_weight_version"])


@dataclass
class ActionTurn:
    """One action turn of a tool environment's rollout."""

    turn: int
    kind: str  # tool | answer | malformed | forced_answer
    tool: str  # the tool called ("" unless kind is tool)
    argument: str
    error: str  # why a malformed action could not be read ("" otherwise)


@dataclass
class AnsweredQuestion:
    """One question of an episode (an item of `Task.asked()`), answered and scored."""

    question_id: str
    question: str
    answers: list[str]
    prediction: str
    reward: float
    metrics: dict[str, float]
    category: Any = None


@dataclass
class Trajectory:
    rollout: int
    task_id: str
    question: str
    answers: list[str]
    segments: list[Segment] = field(default_factory=list)
    extractions: list[Extraction] = field(default_factory=list)
    prediction: str = ""
    """The answer (of a task that asks several questions: the first one's; all are in `answered`)."""
    reward: float = 0.0
    """The episode's return: the answer's score (the mean over the questions asked) plus `shaping_reward`."""
    answered: list[AnsweredQuestion] = field(default_factory=list)
    """Every question the episode asked, in order, with its prediction and scores."""
    shaping_reward: float = 0.0
    """Rewards the environment gave before the answer (its `step` on extraction and tool actions; 0 unless it
    shapes them)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The environment's metrics of the answer (the mean of each over the questions asked)."""
    timings: dict[str, float] = field(default_factory=dict)
    turns: int = 0
    """Actions taken (tool environments): tool calls, malformed actions and the answer."""
    tool_calls: int = 0
    forced_answer: bool = False
    """The turn limit ended the episode, and the answer was asked for."""
    actions: list[ActionTurn] = field(default_factory=list)
    malformed_actions: int = 0

    def close(self) -> None:
        """Every question is answered: the episode's prediction (the first answer's), its return (the mean score
        plus the shaping rewards) and its metrics (each numeric one the answers share, averaged)."""
        answered = self.answered
        self.prediction = answered[0].prediction
        self.reward = sum(a.reward for a in answered) / len(answered) + self.shaping_reward
        if len(answered) == 1:
            self.metrics = dict(answered[0].metrics)
            return
        shared = [k for k in answered[0].metrics if all(isinstance(a.metrics.get(k), numbers.Real) for a in answered)]
        self.metrics = {k: sum(a.metrics[k] for a in answered) / len(answered) for k in shared}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EpisodeBatch:
    trajectories: list[Trajectory]
    snapshots: dict[str, Snapshot]  # "rollout/version" -> that rollout's fast weights at that version

    def to_dict(self) -> dict[str, Any]:
        return {"trajectories": [t.to_dict() for t in self.trajectories]}

    def save(self, path: str | Path) -> None:
        """Trajectories as JSON plus the fast-weight snapshots as safetensors, in one folder."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "trajectories.json").write_text(json.dumps(self.to_dict()))
        flat = {f"{key}|{name}": t.contiguous() for key, snap in self.snapshots.items() for name, t in snap.items()}
        save_file(flat, str(path / "snapshots.safetensors"))

    @classmethod
    def load(cls, path: str | Path) -> "EpisodeBatch":
        path = Path(path)
        data = json.loads((path / "trajectories.json").read_text())
        trajectories = []
        for t in data["trajectories"]:
            segments = [Segment(**s) for s in t.pop("segments")]
            answered = [AnsweredQuestion(**a) for a in t.pop("answered", [])]
            extractions = [Extraction.from_dict(e) for e in t.pop("extractions", [])]
            actions = [ActionTurn(**a) for a in t.pop("actions", [])]
            trajectories.append(Trajectory(segments=segments, answered=answered, extractions=extractions,
                                           actions=actions, **t))
        snapshots: dict[str, Snapshot] = {}
        for flat_key, tensor in load_file(str(path / "snapshots.safetensors")).items():
            key, name = flat_key.split("|", 1)
            snapshots.setdefault(key, {})[name] = tensor
        return cls(trajectories, snapshots)
