"""A synthetic, seeded context-learning environment in the style of CL-Bench: learn something new from a long
document, then apply it.

Each task's document defines something that exists nowhere else, named with coined words so that a model cannot
know it beforehand, of one of four kinds (the task's category):

- ``product``: a rented appliance's rules: tier prices, delivery-zone surcharges, an express fee, a card
  discount with eligibility conditions, and the order in which they apply. Asked: the total price of an order.
- ``notation``: invented operator symbols with arithmetic meanings and a precedence rule. Asked: the value of an
  expression.
- ``units``: an invented measure (four units, their conversion factors, an exception for one material). Asked:
  an amount in the smallest unit.
- ``procedure``: a registry's staged procedure, each stage's form depending on the applicant. Asked: which forms
  an applicant files, in order.

The rules are single paragraphs scattered among many paragraphs of filler (history, marketing, unrelated
clauses) and of distractor rules: the same kind of rules for a sister item with a similar name and other values.
One chunk per paragraph. The question needs the rules applied, not copied: the gold answer is computed from them.

Scoring is by rubric checks (`metadata["rubrics"]`, checked by `check_rubric`): the answer's number (the last one
in the prediction), form codes it must name, their order, and distractor values or codes it must not use. The
reward is 1 when every rubric passes, else 0 (`rubric_all`); the fraction passed (`rubric_fraction`) is reported
too. CL-Bench's own data is not loaded: its licence forbids updating parameters on it, which is what fast weights
do.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Callable

from tmem_rl.envs import register_env
from tmem_rl.envs.base import Environment, Task
from tmem_rl.errors import InputError
from tmem_rl.metrics.qa import best_over_golds, exact_match, mean, token_f1
from tmem_rl.records import QAPair

KINDS = ("product", "notation", "units", "procedure")

# ---- rubric checks --------------------------------------------------------------------------------------------

# A number as models write one: an optional minus sign (ASCII or Unicode), an optional currency symbol, digits with
# optional thousands commas, an optional decimal part. Not inside a word or after a dot: the 7 of "K-7" is 7,
# not -7, and ".5" is no number.
_NUMBER = re.compile(r"(?<![\w.])(?P<sign>[-\u2212])?[$\u20ac\u00a3]?\s?(?P<int>\d{1,3}(?:,\d{3})+(?![\d,])|\d+)"
                     r"(?P<frac>\.\d+)?")


def extract_numbers(text: str) -> list[float]:
    """Every number in `text`, in order: "$1,234.50" -> 1234.5, "-12" -> -12.0, "42.50." -> 42.5."""
    numbers = []
    for match in _NUMBER.finditer(text):
        value = float(match["int"].replace(",", "") + (match["frac"] or ""))
        numbers.append(-value if match["sign"] else value)
    return numbers


def _pattern(text: str) -> re.Pattern:
    """`text` as a whole phrase, case folded, any punctuation or spacing between its letter and digit runs:
    "KD-42" matches "kd 42" and "KD42" but not "KD-421"."""
    runs = re.findall(r"[a-z0-9]+", text.lower())
    return re.compile(r"(?<![a-z0-9])" + r"[\W_]*".join(map(re.escape, runs)) + r"(?![a-z0-9])")


def _position(text: str, prediction: str) -> int | None:
    match = _pattern(text).search(prediction.lower())
    return match.start() if match else None


def _close(a: float, b: float, tolerance: float) -> bool:
    return abs(a - b) <= tolerance + 1e-9


def _check_number(rubric: dict[str, Any], prediction: str) -> bool:
    """The answer's number, the last one in the prediction, is `value` within `tolerance`."""
    numbers = extract_numbers(prediction)
    return bool(numbers) and _close(numbers[-1], rubric["value"], rubric.get("tolerance", 0.0))


def _check_contains(rubric: dict[str, Any], prediction: str) -> bool:
    """The prediction names `text`."""
    return _position(rubric["text"], prediction) is not None


def _check_order(rubric: dict[str, Any], prediction: str) -> bool:
    """The prediction names every one of `items`, first mentions in the given order."""
    positions = [_position(item, prediction) for item in rubric["items"]]
    return None not in positions and positions == sorted(positions) and len(set(positions)) == len(positions)


def _shape(text: str) -> re.Pattern:
    """Any phrase of the same form as `text`: its letter runs as runs of as many letters, its digit runs as any
    digits, case folded. The shape of "KD-42" matches "kd 7" and "AB-12", not "K-7" or "form"."""
    runs = [r"\d+" if run.isdigit() else f"[a-z]{{{len(run)}}}" for run in re.findall(r"[a-z]+|[0-9]+", text.lower())]
    return re.compile(r"(?<![a-z0-9])" + r"[\W_]*".join(runs) + r"(?![a-z0-9])")


def _check_absent(rubric: dict[str, Any], prediction: str) -> bool:
    """The prediction commits to an answer of the asked form, and it is not the distractor. For `value`: the
    answer's number (the last one, as `number` reads it) is not `value`; a worked answer may show the distractor
    on the way. For `text`: the prediction names at least one phrase shaped like `text` (a form code), and never
    `text` itself. An answer of no such form ("", "I don't know") passes no rubric."""
    if "value" in rubric:
        numbers = extract_numbers(prediction)
        return bool(numbers) and not _close(numbers[-1], rubric["value"], rubric.get("tolerance", 0.0))
    committed = _shape(rubric["text"]).search(prediction.lower()) is not None
    return committed and _position(rubric["text"], prediction) is None


RUBRIC_CHECKS: dict[str, Callable[[dict[str, Any], str], bool]] = {
    "number": _check_number,
    "contains": _check_contains,
    "order": _check_order,
    "absent": _check_absent,
}


def check_rubric(rubric: dict[str, Any], prediction: str) -> bool:
    """Whether `prediction` passes one rubric item ({"kind": one of RUBRIC_CHECKS, ...})."""
    check = RUBRIC_CHECKS.get(rubric.get("kind"))
    if check is None:
        raise ValueError(f"context_learning env: unknown rubric kind {rubric.get('kind')!r}; known: "
                         f"{', '.join(RUBRIC_CHECKS)}")
    return check(rubric, prediction)


