"""LongMemEval-S (Wu et al., 2024): a user's chat history with an assistant, tens of sessions, one question about it.

Every item of the file is one task with its own haystack. The stream is the item's sessions sorted by date (ties keep
file order), one chunk per turn (``user: ...`` / ``assistant: ...``), the first chunk of each session opened by a
``Session date: <date>`` line, as LoCoMo's sessions are. The question carries the date it was asked on (temporal
questions are answered relative to it): the agent sees ``<question> (asked on <question_date>)``, while reading and
when answering. ``has_answer`` marks on turns are not shown.

Scoring: token F1 and exact match against the gold answer (`tmem_rl.metrics.qa`). An abstention question (its
``question_id`` ends in ``_abs``; the gold explains why it cannot be answered) scores 1 when the reply declines to
answer (`abstains`), else 0. Every score also says whether the reply abstained, so that a model that declines
answerable questions shows. An optional judge asks a yes/no question adapted from the official evaluation's
per-type questions; it is off by default.

Data: the official ``longmemeval_s.json`` (a JSON list of items); point ``data`` at a local copy. The file is read
in full and checked before any task is built. What is an error and what is skipped follows the LoCoMo loader:

- An item whose ``answer`` is missing, null or blank has nothing to score against: it is skipped and listed in
  `LongMemEvalEnv.skipped` (``{"question_id", "index", "question", "reason"}``), which the evaluation summary counts.
- Anything else that departs from the format raises `LongMemEvalFormatError` (an `InputError`), one line naming the
  file, the item (its index, and its ``question_id`` once known), the field and what was expected: a top level that
  is not a non-empty list, a missing or wrongly typed field, an unknown ``question_type``, a date not in the official
  ``2023/05/20 (Sat) 02:21`` form, haystack lists of unequal length, an empty haystack, a turn without ``role`` or
  ``content`` or with a role other than user / assistant, text with a lone surrogate, a repeated ``question_id``.
  Sessions without turns are left out of the stream, as in LoCoMo.
"""

from __future__ import annotations

import http.client
import json
import numbers
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

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
from tmem_rl.metrics.qa import exact_match, mean, token_f1

QUESTION_TYPES = (
    "single-session-user",
    "single-session-assistant",
    "single-session-preference",
    "multi-session",
    "temporal-reasoning",
    "knowledge-update",
)
ROLES = ("user", "assistant")
ABSTENTION_SUFFIX = "_abs"
QA_PROMPT = (
    "Above are earlier chats between you and a user. Answer the question from the relevant chats, in a short "
    "phrase.\n\nQuestion: {} Short answer:"
)
DEFAULT_JUDGE_MODEL = "gpt-4o-2024-08-06"  # the judge of the official evaluation
DEFAULT_KEY_ENV, DEFAULT_KEY_HOST = "OPENAI_API_KEY", "api.openai.com"  # that key goes to that host only

# The official date form, "2023/05/20 (Sat) 02:21"; the weekday is optional and not checked against the date.
_DATE = re.compile(r"(\d{4})/(\d{1,2})/(\d{1,2})(?: \([A-Za-z]{3}\))? (\d{1,2}):(\d{2})")

# A hedge that comes with an answer anyway ("I'm not sure, but probably Paris"): after one, the reply answers.
_HEDGED = (r"(?!.*\b(?:but|though|although|however|maybe|perhaps|probably|possibly|likely|might|could be|"
           r"i think|i believe|i guess|my guess|i'?d say|i would say)\b)")
