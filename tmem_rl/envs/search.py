"""A synthetic, seeded search environment in the style of MEM1's multi-objective QA: one task asks k questions at once.

Each task has its own small world of fictional people, companies and towns, one document per entity (its facts
among filler sentences that mention other entities of the world, so that a search returns near misses too). The
agent answers by calling `search` (BM25 over the world's documents, top documents first) for up to `max_turns`
actions, then writes all k answers in one line: `a1; a2; ...`. Each question asks one short fact (a year, a
number, a name, a profession) about a different entity, so every answer needs its own search, and what was found
for the earlier questions must be kept while searching for the later ones.
"""

from __future__ import annotations

import random
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

from tmem_rl.actions import format_call
from tmem_rl.envs import register_env
from tmem_rl.envs.base import Environment, EpisodeState, Task
from tmem_rl.errors import InputError
from tmem_rl.metrics.qa import exact_match, token_f1
from tmem_rl.records import QAPair
from tmem_rl.retrieval import BM25Index, bm25_tokens

KINDS = ("person", "company", "town")

# Names are joined from these syllables, which rarely make an English word or a real name.
SYLLABLES = (
    "vel", "mor", "dask", "orl", "ane", "quen", "thal", "brix", "zor", "ith", "umb", "sev", "rask", "yol", "fen",
    "gald", "oss", "eth", "vin", "kael", "lom", "drun", "nes", "phar", "rin", "sul", "tav", "wen", "xan", "bel",
    "cor", "dim", "esk", "fal", "grim", "hal", "ist", "jor", "kel", "lun", "mav", "nor", "ost", "pell", "qua",
    "rov", "sarn", "tel", "urv", "vask", "wyl", "zem",
)
COMPANY_SUFFIXES = (
    "Systems", "Works", "Labs", "Foundry", "Holdings", "Textiles", "Motors", "Instruments", "Mills", "Optics",
    "Freight", "Ceramics",
)
TOWN_PREFIXES = ("Port", "Upper", "Lower", "North", "East", "Fort")
PROFESSIONS = (
    "cartographer", "glassblower", "marine biologist", "locksmith", "structural engineer", "beekeeper",
    "translator", "surveyor", "pharmacist", "violin maker", "archivist", "ferry pilot", "geologist", "stonemason",
    "botanist", "clockmaker", "radio operator", "tax inspector", "bookbinder", "veterinarian", "puppeteer",
    "lighthouse keeper", "sound engineer", "tailor", "court interpreter", "astronomer", "orchard farmer",
    "boat builder", "furniture restorer", "dentist",
)
PRODUCTS = (
    "folding bicycles", "solar kettles", "weather balloons", "glass insulators", "canal barges", "wool blankets",
    "pocket compasses", "ceramic tiles", "wind turbines", "paper lanterns", "hearing aids", "sewing machines",
    "fishing nets", "typewriters", "garden tools", "rope ladders", "snow chains", "water filters", "reading lamps",
    "roof slates", "chess sets", "bicycle bells", "printing presses", "diving helmets", "clock springs", "tin toys",
    "ship propellers", "station clocks",
)

