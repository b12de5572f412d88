"""The extraction action: prompts that ask the agent for QA pairs, and the parser that turns its text into them.

Small models write imperfect JSON: fenced, wrapped in prose, cut off by the token limit, with their own key names.
The parser keeps every pair it can read and records why anything else was dropped, so a failed extraction is a
visible record rather than an exception.
"""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

from tmem_rl.envs import lone_surrogate
from tmem_rl.records import ParseRecord, QAPair

EXTRACTION_PREFILL = "["

INSTRUCTION_KEYS = ("instruction", "question", "q", "query", "input", "prompt")
OUTPUT_KEYS = ("output", "answer", "a", "response", "target")
MAX_PREVIOUS_SHOWN = 20


def _int_or_text(digits: str) -> int | str:
    # An integer literal longer than Python converts (sys.get_int_max_str_digits) stays text instead of failing
    # the whole value: a model that writes a 5000-digit answer wrote text, not a number to compute with.
    try:
        return int(digits)
    except ValueError:
        return digits


# strict=False: small models put raw newlines inside strings.
_DECODER = json.JSONDecoder(strict=False, parse_int=_int_or_text)
# What the decoder raises on text it cannot read: ValueError covers JSONDecodeError; RecursionError comes from the
# C decoder, which recurses once per nesting level.
_DECODE_FAILURES = (ValueError, RecursionError)
_FENCE = re.compile(r"```[\w+-]*")
_OPENER = re.compile(r"[\[{]")
_OBJECT_AHEAD = re.compile(r"\s*\{")
# A whole string, possibly unterminated, so that the brackets and commas inside it are passed over.
_STRING = r'"(?:[^"\\]+|\\.)*"?'
_BRACKET_OR_STRING = re.compile(_STRING + r"|[\[\]{}]", re.DOTALL)
_TRAILING_COMMA = re.compile(r",(?=\s*[\]}])")  # a comma directly before a closer, whitespace between allowed
_STRING_OR_TRAILING_COMMA = re.compile(f"({_STRING})|{_TRAILING_COMMA.pattern}", re.DOTALL)
# QA pairs nest 2-4 levels. Once the decoder has hit its recursion limit, openers that nest this deep are skipped
# instead of decoded: each such attempt would recurse to the limit again, making long "[[[[..." runs quadratic.
_SKIPPED_NESTING = 32
# A failed decode costs time in proportion to its distance from the start of the string decoded (the error counts
# lines and columns), so decodes run in a suffix of the text that starts at most this far before them ...
_MIN_WINDOW = 4096
_MAX_REBASES = 256  # ... or further on texts so long that cutting a new suffix every _MIN_WINDOW costs more.
# Where every bracket starts a value that fails (1 MB of '{"' has 500,000), the scan gives up after this many
# failures: far more brackets than any extraction holds, and a bound on the work (under 0.1 s).
_MAX_FAILED_DECODES = 10_000


# ----------------------------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------------------------


def parse_qa_pairs(text: str, prefilled: bool = False, source: str | None = None) -> ParseRecord:
    """Model text -> QA pairs. `prefilled`: the prompt ended with EXTRACTION_PREFILL and `text` continues it.
    `source`: the text that was read; when given, pairs whose answer is not in it are dropped (see `grounded`).
    Never raises: whatever goes wrong is the record's `error`."""
    record = ParseRecord(raw=text)
    # Last resort for failures no branch below foresaw: one unreadable sample must cost one record, not the run.
    try:
        _parse_into(record, text, prefilled, source)
    except Exception as err:
        record.pairs = []  # they may not have been deduplicated or grounded yet
        record.error = f"parser error: {type(err).__name__}: {err}"
    return record


