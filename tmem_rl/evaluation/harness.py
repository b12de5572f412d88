"""`tmem-rl eval`: memory methods on the same model and questions, for any environment; the base model and
optionally a trained checkpoint side by side. JSONL records, resume, summary, table, chart.

Output folder:
    config.json      every setting the run used
    results.jsonl    one record per (policy, method, question), appended and fsynced as answers come in
    summary.json     per row ("tmem", or "tmem@trained" for the checkpoint): n, f1, em, f1_by_category,
                     extraction parse rate, pairs per extraction, seconds_per_episode, plus the benchmark's own
                     fields (LoCoMo: f1_1_4, f1_1_5)
    summary.md       the same as a markdown table
    f1_by_category.png
    continual.json   with --continual: forward transfer, retention and forgetting per method
                     (tmem_rl.evaluation.continual); its rows are "<method>:<phase>"
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tmem_rl.cpu import configure_cpu_threads
from tmem_rl.envs import lone_surrogate, make_env, read_json_file
from tmem_rl.envs.base import Environment, Task
from tmem_rl.envs.split import SPLITS, split_env
from tmem_rl.errors import InputError
from tmem_rl.evaluation.continual import (PHASES, check_continual, continual_summary, evaluate_continual,
                                          phase_label, sequences, write_continual_reports)
from tmem_rl.evaluation.methods import METHODS, Answered, MethodSettings, TMEMReference, check_methods
from tmem_rl.memory import FastWeightConfig, FastWeights
from tmem_rl.metrics.qa import normalize_answer
from tmem_rl.checkpoint_reader import load_trained_policy
from tmem_rl.models import DEFAULT_MODEL, check_checkpoint_fits, load_policy
from tmem_rl.episode import EpisodeConfig, EpisodeRunner

EPISODE_UNITS = ("question", "conversation")
# Episode settings evaluation decides itself: each method sets the memory mode and the extractor, --continual
# carries fast weights, and nothing records log-probs.
SET_BY_METHODS = ("memory", "extractor", "carry_fast_weights", "record_logprobs", "explicit_notes")
RESULTS = "results.jsonl"
CONFIG = "config.json"
TRAINED = "trained"
# The settings a --resume may change: which rows and questions are evaluated, where the run is written, and how
# fast it goes (a resumed run's batches differ from the first run's anyway). Every other setting changes the
# numbers, and a summary over records from two settings would be silently wrong.
RESUME_MAY_CHANGE = frozenset({"out", "resume", "device", "methods", "evaluate_base", "max_questions",
                               "per_category", "sample_ids", "methods_settings.answer_batch_size"})


@dataclass
class EvalConfig:
    out: str
    """Output folder."""
    data: str | None = None
    """Path to the benchmark file, for environments that read one (LoCoMo: the official locomo10.json)."""
    env: str = "locomo"
    """The environment's registered name (`tmem-rl envs list`)."""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    """Passed to the environment's constructor (facts: num_tasks, num_facts, seed, ...)."""
    split: str = "all"
    """all | train | heldout: which side of the seeded task partition to evaluate (see tmem_rl.envs.split)."""
    heldout_fraction: float = 0.0
    """Share of tasks held out of training; must match the training recipe's for split train / heldout."""
    split_seed: int = 0
    """Seeds the train / held-out partition (must match the training recipe's)."""
    checkpoint: str | None = None
    """A trained policy (a `tmem-rl train` checkpoint, a PEFT adapter or an HF folder), evaluated after the base
    model on the same tasks; its rows are labelled "<method>@trained"."""
    evaluate_base: bool = True
    """False: with a checkpoint, evaluate only the checkpoint (the base model's rows exist elsewhere)."""
    methods: list[str] = field(default_factory=lambda: ["tmem"])
    """Memory methods to run side by side (tmem_rl.evaluation.methods.METHODS)."""
    model: str = DEFAULT_MODEL
    """The base policy: a known short name, an HF folder or a hub id."""
    max_questions: int | None = None
    """Evaluate only the first N tasks (None: all)."""
    per_category: int | None = None
    """First N questions of each category: a fixed subset with every category in it."""
    sample_ids: list[str] | None = None
    """Only these samples (LoCoMo: conversation ids; LongMemEval: question ids)."""
    episode_unit: str = "question"
    """question: one episode per question, the question known while reading (the paper's protocol).
    conversation: one pass per conversation without the question, then all its questions answered from it."""
    resume: bool = False
    """Continue an interrupted run in `out` with the same settings; recorded (method, question) rows are kept."""
    episode: EpisodeConfig = field(default_factory=lambda: EpisodeConfig(do_sample=True))
    """How each episode reads, extracts and answers (a recipe's `episode` section). EpisodeConfig's defaults, but
    for sampling: evaluation samples at the paper's inference settings unless do_sample is False (`--greedy`). A
    dict is read as changes to this default; an EpisodeConfig is taken whole (its own default is greedy). Each
    method sets the memory mode itself."""
    fast_weights: FastWeightConfig = field(default_factory=FastWeightConfig)
    """The inner loop's settings (the `inner_loop` section of a recipe)."""
    methods_settings: MethodSettings = field(default_factory=MethodSettings)
    """Baselines' budgets and the batch size."""
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")
    """Where the model runs (cuda when available, else cpu)."""
    continual: bool = False
    """Continual learning: fast weights carried across a sequence of episodes, one sequence per slot, reported as
    forward transfer, retention and forgetting (tmem_rl.evaluation.continual). Fast-weight methods only."""

    def __post_init__(self):
        nested = {f.name: f for f in dataclasses.fields(self)}
        for name, cls in (("episode", EpisodeConfig), ("fast_weights", FastWeightConfig),
                          ("methods_settings", MethodSettings)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, dataclasses.replace(nested[name].default_factory(), **value))
            elif not isinstance(value, cls):
                raise InputError(f"EvalConfig.{name}: expected a {cls.__name__} or a dict of its fields, got "
                                 f"{type(value).__name__}")
        default = EpisodeConfig()
        for name in SET_BY_METHODS:
            if getattr(self.episode, name) != getattr(default, name):
                raise InputError(f"EvalConfig.episode.{name}={getattr(self.episode, name)!r}: evaluation sets it "
                                 f"itself (each --method its memory and extractor, --continual the carried fast "
                                 f"weights); leave it at {getattr(default, name)!r}")
        check_methods(self.methods)
        if self.episode_unit not in EPISODE_UNITS:
            raise InputError(f"episode_unit={self.episode_unit!r}: expected one of {EPISODE_UNITS}")
        if self.split not in SPLITS:
            raise InputError(f"split={self.split!r}: expected one of {SPLITS}")
        if self.split != "all" and not 0.0 < self.heldout_fraction < 1.0:
            raise InputError(f"split={self.split!r} needs heldout_fraction in (0, 1), got {self.heldout_fraction!r}")
        # Negative, it would slice from the end (-1: all but the last question).
        if self.max_questions is not None and (not isinstance(self.max_questions, int)
                                               or isinstance(self.max_questions, bool) or self.max_questions < 0):
            raise InputError(f"max_questions={self.max_questions!r}: expected an integer >= 0")

    def environment(self) -> Environment:
        kwargs = dict(self.env_kwargs)
        for key in ("data", "sample_ids", "per_category"):
            if getattr(self, key) is not None:
                kwargs[key] = getattr(self, key)
        return split_env(make_env(self.env, **kwargs), self.split, self.heldout_fraction, self.split_seed)


