"""Environments: the contract in `base`, a registry that also reads the ``tmem_rl.envs`` entry point group."""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
from dataclasses import dataclass, replace
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, Callable

from tmem_rl.envs.base import (  # noqa: F401  (re-exported contract)
    Action,
    ActionKind,
    ContractError,
    Environment,
    EpisodeState,
    Observation,
    StepResult,
    Task,
)
from tmem_rl.errors import InputError  # noqa: F401  (re-exported: environments raise it for bad settings)
from tmem_rl.errors import did_you_mean
from tmem_rl.records import ParseRecord, QAPair, Supervision  # noqa: F401  (what extraction actions produce)

_REGISTRY: dict[str, Callable[..., Environment]] = {}

ENTRY_POINT_GROUP = "tmem_rl.envs"
PACKAGE = "tmem_rl"

# The environments that ship with tmem_rl. pyproject.toml registers them in the entry point group too, so that an
# installed tmem_rl lists them like any other package's; this copy is for a source checkout on PYTHONPATH, which has
# no installed metadata. tests/test_plugins.py checks that the two agree.
BUILTIN_ENVS = {
    "context_learning": "tmem_rl.envs.context_learning:ContextLearningEnv",
    "dataset": "tmem_rl.envs.dataset:DatasetEnv",
    "dialogues": "tmem_rl.envs.dialogues:DialoguesEnv",
    "facts": "tmem_rl.envs.facts:FactsEnv",
    "hotpotqa": "tmem_rl.envs.hotpotqa:HotpotQAEnv",
    "locomo": "tmem_rl.envs.locomo:LocomoEnv",
    "longmemeval": "tmem_rl.envs.longmemeval:LongMemEvalEnv",
    "search": "tmem_rl.envs.search:SearchEnv",
}


@dataclass(frozen=True)
class EnvSource:
    """One registration of an environment name: which package makes it available, and as what."""

    name: str
    package: str
    """The distribution that registers it ("tmem_rl" for the built-ins)."""
    version: str | None
    """Its installed version; None when not from installed metadata: a built-in in a source checkout, or a class
    given to `register_env` in this process (package: its top-level module)."""
    target: str
    """What the name loads, "module:Class"."""
    kind: str = ""
    """"stream" or "tool" (the class lists tools); "" until loaded, or when loading failed."""
    error: str = ""
    """Why the target could not be loaded, in one line."""
    conflicts: tuple[str, ...] = ()
    """The other packages that register the same name."""

    @property
    def origin(self) -> str:
        if self.version:
            return f"{self.package} {self.version}"
        return f"{self.package} (built in)" if self.package == PACKAGE else f"{self.package} (register_env)"

    def load(self) -> Callable[..., Environment]:
        return EntryPoint(self.name, self.target, ENTRY_POINT_GROUP).load()


def register_env(name: str):
    """Class decorator: make an environment available to `make_env` and the CLI under `name`."""

    def decorator(cls):
        _REGISTRY[name] = cls
        return cls

    return decorator


def _normalized(package: str) -> str:
    """A distribution name as packaging compares them: tmem_rl, tmem-rl and TMEM.rl are one package."""
    return re.sub(r"[-_.]+", "-", package).lower()


def _same_package(a: str, b: str) -> bool:
    return _normalized(a) == _normalized(b)


def _registrations() -> list[EnvSource]:
    """Every (name, package) registration, from installed metadata, then the built-ins that metadata lacks (none
    on an up-to-date install; all of them in a source checkout). Nothing is imported."""
    found = [EnvSource(ep.name, ep.dist.name, ep.dist.version, ep.value)
             for ep in entry_points(group=ENTRY_POINT_GROUP)]
    installed = {s.name for s in found if _same_package(s.package, PACKAGE)}
    found += [EnvSource(name, PACKAGE, None, target) for name, target in BUILTIN_ENVS.items() if name not in installed]
    return found


def env_sources() -> list[EnvSource]:
    """Every registered environment, sorted by name, each loaded to learn its kind. A target that fails to import
    keeps its error in the record instead of raising, so one broken package hides no other; a name that several
    packages register appears once per package, each naming the others in `conflicts`."""
    found = _registrations()
    records = []
    for source in found:
        try:
            loaded = source.load()
            kind, error = ("tool" if getattr(loaded, "tools", None) else "stream"), ""
        except Exception as err:  # whatever a third-party import raises, the listing goes on
            kind, error = "", _one_line(err)
        others = tuple(s.origin for s in found
                       if s.name == source.name and not _same_package(s.package, source.package))
        records.append(replace(source, kind=kind, error=error, conflicts=others))
    listed = {s.name for s in found}
    for name, cls in _REGISTRY.items():  # registered in this process only, through register_env
        if name not in listed:
            target = f"{cls.__module__}:{cls.__qualname__}"
            kind = "tool" if getattr(cls, "tools", None) else "stream"
            records.append(EnvSource(name, cls.__module__.split(".")[0], None, target, kind))
    return sorted(records, key=lambda s: (s.name, s.package))


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())