# ---- vocabulary -----------------------------------------------------------------------------------------------

# Coined names are joined from these syllables, which rarely make an English word or a real name.
SYLLABLES = (
    "vas", "kor", "tel", "mir", "qua", "zen", "dro", "lix", "bran", "sol", "vek", "nal", "tor", "wim", "pex",
    "gal", "rud", "fen", "oss", "lum", "tra", "kel", "yor", "bex", "dun", "phi", "zar", "mol", "ruv", "sen",
    "tav", "ilk", "orn", "ech", "ulm", "quin", "hesk", "jov", "pry", "sark",
)
PRODUCT_NOUNS = (
    "countertop fermenter", "window-cleaning drone", "heated bicycle locker", "portable sauna cabin",
    "smart beehive", "snow-melting doormat", "self-watering planter wall", "solar bread oven", "mobile darkroom",
    "garden weather mast", "noise-dampening tent", "rooftop rain harvester",
)
MAKER_SUFFIXES = ("Works", "Appliances", "Rentals", "Home Systems", "Collective", "Instruments")
THINGS = (
    "houseboat", "market stall", "beehive colony", "delivery drone", "rooftop garden", "vintage tractor",
    "weather station", "food cart", "fishing skiff", "street organ", "glasshouse", "canal barge",
)
MATERIALS = ("salt", "wool", "barley", "copper", "tea", "river clay", "dried fish", "lamp oil", "flax", "honey")
SYMBOLS = ("#", "@", "&", "\u2295", "\u2297", "\u229b", "\u25c7", "\u2605", "\u2021", "\u00a7")
COLOURS = ("slate grey", "moss green", "brick red", "sand yellow", "harbour blue", "plum", "chalk white")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth")
CODE_LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"

# Arithmetic meanings of an invented operator: id -> (what "a OP b means ...", value). {k}: the operator's constant.
MEANINGS: dict[str, tuple[str, Callable[[int, int, int], int]]] = {
    "scale_add": ("{k} times a, plus b", lambda a, b, k: k * a + b),
    "mul_sub": ("a times b, minus {k}", lambda a, b, k: a * b - k),
    "add_scale": ("the sum of a and b, times {k}", lambda a, b, k: (a + b) * k),
    "square_sub": ("a times a, minus b", lambda a, b, k: a * a - b),
    "max_add": ("the larger of a and b, plus {k}", lambda a, b, k: max(a, b) + k),
    "diff_scale": ("the larger of a and b minus the smaller, times {k}", lambda a, b, k: abs(a - b) * k),
    "add_mul": ("a plus {k} times b", lambda a, b, k: a + k * b),
}