def _record(line: bytes) -> dict[str, Any] | None:
    """The record on one line of a results file, or None where the line is not one."""
    try:
        value = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):  # not UTF-8, not JSON, an over-long integer, nested too deep
        return None
    if not (isinstance(value, dict) and isinstance(value.get("method"), str)
            and isinstance(value.get("question_id"), (str, int))
            and all(isinstance(value.get(k), (int, float)) for k in ("f1", "em"))):
        return None
    return value


def _line_numbers(numbers: list[int], shown: int = 10) -> str:
    listed = ", ".join(map(str, numbers[:shown]))
    return listed + (f" and {len(numbers) - shown} more" if len(numbers) > shown else "")


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every valid record of a results file, in file order.

    A crash can cut the last write short: an unreadable last line without its newline is that torn write, dropped
    and cut from the file so that the next append starts on a line of its own. Any other unreadable line (blank,
    edited, not UTF-8) is skipped with one warning naming it and left in the file: no valid record around it is
    lost."""
    if not path.exists():
        return []
    data = path.read_bytes()
    *lines, tail = data.split(b"\n")  # tail: what follows the last newline, b"" in a file that ends with one
    records, junk = [], []
    for number, line in enumerate(lines, 1):
        record = _record(line)
        if record is None:
            junk.append(number)
        else:
            records.append(record)
    if tail:
        record = _record(tail)
        if record is None:
            print(f"{path}: dropping the incomplete last line {len(lines) + 1} (an interrupted write)",
                  file=sys.stderr)
            os.truncate(path, len(data) - len(tail))
        else:  # complete, only its newline missing
            records.append(record)
            with open(path, "ab") as f:
                f.write(b"\n")
    if junk:
        warnings.warn(f"{path}: skipping {len(junk)} line(s) that hold no record: line(s) {_line_numbers(junk)}",
                      stacklevel=2)
    return records


def _jsonl(record: dict[str, Any]) -> str:
    line = json.dumps(record, ensure_ascii=False)
    if lone_surrogate(line) is not None:  # has no UTF-8 form; escaped, it is still the same JSON
        line = json.dumps(record)
    return line + "\n"


def append_records(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(_jsonl(r) for r in records))
        f.flush()
        os.fsync(f.fileno())


def _saved_settings(config: EvalConfig) -> dict[str, Any]:
    """The settings as config.json holds them (lists where the dataclasses have tuples)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=repr))


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested settings as {dotted key: value}, so that a difference is named down to the setting."""
    if isinstance(value, dict):
        return {k: v for key, inner in value.items() for k, v in _flat(inner, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


# config.json of a run written before EvalConfig held an EpisodeConfig: these settings were flat.
_FLAT_EPISODE_SETTINGS = ("l_max", "max_extraction_tokens", "max_answer_tokens", "temperature", "top_p", "top_k",
                          "chat_template_kwargs", "seed")


def _episode_nested(saved: dict[str, Any]) -> dict[str, Any]:
    """Saved settings with the episode's under "episode", as EvalConfig has them now."""
    if "episode" in saved:
        return saved
    saved = dict(saved)
    episode = dict(saved.pop("episode_kwargs", None) or {})
    episode.update({key: saved.pop(key) for key in _FLAT_EPISODE_SETTINGS if key in saved})
    if "greedy" in saved:
        episode["do_sample"] = not saved.pop("greedy")
    return {**saved, "episode": episode}


