"""Record types shared across the package: the supervision an extraction action produces.

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


@dataclass
class Supervision:
    """The outcome of one extraction action: the pairs to absorb and every attempt that produced them."""

    pairs: list[QAPair] = field(default_factory=list)
    attempts: list[ParseRecord] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"pairs": [p.to_dict() for p in self.pairs], "attempts": [a.to_dict() for a in self.attempts]}