def _parse_into(record: ParseRecord, text: str, prefilled: bool, source: str | None) -> None:
    body = (text or "").strip()
    if not body:
        record.error = "empty"
        return
    if prefilled and not body.startswith(EXTRACTION_PREFILL):
        body = EXTRACTION_PREFILL + body
    body = _remove_trailing_commas(_unfence(body))

    value, unread_tail, error = _locate_json(body)
    if unread_tail is not None:
        record.dropped.append(unread_tail)
    if error is not None:
        record.error = error
        return

    items, error = _as_items(value)
    if error is not None:
        # No item was complete before the unreadable tail, so the tail's reason is the record's.
        record.error = unread_tail["reason"] if unread_tail is not None and error == "empty" else error
        return

    seen: set[tuple[str, str]] = set()
    for item in items:
        pair, reason = _to_pair(item)
        if pair is not None:
            key = (fold(pair.instruction), fold(pair.output))
            if key in seen:
                pair, reason = None, "duplicate"
            else:
                seen.add(key)
        if pair is None:
            record.dropped.append({"item": item, "reason": reason})
        else:
            record.pairs.append(pair)

    if source is not None:
        record.pairs, ungrounded = grounded(record.pairs, source)
        record.dropped.extend(ungrounded)
    if not record.pairs:
        record.error = "all items dropped"


def _unfence(text: str) -> str:
    """The content of the first code fence that holds JSON; fences may be unterminated or only a closing one."""
    if "```" not in text:
        return text
    for match in _FENCE.finditer(text):
        end = text.find("```", match.end())
        segment = text[match.end() : end if end != -1 else len(text)]
        if "[" in segment or "{" in segment:
            return segment.strip()
    return _FENCE.sub(" ", text).strip()


def _remove_trailing_commas(text: str) -> str:
    """Drop a comma directly before ] or } (whitespace between allowed), leaving string contents alone."""
    if not _TRAILING_COMMA.search(text):  # the usual case, found without visiting every string
        return text
    return _STRING_OR_TRAILING_COMMA.sub(lambda m: m.group(1) or "", text)


def _looks_like_pairs(value: Any) -> bool:
    return isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict) for v in value))


def _locate_json(text: str) -> tuple[Any, dict[str, Any] | None, str | None]:
    """Find the JSON in `text` -> (value, dropped entry for an unreadable tail or None, error or None).

    Tries each "[" / "{" in order, so prose before the JSON is skipped. A bracketed aside like "[1]" is kept only as
    a fallback, in case no pair-shaped JSON follows. An array of objects that never closes is salvaged object by
    object rather than decoded whole.
    """
    fallback: Any = None
    found_fallback = False
    reader = _Reader(text)
    pos = 0
    while reader.failures < _MAX_FAILED_DECODES and (opener := _OPENER.search(text, pos)):
        start = opener.start()
        decoded = reader.decode_at(start)
        if decoded is None:
            if text[start] == "[" and _OBJECT_AHEAD.match(text, start + 1):
                items, unread_tail = _salvage_array(text, start)
                return items, unread_tail, None
            pos = start + 1
            continue
        value, end = decoded
        if _looks_like_pairs(value):
            return value, None, None
        if not found_fallback:
            fallback, found_fallback = value, True
        pos = end
    if found_fallback:
        return fallback, None, None
    if reader.failures >= _MAX_FAILED_DECODES:
        return None, None, f"no JSON found (gave up after {_MAX_FAILED_DECODES} unreadable brackets)"
    try:  # a bare JSON scalar has no bracket to find
        return _DECODER.decode(text), None, None
    except _DECODE_FAILURES:
        return None, None, "nesting too deep" if reader.too_deep else "no JSON found"