def _shown(settings: dict[str, Any], key: str) -> str:
    return repr(settings[key]) if key in settings else "(not set)"


def check_resumable(out: Path, config: EvalConfig) -> None:
    """For --resume with results in `out`: its config.json must hold the new settings, except for those in
    RESUME_MAY_CHANGE."""
    path = out / CONFIG
    if not path.exists():
        warnings.warn(f"{path} is missing: the settings of the run being resumed cannot be checked", stacklevel=2)
        return
    saved = read_json_file(path, "the settings of the run to resume (written by tmem-rl eval)")
    if not isinstance(saved, dict):
        raise InputError(f"{path}: expected the settings of the run to resume as a JSON object, got "
                         f"{type(saved).__name__}; use a new --out")
    old, new = _flat(_episode_nested(saved)), _flat(_saved_settings(config))
    # A setting the saved run does not name (added since) ran at its default.
    defaults = _flat(_saved_settings(EvalConfig(out=config.out)))
    changed = [key for key in sorted(old.keys() | new.keys())
               if key not in RESUME_MAY_CHANGE and key.split(".")[0] not in RESUME_MAY_CHANGE
               and not (key in old and key in new and old[key] == new[key])
               and not (key not in old and key in defaults and new[key] == defaults[key])]
    if changed:
        listed = "; ".join(f"{k}: saved {_shown(old, k)}, now {_shown(new, k)}" for k in changed)
        raise InputError(f"{path}: --resume with settings other than the run's ({listed}); one run's summary must "
                         f"not mix two settings: evaluate the new settings with a new --out, or resume with the "
                         f"saved ones")


def row_label(method: str, policy: str) -> str:
    return method if policy == "base" else f"{method}@{policy}"