# Attribute sentences: {name} is the entity, {value} the attribute's value exactly as a question's answer. Every
# sentence of an attribute holds the words its questions hinge on ("born", "year"; "headquarters", "town"), so that
# a search with the question finds the entity's document whichever sentence it was written with.
SENTENCES = {
    "person": {
        "birth_year": ("{name} was born in the year {value}.", "Records show that {name} was born in the year {value}.",
                       "{name}, born in the year {value}, grew up in a large family."),
        "birthplace": ("{name} was born in the town of {value}.", "The town of {value} is where {name} was born.",
                       "{name} was born and spent a happy childhood in the town of {value}."),
        "employer": ("The employer of {name} is {value}.", "{name} has spent years at {value}, their employer.",
                     "Since leaving school, {name} has had one employer: {value}."),
        "profession": ("{name} is {article} {value} by profession.", "By profession, {name} is {article} {value}.",
                       "{name} trained as {article} {value}, a profession chosen early."),
    },
    "company": {
        "founded": ("{name} was founded in the year {value}.", "The year {value} is when {name} was founded.",
                    "Since it was founded in the year {value}, {name} has grown steadily."),
        "founder": ("{name} was founded by {value}.", "{value} founded {name} with a small loan.",
                    "{name} was founded by {value}, who drew up its first plans."),
        "headquarters": ("The headquarters of {name} are in the town of {value}.",
                         "{name} has its headquarters in the town of {value}.",
                         "{name} is run from its headquarters in the town of {value}."),
        "product": ("{name} is best known for making {value}.", "{name} is known across the region for making {value}.",
                    "For years {name} has been known for making {value}."),
        "employees": ("{name} has {value} employees.", "The number of employees at {name} is {value}.",
                      "{name} now has {value} employees across several sites."),
    },
    "town": {
        "founded": ("{name} was founded in the year {value}.", "Settlers founded {name} in the year {value}.",
                    "The year {value} is when {name} was founded."),
        "population": ("{name} has a population of {value}.", "The population of {name} is {value}.",
                       "With a population of {value}, {name} is busier than it looks."),
        "river": ("The {value} runs through {name}.", "The {value} runs through the centre of {name}.",
                  "In {name} the {value} runs through a valley of willows."),
        "mayor": ("The mayor of {name} is {value}.", "{value} is the mayor of {name}.",
                  "{value} was elected mayor of {name} by a wide margin."),
    },
}
# Beyond the name and the words above, questions use only words that documents never hold ("which", "how") or that
# nearly all hold ("the", "of"): either way they rank no document above another.
QUESTIONS = {
    "person": {
        "birth_year": ("In what year was {name} born?", "What year was {name} born in?"),
        "birthplace": ("In which town was {name} born?", "What town was {name} born in?"),
        "employer": ("Who is the employer of {name}?", "Which company is the employer of {name}?"),
        "profession": ("What is the profession of {name}?", "What is {name} by profession?"),
    },
    "company": {
        "founded": ("In what year was {name} founded?", "What year was {name} founded in?"),
        "founder": ("Who founded {name}?", "By whom was {name} founded?"),
        "headquarters": ("In which town are the headquarters of {name}?", "What town has the headquarters of {name}?"),
        "product": ("What is {name} known for making?",),
        "employees": ("How many employees does {name} have?",),
    },
    "town": {
        "founded": ("In what year was {name} founded?", "What year was {name} founded in?"),
        "population": ("What is the population of {name}?",),
        "river": ("Which river runs through {name}?", "What river runs through {name}?"),
        "mayor": ("Who is the mayor of {name}?",),
    },
}
# Filler states no attribute, so it never contradicts a fact. Few sentences name another entity ({other}, of the
# same kind): enough for near misses, few enough that an entity's name still marks its own document.
FILLER = {
    "person": (
        "{name} enjoys long walks along the coast in autumn.",
        "Friends describe {name} as patient, curious and rather stubborn.",
        "{name} once shared a train compartment with {other}.",
        "{name} keeps a small vegetable garden behind the house.",
        "Every winter {name} reads at least a dozen old novels.",
        "{name} has exchanged letters with {other} for many years.",
        "A portrait of {name} hangs in a cafe near the station.",
        "{name} learned to sail as a teenager and still owns a small boat.",
    ),
    "company": (
        "{name} sponsors a chess tournament every spring.",
        "The logo of {name} has been redesigned twice.",
        "{name} once signed a short supply contract with {other}.",
        "Analysts often compare {name} with {other}.",
        "{name} publishes a thin newsletter for its customers.",
        "The offices of {name} are known for their green doors.",
        "{name} opened a small museum about its own history.",
        "{name} gives a prize each year to a local school.",
    ),
    "town": (
        "The market square of {name} fills up on Saturday mornings.",
        "{name} is known for its narrow stone bridges.",
        "A slow country road leads from {name} to {other}.",
        "Families from {other} often spend their summers in {name}.",
        "The old bell tower of {name} can be seen from far away.",
        "A small festival with lanterns is held in {name} each autumn.",
        "{name} has a library with an unusually big collection of maps.",
        "Visitors to {name} praise its bakeries and its quiet streets.",
    ),
}
# Here {other} is any other entity of the world.
GENERIC_FILLER = (
    "A documentary about {other} includes a short scene about {name}.",
    "Local newspapers have mentioned {name} and {other} in the same column.",
    "An archive in the region holds papers about both {name} and {other}.",
    "A popular podcast once discussed {name} for almost an hour.",
    "Little has been written about {name} outside the region.",
    "Old photographs of {name} were found in a box in an attic.",
    "{name} appears in a guidebook chapter about the region.",
    "A local historian is writing a short book about {name}.",
    "Opinions about {name} differ, but most are kind.",
    "{name} is often mentioned in conversations at the harbour.",
)
BODY_WORDS = (110, 180)  # a document body's target length is drawn from this range ...
MAX_WORDS = 200  # ... and never passed