def available_envs() -> list[str]:
    return sorted({s.name for s in _registrations()} | set(_REGISTRY))


def make_env(name: str, **kwargs) -> Environment:
    """The environment registered under `name`, built from `kwargs`, its first task checked. An unknown name or
    setting, a name that two packages register, an entry point that fails to import or makes no `Environment`, or
    a task of the wrong shape, is an InputError that says so in one line (a failed import keeps its traceback as
    the cause: `tmem-rl --debug` shows it)."""
    sources = [s for s in _registrations() if s.name == name]
    if len({_normalized(s.package) for s in sources}) > 1:
        both = "; ".join(f"{s.origin} ({s.target})" for s in sources)
        raise InputError(f"environment {name!r} is registered by more than one package: {both}; uninstall one, "
                         "or rename the entry point in its pyproject.toml")
    if name not in _REGISTRY:
        if not sources:
            raise InputError(f"unknown environment {name!r}{did_you_mean(name, available_envs())}; "
                             f"available: {', '.join(available_envs())}")
        source = sources[0]
        try:
            _REGISTRY[name] = source.load()
        except Exception as err:  # a plugin's import may raise anything; the user needs which one and why
            raise InputError(f"environment {name!r}: cannot load entry point {name} = {source.target} (package "
                             f"{source.origin}): {_one_line(err)}; run tmem-rl --debug for the traceback") from err
    factory = _REGISTRY[name]
    target = sources[0].target if sources else f"{factory.__module__}:{factory.__qualname__}"  # register_env's
    if not callable(factory):
        raise ContractError(f"environment {name!r}: {target} is a {type(factory).__name__}; expected a subclass of "
                            "tmem_rl.envs.base.Environment")
    _check_settings(name, factory, kwargs)
    env = factory(**kwargs)
    # The class's own results are checked by Environment (see __init_subclass__), so only a subclass will do.
    if not isinstance(env, Environment):
        raise ContractError(f"environment {name!r}: {target} made a {type(env).__name__}; expected a subclass of "
                            "tmem_rl.envs.base.Environment")
    if len(env):
        env.task(0)  # checked: tasks of the wrong shape stop a run here, before a model loads, not at its first step
    return env


def _check_settings(name: str, factory: Callable[..., Environment], kwargs: dict[str, Any]) -> None:
    """Setting names against the constructor's signature, so that a typo is named instead of ending in a
    TypeError from deep inside the call. Constructors that take **kwargs check their own."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): the constructor has the last word
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    accepted = [p.name for p in named]
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        raise InputError(f"environment {name!r}: unknown setting(s) {', '.join(map(repr, unknown))}; "
                         f"accepted: {', '.join(accepted) or 'none'}")
    missing = [p.name for p in named if p.default is p.empty and p.name not in kwargs]
    if missing:
        raise InputError(f"environment {name!r}: missing setting(s) {', '.join(map(repr, missing))}")


# ---- user data files -----------------------------------------------------------------------------------------


def printable(name: Any) -> str:
    """A file name or id from user data as it goes into a one-line message: as it is, or quoted with escapes where
    it holds a newline, a control character or a lone surrogate."""
    text = str(name)
    return text if text.isprintable() else repr(text)


def lone_surrogate(text: str) -> int | None:
    """Index of the first lone surrogate in `text` (a JSON "\\ud800" escape decodes to one), or None. Such text has
    no UTF-8 form, so tokenizers and UTF-8 writers fail on it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return None


def read_json_list(path: Any, noun: str, benchmark: str, error: type[InputError] = InputError) -> list:
    """A benchmark file holding a non-empty JSON list of `noun` (e.g. "samples" of "LoCoMo"), with
    `read_json_file`'s one-line errors."""
    raw = read_json_file(path, f"a JSON list of {benchmark} {noun}", error)
    name = printable(path)
    if not isinstance(raw, list):
        raise error(f"{name}: expected a JSON list of {noun}, got {type(raw).__name__}")
    if not raw:
        raise error(f"{name}: no {noun}; expected a JSON list of {benchmark} {noun}")
    return raw