# Replies that decline to answer. Matched anywhere in the lowercased reply, curly apostrophes made straight. The
# first four decline only when no answer follows them in the reply (_HEDGED), and "not sure" only when no clause
# follows in its sentence either (an apology aside): "I'm not sure, it was Paris" answers.
ABSTENTION_PATTERNS = (
    r"\bi (?:do not|don'?t) (?:know|remember|recall)\b" + _HEDGED,
    r"\b(?:i'?m|i am) not (?:sure|certain)\b(?![^.!?\n]*[,;:\u2014](?!\s*(?:sorry|i'?m afraid)\b))" + _HEDGED,
    r"\bno idea\b" + _HEDGED,
    r"\b(?:can ?not|can'?t|unable to|not able to) (?:answer|determine|tell|say|know|find|recall|remember)\b"
    + _HEDGED,
    r"\b(?:impossible|no way) to (?:answer|determine|tell|say|know)\b",
    r"(?:\bnot|n't|\bnever) (?:been )?(?:mentioned|specified|stated|said)\b",
    r"\b(?:do not|don'?t|did not|didn'?t|does not|doesn'?t|have not|haven'?t|has not|hasn'?t|never) "
    r"(?:mention(?:ed)?|specif(?:y|ied)|stated?|sa(?:y|id)|t(?:ell|old)|shared?)\b",
    # "include" only with the chats as subject: "the recipe does not include eggs" answers.
    r"\b(?:chats?|conversations?|history|context|sessions?|messages?|records?) "
    r"(?:do not|don'?t|did not|didn'?t|does not|doesn'?t) include\b",
    r"\bno mention\b",
    r"\b(?:no|not enough|insufficient|no relevant|no such|not sufficient) (?:information|info|details|data|record)",
    r"\b(?:do not|don'?t|does not|doesn'?t) have (?:any |enough |that |this |the )?"
    r"(?:information|info|details|record)",
    r"\binformation (?:is |was )?(?:not |un)(?:available|provided|given)\b",
    r"\b(?:not|isn'?t|wasn'?t) (?:in|part of|included in) (?:the|our|my|your) "
    r"(?:chats?|conversations?|history|context)\b",
    r"^\W*(?:unknown|unanswerable|n/?a)\W*$",
)
_ABSTAINS = re.compile("|".join(f"(?:{p})" for p in ABSTENTION_PATTERNS), re.DOTALL)


def abstains(reply: str) -> bool:
    """Whether `reply` declines to answer ("I don't know", "not mentioned", "no information about ..."). A hedge
    followed by an answer ("I'm not sure, but probably Paris") answers."""
    return _ABSTAINS.search(str(reply).lower().replace("\u2019", "'")) is not None


def is_abstention(question_id: str) -> bool:
    """LongMemEval marks its unanswerable questions by the id suffix ``_abs``."""
    return str(question_id).endswith(ABSTENTION_SUFFIX)


class LongMemEvalFormatError(InputError):
    """The LongMemEval data file does not have the official format."""


class JudgeError(InputError):
    """The judge endpoint could not be asked, or gave no verdict."""


@dataclass(frozen=True)
class Turn:
    role: str  # "user" | "assistant"
    content: str


@dataclass(frozen=True)
class Session:
    session_id: str
    date: str  # as written in the file
    when: datetime  # `date` parsed, what the stream is sorted by
    turns: list[Turn]


@dataclass(frozen=True)
class LongMemEvalItem:
    index: int  # position in the file
    question_id: str
    question_type: str
    question: str
    answer: str
    question_date: str
    sessions: list[Session]  # in file order
    answer_session_ids: list[str]

    @property
    def abstention(self) -> bool:
        return is_abstention(self.question_id)


@dataclass
class LongMemEvalData:
    items: list[LongMemEvalItem]
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {"question_id", "index", "question", "reason"}


# ---- loading -------------------------------------------------------------------------------------------------