# Filler states no rule: {name} is the task's item, {other} its sister, both as running text ("the Vaskortel").
GENERIC_FILLER = (
    "Much has been written about {name}, and not all of it is accurate.",
    "{person} once gave a long talk about {name} at a small gathering in {place}.",
    "A collector in {place} claims to own the oldest surviving record of {name}.",
    "Nobody remembers exactly who first suggested {name}, though {person} is often credited.",
    "Visitors from {place} sometimes ask whether {name} and {other} are the same thing; they are not.",
    "In {year}, a short article in a regional newsletter described {name} in glowing terms.",
    "Opinions about {name} differ, but most people who know it well are fond of it.",
    "{person} keeps a scrapbook of newspaper clippings that mention {name}.",
    "Several students have written essays comparing {name} with {other}.",
    "The archive in {place} holds {n} boxes of letters about {name}, most of them unread.",
    "A radio programme in {year} spent almost an hour on {name} and its history.",
    "It is said that {person} first heard of {name} on a rainy afternoon in {place}.",
    "Some of the early enthusiasm for {name} faded, but a loyal following remained.",
    "Teachers in {place} occasionally use {name} as an example in their lessons.",
    "A short documentary filmed in {place} in {year} mentions {name} in passing.",
    "{person} wrote in a letter that {name} was the most sensible idea of the decade.",
    "There is a small museum in {place} with a display about {name} and {other}.",
    "Critics have argued that {name} is more complicated than it needs to be.",
    "Supporters reply that {name} is simple once the first few days are over.",
    "The weather in {place} was unusually mild in the year {name} became widely known.",
    "A choir in {place} once sang a humorous song about {name} at a harvest fair.",
    "{person} and {person2} disagreed for years about how {name} should be described.",
    "Writings about {name} have been translated into at least {n} languages.",
    "The first printed guide to {name} had a green cover and ran to {n} pages.",
    "Most of the stories told about {name} cannot be checked, but they are told anyway.",
    "Librarians in {place} report that books about {name} are borrowed more often in winter.",
    "A painting in a cafe in {place} shows {person} explaining {name} to a small crowd.",
    "Whatever its origins, {name} is now part of everyday life for many people in {place}.",
    "{person2} still remembers the first time {person} mentioned {name} over dinner.",
    "A travelling theatre group from {place} once staged a comedy about {name}.",
    "Nothing in this handbook limits any right a reader may have under the customs of {place}.",
    "Complaints about this handbook should be sent in writing to the office in {place}.",
    "Corrections to earlier editions of this handbook were collected by {person} in {year}.",
    "This edition replaces the one printed in {year}; the older one should be recycled.",
    "The publisher thanks {person} and {person2} for reading early drafts of these pages.",
    "Quotations in this handbook are reproduced with the kind permission of their authors.",
)
FILLER = {
    "product": (
        "{maker} began making {noun}s in {year}, in a rented workshop in {place}.",
        "The first model of {name} was assembled by hand by {person}, who still keeps the prototype.",
        "Advertisements for {name} promise a calmer home and fewer chores.",
        "Customers in {place} describe {name} as quiet, sturdy and easy to clean.",
        "{maker} once sponsored a cycling race through {place} to make {name} better known.",
        "Every unit of {name} carries a {n}-year warranty against defects in its materials.",
        "Spare parts for {name} are stocked at {n} service points across the region.",
        "The casing of {name} comes in {colour} or {colour2}.",
        "{other} was the maker's first attempt at a {noun} and is still rented in some regions.",
        "A review in {year} called {name} the {noun} that finally works.",
        "{person}, who designs the packaging for {name}, insists on recycled cardboard.",
        "The user manual of {name} runs to {n} pages, most of them diagrams.",
        "Rented units of {name} must be returned clean, with all their accessories.",
        "Cancelled orders of {name} are handled by the customer office in {place}.",
        "{name} won a design prize in {place} in {year}.",
        "A software update for {name} is released every spring.",
        "The marketing slogan of {name} was written by {person} in a single afternoon.",
        "{maker} plans to open a showroom for {name} in {place}.",
        "Technicians say that {name} is easier to repair than {other}.",
        "Returns of {name} are collected on weekday mornings only.",
        "The power cable of {name} is {n} metres long, enough for most rooms.",
    ),
    "notation": (
        "{person} first wrote down {name} in {year}, on the back of a shopping list in {place}.",
        "Schoolchildren in {place} learn {name} as a game before they learn it as arithmetic.",
        "The symbols of {name} were chosen because they were easy to draw with a stick in sand.",
        "Bookkeepers in {place} used {name} for a few decades before it fell out of fashion.",
        "A society devoted to {name} meets in {place} on the first Sunday of every month.",
        "{person} published a slim book of puzzles written in {name} in {year}.",
        "Many people find {name} confusing at first and natural after a week.",
        "{other} is an older cousin of {name}, and the two are easily mixed up.",
        "Printers in {place} had to cast special type to print {name}.",
        "A crossword in a newspaper in {place} once used {name} for its clues.",
        "Mathematicians consider {name} a curiosity rather than a tool.",
        "Some players of board games in {place} keep score in {name}.",
        "An exhibition in {year} displayed {n} old slates covered in {name}.",
        "The rules of {name} fit on a single card, which {person} carried in a coat pocket.",
        "{person2} once tried to teach {name} to a parrot, with mixed results.",
    ),
    "units": (
        "Traders in {place} used {name} long before coins were common.",
        "{name} was settled in {year} after a dispute between merchants of {place} and {place2}.",
        "The old brass weights of {name} are kept in a locked cabinet in {place}.",
        "{person} spent years collecting scales that were marked in {name}.",
        "Market inspectors in {place} still check scales marked in {name} every spring.",
        "{other} is used in the hill villages, and the two are often confused.",
        "Children in {place} learn the words of {name} from a counting rhyme.",
        "Some recipes from {place} still give their quantities in {name}.",
        "A stone in the square of {place} is carved with the words of {name}.",
        "Farmers near {place} sell their harvest by {name} out of habit.",
        "{person} wrote the first printed table of {name} in {year}.",
        "The {big} gets its name, some say, from an old word for a full basket.",
        "Tax collectors in {place} once refused any weight not given in {name}.",
        "{person2} still weighs the morning bread in {name}, to the amusement of the neighbours.",
    ),
    "procedure": (
        "{name} was set up in {year} to keep track of every {thing} in the region.",
        "The offices of {name} in {place} are open on weekday mornings.",
        "{person} has led {name} for {n} years and is known for answering letters by hand.",
        "Queues at {name} are shortest on Tuesday afternoons, according to regulars.",
        "{name} keeps its paper records in a converted warehouse in {place}.",
        "Staff of {name} wear green badges so that visitors can find them easily.",
        "{other}, which serves a different region, uses its own forms and codes.",
        "A {thing} registered with {name} receives a brass plate with its number.",
        "Most applicants find the forms of {name} shorter than they feared.",
        "{name} publishes a yearly report on how many applications it received.",
        "The waiting room of {name} has a small library of books about {place}.",
        "Applicants may bring a friend or relative to the counter of {name}.",
        "The stamps used by {name} are designed by {person} and change every {n} years.",
        "{person2} once waited a whole afternoon at {name}, only to find the office closed for a holiday.",
    ),
}
FILLER_SENTENCES = (4, 7)  # sentences per filler paragraph
# The last line of every answer prompt: a short answer that the rubric checks can read (a number's rubric reads the
# last number in the prediction).
ANSWER_FORMATS = {
    "product": "Write only the total price in dollars, as a number.",
    "notation": "Write only the value, as a number.",
    "units": "Write only the number.",
    "procedure": "Write only the form codes, in the order they are filed, separated by commas.",
}


# ---- generation ------------------------------------------------------------------------------------------------


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def _count(n: int, unit: str) -> str:
    return f"{n} {unit}" if n == 1 else f"{n} {unit}s"


def _money(value: Decimal) -> str:
    return f"${value:,.2f}"


def _cents(value: Decimal) -> Decimal:
    return value.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


class _Namer:
    """Fresh coined words for one task: no word contains another, so that every name is told apart."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.words: list[str] = []
        self.syllables: dict[str, tuple[str, ...]] = {}

    def _take(self, parts: tuple[str, ...]) -> str | None:
        word = "".join(parts)
        if any(word in w or w in word for w in self.words):
            return None
        self.words.append(word)
        self.syllables[word] = parts
        return word

    def word(self, syllables: tuple[int, ...] = (2, 2, 3)) -> str:
        while True:
            word = self._take(tuple(self.rng.sample(SYLLABLES, self.rng.choice(syllables))))
            if word:
                return word.capitalize()

    def sibling(self, word: str) -> str:
        """A word like `word`, its last syllable swapped: the name of a look-alike."""
        parts = self.syllables[word.lower()]
        while True:
            sibling = self._take(parts[:-1] + (self.rng.choice([s for s in SYLLABLES if s != parts[-1]]),))
            if sibling:
                return sibling.capitalize()

    def person(self) -> str:
        return f"{self.word((2,))} {self.word((2, 3))}"


@dataclass
class _Spec:
    """One task's content before it is laid out as a document."""

    name: str  # the item as running text: "the Vaskortel", "the Velmor notation"
    other: str  # its sister, with a look-alike name
    intro: str
    rules: list[str]  # the item's rules, one paragraph each
    distractors: list[str]  # the sister's rules, one paragraph each
    question: str
    answer: str
    rubrics: list[dict[str, Any]]
    pairs: list[QAPair]  # grounded in the rules: every answer occurs in its rule's sentence
    rules_meta: dict[str, Any]  # the item's rule values
    distractor_meta: dict[str, Any]  # the sister's rule values
    situation: dict[str, Any]  # what the question gives
    slots: dict[str, str] = field(default_factory=dict)  # further filler slots (maker, noun, thing, big)