def read_json_file(path: Any, expected: str, error: type[InputError] = InputError) -> Any:
    """The JSON value in a user's data file. Anything that stops it being read (no such file, bytes that are not
    UTF-8, invalid JSON, a number too long for Python, nesting too deep) is an `error` whose one-line message names
    the file, where in it, and `expected` (what the file should hold)."""
    if not isinstance(path, (str, os.PathLike)):
        raise error(f"data file: expected a file path, got {path!r}")
    name = printable(path)
    try:
        data = Path(path).read_bytes()
    except (OSError, ValueError) as err:  # ValueError: a path the OS cannot take (a NUL, a lone surrogate)
        raise error(f"{name}: cannot read the file ({getattr(err, 'strerror', None) or err}); expected {expected}"
                    ) from err
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark is harmless: accept it
    except UnicodeDecodeError as err:
        raise error(f"{name}: not UTF-8 text (byte offset {err.start}: {data[err.start]:#04x}); expected {expected}"
                    ) from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{name}: not valid JSON at line {err.lineno}, column {err.colno} ({err.msg}); "
                    f"expected {expected}") from err
    except RecursionError as err:
        raise error(f"{name}: JSON nested too deeply to read; expected {expected}") from err
    except ValueError as err:  # an integer literal longer than Python converts
        raise error(f"{name}: an integer has more than {sys.get_int_max_str_digits()} digits, more than Python "
                    f"reads; expected {expected}") from err


def read_jsonl(path: Any, expected: str, error: type[InputError] = InputError) -> list[tuple[int, Any]]:
    """(line number, JSON value) of every non-blank line of a user's JSONL file; a file that cannot be read or a
    line that is not JSON is an `error` naming the file, the line and `expected` (what a line should hold). Lines
    end at newlines only: a JSON string may hold U+2028 and other characters `str.splitlines` would split at."""
    if not isinstance(path, (str, os.PathLike)):
        raise error(f"data file: expected a file path, got {path!r}")
    name = printable(path)
    values = []
    try:
        with Path(path).open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    values.append((number, json.loads(line)))
                except (json.JSONDecodeError, RecursionError) as err:
                    raise error(f"{name}, line {number}: not valid JSON ({getattr(err, 'msg', err)}); expected "
                                f"{expected}") from err
    except (OSError, ValueError) as err:  # ValueError: a path the OS cannot take; UnicodeDecodeError is one
        if isinstance(err, InputError):
            raise
        reason = getattr(err, "strerror", None) or getattr(err, "reason", None) or err
        raise error(f"{name}: cannot read the file ({reason}); expected JSONL lines of {expected}") from err
    if not values:
        raise error(f"{name}: no lines; expected JSONL lines of {expected}")
    return values


def text_field(where: str, name: str, value: Any, error: type[InputError] = InputError, meaning: str = "") -> str:
    """`value` if it is a string with a UTF-8 form, else an `error` naming `where` and the field `name` (`meaning`
    says what the field is, after "must be a string"). A lone surrogate (from a "\\ud800" escape) would pass a type
    check and only fail later, in the tokenizer or when a record is written."""
    if not isinstance(value, str):
        raise error(f"{where}: field '{name}' must be a string{meaning}, got {value!r}")
    bad = lone_surrogate(value)
    if bad is not None:
        raise error(f"{where}: field '{name}' must be Unicode text; it has a lone surrogate ({ascii(value[bad])}) "
                    f"at character {bad}")
    return value


def gold_text(where: str, name: str, value: Any, error: type[InputError] = InputError) -> str | None:
    """A gold answer as text (benchmark files have numbers such as 2022 among the strings); None when absent or
    blank, which loaders skip rather than score against."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise error(f"{where}: field '{name}' must be a string or a number, got {value!r}")
    return text_field(where, name, str(value), error).strip() or None


# ---- environment settings --------------------------------------------------------------------------------------


def check_count(env: str, name: str, value: Any) -> None:
    """A setting that is None or an integer >= 0 (a number of tasks to keep)."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise InputError(f"{env} env: {name} must be None or an integer >= 0, got {value!r}")


def check_strings(env: str, name: str, value: Any) -> None:
    """A setting that is None or a list of strings (ids or names to keep)."""
    if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
        raise InputError(f"{env} env: {name} must be None or a list of strings, got {value!r}")


def first_per_category(tasks: list[Task], n: int | None) -> list[Task]:
    """The first `n` tasks of each `metadata["category"]`, in their order: a fixed mixed subset. None keeps all."""
    if n is None:
        return list(tasks)
    seen: dict[Any, int] = {}
    kept = []
    for task in tasks:
        category = task.metadata["category"]
        seen[category] = seen.get(category, 0) + 1
        if seen[category] <= n:
            kept.append(task)
    return kept


def pick_unused(rng, pool, used: set[str]) -> str:
    """A value of `pool` that is not in `used` (values a generated stream already gave a fact), added to it: so that
    no two facts of one stream share a value and every answer stays unambiguous."""
    value = rng.choice([v for v in pool if v not in used])
    used.add(value)
    return value


def article(word: str) -> str:
    """The indefinite article of `word`, by its first letters ("an engineer", "a nurse", "a university lecturer")."""
    lowered = word.lower()
    return "a" if lowered.startswith(("uni", "eu")) or lowered[0] not in "aeiou" else "an"
