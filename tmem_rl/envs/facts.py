"""A synthetic, seeded environment: a chat log among a few people, with one question about one fact in it.

Each stream mixes personal facts (where someone lives, their pet's name, birthday, favourite number, job, or a
meeting they arranged) with small talk. Some small talk mentions the same kinds of values (a city someone wants to
visit, a dog met in the park) so that a reader has to tie a value to the right person and relation, not just spot
it. Every (person, kind) pair carries at most one fact per stream, so the question has a single answer.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from tmem_rl.envs import article, pick_unused, register_env
from tmem_rl.envs.base import Environment, Question, Task
from tmem_rl.errors import InputError
from tmem_rl.metrics.qa import best_over_golds, exact_match, token_f1
from tmem_rl.records import QAPair

NAMES = (
    "Maya", "Omar", "Lena", "Tariq", "Sofia", "Jonas", "Priya", "Mateo", "Aisha", "Felix", "Hana", "Diego",
    "Ingrid", "Kofi", "Elena", "Ravi", "Chloe", "Nikolai", "Yuki", "Samuel", "Amara", "Lucas", "Freya", "Hugo",
    "Zara", "Tomas", "Leila", "Bruno", "Nadia", "Oscar", "Mira", "Idris", "Clara", "Emil", "Rosa", "Kenji",
    "Talia", "Victor", "Noor", "Anton",
)
CITIES = (
    "Lisbon", "Toronto", "Osaka", "Nairobi", "Krakow", "Melbourne", "Montreal", "Valencia", "Seoul", "Dublin",
    "Lima", "Hamburg", "Porto", "Vancouver", "Marseille", "Bangalore", "Edinburgh", "Cape Town", "Oslo",
    "Santiago", "Reykjavik", "Tbilisi", "Hanoi", "Bologna", "Copenhagen", "Auckland", "Istanbul", "Prague",
    "Buenos Aires", "Helsinki", "Kyoto", "Zurich", "Accra", "Vienna", "Manila", "Denver",
)
SPECIES = ("dog", "cat", "parrot", "rabbit", "hamster", "tortoise", "ferret", "goldfish")
PET_NAMES = (
    "Biscuit", "Pepper", "Mango", "Waffles", "Ziggy", "Noodle", "Juniper", "Pickles", "Clementine", "Bandit",
    "Marble", "Toffee", "Pretzel", "Cosmo", "Olive", "Rusty", "Sprout", "Nugget", "Luna", "Gizmo", "Maple",
    "Dumpling", "Pixel", "Basil", "Fig", "Comet", "Truffle", "Sable", "Button", "Crumpet", "Hazel", "Socks",
    "Bramble", "Kiwi", "Tofu", "Ember",
)
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
    "November", "December",
)
JOBS = (
    "nurse", "architect", "pastry chef", "bus driver", "pharmacist", "carpenter", "software engineer",
    "librarian", "veterinarian", "electrician", "translator", "photographer", "dentist", "plumber", "pilot",
    "florist", "accountant", "geologist", "tailor", "firefighter", "journalist", "physiotherapist", "barista",
    "landscape gardener", "radio host", "locksmith", "midwife", "sound engineer", "beekeeper", "optician",
    "paramedic", "violin teacher", "data analyst", "ship captain", "court reporter", "museum curator",
    "tattoo artist", "zookeeper", "glassblower", "surveyor",
)
PLACES = (
    "Harbor Cafe", "Central Library", "Rosewood Park fountain", "Blue Door Bakery", "Old Mill Market",
    "Riverside Pier",
    "Lantern Bookshop", "Maple Street Diner", "North Station", "Copper Kettle", "Botanical Gardens",
    "Silver Spoon Bistro", "City Museum", "Elm Court Gym", "Sunset Terrace", "Green Lantern Pub", "Town Square",
    "Oak Hill Observatory", "Marigold Tea House", "Pebble Beach Kiosk", "Union Food Hall", "Willow Cinema",
    "Granite Climbing Wall", "Juniper Wine Bar", "Hilltop Chapel", "Canal Boathouse", "Velvet Jazz Club",
    "Cedar Community Hall",
)
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
HOURS = ("8 am", "9 am", "10 am", "11 am", "noon", "1 pm", "2 pm", "3 pm", "4 pm", "5 pm", "6 pm", "7 pm", "8 pm")
FOODS = ("curry", "dumplings", "risotto", "tacos", "ramen", "lentil soup", "paella", "flatbread", "stir fry")
SHOWS = ("Night Harbour", "The Long Orchard", "Glass Houses", "Signal Lost", "Paper Moons", "Northern Static")

# Templates. {p}: the fact's subject; {s}: another person speaking about them; {q}: the other person in a meeting.
FACT_TEMPLATES = {
    "city": (
        "{p}: I finally moved to {value} last spring.",
        "{p}: Living in {value} has been an adventure so far.",
        "{p}: Since I relocated to {value}, my commute is much shorter.",
        "{s}: Did you know {p} lives in {value} now?",
        "{s}: {p} just settled in {value} and loves the food there.",
        "{p}: My new flat in {value} finally has proper heating.",
    ),
    "pet": (
        "{p}: My {species} {value} chewed through another charger.",
        "{p}: I adopted a {species} and named it {value}.",
        "{p}: {value}, my {species}, refuses to sleep anywhere but the sofa.",
        "{s}: {p}'s {species} {value} is the friendliest animal I know.",
        "{p}: I had to take my {species} {value} to the vet yesterday.",
    ),
    "birthday": (
        "{p}: My birthday is on {value}, so save the date.",
        "{p}: I was born on {value}.",
        "{s}: Don't forget that {p}'s birthday is {value}.",
        "{p}: Every year on {value} I celebrate my birthday with a big dinner.",
        "{s}: We are throwing {p} a surprise party on {value}, which is their birthday.",
    ),
    "number": (
        "{p}: My favourite number has always been {value}.",
        "{p}: I pick {value} for everything because it is my favourite number.",
        "{s}: {p}'s favourite number is {value}, which explains the jersey.",
        "{p}: Ask me my favourite number and I will say {value} every time.",
    ),
    "job": (
        "{p}: I started working as {article} {value} last month.",
        "{p}: Being {article} {value} keeps me busy most days.",
        "{s}: {p} has been {article} {value} for years now.",
        "{p}: My job as {article} {value} pays the bills, mostly.",
        "{s}: {p} finally got hired as {article} {value}.",
    ),
    "meeting": (
        "{p}: I'm meeting {q} at the {place} on {time}.",
        "{p}: {q}, let's meet at the {place} on {time}.",
        "{q}: {p} and I are getting together at the {place} on {time}.",
        "{p}: Reminder to myself: {q}, the {place}, {time}.",
    ),
}
QUESTION_TEMPLATES = {
    "city": ("Which city does {p} live in now?", "Where did {p} move to?", "What city is {p} living in?"),
    "pet": ("What is the name of {p}'s {species}?", "What did {p} name their {species}?"),
    "birthday": ("When is {p}'s birthday?", "On what date is {p}'s birthday?"),
    "number": ("What is {p}'s favourite number?", "Which number is {p}'s favourite?"),
    "job": ("What does {p} do for a living?", "What is {p}'s job?"),
    "meeting_place": ("Where are {p} and {q} meeting?", "At which place will {p} meet {q}?"),
    "meeting_time": ("When are {p} and {q} meeting?", "At what time will {p} meet {q}?"),
}
# {s}/{o}: people in the chat; {city}, {pet}, {job}, {n}: values no fact in the stream uses (hard negatives).
DISTRACTOR_TEMPLATES = (
    "{s}: The weather has been strange lately.",
    "{s}: I can't believe how expensive coffee has gotten.",
    "{s}: {o}, did you catch the game last night?",
    "{s}: The bus was late again this morning.",
    "{s}: I really need a holiday.",
    "{s}: I finally fixed the leaky tap in the kitchen.",
    "{s}: Traffic on the bridge was terrible today.",
    "{s}: I'm thinking of taking up running again.",
    "{s}: That concert last weekend was louder than I expected.",
    "{s}: {o}, you should try the new bakery on the corner.",
    "{s}: My phone battery dies by lunchtime these days.",
    "{s}: I've been trying to cook more {food} at home.",
    "{s}: Have you seen the new season of {show}?",
    "{s}: {o}, I still owe you for the tickets, right?",
    "{s}: Someone left a bicycle chained to my fence.",
    "{s}: I spent the whole weekend reorganising my bookshelf.",
    "{s}: The power went out twice during the storm.",
    "{s}: I keep forgetting to water my plants.",
    "{s}: {o}, are you still learning the guitar?",
    "{s}: My neighbours are renovating again, it is so noisy.",
    "{s}: I've always wanted to visit {city}.",
    "{s}: My cousin keeps sending me photos from {city}.",
    "{s}: I met a dog called {pet} at the park this morning.",
    "{s}: My brother says he wants to become {job_article} {job}.",
    "{s}: I read {n} pages of my book on the train.",
    "{s}: There were {n} people in the queue at the post office.",
)


@dataclass
class _Fact:
    kind: str  # key of FACT_TEMPLATES
    subject: str
    line: str
    values: dict[str, str]  # slot -> value, e.g. {"value": "Biscuit", "species": "dog"}


def _answer_of(fact: _Fact, kind: str) -> str:
    """The value a question of `kind` (a meeting's place or time, else the fact's kind) asks of `fact`."""
    return fact.values[{"meeting_place": "place", "meeting_time": "time"}.get(kind, "value")]


@register_env("facts")
class FactsEnv(Environment):
    """Synthetic chat streams with one factual question each; deterministic in (seed, index)."""

    name = "facts"
    KINDS = tuple(FACT_TEMPLATES)
    POSITIONS = ("early", "anywhere", "late")
    MAX_FACTS = 60  # keeps the cast within NAMES and every value pool large enough to stay distinct
    # Upper bounds so that a typo in a count fails at once: len() takes at most a 63-bit count, and a stream of
    # more lines (about 15 tokens each) than this is far beyond any model's context and slow to build.
    MAX_TASKS = 2**31
    MAX_DISTRACTORS = 10_000

    def __init__(
        self,
        *,
        num_tasks: int = 16,
        num_facts: int = 6,
        num_distractors: int = 24,
        lines_per_chunk: int = 4,
        fact_position: str = "early",
        questions_per_task: int | None = 1,
        seed: int = 0,
    ):
        """`questions_per_task`: facts asked about after the stream. 1: one, its question shown while reading (the
        paper's protocol). k > 1: k distinct planted facts (the first placed by `fact_position`, the others where
        they fall), asked only after the stream, so that the reading has no question in mind; None: every planted
        fact (a meeting is asked by one of its place and time)."""
        for arg, value, low, high in (
            ("num_tasks", num_tasks, 1, self.MAX_TASKS),
            ("num_facts", num_facts, 1, self.MAX_FACTS),
            ("num_distractors", num_distractors, 0, self.MAX_DISTRACTORS),
            ("lines_per_chunk", lines_per_chunk, 1, None),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InputError(f"facts env: {arg} must be an integer >= {low}, got {value!r}")
            if high is not None and value > high:
                raise InputError(f"facts env: {arg} must be at most {high}, got {value!r}")
        if questions_per_task is not None and (not isinstance(questions_per_task, int)
                                               or isinstance(questions_per_task, bool)
                                               or not 1 <= questions_per_task <= num_facts):
            raise InputError(f"facts env: questions_per_task must be None (every fact) or an integer from 1 to "
                             f"num_facts ({num_facts}), got {questions_per_task!r}")
        if fact_position not in self.POSITIONS:
            raise InputError(f"facts env: fact_position must be one of {self.POSITIONS}, got {fact_position!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise InputError(f"facts env: seed must be an integer, got {seed!r}")
        self.num_tasks = num_tasks
        self.num_facts = num_facts
        self.num_distractors = num_distractors
        self.lines_per_chunk = lines_per_chunk
        self.fact_position = fact_position
        self.questions_per_task = num_facts if questions_per_task is None else questions_per_task
        self.seed = seed

    def __len__(self) -> int:
        return self.num_tasks

    def task(self, index: int) -> Task:
        if not 0 <= index < self.num_tasks:
            raise IndexError(f"facts env: task index {index} out of range [0, {self.num_tasks})")
        # String seeds hash through SHA-512, so each (seed, index) gets its own stream, independent of call order.
        rng = random.Random(f"facts:{self.seed}:{index}")

        # Every fact takes at most two (person, kind) slots, so this cast always has room for num_facts.
        cast_size = max(rng.randint(3, 5), math.ceil(2 * self.num_facts / len(self.KINDS)))
        cast = rng.sample(NAMES, cast_size)
        facts = self._facts(rng, cast)

        asked = rng.choice(facts)
        kind, question = self._question(rng, asked)

        lines = [f.line for f in facts if f is not asked] + self._distractors(rng, cast, facts)
        rng.shuffle(lines)
        total = len(lines) + 1
        if self.fact_position == "early":
            position = rng.randrange(math.ceil(total / 3))
        elif self.fact_position == "late":
            position = rng.randrange(min(math.ceil(2 * total / 3), total - 1), total)
        else:
            position = rng.randrange(total)
        lines.insert(position, asked.line)

        step = self.lines_per_chunk
        chunks = tuple("\n".join(lines[i : i + step]) for i in range(0, total, step))
        answer = _answer_of(asked, kind)
        metadata = {
            "category": kind,
            "fact_kind": kind,
            "fact_line_index": position,
            "fact_chunk_index": position // step,
            "num_chunks": len(chunks),
        }
        questions: tuple[Question, ...] = ()
        if self.questions_per_task > 1:  # drawn after everything above, so one-question tasks stay as they were
            others = rng.sample([f for f in facts if f is not asked], self.questions_per_task - 1)
            questions = (Question(question, (answer,), {"category": kind, "fact_kind": kind}),
                         *(self._asked_question(rng, fact) for fact in others))
            question = ""
        return Task(
            task_id=f"facts-{self.seed}-{index}",
            question=question,
            chunks=chunks,
            answers=(answer,),
            reference_pairs=self._reference_pairs(facts, asked, questions[0].question if questions else question,
                                                  answer),
            metadata=metadata,
            questions=questions,
        )

    def _asked_question(self, rng: random.Random, fact: _Fact) -> Question:
        kind, question = self._question(rng, fact)
        answer = _answer_of(fact, kind)
        return Question(question, (answer,), {"category": kind, "fact_kind": kind})

    def score(self, task: Task, prediction: str) -> dict[str, float]:
        f1 = best_over_golds(token_f1, prediction, task.answers)
        em = best_over_golds(exact_match, prediction, task.answers)
        return {"reward": f1, "f1": f1, "em": em}

    # ---- generation helpers -------------------------------------------------------------------------------

    def _facts(self, rng: random.Random, cast: list[str]) -> list[_Fact]:
        taken: set[tuple[str, str]] = set()  # (person, kind) slots already holding a fact
        used: dict[str, set[str]] = {k: set() for k in (*self.KINDS, "place", "time")}
        facts = []
        while len(facts) < self.num_facts:
            free = {(p, k) for p in cast for k in self.KINDS if (p, k) not in taken}
            # A meeting also takes its partner's slot, so it needs two free people.
            meeting_free = sum((p, "meeting") in free for p in cast)
            slots = sorted((p, k) for p, k in free if k != "meeting" or meeting_free >= 2)
            subject, kind = rng.choice(slots)
            taken.add((subject, kind))
            others = [q for q in cast if q != subject]
            values = {"p": subject, "s": rng.choice(others)}
            if kind == "meeting":
                partner = rng.choice([q for q in others if (q, kind) not in taken])
                taken.add((partner, kind))
                values["q"] = partner
                values["place"] = pick_unused(rng, PLACES, used["place"])
                values["time"] = pick_unused(rng, [f"{d} at {h}" for d in DAYS for h in HOURS], used["time"])
            else:
                values["value"] = pick_unused(rng, self._pool(kind), used[kind])
                if kind == "pet":
                    values["species"] = rng.choice(SPECIES)
                if kind == "job":
                    values["article"] = article(values["value"])
            line = rng.choice(FACT_TEMPLATES[kind]).format(**values)
            facts.append(_Fact(kind=kind, subject=subject, line=line, values=values))
        return facts

    @staticmethod
    def _pool(kind: str) -> list[str]:
        if kind == "city":
            return list(CITIES)
        if kind == "pet":
            return list(PET_NAMES)
        if kind == "birthday":
            return [f"{m} {d}" for m in MONTHS for d in range(1, 29)]
        if kind == "number":
            return [str(n) for n in range(2, 100)]
        if kind == "job":
            return list(JOBS)
        raise KeyError(kind)

    @staticmethod
    def _reference_pairs(facts: list[_Fact], asked: _Fact, question: str, answer: str) -> tuple[QAPair, ...]:
        """One pair per planted fact (two per meeting), each asked in the stream's first question wording; the
        asked fact first, in the words of the task's own question."""
        pairs = [QAPair(question, answer)]
        for fact in facts:
            kinds = ("meeting_place", "meeting_time") if fact.kind == "meeting" else (fact.kind,)
            for kind in kinds:
                value = _answer_of(fact, kind)
                if fact is asked and value == answer:
                    continue
                pairs.append(QAPair(QUESTION_TEMPLATES[kind][0].format(**fact.values), value))
        return tuple(pairs)

    def _question(self, rng: random.Random, fact: _Fact) -> tuple[str, str]:
        kind = fact.kind
        if kind == "meeting":
            kind = rng.choice(("meeting_place", "meeting_time"))
        return kind, rng.choice(QUESTION_TEMPLATES[kind]).format(**fact.values)

    def _distractors(self, rng: random.Random, cast: list[str], facts: list[_Fact]) -> list[str]:
        # Hard negatives draw values that no fact in this stream uses, so they never contradict the answer.
        in_use = {k: {f.values["value"] for f in facts if f.kind == k} for k in ("city", "pet", "job", "number")}
        lines = []
        for _ in range(self.num_distractors):
            speaker = rng.choice(cast)
            job = rng.choice([j for j in JOBS if j not in in_use["job"]])
            values = {
                "s": speaker,
                "o": rng.choice([q for q in cast if q != speaker]),
                "city": rng.choice([c for c in CITIES if c not in in_use["city"]]),
                "pet": rng.choice([n for n in PET_NAMES if n not in in_use["pet"]]),
                "job": job,
                "job_article": article(job),
                "n": str(rng.choice([n for n in range(2, 100) if str(n) not in in_use["number"]])),
                "food": rng.choice(FOODS),
                "show": rng.choice(SHOWS),
            }
            lines.append(rng.choice(DISTRACTOR_TEMPLATES).format(**values))
        return lines