# Words the templates use: a coined name must not be one of them, or it would match every document.
_VOCABULARY = {
    token
    for text in (*COMPANY_SUFFIXES, *TOWN_PREFIXES, *PROFESSIONS, *PRODUCTS, *FILLER["person"],
                 *FILLER["company"], *FILLER["town"], *GENERIC_FILLER,
                 *(s for kind in SENTENCES.values() for ss in kind.values() for s in ss),
                 *(q for kind in QUESTIONS.values() for qs in kind.values() for q in qs))
    for token in bm25_tokens(text)
}
# Numbering a model may put before an answer: "(1)", "1)", "1." (digits then "." only before a space, so that a
# number answer keeps its digits; every number answer has at least three).
_NUMBERING = re.compile(r"^(?:\(\d{1,2}\)|\d{1,2}\)|\d{1,2}\.(?=\s|$))\s*")
_PART_SEPARATOR = re.compile(r"[;\n]")


@dataclass
class _Entity:
    kind: str  # one of KINDS
    name: str
    attributes: dict[str, str] = field(default_factory=dict)  # attribute -> value, as written in the document


@dataclass
class _World:
    """One task's world: its documents (the entity's name, a newline, the body) and, once searched, their index."""

    task: Task
    documents: tuple[str, ...]
    _index: BM25Index | None = None

    @property
    def index(self) -> BM25Index:
        if self._index is None:
            self._index = BM25Index(list(self.documents))
        return self._index


class _Namer:
    """Fresh fictional names for one world: every coined word is new, and no name contains another."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.words: list[str] = []
        self.names: list[str] = []

    def word(self) -> str:
        while True:
            word = "".join(self.rng.sample(SYLLABLES, 2 if self.rng.random() < 0.85 else 3))
            if word not in _VOCABULARY and all(word not in w and w not in word for w in self.words):
                self.words.append(word)
                return word.capitalize()

    def name(self, kind: str) -> str:
        while True:
            if kind == "person":
                name = f"{self.word()} {self.word()}"
            elif kind == "company":
                name = f"{self.word()} {self.rng.choice(COMPANY_SUFFIXES)}"
            elif kind == "town" and self.rng.random() < 0.3:
                name = f"{self.rng.choice(TOWN_PREFIXES)} {self.word()}"
            elif kind == "town":
                name = self.word()
            else:  # a river: a value, not an entity, but a name all the same
                name = f"{self.word()} River"
            low = name.lower()
            if all(low not in n and n not in low for n in self.names):
                self.names.append(low)
                return name


def answer_parts(prediction: str) -> list[str]:
    """The answers in a prediction: split on ";" and newlines, numbering like "(1)" or "1." stripped, empty parts
    dropped."""
    parts = (_NUMBERING.sub("", part.strip()).strip() for part in _PART_SEPARATOR.split(prediction))
    return [part for part in parts if part]


def match_answers(prediction: str, golds: Sequence[str], f1_of: Callable[[str, str], float] = token_f1,
                  em_of: Callable[[str, str], float] = exact_match) -> list[tuple[float, float]]:
    """(F1, EM) of each gold answer against the part of `prediction` matched to it, (0, 0) where none is. Only the
    first len(golds) parts count: an answer that lists many guesses must not score as if it had chosen."""
    parts = answer_parts(prediction)[: len(golds)]
    f1 = [[f1_of(part, gold) for part in parts] for gold in golds]  # [k, parts]
    em = [[em_of(part, gold) for part in parts] for gold in golds]  # [k, parts]
    # Greedy one-to-one: best F1 first, then exact matches ("Dask Orlin" fits "Orlin Dask" by F1 alone), then the
    # part in the gold's own position.
    candidates = sorted(
        ((i, j) for i in range(len(golds)) for j in range(len(parts)) if f1[i][j] > 0),
        key=lambda ij: (-f1[ij[0]][ij[1]], -em[ij[0]][ij[1]], ij[0] != ij[1], ij),
    )
    matched: dict[int, int] = {}
    for i, j in candidates:
        if i not in matched and j not in matched.values():
            matched[i] = j
    return [(f1[i][matched[i]], em[i][matched[i]]) if i in matched else (0.0, 0.0) for i in range(len(golds))]


def ask_all(questions: Sequence[str]) -> str:
    """One task's k questions as the agent reads them."""
    if len(questions) == 1:
        return f"Answer this question: {questions[0]}"
    numbered = " ".join(f"({n}) {q}" for n, q in enumerate(questions, start=1))
    return f"Answer these {len(questions)} questions, in order, separated by ';': {numbered}"