def _distinct(question: str, gold: float, candidates: list[float]) -> bool:
    """Whether the wrong answers are told apart from the gold and from the question's own numbers (which an
    answer may repeat)."""
    taken = [gold, *extract_numbers(question)]
    return all(not any(_close(c, t, 0.01) for t in taken) for c in candidates) and \
        len({round(c, 2) for c in candidates}) == len(candidates)


@register_env("context_learning")
class ContextLearningEnv(Environment):
    """Long seeded documents that define something new, each with a question that needs its rules applied;
    deterministic in (seed, index).

    num_tasks: tasks held. doc_words: words per document, about (filler is added until it is reached; the default
    makes 13.4k-16.6k SmolLM2 tokens, past the default L_max). kinds: the kinds used, in turn by task index. seed:
    with the task index, seeds each document.
    """

    name = "context_learning"
    default_l_max = 12288  # the paper's context-learning budget
    summary_columns = ("rubric_all", "rubric_fraction")
    KINDS = KINDS
    MIN_DOC_WORDS = 1000  # room for any kind's rules and distractors (tests/test_context_learning.py checks)
    MAX_DOC_WORDS = 1_000_000
    MAX_TASKS = 2**31  # len() takes at most a 63-bit count

    def __init__(self, *, num_tasks: int = 256, doc_words: int = 10_000, kinds: list[str] | None = None,
                 seed: int = 0):
        for arg, value, low, high in (
            ("num_tasks", num_tasks, 1, self.MAX_TASKS),
            ("doc_words", doc_words, self.MIN_DOC_WORDS, self.MAX_DOC_WORDS),
            ("seed", seed, None, None),
        ):
            if not isinstance(value, int) or isinstance(value, bool):
                raise InputError(f"context_learning env: {arg} must be an integer, got {value!r}")
            if (low is not None and value < low) or (high is not None and value > high):
                why = " (room for the rules and their distractors)" if arg == "doc_words" else ""
                raise InputError(f"context_learning env: {arg} must be between {low} and {high}{why}, got "
                                 f"{value!r}")
        if kinds is None:
            kinds = list(KINDS)
        if not isinstance(kinds, (list, tuple)) or not kinds or not all(isinstance(k, str) for k in kinds):
            raise InputError(f"context_learning env: kinds must be a non-empty list of kind names from "
                             f"{', '.join(KINDS)}, got {kinds!r}")
        unknown = [k for k in kinds if k not in KINDS]
        if unknown or len(set(kinds)) != len(kinds):
            problem = f"unknown kind(s) {', '.join(map(repr, unknown))}" if unknown else "a kind named twice"
            raise InputError(f"context_learning env: kinds has {problem}; expected distinct names from "
                             f"{', '.join(KINDS)}")
        self.num_tasks = num_tasks
        self.doc_words = doc_words
        self.kinds = tuple(kinds)
        self.seed = seed

    def __len__(self) -> int:
        return self.num_tasks

    def task(self, index: int) -> Task:
        if not 0 <= index < self.num_tasks:
            raise IndexError(f"context_learning env: task index {index} out of range [0, {self.num_tasks})")
        kind = self.kinds[index % len(self.kinds)]  # kinds in turn, so any prefix of the tasks mixes them
        # String seeds hash through SHA-512, so each (seed, index) gets its own document, independent of call order.
        rng = random.Random(f"context_learning:{self.seed}:{index}:{kind}")
        namer = _Namer(rng)
        spec = getattr(self, f"_{kind}")(rng, namer)  # drawn before the filler: doc_words changes no rule
        chunks, rule_chunks, distractor_chunks = self._document(rng, namer, spec, kind)
        return Task(
            task_id=f"context_learning-{self.seed}-{index}",
            question=spec.question,
            chunks=chunks,
            answers=(spec.answer,),
            reference_pairs=tuple(spec.pairs),
            metadata={
                "index": index,
                "category": kind,
                "rubrics": spec.rubrics,
                "rules": spec.rules_meta,
                "distractor_rules": spec.distractor_meta,
                "situation": spec.situation,
                "subject": spec.name,
                "distractor": spec.other,
                "rule_chunks": rule_chunks,
                "distractor_chunks": distractor_chunks,
                "num_chunks": len(chunks),
                "num_words": sum(len(c.split()) for c in chunks),
            },
        )

    def score(self, task: Task, prediction: str) -> dict[str, float]:
        # The reward is all-or-nothing: a wrong number still passes the "absent" rubrics of distractors it
        # avoids, so the fraction has a floor that any committed answer reaches; it is kept as a diagnostic.
        passed = [check_rubric(r, prediction) for r in task.metadata["rubrics"]]
        strict = float(all(passed))
        return {
            "reward": strict,
            "f1": best_over_golds(token_f1, prediction, task.answers),
            "em": best_over_golds(exact_match, prediction, task.answers),
            "rubric_all": strict,
            "rubric_fraction": sum(passed) / len(passed),
        }

    def summarize(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        scored = [r for r in records if "rubric_all" in r]
        categories = sorted({str(r.get("category")) for r in scored})
        summary: dict[str, Any] = {}
        for key in ("rubric_all", "rubric_fraction"):
            summary[key] = mean([float(r[key]) for r in scored])
            summary[f"{key}_by_category"] = {
                c: mean([float(r[key]) for r in scored if str(r.get("category")) == c]) for c in categories}
        return summary

    def answer_prompt(self, question: str, context: str, task: Task | None = None) -> str:
        prompt = super().answer_prompt(question, context, task)
        if task is None:  # one extracted pair's question: the plain shape
            return prompt
        return f"{prompt}\n{ANSWER_FORMATS[task.metadata['category']]}"

    # ---- the document -----------------------------------------------------------------------------------------

    def _document(self, rng: random.Random, namer: _Namer, spec: _Spec, kind: str
                  ) -> tuple[tuple[str, ...], list[int], list[int]]:
        """Intro first, then the rule, distractor and filler paragraphs shuffled together; filler is added until
        the document holds `doc_words` words. Returns the chunks and where the rules and distractors landed."""
        people = [namer.person() for _ in range(8)]
        places = [namer.word() for _ in range(6)]
        pool = FILLER[kind] + GENERIC_FILLER

        def filler(templates) -> list[str]:  # each sentence with its own people, places and numbers
            sentences = []
            for template in templates:
                person, person2 = rng.sample(people, 2)
                place, place2 = rng.sample(places, 2)
                colour, colour2 = rng.sample(COLOURS, 2)
                slots = {"name": spec.name, "other": spec.other, "person": person, "person2": person2,
                         "place": place, "place2": place2, "year": rng.randint(1850, 2015), "n": rng.randint(2, 40),
                         "colour": colour, "colour2": colour2, **spec.slots}
                sentences.append(_sentence(template.format(**slots)))
            return sentences

        def padded(rule: str) -> str:  # a rule with a sentence of filler before it, after it, or both
            before, after = filler(rng.sample(pool, 2))
            return " ".join(rng.choice(([before, rule], [rule, after], [before, rule, after])))

        body = [("rule", i, padded(r)) for i, r in enumerate(spec.rules)]
        body += [("distractor", i, padded(r)) for i, r in enumerate(spec.distractors)]
        words = len(spec.intro.split()) + sum(len(p.split()) for _, _, p in body)
        while words < self.doc_words:
            paragraph = " ".join(filler(rng.sample(pool, rng.randint(*FILLER_SENTENCES))))
            body.append(("filler", -1, paragraph))
            words += len(paragraph.split())
        rng.shuffle(body)
        chunks = (spec.intro, *(p for _, _, p in body))
        where = {(role, i): n for n, (role, i, _) in enumerate(body, start=1)}
        rule_chunks = [where["rule", i] for i in range(len(spec.rules))]
        distractor_chunks = [where["distractor", i] for i in range(len(spec.distractors))]
        return chunks, rule_chunks, distractor_chunks

    # ---- the four kinds ---------------------------------------------------------------------------------------

    def _product(self, rng: random.Random, namer: _Namer) -> _Spec:
        word = namer.word()
        name, other = f"the {word}", f"the {namer.sibling(word)}"
        noun = rng.choice(PRODUCT_NOUNS)
        maker = f"{namer.word()} {rng.choice(MAKER_SUFFIXES)}"
        tiers = [namer.word((2,)) for _ in range(3)]
        home, *zones = [namer.word((2,)) for _ in range(3)]
        card = namer.word((2, 3))

        def draw(avoid: dict[str, Any] | None) -> dict[str, Any]:
            while True:
                rules = {
                    "tiers": {t: str(Decimal(rng.randint(40, 380)) / 4) for t in tiers},
                    "surcharges": {home: 0, **dict(zip(zones, rng.sample(range(3, 26), 2)))},
                    "express_fee": str(Decimal(rng.randint(8, 60)) / 2),
                    "discount": {"card": card, "min_units": rng.randint(3, 10),
                                 "percent": rng.choice((5, 8, 10, 12, 15, 20, 25))},
                }
                if avoid is None or all(rules["tiers"][t] != avoid["tiers"][t] for t in tiers) and \
                        rules["express_fee"] != avoid["express_fee"]:
                    return rules

        rules = draw(None)
        sister = draw(rules)
        sister["surcharges"] = {home: 0, **{z: p + rng.choice((-2, -1, 1, 2, 3)) for z, p in
                                            rules["surcharges"].items() if z != home}}
        while True:
            situation = {"tier": rng.choice(tiers), "units": rng.randint(2, 12), "months": rng.randint(2, 12),
                         "zone": rng.choice([home, *zones]), "express": rng.random() < 0.5,
                         "card": rng.random() < 0.6}
            total, eligible = product_total(rules, situation)
            # The wrong answers a reader gets from the sister's rules, or from getting eligibility wrong.
            wrong = [product_total(sister, situation)[0], product_total(rules, situation, discount=not eligible)[0]]
            question = self._product_question(name, card, situation)
            if _distinct(question, float(total), [float(w) for w in wrong]):
                break

        def rule_text(r: dict[str, Any], item: str) -> tuple[list[str], list[QAPair]]:
            texts, pairs = [], []
            for tier, price in r["tiers"].items():
                price = _money(Decimal(price))
                texts.append(rng.choice((
                    f"The {tier} tier of {item} rents for {price} per unit per month.",
                    f"Renting one unit of {item} in the {tier} tier costs {price} per unit per month.",
                )))
                pairs.append(QAPair(f"What is the monthly price per unit of the {tier} tier of {item}?", price))
            for zone, percent in r["surcharges"].items():
                if percent:
                    texts.append(f"Deliveries of {item} to the {zone} zone carry a surcharge of {percent}% of the "
                                 f"rental subtotal.")
                    pairs.append(QAPair(f"What surcharge applies to deliveries of {item} to the {zone} zone?",
                                        f"{percent}%"))
                else:
                    texts.append(f"Deliveries of {item} within the {zone} zone carry no surcharge at all.")
                    pairs.append(QAPair(f"What surcharge applies to deliveries of {item} within the {zone} zone?",
                                        "no surcharge"))
            fee = _money(Decimal(r["express_fee"]))
            texts.append(f"Express servicing of {item} adds a flat {fee} per unit to the order, charged once "
                         f"however long the rental.")
            pairs.append(QAPair(f"What does express servicing of {item} cost?", f"{fee} per unit"))
            d = r["discount"]
            texts.append(f"Holders of a {d['card']} card who rent at least {d['min_units']} units of {item} in one "
                         f"order get {d['percent']}% off the order total; nobody else gets this discount.")
            pairs += [QAPair(f"What discount do holders of a {d['card']} card get on {item}?", f"{d['percent']}%"),
                      QAPair(f"How many units of {item} must a {d['card']} card holder rent for the discount?",
                             f"at least {d['min_units']} units")]
            return texts, pairs

        texts, pairs = rule_text(rules, name)
        texts.append(f"For {name}, the order total is the rental subtotal (units times monthly price times months) "
                     f"plus the zone surcharge and any express fee; the card discount, when it applies, is taken "
                     f"last, from that sum, and the total is rounded to the nearest cent only at the end.")
        pairs.append(QAPair(f"When is the card discount on {name} taken?", "taken last"))
        distractors, _ = rule_text(sister, other)
        return _Spec(
            name=name, other=other,
            intro=_sentence(f"{name} is a {noun} made by {maker} and rented out by the unit. This handbook "
                            f"gathers its rental rules, scattered among notes on its history, its makers and its "
                            f"customers. It also mentions {other}, an older {noun} from the same maker, whose "
                            f"rules are different."),
            rules=texts, distractors=distractors, question=question, answer=_money(total),
            rubrics=[
                {"kind": "number", "value": float(total), "tolerance": 0.01, "description": "the total price"},
                {"kind": "absent", "value": float(wrong[0]), "tolerance": 0.01,
                 "description": f"no rule of {other} used"},
                {"kind": "absent", "value": float(wrong[1]), "tolerance": 0.01,
                 "description": "the card discount taken only when the order is eligible"},
            ],
            pairs=pairs, rules_meta=rules, distractor_meta=sister, situation=situation,
            slots={"maker": maker, "noun": noun},
        )

    @staticmethod
    def _product_question(name: str, card: str, s: dict[str, Any]) -> str:
        holds = "holds" if s["card"] else "does not hold"
        express = "with" if s["express"] else "without"
        return (f"A customer who {holds} a {card} card rents {s['units']} units of the {s['tier']} tier of {name} "
                f"for {s['months']} months, delivered to the {s['zone']} zone, {express} express servicing. What "
                f"is the total price of the order in dollars?")

    def _notation(self, rng: random.Random, namer: _Namer) -> _Spec:
        word = namer.word()
        name, other = f"the {word} notation", f"the {namer.sibling(word)} notation"
        # All drawn again until the answers differ: some pairs of meanings give the same value in either order
        # (k*a + b, then a + k'*b), and then precedence could never matter.
        while True:
            symbols = rng.sample(SYMBOLS, 3)
            meanings = rng.sample(sorted(MEANINGS), 3)
            ops = {s: {"meaning": m, "k": rng.randint(2, 5)} for s, m in zip(symbols, meanings)}
            sister_ops = {}
            for s in symbols:
                choices = [(m, k) for m in sorted(MEANINGS) for k in range(2, 6)
                           if (m, k) != (ops[s]["meaning"], ops[s]["k"])
                           and not (m == "square_sub" and ops[s]["meaning"] == "square_sub")]
                m, k = rng.choice(choices)
                sister_ops[s] = {"meaning": m, "k": k}
            first = rng.choice(symbols)
            rules = {"operators": ops, "first": first}
            sister = {"operators": sister_ops, "first": None}
            x, y, z = (rng.randint(2, 9) for _ in range(3))
            left = rng.choice([s for s in symbols if s != first])
            expression = [x, left, y, first, z]
            question = f"In {name}, what is the value of {x} {left} {y} {first} {z}?"
            gold = notation_value(rules, expression)
            wrong = [notation_value(sister, expression), notation_value({**rules, "first": None}, expression)]
            if _distinct(question, gold, wrong):
                break

        def rule_text(operators: dict[str, Any], item: str) -> tuple[list[str], list[QAPair]]:
            texts, pairs = [], []
            for s, op in operators.items():
                meaning = MEANINGS[op["meaning"]][0].format(k=op["k"])
                a, b = rng.randint(2, 9), rng.randint(2, 9)
                example = MEANINGS[op["meaning"]][1](a, b, op["k"])
                texts.append(f"In {item}, a {s} b means {meaning}. For example, {a} {s} {b} = {example}.")
                pairs.append(QAPair(f"In {item}, what does a {s} b mean?", meaning))
            return texts, pairs

        texts, pairs = rule_text(ops, name)
        texts.append(f"In {name}, when an expression mixes operators without brackets, {first} is always worked out "
                     f"first, and the rest from left to right.")
        pairs.append(QAPair(f"In {name}, which operator is worked out first?", f"{first} is always worked out first"))
        distractors, _ = rule_text(sister_ops, other)
        distractors.append(f"{_sentence(other)} has no precedence of its own: every expression in it is worked out "
                           f"strictly from left to right.")
        return _Spec(
            name=name, other=other,
            intro=_sentence(f"{name} is a way of writing small sums with symbols of its own. This handbook describes "
                            f"its symbols among notes on where it came from and who used it. {_sentence(other)}, "
                            f"which gives the same symbols other meanings, comes up along the way."),
            rules=texts, distractors=distractors, question=question, answer=str(gold),
            rubrics=[
                {"kind": "number", "value": gold, "tolerance": 0.0, "description": "the value of the expression"},
                {"kind": "absent", "value": wrong[0], "tolerance": 0.0,
                 "description": f"no meaning from {other} used"},
                {"kind": "absent", "value": wrong[1], "tolerance": 0.0,
                 "description": f"{first} worked out first"},
            ],
            pairs=pairs, rules_meta=rules, distractor_meta=sister, situation={"expression": expression},
        )

    def _units(self, rng: random.Random, namer: _Namer) -> _Spec:
        word = namer.word()
        name, other = f"the {word} measure", f"the {namer.sibling(word)} measure"
        def unit() -> str:  # a word whose plural is the word and "s"
            while True:
                word = namer.word((1, 2)).lower()
                if word[-1] not in "sxzh":
                    return word

        units = [unit() for _ in range(4)]  # largest first
        material = rng.choice(MATERIALS)
        big, mid, small, tiny = units

        def draw(avoid: dict[str, Any] | None) -> dict[str, Any]:
            while True:
                factors = [rng.randint(3, 12), rng.randint(3, 16), rng.randint(2, 12)]
                special = rng.choice([f for f in range(3, 15) if f != factors[0]])
                if avoid is None or all(a != b for a, b in zip(factors, avoid["factors"])) and \
                        special != avoid["special"]["factor"]:
                    return {"units": units, "factors": factors, "special": {"material": material, "factor": special}}

        rules = draw(None)
        sister = draw(rules)
        while True:
            a, b, _ = rules["factors"]
            amounts = [rng.randint(2, 9), rng.randint(1, a - 1), rng.randint(1, b - 1)]
            asked = material if rng.random() < 0.5 else rng.choice([m for m in MATERIALS if m != material])
            p, q, r = amounts
            question = (f"In {name}, how many {tiny}s are there in {_count(p, big)}, {_count(q, mid)} and "
                        f"{_count(r, small)} of {asked}?")
            gold = units_value(rules, amounts, asked)
            flipped = {**rules, "special": {"material": material, "factor": rules["factors"][0]}} \
                if asked == material else {**rules, "factors": [rules["special"]["factor"], *rules["factors"][1:]]}
            wrong = [units_value(sister, amounts, asked), units_value(flipped, amounts, asked)]
            if _distinct(question, gold, wrong):
                break

        def rule_text(r: dict[str, Any], item: str, where: str) -> tuple[list[str], list[QAPair]]:
            a, b, c = r["factors"]
            special = r["special"]["factor"]
            texts = [
                f"In {item}{where}, one {big} is {a} {mid}s.",
                f"In {item}{where}, a {mid} is made up of {b} {small}s.",
                f"In {item}{where}, one {small} equals {c} {tiny}s.",
                f"When {material} is weighed in {item}{where}, a {big} is reckoned as {special} {mid}s instead, an "
                f"old custom of the {material} trade; every other unit keeps its usual size.",
            ]
            pairs = [
                QAPair(f"In {item}, how many {mid}s are in one {big}?", f"{a} {mid}s"),
                QAPair(f"In {item}, how many {small}s make up a {mid}?", f"{b} {small}s"),
                QAPair(f"In {item}, how many {tiny}s does one {small} equal?", f"{c} {tiny}s"),
                QAPair(f"In {item}, how many {mid}s is a {big} of {material}?", f"{special} {mid}s"),
            ]
            return texts, pairs

        texts, pairs = rule_text(rules, name, "")
        distractors, _ = rule_text(sister, other, ", used in the hill villages")
        return _Spec(
            name=name, other=other,
            intro=_sentence(f"{name} is an old way of weighing goods, with four units of its own: the {big}, the "
                            f"{mid}, the {small} and the {tiny}. This handbook records how they relate, among "
                            f"notes on the trades that used them. {_sentence(other)}, which uses the same words "
                            f"for other sizes, is described too."),
            rules=texts, distractors=distractors, question=question, answer=str(gold),
            rubrics=[
                {"kind": "number", "value": gold, "tolerance": 0.0, "description": f"the amount in {tiny}s"},
                {"kind": "absent", "value": wrong[0], "tolerance": 0.0,
                 "description": f"no factor of {other} used"},
                {"kind": "absent", "value": wrong[1], "tolerance": 0.0,
                 "description": f"the {material} exception applied only to {material}"},
            ],
            pairs=pairs, rules_meta=rules, distractor_meta=sister,
            situation={"amounts": amounts, "material": asked}, slots={"big": big},
        )

    def _procedure(self, rng: random.Random, namer: _Namer) -> _Spec:
        word = namer.word()
        name, other = f"the {word} Registry", f"the {namer.sibling(word)} Registry"
        thing = rng.choice(THINGS)
        region = namer.word()
        person = namer.person()
        situation = {"resident": rng.random() < 0.5, "commercial": rng.random() < 0.5,
                     "weight": rng.randint(20, 900), "renewal": rng.random() < 0.5, "age": rng.randint(18, 80)}
        codes: set[str] = set()

        def code() -> str:
            while True:
                new = f"{rng.choice(CODE_LETTERS)}{rng.choice(CODE_LETTERS)}-{rng.randint(2, 99)}"
                if new not in codes:
                    codes.add(new)
                    return new

        def threshold(attribute: str) -> int:  # never the applicant's own value: the condition is never a tie
            low, high = (50, 850) if attribute == "weight" else (21, 75)
            return rng.choice([t for t in range(low, high) if t != situation[attribute]])

        stages: list[dict[str, Any]] = [{"stage": 1, "condition": None, "form": code(), "otherwise": None}]
        for n, attribute in enumerate(rng.sample(("resident", "commercial", "weight", "renewal", "age"), 4), start=2):
            condition = {"attribute": attribute}
            if attribute in ("weight", "age"):
                condition["threshold"] = threshold(attribute)
            stages.append({"stage": n, "condition": condition, "form": code(),
                           "otherwise": code() if rng.random() < 0.5 else None})
        sister_stages = [{**s, "form": code(), "otherwise": s["otherwise"] and code()} for s in stages]
        rules, sister = {"stages": stages}, {"stages": sister_stages}
        gold = procedure_forms(rules, situation)
        wrong_branch = [s["otherwise"] if applies(s["condition"], situation) else s["form"] for s in stages[1:]]
        wrong_branch = [c for c in wrong_branch if c]
        sister_applied = procedure_forms(sister, situation)

        def who(condition: dict[str, Any]) -> str:
            return {
                "resident": f"applicants who live in {region}",
                "commercial": f"applicants whose {thing} will be used commercially",
                "weight": f"applicants whose {thing} weighs more than {condition.get('threshold')} kilograms",
                "renewal": "applicants renewing an earlier registration",
                "age": f"applicants under {condition.get('threshold')} years of age",
            }[condition["attribute"]]

        def rule_text(stage_list: list[dict[str, Any]], item: str) -> tuple[list[str], list[QAPair]]:
            texts, pairs = [], []
            for s in stage_list:
                at = f"At the {ORDINALS[s['stage'] - 1]} stage of an application to {item}"
                if s["condition"] is None:
                    texts.append(f"Every application to {item} opens with its first stage, at which the applicant "
                                 f"files form {s['form']}.")
                    pairs.append(QAPair(f"Which form is filed at the first stage of an application to {item}?",
                                        f"form {s['form']}"))
                elif s["otherwise"]:
                    texts.append(f"{at}, {who(s['condition'])} file form {s['form']}; everyone else files form "
                                 f"{s['otherwise']}.")
                    pairs += [QAPair(f"{at}, which form do {who(s['condition'])} file?", f"form {s['form']}"),
                              QAPair(f"{at}, which form does everyone else file?", f"form {s['otherwise']}")]
                else:
                    texts.append(f"{at}, only {who(s['condition'])} file a form, form {s['form']}; everyone else "
                                 f"skips this stage.")
                    pairs.append(QAPair(f"{at}, which form do {who(s['condition'])} file?", f"form {s['form']}"))
            return texts, pairs

        texts, pairs = rule_text(stages, name)
        last = ORDINALS[len(stages) - 1]
        texts.append(f"The stages of an application to {name} are always completed in order, from the first to the "
                     f"{last}, and forms are filed in the order of their stages.")
        pairs.append(QAPair(f"In what order are the stages of an application to {name} completed?",
                            f"from the first to the {last}"))
        distractors, _ = rule_text(sister_stages, other)
        s = situation
        history = "it was registered before, and this is a renewal" if s["renewal"] else \
            "it has never been registered before"
        question = (f"{person}, who lives {'in' if s['resident'] else 'outside'} {region} and is {s['age']} years "
                    f"old, is registering a {thing} that weighs {s['weight']} kilograms and will be used "
                    f"{'commercially' if s['commercial'] else 'privately'}; {history}. Which forms must {person} "
                    f"file with {name}, in order?")
        rubrics = [{"kind": "contains", "text": c, "description": f"form {c} filed"} for c in gold]
        if len(gold) > 1:
            rubrics.append({"kind": "order", "items": gold, "description": "the forms in the order of their stages"})
        rubrics.append({"kind": "absent", "text": rng.choice(sister_applied),
                        "description": f"no form of {other} named"})
        if wrong_branch:
            rubrics.append({"kind": "absent", "text": rng.choice(wrong_branch),
                            "description": "only the forms whose conditions the applicant meets"})
        return _Spec(
            name=name, other=other,
            intro=_sentence(f"{name} registers every {thing} kept in {region} and the lands around it. This handbook "
                            f"sets out its application procedure, stage by stage, among notes on the registry's "
                            f"history and habits. {_sentence(other)}, which serves a neighbouring region with forms "
                            f"of its own, is mentioned where applicants tend to confuse the two."),
            rules=texts, distractors=distractors, question=question, answer=", ".join(gold), rubrics=rubrics,
            pairs=pairs, rules_meta={**rules, "region": region}, distractor_meta=sister, situation=situation,
            slots={"thing": thing},
        )


# ---- the rules, applied -----------------------------------------------------------------------------------------


def product_total(rules: dict[str, Any], situation: dict[str, Any], discount: bool | None = None
                  ) -> tuple[Decimal, bool]:
    """The order total under `rules` (rounded to the cent) and whether the card discount applied. `discount`
    forces the discount on or off (the answer of a reader who got eligibility wrong)."""
    s = situation
    subtotal = s["units"] * Decimal(rules["tiers"][s["tier"]]) * s["months"]
    total = subtotal * (1 + Decimal(rules["surcharges"][s["zone"]]) / 100)
    if s["express"]:
        total += s["units"] * Decimal(rules["express_fee"])
    d = rules["discount"]
    eligible = s["card"] and s["units"] >= d["min_units"]
    if eligible if discount is None else discount:
        total -= total * Decimal(d["percent"]) / 100
    return _cents(total), eligible


def notation_value(rules: dict[str, Any], expression: list) -> int:
    """`x P y Q z` under `rules`: the operator named "first" is worked out before the other, else left to right."""
    x, left, y, right, z = expression

    def apply(op: str, a: int, b: int) -> int:
        spec = rules["operators"][op]
        return MEANINGS[spec["meaning"]][1](a, b, spec["k"])

    if rules["first"] == right and rules["first"] != left:
        return apply(left, x, apply(right, y, z))
    return apply(right, apply(left, x, y), z)


def units_value(rules: dict[str, Any], amounts: list[int], material: str) -> int:
    """`amounts` of the three largest units, in the smallest."""
    a, b, c = rules["factors"]
    if material == rules["special"]["material"]:
        a = rules["special"]["factor"]
    p, q, r = amounts
    return ((p * a + q) * b + r) * c


def applies(condition: dict[str, Any] | None, situation: dict[str, Any]) -> bool:
    if condition is None:
        return True
    attribute = condition["attribute"]
    if attribute == "weight":
        return situation["weight"] > condition["threshold"]
    if attribute == "age":
        return situation["age"] < condition["threshold"]
    return bool(situation[attribute])


def procedure_forms(rules: dict[str, Any], situation: dict[str, Any]) -> list[str]:
    """The forms an applicant files, in stage order."""
    forms = []
    for stage in sorted(rules["stages"], key=lambda s: s["stage"]):
        form = stage["form"] if applies(stage["condition"], situation) else stage["otherwise"]
        if form:
            forms.append(form)
    return forms
