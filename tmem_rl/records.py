"""Record types shared across the package: the supervision an extraction action produces, and what absorbing it
did to the fast weights.

They live below everything that passes them around (environments, the parser, fast weights, the episode runner),
so none of those has to import another for a data type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class QAPair:
    """One unit of supervision for the inner loop, in the paper's format."""

    instruction: str
    output: str

    def to_dict(self) -> dict[str, str]:
        return {"instruction": self.instruction, "output": self.output}


@dataclass
class ParseRecord:
    """One extraction attempt: the raw model text, what was kept, and why anything was dropped."""

    raw: str
    pairs: list[QAPair] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)  # {"item": ..., "reason": ...}
    error: str | None = None  # set when nothing usable could be read at all

    @property
    def ok(self) -> bool:
        return bool(self.pairs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "raw": self.raw,
            "pairs": [p.to_dict() for p in self.pairs],
            "dropped": self.dropped,
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ParseRecord":
        return cls(data["raw"], [QAPair(**p) for p in data["pairs"]], data["dropped"], data["error"])


@dataclass
class Supervision:
    """The outcome of one extraction action: the pairs to absorb and every attempt that produced them."""

    pairs: list[QAPair] = field(default_factory=list)
    attempts: list[ParseRecord] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Supervision":
        """As `dataclasses.asdict` wrote it (a saved trajectory's extraction)."""
        return cls([QAPair(**p) for p in data["pairs"]], [ParseRecord.from_dict(a) for a in data["attempts"]])


@dataclass
class InnerUpdate:
    """What one absorb did to one fast-weight slot (`FastWeights.absorb` returns one per slot it was given)."""

    num_pairs: int = 0
    """Pairs trained on; 0 when every pair had to be dropped (the slot is then not updated)."""
    dropped: list[dict[str, Any]] = field(default_factory=list)
    """Pairs that could not be trained on: {"item": the pair, "reason": why}."""
    loss_before: float | None = None
    """Mean answer-token loss on the slot's pairs before the update (None: nothing trained)."""
    loss_after: float | None = None
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    """Wall time of the batched update that trained this slot (shared by every slot in it)."""
    probe_leak: float | None = None
    """The collapse guard's share of damaged probe answers (None: the guard did not run)."""
    probe_answers: list[str] | None = None
    rolled_back: bool = False
    """The update was undone: the slot is as before this absorb, and its version did not move."""
    rollback_reason: str | None = None
    """non-finite | diverged | probe_leak."""

    @property
    def absorbed(self) -> bool:
        """The slot's fast weights hold these pairs now."""
        return self.num_pairs > 0 and not self.rolled_back