class _Reader:
    """Decodes the JSON values that start at increasing positions of one text, counting the failures."""

    def __init__(self, text: str):
        self.text = text
        self.base, self.suffix = 0, text  # decodes run in suffix = text[base:] (see _MIN_WINDOW)
        self.window = max(_MIN_WINDOW, len(text) // _MAX_REBASES)
        self.too_deep: set[int] = set()  # openers known to nest too deep to decode
        self.failures = 0

    def decode_at(self, start: int) -> tuple[Any, int] | None:
        """(value, end) of the JSON at `start`, or None where it cannot be read. Hitting the recursion limit adds
        the deeply nested openers to `too_deep`, so that none of them is decoded again."""
        if start in self.too_deep:
            return None
        if start - self.base > self.window:
            self.base, self.suffix = start, self.text[start:]
        try:
            value, end = _DECODER.raw_decode(self.suffix, start - self.base)
            return value, end + self.base
        except RecursionError:
            self.too_deep.add(start)
            self.too_deep.update(_deeply_nested_openers(self.text, start))
        except ValueError:
            pass
        self.failures += 1
        return None


def _deeply_nested_openers(text: str, start: int) -> set[int]:
    """The openers in the value at `start` that nest at least _SKIPPED_NESTING levels, by counting brackets outside
    strings. Where the text is valid JSON this count is the decoder's nesting, so decoding at any of these openers
    either fails or gives a value far too deep to hold QA pairs."""
    open_positions: list[int] = []
    deep: set[int] = set()
    for token in _BRACKET_OR_STRING.finditer(text, start):
        char = text[token.start()]
        if char in "[{":
            open_positions.append(token.start())
            if len(open_positions) >= _SKIPPED_NESTING:
                deep.add(open_positions[-_SKIPPED_NESTING])
        elif char in "]}":
            open_positions.pop()
            if not open_positions:
                break  # the value at `start` has closed
    return deep


def _salvage_array(text: str, start: int) -> tuple[list[Any], dict[str, Any] | None]:
    """Decode the items of the array opening at `start` one by one -> (complete items, dropped entry for the
    unreadable tail or None)."""
    items: list[Any] = []
    pos = start + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return items, None
        try:
            item, pos = _DECODER.raw_decode(text, pos)
        except _DECODE_FAILURES as err:
            reason = "nesting too deep" if isinstance(err, RecursionError) else "truncated"
            return items, {"item": text[pos:], "reason": reason}
        items.append(item)


def _as_items(value: Any) -> tuple[list[Any], str | None]:
    """The decoded JSON -> the list of candidate pair objects, or an error."""
    if isinstance(value, dict):
        keys = {str(k).strip().lower() for k in value}
        if keys & set(INSTRUCTION_KEYS + OUTPUT_KEYS):
            return [value], None
        # {"pairs": [...]}, {"qa": [...]}: whatever the wrapper key, the list inside is the payload.
        for inner in value.values():
            if isinstance(inner, list):
                value = inner
                break
        else:
            return [value], None
    if not isinstance(value, list):
        return [], "not a list of objects"
    if not value:
        return [], "empty"
    return value, None


def _to_pair(item: Any) -> tuple[QAPair | None, str]:
    if not isinstance(item, dict):
        return None, "not an object"
    fields = {str(k).strip().lower(): v for k, v in item.items()}
    q_key = next((k for k in INSTRUCTION_KEYS if k in fields), None)
    a_key = next((k for k in OUTPUT_KEYS if k in fields), None)
    if q_key is None and a_key is None:
        return None, f"no question or answer key (had: {', '.join(sorted(fields)) or 'none'})"
    question = _as_text(fields.get(q_key)) if q_key else ""
    answer = _as_text(fields.get(a_key)) if a_key else ""
    if not question:
        return None, "no question"
    if not answer:
        return None, "no answer"
    if lone_surrogate(question) is not None or lone_surrogate(answer) is not None:
        # A "\ud800" escape decodes to half a character: no tokenizer can encode the pair.
        return None, "not Unicode text (lone surrogate)"
    if fold(question) == fold(answer):
        return None, "question equals answer"
    return QAPair(instruction=question, output=answer), ""


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (bool, int, float)):
        return str(value)
    if isinstance(value, list) and value and all(isinstance(v, (str, bool, int, float)) for v in value):
        return ", ".join(_as_text(v) for v in value)
    return ""  # None, objects, empty lists: nothing usable as a question or an answer


def fold(text: str) -> str:
    """Case- and whitespace-insensitive form of a text, for comparing answers."""
    return " ".join(text.casefold().split())


# ----------------------------------------------------------------------------------------------------------------
# Knowing when an extraction is done, while it is generated
# ----------------------------------------------------------------------------------------------------------------

# Why an extraction's generation ended: an end token, `max_pairs` pairs written, a pair repeated, the list closed,
# or the token budget.
STOP_REASONS = ("eos", "max_pairs", "repeat", "closed", "length")
_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"