def to_record(method: str, unit: str, answered: Answered, env, policy: str = "base") -> dict[str, Any]:
    task = answered.task
    metrics = env.score(task, answered.prediction)
    meta = task.metadata
    record = {
        "method": row_label(method, policy),
        "policy": policy,
        "episode_unit": unit,
        "sample_id": meta.get("sample_id", task.task_id),
        "question_id": task.question_id,
        "category": meta.get("category"),
        "question": task.question,
        "gold": task.answers[0] if task.answers else "",
        "prediction": answered.prediction,
        "f1": metrics["f1"],
        "em": metrics["em"],
        "seconds": answered.seconds,
        **answered.extra,
    }
    # The environment's own scores beyond F1 / EM (an abstention check, rubric checks, a judge's verdict); none
    # may overwrite a field the harness keys on.
    return {**{key: value for key, value in metrics.items() if key not in record}, **record}


def episodes(env, unit: str, pending: list[Task], batch_size: int):
    """(readings, questions per reading) batches for the chosen episode unit: up to `batch_size` streams are read in
    lockstep (each task with its questions, or one conversation with all its pending questions)."""
    if unit == "question":
        for begin in range(0, len(pending), batch_size):
            batch = pending[begin : begin + batch_size]
            yield batch, [list(t.asked()) for t in batch]
        return
    wanted = {t.task_id for t in pending}
    # A task that asks several questions is a conversation of its own.
    by_sample = env.questions_by_sample() if hasattr(env, "questions_by_sample") else {t.task_id: [t] for t in pending}
    readings, questions = [], []
    for sample_id, tasks in by_sample.items():
        todo = [asked for t in tasks if t.task_id in wanted for asked in t.asked()]
        if todo:
            readings.append(Task(task_id=sample_id, question="", chunks=tasks[0].chunks, answers=(),
                                 reference_pairs=tasks[0].reference_pairs))
            questions.append(todo)
        if len(readings) == batch_size:
            yield readings, questions
            readings, questions = [], []
    if readings:
        yield readings, questions


def check_applicable(config: EvalConfig, env: Environment) -> None:
    """Methods and episode unit against the environment's kind: a tool environment runs one episode per task."""
    if not env.tools:
        return
    if config.episode_unit != "question":
        raise InputError(f"episode_unit={config.episode_unit!r}: environment {env.name!r} is a tool environment, "
                         "whose episodes are one task each; use episode_unit question")
    unusable = [m for m in config.methods if METHODS[m].agent_memory is None]
    if unusable:
        usable = [name for name, cls in METHODS.items() if cls.agent_memory is not None]
        raise InputError(f"method(s) {', '.join(unusable)} do not apply to the tool environment {env.name!r}; "
                         f"available: {', '.join(usable)}")


def run_eval(config: EvalConfig) -> dict[str, Any]:
    configure_cpu_threads()
    out = Path(config.out)
    results_path = out / RESULTS
    has_results = results_path.exists() and results_path.stat().st_size > 0
    if has_results and not config.resume:
        raise InputError(f"{results_path} already has results; pass --resume to continue, or another --out")
    env = config.environment()
    # Recorded as used: config.json names the budget, and a resume compares it.
    config = dataclasses.replace(config, episode=dataclasses.replace(config.episode, l_max=config.episode.budget(env)))
    check_applicable(config, env)
    if has_results:
        check_resumable(out, config)

    tasks = env.tasks()
    if config.max_questions is not None:
        tasks = tasks[: config.max_questions]
    if not tasks:
        raise InputError(f"environment {env.name!r}: no tasks to evaluate (see --max-questions, --per-category, "
                         "--sample-ids, --split)")
    if config.continual:
        check_continual(config, env, tasks)
    if TMEMReference.name in config.methods and config.episode.supervision != "qa_pairs":
        raise InputError(f"method {TMEMReference.name} absorbs reference pairs; it does not apply with supervision="
                         f"{config.episode.supervision!r}")
    if TMEMReference.name in config.methods and not all(t.reference_pairs for t in tasks):
        raise InputError(f"method {TMEMReference.name} needs reference pairs, and environment {env.name!r} has "
                         "none; drop it from --method")
    # Written once every setting has been checked, atomically: a resume compares against it.
    out.mkdir(parents=True, exist_ok=True)
    staged = out / f"{CONFIG}.tmp"
    staged.write_text(json.dumps(dataclasses.asdict(config), indent=2, default=repr))  # a judge function: its repr
    os.replace(staged, out / CONFIG)
    done = {(r["method"], r["question_id"]) for r in read_records(results_path)}

    def load_base():
        model, tokenizer = load_policy(config.model, device=config.device)
        if config.checkpoint:  # a checkpoint of another model fails now, not after the base's evaluation
            check_checkpoint_fits(config.checkpoint, config.model, model.config)
        return model, tokenizer

    def load_trained():
        check_checkpoint_fits(config.checkpoint, config.model)  # configs and file headers only
        return load_trained_policy(config.checkpoint, config.model, device=config.device)

    policies = [("base", load_base)]
    if config.checkpoint and not config.evaluate_base:
        policies = []
    if config.checkpoint:
        policies.append((TRAINED, load_trained))
    rows = []
    for policy, load in policies:
        labels = {m: row_label(m, policy) for m in config.methods}
        if config.continual:
            rows += [row_label(phase_label(m, phase), policy) for m in config.methods for phase in PHASES]
            model, tokenizer = load()
            run_continual(config, env, model, tokenizer, tasks, policy, results_path)
            del model
            continue
        rows += labels.values()
        todo = {m: [t for t in tasks if any((labels[m], a.question_id) not in done for a in t.asked())]
                for m in config.methods}
        if not any(todo.values()):
            continue  # finished in an earlier run: no need to load this policy again
        model, tokenizer = load()
        evaluate_policy(config, env, model, tokenizer, todo, policy, results_path, done)
        del model
    summary = write_reports(out, env, rows, len(getattr(env, "skipped", [])))
    if config.continual:
        records = read_records(results_path)
        write_continual_reports(out, {row_label(m, p): continual_summary(records, row_label(m, p))
                                      for p, _ in policies for m in config.methods})
    return summary