def search_tool(top_k_docs: int) -> dict[str, str]:
    """The search tool as the agent is told of it."""
    return {"search": f"searches the document collection for the query and returns the top {top_k_docs} "
                      f"document{'s' if top_k_docs > 1 else ''}"}


class MultiQuestionSearch(Environment):
    """What every k-questions-at-once search environment shares: the search tool, the scoring of the k answers,
    the instructions and worked example, and the answer prompt. A subclass supplies the tasks (`metadata["k"]`,
    `metadata["sub_answers"]`) and `call_tool`."""

    tools = search_tool(3)
    default_l_max = 8192
    answer_f1 = staticmethod(token_f1)
    """How one answer is scored against its gold answer (EM is exact match after normalization)."""

    def score(self, task: Task, prediction: str) -> dict[str, float]:
        """Mean F1 / EM over the k questions (F1 is the reward), whether all are exact, and each question's F1."""
        matched = match_answers(prediction, task.metadata["sub_answers"], self.answer_f1, exact_match)
        mean_f1 = sum(f1 for f1, _ in matched) / len(matched)
        exact = sum(em for _, em in matched)
        return {"reward": mean_f1, "f1": mean_f1, "em": exact / len(matched),
                "all_correct": float(exact == len(matched)),
                **{f"f1_q{i}": f1 for i, (f1, _) in enumerate(matched, start=1)}}

    def instructions(self, task: Task) -> str:
        return super().instructions(task) + "\n\nSearch for one thing at a time. Answer once what you have found " \
                                            "answers every question."

    def example_turns(self) -> list[dict[str, str]]:
        # A made-up world outside every generated one (its names are not built from the generator's syllables).
        question = ("Answer these 2 questions, in order, separated by ';': (1) In what year was Acme Robotics "
                    "founded? (2) Which town is Anna Berg from?")
        example = Task("example", question, (), ("1987; Lund",), metadata={"k": 2})
        first = format_call("search", "Acme Robotics founded year", "[1] Acme Robotics\nAcme Robotics makes garden "
                            "robots. It was founded in the year 1987. Its headquarters are in the town of Lund.")
        second = format_call("search", "Anna Berg town", "[1] Anna Berg\nAnna Berg is a nurse. She comes from the "
                             "town of Lund.")
        steps = [("", "<search>Acme Robotics founded year</search>"), (first, "<search>Anna Berg town</search>"),
                 (f"{first}\n{second}", "<answer>1987; Lund</answer>")]
        messages = []
        for turn, (context, action) in enumerate(steps):
            messages += [{"role": "user", "content": self.turn_prompt(example, context, self.max_turns - turn)},
                         {"role": "assistant", "content": action}]
        return messages

    def answer_prompt(self, question: str, context: str, task: Task | None = None) -> str:
        prompt = super().answer_prompt(question, context, task)
        if task is None:  # one extracted pair's question: the plain shape
            return prompt
        k = task.metadata["k"]
        if k == 1:
            return f"{prompt}\nWrite only the short answer."
        return f"{prompt}\nWrite only the {k} short answers, in order, separated by ';'."