class PairReader:
    """Reads an extraction's text piece by piece as it is generated and says when it is done: `feed` returns
    "max_pairs" once `max_pairs` pairs are written, "repeat" once a pair repeats an earlier one, "closed" once the
    list of pairs closes, and None until then. `pairs` counts the pairs read (repeats not counted).

    It reads as `parse_qa_pairs` does, so that text cut where it stops parses to the pairs it counted: a leading
    <think> block is skipped, a "[" (the prefilled one too) opens the list of pairs when an object follows it, each
    object in the list is decoded and made a pair by the parser's own code, and a repeat is the parser's duplicate.
    Each character is scanned once, so a completion costs time linear in its length. Where it cannot follow the
    text (pairs in a wrapper object, an object that does not decode, after which the parser reads nothing more) it
    never stops: generation then ends as it did without it.
    """

    def __init__(self, max_pairs: int, prefilled: bool = False):
        self.max_pairs = max_pairs
        self.pairs = 0
        self.reason: str | None = None
        self._seen: set[tuple[str, str]] = set()
        self._head: str | None = ""  # text before the JSON that may still be a <think> block; None once past it
        self._thinking = False
        self._opening = prefilled  # a "[" was read: it opens the list if an object follows
        self._lost = False  # the parser reads nothing more of this text: never stop
        self._depth = 0  # brackets open, counted outside strings
        self._list: int | None = None  # the depth inside the list of pairs, once it opened
        self._item: list[str] | None = None  # the characters of the object being read
        self._in_string = self._escaped = False

    def feed(self, text: str) -> str | None:
        if self._head is not None:
            text = self._after_thinking(text)
        try:
            for char in text:
                if self.reason is not None or self._lost:
                    break
                self._read(char)
        except Exception:  # as the parser's own last resort: one unreadable text must not end a run
            self._lost = True
        return self.reason

    def _after_thinking(self, text: str) -> str:
        """What of `text` follows a leading <think> block (`strip_thinking` removes it before parsing); "" while the
        block is open or may still begin."""
        self._head += text
        if not self._thinking:
            lead = self._head.lstrip()
            if _THINK_OPEN.startswith(lead):
                return ""
            if not lead.startswith(_THINK_OPEN):
                text, self._head = self._head, None
                return text
            self._thinking, self._head = True, lead[len(_THINK_OPEN):]
        end = self._head.find(_THINK_CLOSE)
        if end < 0:
            self._head = self._head[-len(_THINK_CLOSE):]  # enough to find a closing tag split across pieces
            return ""
        text, self._head = self._head[end + len(_THINK_CLOSE):], None
        return text

    def _read(self, char: str) -> None:
        if self._opening:
            if char.isspace():
                return
            self._opening = False
            if char == "{":  # the parser salvages "[{" item by item (_OBJECT_AHEAD); other "[" it reads past
                self._depth = self._list = 1
        if self._item is not None:
            self._item.append(char)
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif char == "\\":
                self._escaped = True
            elif char == '"':
                self._in_string = False
        elif char == '"':
            self._in_string = self._depth > 0  # quotes in prose around the JSON delimit nothing
        elif char == "[" and self._depth == 0:
            self._opening = True
        elif char in "[{":
            if char == "{" and self._depth == self._list:
                self._item = [char]
            self._depth += 1
        elif char in "]}" and self._depth > 0:  # a closer in prose closes nothing
            self._depth -= 1
            if self._item is not None and self._depth == self._list:
                self._read_item("".join(self._item))
                self._item = None
            elif self._depth == 0 and self._list is not None:
                self.reason = "closed"  # the parser takes this list and reads nothing after it

    def _read_item(self, text: str) -> None:
        try:
            value = _DECODER.decode(_remove_trailing_commas(text))
        except _DECODE_FAILURES:
            self._lost = True  # the parser's salvage stops at an object it cannot decode
            return
        pair, _ = _to_pair(value)
        if pair is None:
            return
        key = (fold(pair.instruction), fold(pair.output))
        if key in self._seen:
            self.reason = "repeat"
            return
        self._seen.add(key)
        self.pairs += 1
        if self.pairs >= self.max_pairs:
            self.reason = "max_pairs"


# ----------------------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------------------

_EXTRACTION_SYSTEM = (
    "You read text and write question-answer pairs about its facts, as a JSON list of "
    '{"instruction": question, "output": answer}. Output only the JSON list.'
)

# A worked example given as an earlier chat turn: small models follow a demonstrated turn far more reliably than
# a described format (measured on SmolLM2-135M: valid JSON on 4 of 4 chunks with it, 0 of 4 without). Small models
# also copy the example's content, so every name and value in it is one that no built-in stream uses: a copied
# pair never passes the grounding check by accident, and never teaches the fast weights a wrong fact.
_EXAMPLE_TEXT = ("Quill: My iguana Zorbo sleeps all day.\nBex: The tram was late again.\n"
                 "Quill: I work as a glazier in Hammerfest.")