def make_runner(config: EvalConfig, model, tokenizer, slots: int, policy: str = "base") -> EpisodeRunner:
    """The evaluation's episode runner: the config's episode settings, `slots` fast-weight slots. The trained
    policy's fast weights take the A its training used, saved with the checkpoint."""
    init_from = config.checkpoint if policy == TRAINED else None
    fast = FastWeights(model, slots, config.fast_weights, init_from=init_from)
    return EpisodeRunner(model, tokenizer, fast, config.episode)


def run_continual(config: EvalConfig, env, model, tokenizer, tasks: list[Task], policy: str,
                  results_path: Path) -> None:
    """--continual: each method's phases over sequences of the tasks, one sequence per slot."""
    slots = min(config.methods_settings.answer_batch_size, len(tasks))
    batches = sequences(tasks, slots)
    left_out = len(tasks) - slots * len(batches)
    if left_out:
        print(f"continual: {left_out} task(s) past the last whole batch of {slots} left out", file=sys.stderr)
    runner = make_runner(config, model, tokenizer, slots, policy)
    for method_name in config.methods:
        row = row_label(method_name, policy)

        def record(phase: str, position: int, answers: list[Answered]) -> None:
            records = [{**to_record(phase_label(method_name, phase), config.episode_unit, a, env, policy),
                        "continual_row": row, "phase": phase, "position": position, "sequence": s}
                       for s, a in enumerate(answers)]
            append_records(results_path, records)

        evaluate_continual(method_name, runner, env, config.methods_settings, batches, record)
    runner.fast.remove()


def evaluate_policy(config: EvalConfig, env, model, tokenizer, todo: dict[str, list[Task]], policy: str,
                    results_path: Path, done: set[tuple[str, str]] = frozenset()) -> None:
    """Each method's pending tasks; a question recorded already (`done`: (row, question_id), of a task whose other
    questions an interrupted run did not record) is answered again with the others but not written twice."""
    settings = config.methods_settings
    runner = make_runner(config, model, tokenizer, settings.answer_batch_size, policy)
    fast = runner.fast
    for method_name, pending in todo.items():
        method = METHODS[method_name](runner, env, settings)
        label = row_label(method_name, policy)
        questions_left = sum((label, a.question_id) not in done for t in pending for a in t.asked())
        # Closed on an error too, so that the error's line does not land on the bar's.
        with tqdm(total=questions_left, desc=label, unit="q", dynamic_ncols=True) as bar:
            for readings, questions in episodes(env, config.episode_unit, pending, settings.answer_batch_size):
                answered = method.run(readings, questions)
                records = [to_record(method_name, config.episode_unit, a, env, policy)
                           for group in answered for a in group]
                records = [r for r in records if (r["method"], r["question_id"]) not in done]
                append_records(results_path, records)
                bar.update(len(records))
    fast.remove()


