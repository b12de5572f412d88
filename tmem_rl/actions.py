"""The text format of actions in a tool environment, and its parser.

One action per turn, written as a tag named after the tool, or `answer`:

    <search>founding year of Velmora Systems</search>
    <answer>1987; Port Aldane</answer>

The first complete tag is the action; later ones are ignored (and counted). Text that holds no complete, known tag
with something inside it is a malformed action: the runner shows the agent why, and the episode goes on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ANSWER = "answer"
FORCED_ANSWER = "forced_answer"  # not an action: the answer the runner asked for at the turn limit
ACTION_PREFILL = "<"  # what an action turn starts with (EpisodeConfig.prefill): the model continues a tag
TOOL, MALFORMED = "tool", "malformed"

# A tag opened and closed with the same name; the shortest body, so that two calls in a row stay two.
_CALL = re.compile(r"<([A-Za-z_][\w-]*)>(.*?)</\1\s*>", re.DOTALL)
_OPENED = re.compile(r"<([A-Za-z_][\w-]*)>")


@dataclass(frozen=True)
class ParsedAction:
    kind: str
    """"tool", "answer" or "malformed"."""
    name: str = ""
    """The tool's name ("answer" for an answer; "" when malformed)."""
    argument: str = ""
    """What was inside the tag, stripped: the query, or the answer."""
    error: str = ""
    """Why the text is not an action (malformed only), phrased for the agent."""
    ignored: int = 0
    """Further complete tags after the first in the parsed text: only one action runs per turn."""
    end: int = 0
    """Offset in the text just past the action's closing tag (0 when malformed)."""


def action_format(tools: dict[str, str]) -> str:
    """How to act, for the agent's instructions: one line per tool, then the answer."""
    lines = [f"<{name}>...</{name}>: {description}" for name, description in tools.items()]
    lines.append(f"<{ANSWER}>...</{ANSWER}>: your final answer; this ends the episode.")
    return "Actions:\n" + "\n".join(lines)


def format_call(tool: str, argument: str, result: str) -> str:
    """A tool call and its result as they stand in the working context."""
    return f"<{tool}>{argument}</{tool}>\n{result}"


def closing_tags(tools: dict[str, str]) -> list[str]:
    """The strings after which an action is complete (generation of a turn can stop there)."""
    return [f"</{name}>" for name in (*tools, ANSWER)]


def parse_action(text: str, tools: dict[str, str]) -> ParsedAction:
    """The action written in `text` (see the module docstring); never raises."""
    known = (*tools, ANSWER)
    calls = [m for m in _CALL.finditer(text) if m.group(1) in known]
    if not calls:
        return ParsedAction(MALFORMED, error=_why_not(text, tools))
    first = calls[0]
    name, argument = first.group(1), first.group(2).strip()
    if not argument:
        what = "the answer" if name == ANSWER else "a query"
        return ParsedAction(MALFORMED, error=f"<{name}></{name}> is empty; put {what} inside the tag.")
    kind = ANSWER if name == ANSWER else TOOL
    return ParsedAction(kind, name, argument, ignored=len(calls) - 1, end=first.end())


def _why_not(text: str, tools: dict[str, str]) -> str:
    usage = " or ".join(f"<{n}>...</{n}>" for n in (*tools, ANSWER))
    opened = [m.group(1) for m in _OPENED.finditer(text)]
    unknown = [n for n in opened if n not in (*tools, ANSWER)]
    if not text.strip():
        return f"No action: the reply was empty. Write {usage}."
    if unknown:
        return f"Unknown action <{unknown[0]}>. Write {usage}."
    if opened:
        return f"The tag <{opened[0]}> is never closed with </{opened[0]}>. Write {usage}."
    return f"No action found. Write {usage}."
