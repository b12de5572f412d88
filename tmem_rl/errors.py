"""The project's error for bad input: a recipe, a data file, a flag, a checkpoint, a model name.

Its message is one line that names the file, key or value and what was expected. `tmem-rl` prints it without a
traceback and exits with status 2; library users catch it like any ValueError.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class InputError(ValueError):
    """Bad input from the user; the message names where it is and what was expected."""

    def __str__(self) -> str:
        # The message quotes user input (keys, paths, values), which may hold line breaks: keep it one line.
        return super().__str__().replace("\r", "\\r").replace("\n", "\\n")


def did_you_mean(word: object, choices: Iterable[str], prefix: str = "") -> str:
    """The hint that follows an unknown name in an error message: " (did you mean 'x'?)" when `word` is close to
    one of `choices` (shown after `prefix`, e.g. the section of a key), else "". A near miss is most often a typo."""
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


class RunError(RuntimeError):
    """A run that cannot go on for a reason outside its input: a collective that timed out because another rank
    died or hung. The message is one line naming the rank, the phase and what to do; `tmem-rl` prints it and exits
    with status 1, so that a launcher with restarts (torchrun --max-restarts) restarts the job."""

    def __str__(self) -> str:
        return super().__str__().replace("\r", "\\r").replace("\n", "\\n")