def load_longmemeval(path: str | Path, question_ids: list[str] | None = None) -> LongMemEvalData:
    """Items of an official-format ``longmemeval_s.json``, in file order, optionally only those in `question_ids`."""
    raw = read_json_list(path, "items", "LongMemEval", LongMemEvalFormatError)
    name = printable(path)

    parsed = [_item(name, i, item) for i, item in enumerate(raw)]
    ids = [item.question_id if isinstance(item, LongMemEvalItem) else item["question_id"] for item in parsed]
    repeated = {qid: [i for i, other in enumerate(ids) if other == qid] for qid, n in Counter(ids).items() if n > 1}
    if repeated:
        listed = "; ".join(f"{printable(qid)} (items {', '.join(map(str, where))})" for qid, where in repeated.items())
        raise LongMemEvalFormatError(f"{name}: field 'question_id' must be unique; repeated: {listed}")
    if question_ids is not None:
        unknown = [q for q in question_ids if q not in ids]
        if unknown:
            shown = ", ".join(map(printable, ids[:5])) + (", ..." if len(ids) > 5 else "")
            raise LongMemEvalFormatError(f"{name}: unknown question_id {', '.join(map(repr, unknown))}; the file has "
                                         f"{len(ids)} ({shown})")
        wanted = set(question_ids)
        parsed = [p for p, qid in zip(parsed, ids) if qid in wanted]
    return LongMemEvalData(
        items=[p for p in parsed if isinstance(p, LongMemEvalItem)],
        skipped=[p for p in parsed if not isinstance(p, LongMemEvalItem)],
    )


def _item(name: str, index: int, item: Any) -> LongMemEvalItem | dict[str, Any]:
    """The parsed item, or its `skipped` record."""
    where = f"{name}: item {index}"
    if not isinstance(item, dict):
        raise LongMemEvalFormatError(f"{where}: expected an object, got {type(item).__name__}")
    question_id = _text(where, "question_id", _field(where, item, "question_id"))
    if not question_id.strip():
        raise LongMemEvalFormatError(f"{where}: field 'question_id' must be a non-empty string, got {question_id!r}")
    where = f"{name}: item {index} (question_id {printable(question_id)})"
    question_type = _field(where, item, "question_type")
    if question_type not in QUESTION_TYPES:
        raise LongMemEvalFormatError(f"{where}: field 'question_type' must be one of {', '.join(QUESTION_TYPES)}, "
                                     f"got {question_type!r}")
    question = _text(where, "question", _field(where, item, "question"))
    question_date = _text(where, "question_date", _field(where, item, "question_date"))
    parse_date(where, "question_date", question_date)
    answer = gold_text(where, "answer", item.get("answer"), LongMemEvalFormatError)

    session_ids = _strings(where, "haystack_session_ids", _field(where, item, "haystack_session_ids"))
    dates = _strings(where, "haystack_dates", _field(where, item, "haystack_dates"))
    sessions = _field(where, item, "haystack_sessions")
    if not isinstance(sessions, list):
        raise LongMemEvalFormatError(f"{where}: field 'haystack_sessions' must be a list of sessions, "
                                     f"got {type(sessions).__name__}")
    lengths = {"haystack_session_ids": len(session_ids), "haystack_dates": len(dates),
               "haystack_sessions": len(sessions)}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"'{key}' {n}" for key, n in lengths.items())
        raise LongMemEvalFormatError(f"{where}: fields 'haystack_session_ids', 'haystack_dates' and "
                                     f"'haystack_sessions' must have equal lengths, got {listed}")
    if not sessions:
        raise LongMemEvalFormatError(f"{where}: field 'haystack_sessions' is empty; expected at least one session")
    parsed = [
        Session(session_id=sid, date=date, when=parse_date(where, f"haystack_dates[{i}]", date),
                turns=_turns(where, i, turns))
        for i, (sid, date, turns) in enumerate(zip(session_ids, dates, sessions))
    ]
    if not any(s.turns for s in parsed):
        raise LongMemEvalFormatError(f"{where}: field 'haystack_sessions' holds no turns; expected at least one")
    answer_session_ids = _strings(where, "answer_session_ids", _field(where, item, "answer_session_ids"))

    if answer is None:
        return {"question_id": question_id, "index": index, "question": question, "reason": "no gold answer"}
    return LongMemEvalItem(
        index=index,
        question_id=question_id,
        question_type=question_type,
        question=question,
        answer=answer,
        question_date=question_date,
        sessions=parsed,
        answer_session_ids=answer_session_ids,
    )


