"""LoCoMo (Maharana et al., ACL 2024): very long two-person conversations, with questions about them.

The stream is the whole conversation, one turn per chunk, sessions in order, each session opened by its date (temporal
questions are answered relative to those dates). Every question of a conversation becomes one task over the same
stream. Prompts and scoring follow the benchmark's official evaluation code, so that numbers are comparable with
published ones; see `tmem_rl.metrics.locomo`.

Data: the official ``locomo10.json`` (a list of samples, CC BY-NC 4.0); point ``data`` at a local copy.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tmem_rl.envs import (
    check_count,
    check_strings,
    first_per_category,
    gold_text,
    printable,
    read_json_list,
    register_env,
    text_field,
)
from tmem_rl.envs.base import Environment, Task
from tmem_rl.errors import InputError
from tmem_rl.metrics.locomo import CATEGORY_NAMES, aggregate, score_answer

QA_PROMPT = (
    "Based on the above context, write an answer in the form of a short phrase for the following question. "
    "Answer with exact words from the context whenever possible.\n\nQuestion: {} Short answer:"
)
QA_PROMPT_CAT_5 = "Based on the above context, answer the following question.\n\nQuestion: {} Short answer:"
DATE_HINT = " Use DATE of CONVERSATION to answer with an approximate date."
SELECT_SUFFIX = " Select the correct answer: (a) {} (b) {}. "
NOT_MENTIONED = "Not mentioned in the conversation"

# ASCII digits, few enough for int(): a key like "session_<5000 digits>" is not a session, like any unknown key.
_SESSION_KEY = re.compile(r"session_([0-9]{1,9})")
_OPTION_LETTERS = {"a": "a", "(a)": "a", "b": "b", "(b)": "b"}


class LocomoFormatError(InputError):
    """The LoCoMo data file does not have the official format."""


@dataclass(frozen=True)
class Turn:
    speaker: str
    dia_id: str  # "D<session>:<turn>", what question evidence refers to
    text: str
    blip_caption: str | None = None  # caption of an image shared with the turn


@dataclass(frozen=True)
class Session:
    index: int  # N of the file's session_N key
    date_time: str
    turns: list[Turn]


@dataclass(frozen=True)
class LocomoQuestion:
    question_id: str  # f"{sample_id}/q{index}"
    index: int  # position in the sample's qa list
    question: str
    gold: str  # category 5: NOT_MENTIONED, the only answer the official metric credits
    category: int
    evidence: list[str]
    adversarial_answer: str | None = None  # category 5: the tempting wrong answer offered as an option


@dataclass
class LocomoSample:
    sample_id: str
    speaker_a: str
    speaker_b: str
    sessions: list[Session]
    questions: list[LocomoQuestion]
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {"sample_id", "index", "question", "reason"}


# ---- loading -------------------------------------------------------------------------------------------------


def load_locomo(path: str | Path, sample_ids: list[str] | None = None) -> list[LocomoSample]:
    """Samples of an official-format ``locomo10.json``, in file order, optionally only those in `sample_ids`."""
    raw = read_json_list(path, "samples", "LoCoMo", LocomoFormatError)
    name = printable(path)

    samples = [_sample(name, i, item) for i, item in enumerate(raw)]
    ids = [s.sample_id for s in samples]
    duplicates = sorted(printable(i) for i, n in Counter(ids).items() if n > 1)
    if duplicates:
        raise LocomoFormatError(f"{name}: field 'sample_id' must be unique; repeated: {', '.join(duplicates)}")
    if sample_ids is None:
        return samples
    unknown = [s for s in sample_ids if s not in ids]
    if unknown:
        raise LocomoFormatError(f"{name}: unknown sample_id {', '.join(map(repr, unknown))}; "
                                f"available: {', '.join(map(printable, ids))}")
    wanted = set(sample_ids)
    return [s for s in samples if s.sample_id in wanted]


def _sample(name: str, index: int, item: Any) -> LocomoSample:
    where = f"{name}: sample index {index}"
    if not isinstance(item, dict):
        raise LocomoFormatError(f"{where}: expected an object, got {type(item).__name__}")
    if "sample_id" not in item:
        raise LocomoFormatError(f"{where}: missing field 'sample_id'")
    sample_id = _text(where, "sample_id", str(item["sample_id"]))
    where = f"{name}: sample {printable(sample_id)}"
    for key in ("conversation", "qa"):
        if key not in item:
            raise LocomoFormatError(f"{where}: missing field {key!r}")
    conversation = item["conversation"]
    if not isinstance(conversation, dict):
        raise LocomoFormatError(f"{where}: field 'conversation' must be an object, got {type(conversation).__name__}")
    for key in ("speaker_a", "speaker_b"):
        if key not in conversation:
            raise LocomoFormatError(f"{where}: missing field 'conversation.{key}'")
        _text(where, f"conversation.{key}", conversation[key])
    if not isinstance(item["qa"], list):
        raise LocomoFormatError(f"{where}: field 'qa' must be a list, got {type(item['qa']).__name__}")

    sessions = _sessions(where, conversation)
    questions, skipped = [], []
    for q_index, qa in enumerate(item["qa"]):
        question = _question(where, sample_id, q_index, qa)
        if isinstance(question, str):
            skipped.append({"sample_id": sample_id, "index": q_index, "question": qa["question"], "reason": question})
        else:
            questions.append(question)
    return LocomoSample(
        sample_id=sample_id,
        speaker_a=conversation["speaker_a"],
        speaker_b=conversation["speaker_b"],
        sessions=sessions,
        questions=questions,
        skipped=skipped,
    )


def _sessions(where: str, conversation: dict) -> list[Session]:
    # Keys are sorted by number, not as strings, so that session_10 follows session_9. Some files carry
    # session_N_date_time for sessions that have no session_N list; those hold no turns and are ignored.
    numbered = sorted(
        (int(m.group(1)), key) for key in conversation if (m := _SESSION_KEY.fullmatch(key)) is not None
    )
    sessions = []
    for number, key in numbered:
        turns = conversation[key]
        if not isinstance(turns, list):
            raise LocomoFormatError(f"{where}: field 'conversation.{key}' must be a list of turns, "
                                    f"got {type(turns).__name__}")
        if not turns:
            continue
        date_key = f"{key}_date_time"
        _text(where, f"conversation.{date_key}", conversation.get(date_key), " (the session's date)")
        sessions.append(
            Session(index=number, date_time=conversation[date_key], turns=[
                _turn(where, f"conversation.{key}[{i}]", t) for i, t in enumerate(turns)
            ])
        )
    return sessions


def _turn(where: str, name: str, turn: Any) -> Turn:
    if not isinstance(turn, dict):
        raise LocomoFormatError(f"{where}: field '{name}' must be a turn object, got {type(turn).__name__}")
    for key in ("speaker", "text", "dia_id"):
        _text(where, f"{name}.{key}", turn.get(key))
    caption = turn.get("blip_caption")
    if caption is not None:
        _text(where, f"{name}.blip_caption", caption)
    return Turn(speaker=turn["speaker"], dia_id=turn["dia_id"], text=turn["text"], blip_caption=caption or None)


def _text(where: str, name: str, value: Any, meaning: str = "") -> str:
    return text_field(where, name, value, LocomoFormatError, meaning)


def _gold_text(where: str, name: str, value: Any) -> str | None:
    return gold_text(where, name, value, LocomoFormatError)


def _question(where: str, sample_id: str, index: int, qa: Any) -> LocomoQuestion | str:
    """The parsed question, or the reason to skip it."""
    name = f"qa[{index}]"
    if not isinstance(qa, dict):
        raise LocomoFormatError(f"{where}: field '{name}' must be a question object, got {type(qa).__name__}")
    _text(where, f"{name}.question", qa.get("question"))
    category = qa.get("category")
    if not isinstance(category, int) or isinstance(category, bool) or category not in CATEGORY_NAMES:
        raise LocomoFormatError(
            f"{where}: field '{name}.category' must be an integer in {sorted(CATEGORY_NAMES)}, got {category!r}"
        )
    evidence = qa.get("evidence", [])
    if not isinstance(evidence, list) or not all(isinstance(e, str) for e in evidence):
        raise LocomoFormatError(f"{where}: field '{name}.evidence' must be a list of dia_id strings, got {evidence!r}")
    for i, e in enumerate(evidence):
        _text(where, f"{name}.evidence[{i}]", e)
    # A few entries pack two ids into one string ("D8:6; D9:17").
    evidence = [part.strip() for e in evidence for part in re.split(r"[;,]", e) if part.strip()]

    answer = _gold_text(where, f"{name}.answer", qa.get("answer"))
    adversarial = None
    if category == 5:
        # Older releases kept the adversarial answer under "answer"; locomo10.json uses "adversarial_answer".
        adversarial = _gold_text(where, f"{name}.adversarial_answer", qa.get("adversarial_answer")) or answer
        if adversarial is None:
            return "no gold answer"
        gold = NOT_MENTIONED
    else:
        if answer is None:
            return "no gold answer"
        gold = answer
    return LocomoQuestion(
        question_id=f"{sample_id}/q{index}",
        index=index,
        question=qa["question"],
        gold=gold,
        category=category,
        evidence=evidence,
        adversarial_answer=adversarial,
    )


def render_stream(sample: LocomoSample) -> list[str]:
    """One chunk per turn; a session's first turn carries the session date on a line of its own."""
    chunks = []
    for session in sample.sessions:
        for i, turn in enumerate(session.turns):
            line = f"{turn.speaker}: {turn.text}"
            if turn.blip_caption:
                line += f" [shares {turn.blip_caption}]"
            chunks.append(f"DATE: {session.date_time}\n{line}" if i == 0 else line)
    return chunks