@register_env("search")
class SearchEnv(MultiQuestionSearch):
    """k questions per task, answered by searching the task's own documents; deterministic in (seed, index)."""

    name = "search"
    MAX_K = 16
    MIN_ENTITIES = 6  # two of each kind, so that every relation has someone to point at
    MAX_ENTITIES = 500  # past this, building a world (names are checked pairwise) gets slow
    MAX_TASKS = 2**31  # len() takes at most a 63-bit count; far more tasks than anyone trains on
    CACHE_SIZE = 64  # worlds kept, with their search indexes: a batch of episodes touches a few at a time

    def __init__(
        self,
        *,
        num_tasks: int = 200,
        k: int = 2,
        num_entities: int = 40,
        top_k_docs: int = 3,
        max_turns: int = 10,
        seed: int = 0,
    ):
        for arg, value, low, high in (
            ("num_tasks", num_tasks, 1, self.MAX_TASKS),
            ("k", k, 1, self.MAX_K),
            ("num_entities", num_entities, self.MIN_ENTITIES, self.MAX_ENTITIES),
            ("top_k_docs", top_k_docs, 1, None),
            ("max_turns", max_turns, 1, None),
            ("seed", seed, None, None),
        ):
            if not isinstance(value, int) or isinstance(value, bool):
                raise InputError(f"search env: {arg} must be an integer, got {value!r}")
            if (low is not None and value < low) or (high is not None and value > high):
                bounds = f"at least {low}" if high is None else f"between {low} and {high}"
                raise InputError(f"search env: {arg} must be {bounds}, got {value!r}")
        if k > num_entities:
            raise InputError(f"search env: k ({k}) must be at most num_entities ({num_entities}): each question "
                             f"asks about a different entity")
        if top_k_docs > num_entities:
            raise InputError(f"search env: top_k_docs ({top_k_docs}) must be at most num_entities "
                             f"({num_entities}), the number of documents a search can return")
        self.num_tasks = num_tasks
        self.k = k
        self.num_entities = num_entities
        self.top_k_docs = top_k_docs
        self.max_turns = max_turns
        self.seed = seed
        self.tools = search_tool(top_k_docs)
        self._worlds: OrderedDict[int, _World] = OrderedDict()

    def __len__(self) -> int:
        return self.num_tasks

    def task(self, index: int) -> Task:
        return self._world(index).task

    def documents(self, task: Task) -> list[str]:
        """The task's corpus, in document order (`metadata["gold_documents"]` indexes it)."""
        return list(self._world_of(task).documents)

    def call_tool(self, state: EpisodeState, tool: str, argument: str) -> str:
        if tool != "search":
            raise ValueError(f"environment {self.name!r} has no tool {tool!r}; tools: search")
        if not bm25_tokens(argument):
            return "The search query is empty: write the words to search for."
        world = self._world_of(state.task)
        ranked = world.index.ranked(argument, self.top_k_docs)
        return "\n\n".join(f"[{rank}] {world.documents[i]}" for rank, i in enumerate(ranked, start=1))

    # ---- generation -----------------------------------------------------------------------------------------

    def _world(self, index: int) -> _World:
        if not 0 <= index < self.num_tasks:
            raise IndexError(f"search env: task index {index} out of range [0, {self.num_tasks})")
        world = self._worlds.get(index)
        if world is None:
            world = self._build(index)
            self._worlds[index] = world
            if len(self._worlds) > self.CACHE_SIZE:
                self._worlds.popitem(last=False)
        self._worlds.move_to_end(index)
        return world

    def _world_of(self, task: Task) -> _World:
        index = task.metadata.get("index")
        world = self._world(index) if isinstance(index, int) and 0 <= index < self.num_tasks else None
        # Searching another environment's task would silently return the wrong world's documents.
        if world is None or world.task != task:
            raise ValueError(f"search env: task {task.task_id!r} is not a task of this environment")
        return world

    def _build(self, index: int) -> _World:
        # String seeds hash through SHA-512, so each (seed, index) gets its own world, independent of call order.
        rng = random.Random(f"search:{self.seed}:{index}")
        entities = self._entities(rng)
        documents = tuple(self._document(rng, entity, entities) for entity in entities)

        # Round-robin over the kinds (in a random order), so the questions mix people, companies and towns.
        pools = {kind: [i for i, e in enumerate(entities) if e.kind == kind] for kind in KINDS}
        order = list(KINDS)
        rng.shuffle(order)
        for pool in pools.values():
            rng.shuffle(pool)
        picked: list[int] = []
        while len(picked) < self.k:
            picked += [pools[kind].pop() for kind in order if pools[kind]]
        picked = picked[: self.k]

        questions, answers, asked = [], [], set()
        for i in picked:
            entity = entities[i]
            fresh = [a for a in entity.attributes if (entity.kind, a) not in asked] or list(entity.attributes)
            attribute = rng.choice(fresh)
            asked.add((entity.kind, attribute))
            questions.append(rng.choice(QUESTIONS[entity.kind][attribute]).format(name=entity.name))
            answers.append(entity.attributes[attribute])

        task = Task(
            task_id=f"search-{self.seed}-{index}",
            question=ask_all(questions),
            chunks=(),
            answers=("; ".join(answers),),
            reference_pairs=tuple(QAPair(q, a) for q, a in zip(questions, answers)),
            metadata={
                "index": index,
                "sub_questions": questions,
                "sub_answers": answers,
                "gold_documents": picked,
                "entities": [entities[i].name for i in picked],
                "k": self.k,
                "category": str(self.k),
                "num_documents": len(documents),
            },
        )
        return _World(task=task, documents=documents)

    def _entities(self, rng: random.Random) -> list[_Entity]:
        n = self.num_entities
        towns = max(2, round(0.25 * n))
        companies = max(2, round(0.3 * n))
        kinds = ["town"] * towns + ["company"] * companies + ["person"] * (n - towns - companies)
        rng.shuffle(kinds)
        namer = _Namer(rng)
        entities = [_Entity(kind, namer.name(kind)) for kind in kinds]
        of_kind = {kind: [e for e in entities if e.kind == kind] for kind in KINDS}

        # People first: a company's founding year follows its founder's birth.
        for e in of_kind["person"]:
            e.attributes = {
                "birth_year": str(rng.randint(1935, 2000)),
                "birthplace": rng.choice(of_kind["town"]).name,
                "employer": rng.choice(of_kind["company"]).name,
                "profession": rng.choice(PROFESSIONS),
            }
        for e in of_kind["company"]:
            founder = rng.choice(of_kind["person"])
            born = int(founder.attributes["birth_year"])
            e.attributes = {
                "founded": str(rng.randint(born + 22, min(born + 60, 2024))),
                "founder": founder.name,
                "headquarters": rng.choice(of_kind["town"]).name,
                "product": rng.choice(PRODUCTS),
                "employees": str(rng.randint(120, 9800)),
            }
        for e in of_kind["town"]:
            e.attributes = {
                "founded": str(rng.randint(1150, 1890)),
                "population": str(rng.randint(800, 240_000)),
                "river": namer.name("river"),
                "mayor": rng.choice(of_kind["person"]).name,
            }
        return entities

    def _document(self, rng: random.Random, entity: _Entity, entities: list[_Entity]) -> str:
        facts = []
        for attribute, value in entity.attributes.items():
            template = rng.choice(SENTENCES[entity.kind][attribute])
            article = "an" if value[0] in "aeiou" else "a"
            facts.append(template.format(name=entity.name, value=value, article=article))
        rng.shuffle(facts)

        same_kind = [e.name for e in entities if e.kind == entity.kind and e is not entity]
        others = [e.name for e in entities if e is not entity]
        pool = [(t, same_kind) for t in FILLER[entity.kind]] + [(t, others) for t in GENERIC_FILLER]
        rng.shuffle(pool)
        target = rng.randint(*BODY_WORDS)
        words = sum(len(s.split()) for s in facts)
        filler = []
        for template, candidates in pool:
            if words >= target:
                break
            sentence = template.format(name=entity.name, other=rng.choice(candidates))
            if words + len(sentence.split()) > MAX_WORDS:
                continue
            filler.append(sentence)
            words += len(sentence.split())

        # A fact opens the document, as an encyclopedia entry would; the rest interleave.
        rest = facts[1:] + filler
        rng.shuffle(rest)
        return f"{entity.name}\n{' '.join([facts[0], *rest])}"