def _field(where: str, item: dict, key: str, parent: str = "") -> Any:
    if key not in item:
        raise LongMemEvalFormatError(f"{where}: missing field '{parent + '.' if parent else ''}{key}'")
    return item[key]


def _text(where: str, name: str, value: Any) -> str:
    return text_field(where, name, value, LongMemEvalFormatError)


def _strings(where: str, name: str, value: Any) -> list[str]:
    if not isinstance(value, list):
        raise LongMemEvalFormatError(f"{where}: field '{name}' must be a list of strings, got {type(value).__name__}")
    return [_text(where, f"{name}[{i}]", v) for i, v in enumerate(value)]


def parse_date(where: str, name: str, value: str) -> datetime:
    """A date in the official form, "2023/05/20 (Sat) 02:21"."""
    match = _DATE.fullmatch(value.strip())
    try:
        if match is None:
            raise ValueError("not in the official form")
        year, month, day, hour, minute = map(int, match.groups())
        return datetime(year, month, day, hour, minute)
    except ValueError:
        raise LongMemEvalFormatError(f"{where}: field '{name}' must be a date like '2023/05/20 (Sat) 02:21', "
                                     f"got {value!r}") from None


def _turns(where: str, session: int, turns: Any) -> list[Turn]:
    name = f"haystack_sessions[{session}]"
    if not isinstance(turns, list):
        raise LongMemEvalFormatError(f"{where}: field '{name}' must be a list of turns, got {type(turns).__name__}")
    parsed = []
    for i, turn in enumerate(turns):
        here = f"{name}[{i}]"
        if not isinstance(turn, dict):
            raise LongMemEvalFormatError(f"{where}: field '{here}' must be a turn object, got {type(turn).__name__}")
        role = _field(where, turn, "role", here)
        if role not in ROLES:
            raise LongMemEvalFormatError(f"{where}: field '{here}.role' must be 'user' or 'assistant', got {role!r}")
        content = _text(where, f"{here}.content", _field(where, turn, "content", here))
        if not isinstance(turn.get("has_answer", False), bool):
            raise LongMemEvalFormatError(f"{where}: field '{here}.has_answer' must be true or false, "
                                         f"got {turn['has_answer']!r}")
        parsed.append(Turn(role=role, content=content))
    return parsed


def render_stream(item: LongMemEvalItem) -> list[str]:
    """One chunk per turn, sessions by date (ties in file order); a session's first turn carries its date on a line
    of its own."""
    chunks = []
    for session in sorted(item.sessions, key=lambda s: s.when):
        for i, turn in enumerate(session.turns):
            line = f"{turn.role}: {turn.content.strip()}"
            chunks.append(f"Session date: {session.date}\n{line}" if i == 0 else line)
    return chunks


def dated_question(question: str, question_date: str) -> str:
    return f"{question} (asked on {question_date})"


# ---- judging -------------------------------------------------------------------------------------------------

Judge = Callable[[str, str, str, str, bool], bool]
"""(question, gold answer, prediction, question type, abstention) -> whether the prediction is correct."""

_JUDGE_FRAME = ("You are given a question, {what}, and a reply from a model.{rule}\n\nQuestion: {question}\n\n"
                "{label}: {answer}\n\nModel reply: {prediction}\n\n{ask} Reply with yes or no only.")
_CONTAINS = (" Answer yes if the reply contains the correct answer, or is equivalent to it, or goes through every "
             "step needed to reach it; otherwise answer no. A reply that gives only part of the required "
             "information is not correct.")
_JUDGE_RULES = {
    "single-session-user": _CONTAINS,
    "single-session-assistant": _CONTAINS,
    "multi-session": _CONTAINS,
    "temporal-reasoning": _CONTAINS + (" Do not count an off-by-one error in a number of days, weeks or months "
                                       "against the reply: if the correct answer is 18 days, 19 days is correct."),
    "knowledge-update": (" Answer yes if the reply contains the correct answer; otherwise answer no. A reply that "
                         "also mentions earlier, outdated information is still correct as long as the answer it gives "
                         "is the updated one."),
    "single-session-preference": (" Answer yes if the reply satisfies the rubric; otherwise answer no. The reply "
                                  "need not cover every point of the rubric: it is correct as long as it recalls "
                                  "the user's personal information and uses it correctly."),
}
_ABSTENTION_RULE = (" The question cannot be answered from what the model was told. Answer yes if the reply "
                    "recognises this, for instance by saying the information is incomplete, or that related "
                    "information was given but not what is asked; otherwise answer no.")