# ---- the official prompts and scoring, shared with environments shaped like LoCoMo (dialogues) -------------------


def adversarial_options(key: str, tempting: str) -> dict[str, str]:
    """A category-5 question's two options, NOT_MENTIONED and the tempting wrong answer, in an order drawn from
    `key` (a string seed naming the question)."""
    pair = (NOT_MENTIONED, tempting)
    if random.Random(key).random() >= 0.5:
        pair = pair[::-1]
    return {"a": pair[0], "b": pair[1]}


def locomo_score(task: Task, prediction: str) -> dict[str, float]:
    """The official metric for one question (`task.metadata` holds its "category", and "options" for category 5:
    a prediction that is an option letter, "a" or "(b)", is read as that option)."""
    options = task.metadata.get("options")
    if options:
        letter = _OPTION_LETTERS.get(prediction.strip().lower())
        if letter is not None:
            prediction = options[letter]
    metrics = score_answer(prediction, task.answers[0], task.metadata["category"])
    return {"reward": metrics["f1"], "f1": metrics["f1"], "em": metrics["em"]}


def locomo_answer_prompt(question: str, context: str, task: Task | None = None) -> str:
    """The official QA prompt: the date hint for temporal questions, the two options for adversarial ones; without
    a task (an extracted pair rendered by the inner loop), the plain prompt."""
    category = task.metadata.get("category") if task is not None else None
    options = task.metadata.get("options") if task is not None else None
    if category == 5 and options:
        prompt = QA_PROMPT_CAT_5.format(question + SELECT_SUFFIX.format(options["a"], options["b"]))
    elif category == 2:
        prompt = QA_PROMPT.format(question + DATE_HINT)
    else:
        prompt = QA_PROMPT.format(question)
    return f"{context}\n\n{prompt}" if context.strip() else prompt