_EXAMPLE_PAIRS = [
    QAPair("What is the name of Quill's iguana?", "Zorbo"),
    QAPair("What is Quill's job?", "glazier"),
    QAPair("Where does Quill work?", "Hammerfest"),
]

_ANSWER_SYSTEM = "Answer the question briefly, in a few words, using what you read and remember."
_SUMMARY_SYSTEM = "You keep short notes about a long text so that questions can be answered from the notes alone."


def _extraction_request(question: str, context: str, previous: list[QAPair] | None, max_pairs: int) -> str:
    # In conversation mode the question is not known while reading: ask for the facts likely to be asked.
    parts = [f"Question to answer later: {question}"] if question else []
    parts.append(f"Text:\n{context}")
    if previous:
        shown = previous[-MAX_PREVIOUS_SHOWN:]
        lines = "\n".join(json.dumps(p.to_dict(), ensure_ascii=False) for p in shown)
        parts.append(f"Pairs already written (do not repeat them):\n{lines}")
    parts.append(
        f"Write up to {max_pairs} question-answer pairs about facts in the text (names, numbers, dates, places) "
        + ("that would help answer the question. " if question else "that someone may ask about later. ")
        + "Copy each answer from the text. "
        'Output only a JSON list of {"instruction": ..., "output": ...}.'
    )
    return "\n\n".join(parts)


def extraction_messages(
    question: str,
    context: str,
    previous: list[QAPair] | None = None,
    max_pairs: int = 8,
    examples: bool = True,
) -> list[dict[str, str]]:
    """Chat messages asking for QA pairs from `context` that will help answer `question` later."""
    messages = [{"role": "system", "content": _EXTRACTION_SYSTEM}]
    if examples:
        example_answer = json.dumps([p.to_dict() for p in _EXAMPLE_PAIRS], ensure_ascii=False)
        messages += [
            {"role": "user", "content": _extraction_request("Where does Quill work?", _EXAMPLE_TEXT, None, max_pairs)},
            {"role": "assistant", "content": example_answer},
        ]
    messages.append({"role": "user", "content": _extraction_request(question, context, previous, max_pairs)})
    return messages


def reference_supervision(reference: Sequence[QAPair], window: str, written: Sequence[QAPair],
                          max_pairs: int) -> list[QAPair]:
    """The ideal extraction of `window`: the environment's reference pairs grounded in it that were not written
    before, at most `max_pairs`, in the environment's order (the asked pair first)."""
    fresh = [p for p in reference if p not in written]
    return grounded(fresh, window)[0][:max_pairs]


def grounded(pairs: list[QAPair], source: str) -> tuple[list[QAPair], list[dict[str, Any]]]:
    """Keep the pairs whose answer occurs in `source` (case and whitespace folded); the rest are dropped with a
    reason. Small models copy the prompt's example or invent answers; such pairs would teach the fast weights
    something the stream never said."""
    haystack = fold(source)
    kept, dropped = [], []
    for pair in pairs:
        if fold(pair.output) in haystack:
            kept.append(pair)
        else:
            dropped.append({"item": pair.to_dict(), "reason": "answer not in text"})
    return kept, dropped


def answer_messages(user_text: str) -> list[dict[str, str]]:
    """Chat messages for the final answer; `user_text` comes from `Environment.answer_prompt`."""
    return [{"role": "system", "content": _ANSWER_SYSTEM}, {"role": "user", "content": user_text}]


def summary_messages(question: str, notes: str, window: str, summary_tokens: int) -> list[dict[str, str]]:
    """Chat messages asking to rewrite running `notes` with the new text `window` (the summary-memory baseline,
    MemAgent-style); `question` may be empty when it is not known while reading."""
    focus = f"Question to answer later: {question}\n\n" if question else ""
    keep = ("every fact that may help answer the question" if question
            else "every fact someone may ask about later (names, dates, events, places)")
    budget_words = int(summary_tokens * 0.7)
    user = (f"{focus}Current notes:\n{notes or '(none yet)'}\n\nNew text:\n{window}\n\n"
            f"Rewrite the notes: keep {keep}, add the new ones from the new text, with their dates. "
            f"At most {budget_words} words. Output only the notes.")
    return [{"role": "system", "content": _SUMMARY_SYSTEM}, {"role": "user", "content": user}]