def judge_prompt(question: str, answer: str, prediction: str, question_type: str, abstention: bool) -> str:
    """The yes/no question put to the judge, adapted from the official evaluation's per-type questions."""
    if abstention:
        return _JUDGE_FRAME.format(what="an explanation of why it cannot be answered", rule=_ABSTENTION_RULE,
                                   question=question, label="Explanation", answer=answer, prediction=prediction,
                                   ask="Does the reply recognise that the question cannot be answered?")
    if question_type not in _JUDGE_RULES:
        raise ValueError(f"longmemeval judge: question_type must be one of {', '.join(QUESTION_TYPES)}, "
                         f"got {question_type!r}")
    preference = question_type == "single-session-preference"
    return _JUDGE_FRAME.format(
        what="a rubric for the personalised reply wanted" if preference else "its correct answer",
        rule=_JUDGE_RULES[question_type], question=question, label="Rubric" if preference else "Correct answer",
        answer=answer, prediction=prediction, ask="Is the reply correct?",
    )


def http_judge(url: str, model: str = DEFAULT_JUDGE_MODEL, api_key_env: str | None = None,
               timeout: float = 60.0) -> Judge:
    """A judge that asks an OpenAI-compatible chat completions endpoint (`url` is its base, e.g.
    ``https://api.openai.com/v1``) the `judge_prompt` question, greedily, and reads "yes" in the reply as a pass, as
    the official evaluation does. The API key is read from the environment variable `api_key_env`; without one,
    from ``$OPENAI_API_KEY`` only when the host is api.openai.com, so that the key never goes to another host
    unasked."""
    endpoint = url.rstrip("/") + "/chat/completions"
    if api_key_env is None and (urllib.parse.urlsplit(url).hostname or "") == DEFAULT_KEY_HOST:
        api_key_env = DEFAULT_KEY_ENV

    def judge(question: str, answer: str, prediction: str, question_type: str, abstention: bool) -> bool:
        body = {"model": model, "temperature": 0, "max_tokens": 10, "n": 1, "messages": [
            {"role": "user", "content": judge_prompt(question, answer, prediction, question_type, abstention)},
        ]}
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(api_key_env) if api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(endpoint, data=json.dumps(body).encode("utf-8"), headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                reply = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as err:
            raise JudgeError(f"longmemeval judge {endpoint}: HTTP {err.code} {err.reason}; expected an "
                             "OpenAI-compatible chat completions endpoint (see judge_url, judge_model, "
                             "judge_api_key_env)") from err
        except (urllib.error.URLError, OSError) as err:  # refused, unknown host, timed out
            reason = getattr(err, "reason", None) or err
            raise JudgeError(f"longmemeval judge {endpoint}: cannot be reached ({reason})") from err
        except http.client.HTTPException as err:  # the connection broke off mid-reply (IncompleteRead), ...
            raise JudgeError(f"longmemeval judge {endpoint}: no complete reply ({type(err).__name__}: "
                             f"{' '.join(str(err).split())})") from err
        except ValueError as err:  # not UTF-8, not JSON
            raise JudgeError(f"longmemeval judge {endpoint}: the reply is not JSON ({err})") from err
        try:
            content = reply["choices"][0]["message"]["content"]
            if not isinstance(content, str):
                raise TypeError(type(content).__name__)
        except (KeyError, IndexError, TypeError) as err:
            raise JudgeError(f"longmemeval judge {endpoint}: the reply has no choices[0].message.content text; "
                             "expected a chat completion") from err
        return "yes" in content.lower()

    return judge


def _as_verdict(value: Any) -> bool:
    """A judge callable's verdict: True or False, or a value that stands for one (a numpy bool, the integer 0 or
    1); anything else ("yes", None, 0.5) is a JudgeError rather than a guess."""
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool")):
        return bool(value)
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise JudgeError(f"longmemeval judge: the judge callable must return True or False (or 1 / 0), got {value!r} "
                     f"({type(value).__name__})")


# ---- environment ---------------------------------------------------------------------------------------------


@register_env("longmemeval")
class LongMemEvalEnv(Environment):
    """One task per LongMemEval item, in file order; the stream is the item's own haystack.

    `default_l_max` is left unset, so episodes read at 4096 tokens (`EpisodeConfig.budget`: the paper's LoCoMo budget;
    no LongMemEval budget is given there). A LongMemEval-S haystack is ~115k tokens, so at 4096 the agent extracts
    and clears its context many times per item; ``--l-max`` changes the budget.
    """

    name = "longmemeval"
    summary_columns = ("abstention_accuracy", "judge")

    def __init__(
        self,
        data: str | None = None,
        sample_ids: list[str] | None = None,
        max_items: int | None = None,
        per_category: int | None = None,
        question_types: list[str] | None = None,
        judge: Judge | None = None,
        judge_url: str | None = None,
        judge_model: str = DEFAULT_JUDGE_MODEL,
        judge_api_key_env: str | None = None,
        judge_timeout: float = 60.0,
    ):
        """`data`: the official longmemeval_s.json. `sample_ids`: only these question ids (each item is its own
        sample). `question_types`: only these types. `per_category`: the first N items of each question type (file
        order), a fixed mixed subset; `max_items` then truncates the list.
        `judge`: a callable (question, answer, prediction, question_type, abstention) -> bool, or `judge_url`: the
        base URL of an OpenAI-compatible endpoint asked with `judge_model`, its key read from the environment variable
        `judge_api_key_env` (unset: from $OPENAI_API_KEY, and only for api.openai.com). With either, every score has
        "judge" (1.0 / 0.0); without, there is no judge."""
        if data is None:
            raise InputError("longmemeval env: no data file; tmem-rl does not download LongMemEval: get "
                             "longmemeval_s.json from the official release and pass it with --data (Python: data=...)")
        check_count("longmemeval", "max_items", max_items)
        check_count("longmemeval", "per_category", per_category)
        check_strings("longmemeval", "sample_ids", sample_ids)
        check_strings("longmemeval", "question_types", question_types)
        unknown = [t for t in question_types or [] if t not in QUESTION_TYPES]
        if unknown:
            raise InputError(f"longmemeval env: unknown question_types {', '.join(map(repr, unknown))}; "
                             f"available: {', '.join(QUESTION_TYPES)}")
        self.judge = self._judge(judge, judge_url, judge_model, judge_api_key_env, judge_timeout)
        self.data = str(data)
        loaded = load_longmemeval(data, sample_ids)
        self.items, self._skipped = loaded.items, loaded.skipped
        tasks = first_per_category([self._task(item) for item in self.items
                                    if question_types is None or item.question_type in question_types], per_category)
        self._tasks = tasks if max_items is None else tasks[:max_items]
        self._verdicts: dict[tuple[str, str], bool] = {}  # (question_id, prediction): one judge call per answer

    @staticmethod
    def _judge(judge, url, model, api_key_env, timeout) -> Judge | None:
        if judge is not None and url is not None:
            raise InputError("longmemeval env: give judge (a callable) or judge_url (an endpoint), not both")
        if judge is not None and not callable(judge):
            raise InputError(f"longmemeval env: judge must be a callable (question, answer, prediction, "
                             f"question_type, abstention) -> bool, got {judge!r}")
        if url is None:
            return judge
        if not isinstance(url, str) or not re.match(r"https?://", url):
            raise InputError(f"longmemeval env: judge_url must be an http(s) base URL such as "
                             f"'https://api.openai.com/v1', got {url!r}")
        if not isinstance(model, str) or not model:
            raise InputError(f"longmemeval env: judge_model must be a model name, got {model!r}")
        if api_key_env is not None and not isinstance(api_key_env, str):
            raise InputError(f"longmemeval env: judge_api_key_env must be an environment variable name or None, "
                             f"got {api_key_env!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise InputError(f"longmemeval env: judge_timeout must be a number of seconds > 0, got {timeout!r}")
        return http_judge(url, model, api_key_env, float(timeout))

    def __len__(self) -> int:
        return len(self._tasks)

    def task(self, index: int) -> Task:
        if not 0 <= index < len(self._tasks):
            raise IndexError(f"longmemeval env: task index {index} out of range [0, {len(self._tasks)})")
        return self._tasks[index]

    @property
    def skipped(self) -> list[dict[str, Any]]:
        return list(self._skipped)

    def questions_by_sample(self) -> dict[str, list[Task]]:
        # Every item has its own haystack: one question per stream.
        return {t.metadata["sample_id"]: [t] for t in self._tasks}

    def score(self, task: Task, prediction: str) -> dict[str, float]:
        meta = task.metadata
        abstained = abstains(prediction)
        if meta["abstention"]:
            f1 = em = float(abstained)
        else:
            f1, em = token_f1(prediction, task.answers[0]), exact_match(prediction, task.answers[0])
        scores = {"reward": f1, "f1": f1, "em": em, "abstained": float(abstained)}
        if self.judge is not None:
            scores["judge"] = float(self._verdict(task, prediction))
        return scores

    def _verdict(self, task: Task, prediction: str) -> bool:
        meta = task.metadata
        key = (meta["question_id"], prediction)
        if key not in self._verdicts:
            verdict = self.judge(meta["question"], task.answers[0], prediction, meta["category"], meta["abstention"])
            self._verdicts[key] = _as_verdict(verdict)
        return self._verdicts[key]

    def summarize(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """F1, EM and count per question type (every type present, None where it has no records), abstention
        accuracy (the share of abstention questions declined), how often answerable questions were declined, and
        with a judge its accuracy, overall and per type."""

        def mean_of(rows: list[dict[str, Any]], key: str) -> float | None:
            return mean([float(r[key]) for r in rows])

        by_type = {t: [r for r in records if r.get("category") == t] for t in QUESTION_TYPES}
        unanswerable = [r for r in records if is_abstention(r.get("question_id", ""))]
        answerable = [r for r in records if not is_abstention(r.get("question_id", ""))]
        summary = {
            "n_by_category": {t: len(rows) for t, rows in by_type.items()},
            "f1_by_category": {t: mean_of(rows, "f1") for t, rows in by_type.items()},
            "em_by_category": {t: mean_of(rows, "em") for t, rows in by_type.items()},
            "abstention_accuracy": mean_of(unanswerable, "f1"),
            "abstained_answerable": mean_of([r for r in answerable if "abstained" in r], "abstained"),
        }
        judged = [r for r in records if r.get("judge") is not None]
        if judged:
            summary["judge"] = mean_of(judged, "judge")
            summary["judge_by_category"] = {t: mean_of([r for r in rows if r.get("judge") is not None], "judge")
                                            for t, rows in by_type.items()}
        return summary

    def answer_prompt(self, question: str, context: str, task: Task | None = None) -> str:
        # A task's question already carries the date it was asked on; an extracted pair's question has none.
        prompt = QA_PROMPT.format(question)
        return f"{context}\n\n{prompt}" if context.strip() else prompt

    def _task(self, item: LongMemEvalItem) -> Task:
        return Task(
            task_id=item.question_id,
            question=dated_question(item.question, item.question_date),
            chunks=tuple(render_stream(item)),
            answers=(item.answer,),
            metadata={
                "sample_id": item.question_id,
                "question_id": item.question_id,
                "category": item.question_type,
                "abstention": item.abstention,
                "answer_session_ids": list(item.answer_session_ids),
                "question_date": item.question_date,
                "question": item.question,
            },
        )