def write_reports(out: Path, env: Environment, rows: list[str], skipped: int) -> dict[str, Any]:
    records = read_records(out / RESULTS)
    summary = {}
    for row in rows:
        mine = [r for r in records if r["method"] == row]
        summary[row] = {**summarize(mine), **env.summarize(mine), "skipped": skipped}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(markdown_table(summary, env.summary_columns) + "\n")
    plot_categories(summary, out / "f1_by_category.png")
    return summary


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Any environment's summary: F1 / EM overall and by the tasks' `category`, extraction parse rate (share of
    extraction actions that yielded a usable pair; None for methods that do not extract), speed, and the most
    common answer with its share of the questions: a policy that collapsed gives one answer to many questions."""
    categories = sorted({str(r["category"]) for r in records if r.get("category") is not None})
    # Normalised as scoring does; an option letter ("a") normalises to nothing and is kept as written.
    answers = Counter(normalize_answer(str(r["prediction"])) or str(r["prediction"]).strip().lower()
                      for r in records)
    top_answer, top_count = answers.most_common(1)[0] if answers else (None, 0)
    extractions = [e for r in records for e in r.get("extractions") or []]
    parsed = [bool(e["supervision"]["pairs"]) for e in extractions]
    seconds = [float(r["seconds"]) for r in records if r.get("seconds") is not None]
    return {
        "n": len(records),
        "f1": _mean([float(r["f1"]) for r in records]),
        "em": _mean([float(r["em"]) for r in records]),
        "f1_by_category": {c: _mean([float(r["f1"]) for r in records if str(r.get("category")) == c])
                           for c in categories},
        "parse_rate": _mean([float(p) for p in parsed]),
        "pairs_per_extraction": _mean([float(len(e["supervision"]["pairs"])) for e in extractions]),
        "seconds_per_episode": _mean(seconds),
        "top_answer": top_answer,
        "top_answer_share": top_count / len(records) if records else None,
        **_acting(records),
    }


def _acting(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Tool environments' episode shape: turns, tool calls, malformed actions and answers forced by the turn limit,
    per episode."""
    acting = [r for r in records if "turns" in r]
    if not acting:
        return {}
    return {key: _mean([float(r[key]) for r in acting])
            for key in ("turns", "tool_calls", "malformed_actions", "forced_answer")}


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _categories(summary: dict[str, Any]) -> list[str]:
    found = {c for s in summary.values() for c in s["f1_by_category"]}
    return sorted(found, key=lambda c: (not c.isdigit(), int(c) if c.isdigit() else 0, c))


def markdown_table(summary: dict[str, Any], columns: tuple[str, ...] = ()) -> str:
    """One row per method; `columns`: the environment's own figures to show (`Environment.summary_columns`)."""
    cats = _categories(summary)
    extra = [k for k in columns if any(s.get(k) is not None for s in summary.values())]
    acting = [k for k in ("turns", "tool_calls", "malformed_actions", "forced_answer")
              if any(s.get(k) is not None for s in summary.values())]
    head = ["method", "n", *cats, "F1", *extra, "EM", "parse rate", "pairs / extraction", *acting,
            "top answer share", "s / episode"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, s in summary.items():
        by_cat = [_fmt(s["f1_by_category"].get(c)) for c in cats]
        secs = "-" if s["seconds_per_episode"] is None else f"{s['seconds_per_episode']:.1f}"
        rows.append("| " + " | ".join([method, str(s["n"]), *by_cat, _fmt(s["f1"]), *[_fmt(s.get(k)) for k in extra],
                                       _fmt(s["em"]), _fmt(s["parse_rate"]), _fmt(s["pairs_per_extraction"]),
                                       *[_fmt(s.get(k)) for k in acting], _fmt(s.get("top_answer_share")),
                                       secs]) + " |")
    return "\n".join(rows)


def plot_categories(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = _categories(summary) or ["all"]
    width = 0.8 / max(len(summary), 1)
    fig, ax = plt.subplots(figsize=(max(8, len(cats) * 1.2), 4))
    for i, (method, s) in enumerate(summary.items()):
        values = [(s["f1_by_category"].get(c) if c != "all" else s["f1"]) or 0.0 for c in cats]
        ax.bar([j + (i - (len(summary) - 1) / 2) * width for j in range(len(cats))], values, width, label=method)
    ax.set_xticks(range(len(cats)), cats)
    ax.set_ylabel("F1")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("F1 by question category")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