def locomo_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The official reporting shape: every category present (None when empty) and the 1-4 / 1-5 means."""
    official = aggregate(records)
    return {k: official[k] for k in ("f1_by_category", "f1_1_4", "f1_1_5")}


# ---- environment ---------------------------------------------------------------------------------------------


@register_env("locomo")
class LocomoEnv(Environment):
    """One task per LoCoMo question, in file order; the stream is the question's whole conversation."""

    name = "locomo"
    summary_columns = ("f1_1_4", "f1_1_5")

    def __init__(
        self,
        data: str,
        sample_ids: list[str] | None = None,
        max_questions: int | None = None,
        seed: int = 0,
        per_category: int | None = None,
    ):
        """`per_category`: keep only the first N questions of each category (file order), a fixed mixed subset;
        `max_questions` then truncates that list."""
        check_count("locomo", "max_questions", max_questions)
        check_count("locomo", "per_category", per_category)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise InputError(f"locomo env: seed must be an integer, got {seed!r}")
        check_strings("locomo", "sample_ids", sample_ids)
        self.data = str(data)
        self.seed = seed
        self.samples = load_locomo(data, sample_ids)
        # All questions of a conversation share one rendered stream.
        self._streams = {s.sample_id: tuple(render_stream(s)) for s in self.samples}
        tasks = first_per_category([self._task(s, q) for s in self.samples for q in s.questions], per_category)
        self._tasks = tasks if max_questions is None else tasks[:max_questions]

    def __len__(self) -> int:
        return len(self._tasks)

    def task(self, index: int) -> Task:
        if not 0 <= index < len(self._tasks):
            raise IndexError(f"locomo env: task index {index} out of range [0, {len(self._tasks)})")
        return self._tasks[index]

    def summarize(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        return locomo_summary(records)

    def split_key(self, index: int) -> str:
        # Questions about one conversation share its stream: hold conversations out, not single questions.
        return self.task(index).metadata["sample_id"]

    @property
    def skipped(self) -> list[dict[str, Any]]:
        return [record for s in self.samples for record in s.skipped]

    def questions_by_sample(self) -> dict[str, list[Task]]:
        grouped: dict[str, list[Task]] = {}
        for task in self._tasks:
            grouped.setdefault(task.metadata["sample_id"], []).append(task)
        return grouped

    def score(self, task: Task, prediction: str) -> dict[str, float]:
        return locomo_score(task, prediction)

    def answer_prompt(self, question: str, context: str, task: Task | None = None) -> str:
        return locomo_answer_prompt(question, context, task)

    def _task(self, sample: LocomoSample, q: LocomoQuestion) -> Task:
        # Seeded per question, so the option order does not depend on which questions are loaded.
        options = None
        if q.category == 5:
            options = adversarial_options(f"locomo:{self.seed}:{q.question_id}", q.adversarial_answer)
        return Task(
            task_id=q.question_id,
            question=q.question,
            chunks=self._streams[sample.sample_id],
            answers=(q.gold,),
            metadata={
                "sample_id": sample.sample_id,
                "question_id": q.question_id,
                "category": q.category,
                "evidence": list(q.evidence),
                "options": options,
            },
        )
