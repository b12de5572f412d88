"""The synthetic LoCoMo-shaped `dialogues` environment: determinism, answerable questions, scoring, sizes."""

from __future__ import annotations

import datetime
import re
from collections import Counter

import pytest

from tmem_rl.envs import env_sources, make_env
from tmem_rl.envs.dialogues import (
    BRIDGES,
    BRIDGES_AGAIN,
    CITIES,
    EVENTS,
    FAREWELLS,
    GREETINGS_FIRST,
    GREETINGS_LATER,
    HOBBIES,
    JOBS,
    NAMES,
    PET_NAMES,
    QUESTIONS,
    REACTIONS,
    SMALL_TALK,
    SPECIES,
    STATEMENTS,
    DialoguesEnv,
)
from tmem_rl.envs.locomo import DATE_HINT, NOT_MENTIONED, QA_PROMPT, LocomoEnv
from tmem_rl.envs.split import split_env
from tmem_rl.errors import InputError
from tmem_rl.extraction import grounded
from tmem_rl.metrics.locomo import CATEGORY_NAMES

SEED = 5


@pytest.fixture(scope="module")
def tasks():
    env = DialoguesEnv(num_tasks=30, seed=SEED)
    return [env.task(i) for i in range(30)]


def said(value: str, text: str) -> bool:
    """`value` occurs in `text` as whole words, case folded."""
    return re.search(rf"(?<!\w){re.escape(value.casefold())}(?!\w)", text.casefold()) is not None


def speaker(chunk: str) -> str:
    return chunk.split("\n")[-1].split(":")[0]


def session_day(task, chunk_index: int) -> datetime.date:
    """The date of the session a chunk belongs to, read from the last DATE line at or before it."""
    line = next(c for c in reversed(task.chunks[: chunk_index + 1]) if c.startswith("DATE: "))
    text = line.split("\n")[0].split(" on ", 1)[1]  # "8 May, 2023"
    return datetime.datetime.strptime(text, "%d %B, %Y").date()


NUMBERS = {"two": 2, "three": 3, "four": 4, "five": 5}
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def expected_gold(phrase: str, today: datetime.date) -> str:
    """The date a relative phrase said on `today` names, in LoCoMo's style: "7 May 2023" (a month: "June 2023")."""
    if phrase == "next month":
        first = (today.replace(day=1) + datetime.timedelta(days=32)).replace(day=1)
        return first.strftime("%B %Y")
    fixed = {"this morning": 0, "earlier today": 0, "yesterday": 1, "the day before yesterday": 2, "a week ago": 7}
    if phrase in fixed:
        days = fixed[phrase]
    elif m := re.fullmatch(r"(\w+) days ago", phrase):
        days = NUMBERS[m.group(1)]
    else:  # "last Friday": the latest Friday at least two days back ("yesterday" would have been said otherwise)
        weekday = WEEKDAYS.index(re.fullmatch(r"last (\w+)", phrase).group(1))
        days = next(d for d in range(2, 9) if (today - datetime.timedelta(days=d)).weekday() == weekday)
    day = today - datetime.timedelta(days=days)
    return f"{day.day} {day.strftime('%B %Y')}"


def questions(tasks, category):
    return [(t, q) for t in tasks for q in t.questions if q.metadata["category"] == category]


# ---- determinism ---------------------------------------------------------------------------------------------


def test_same_seed_same_task_different_seed_different_and_any_call_order():
    a = DialoguesEnv(num_tasks=4, seed=3)
    forward = [a.task(i) for i in range(4)]
    fresh = DialoguesEnv(num_tasks=4, seed=3)
    assert fresh.task(2) == forward[2]  # nothing generated before it
    assert [fresh.task(i) for i in reversed(range(4))][::-1] == forward
    other = DialoguesEnv(num_tasks=4, seed=4).tasks()
    assert all(x.chunks != y.chunks for x, y in zip(forward, other))
    assert len({t.chunks for t in forward}) == 4
    assert forward[1].task_id == forward[1].metadata["sample_id"] == "dialogues-3-1"
    assert other[3].questions[0].metadata["question_id"] == "dialogues-4-3/q0"


# ---- the stream ----------------------------------------------------------------------------------------------


def test_stream_is_rendered_like_locomo(tasks):
    for task in tasks:
        starts = task.metadata["session_starts"]
        assert task.question == "" and task.answers == ()
        assert len(starts) == task.metadata["num_sessions"] == 5 and task.metadata["num_chunks"] == len(task.chunks)
        assert [i for i, c in enumerate(task.chunks) if c.startswith("DATE: ")] == starts
        for start, date in zip(starts, task.metadata["session_dates"]):
            assert re.fullmatch(r"\d{1,2}:\d\d [ap]m on \d{1,2} [A-Z][a-z]+, 20\d\d", date)
            assert task.chunks[start].startswith(f"DATE: {date}\n")
        days = [session_day(task, s) for s in starts]
        assert all(5 <= (b - a).days <= 40 for a, b in zip(days, days[1:]))  # in order, days to weeks apart
        # One turn per chunk; the two speakers take turns within a session.
        bounds = starts + [len(task.chunks)]
        for lo, hi in zip(bounds, bounds[1:]):
            names = [speaker(c) for c in task.chunks[lo:hi]]
            assert set(names) == set(task.metadata["speakers"])
            assert all(x != y for x, y in zip(names, names[1:]))
            assert hi - lo >= 16


def test_default_streams_are_one_to_three_thousand_tokens():
    from transformers import AutoTokenizer

    from tmem_rl.models import FIXTURE_TOKENIZER

    tokenizer = AutoTokenizer.from_pretrained(FIXTURE_TOKENIZER)
    env = DialoguesEnv()
    lengths = [len(tokenizer("\n".join(env.task(i).chunks))["input_ids"]) for i in range(0, 256, 32)]
    assert 1000 <= min(lengths) and max(lengths) <= 3000, lengths


def test_small_talk_never_says_a_fact_value_of_its_conversation(tasks):
    for task in tasks:
        facts = task.metadata["facts"]
        stating = {f["chunk"] for f in facts}
        values = [v for f in facts for v in f["values"]]
        for i, chunk in enumerate(task.chunks):
            if i not in stating:
                assert not [v for v in values if said(v, chunk)], (task.task_id, chunk)


def test_value_pools_are_large_distinct_and_absent_from_every_template():
    pools = {"names": NAMES, "cities": tuple(CITIES), "jobs": tuple(JOBS), "pets": PET_NAMES, "hobbies": HOBBIES,
             "events": tuple(past for past, _ in EVENTS), "species": SPECIES}
    sizes = {"names": 150, "cities": 80, "jobs": 60, "pets": 100, "hobbies": 30, "events": 30, "species": 10}
    for name, pool in pools.items():
        assert len(set(pool)) == len(pool) >= sizes[name], name
    everything = [v for pool in pools.values() for v in pool]
    assert len(set(everything)) == len(everything)
    assert not set(CITIES.values()) & set(CITIES)  # no country shares a name with a city
    templates = [t for group in STATEMENTS.values() for t in group]
    templates += [t for group in REACTIONS.values() for pair in group for t in pair if t]
    templates += [t for remarks, replies in SMALL_TALK for t in remarks + replies]
    templates += [t for pair in GREETINGS_FIRST + GREETINGS_LATER + FAREWELLS for t in pair]
    templates += list(BRIDGES + BRIDGES_AGAIN) + [t for group in QUESTIONS.values() for t in group]
    for pool in ("names", "cities", "jobs", "pets", "hobbies"):
        clashes = [(v, t) for v in pools[pool] for t in templates if said(v, t)]
        assert not clashes, clashes[:3]
    assert all(len(STATEMENTS[k]) >= 4 for k in STATEMENTS) and all(len(q) >= 3 for q in QUESTIONS.values())


# ---- the questions -------------------------------------------------------------------------------------------


def test_single_hop_golds_are_the_latest_value_told_by_that_person(tasks):
    for task, q in questions(tasks, 4):
        (gold,), (chunk,) = q.answers, q.metadata["evidence"]
        assert gold in task.chunks[chunk] and speaker(task.chunks[chunk]) == q.metadata["subject"]
        assert q.metadata["subject"] in q.question and q.metadata["options"] is None
        if q.metadata["relation"] in ("home", "job", "trip"):  # a value that changed: the last one told
            told = [f["chunk"] for f in task.metadata["facts"]
                    if f["speaker"] == q.metadata["subject"] and f["relation"] == q.metadata["relation"]]
            assert chunk == max(told)


def test_multi_hop_golds_list_values_told_in_several_turns(tasks):
    found = 0
    for task, q in questions(tasks, 1):
        items = q.answers[0].split(", ")
        evidence = q.metadata["evidence"]
        assert len(items) == len(evidence) == 2 and len(set(items)) == 2
        for item, chunk in zip(items, evidence):  # in the order told; the earlier value stays in the stream
            assert item in task.chunks[chunk] and speaker(task.chunks[chunk]) == q.metadata["subject"]
        sessions = {sum(start <= c for start in task.metadata["session_starts"]) for c in evidence}
        found += len(sessions) == 2
    assert found > 20  # mostly across sessions


def test_temporal_golds_follow_from_the_session_date_and_the_phrase(tasks):
    phrases = Counter()
    for task, q in questions(tasks, 2):
        when = q.metadata["when"]
        (chunk,) = q.metadata["evidence"]
        assert when.casefold() in task.chunks[chunk].casefold()
        assert q.answers[0] == expected_gold(when, session_day(task, chunk)), (q.question, when)
        phrases[when.split()[0] if when.startswith("last ") else when] += 1
    assert len(phrases) >= 8 and phrases["next month"] and phrases["last"]


def test_open_domain_golds_map_the_value_told(tasks):
    mapping = {"home": CITIES, "trip": CITIES, "job": JOBS}
    for task, q in questions(tasks, 3):
        (chunk,) = q.metadata["evidence"]
        (fact,) = [f for f in task.metadata["facts"] if f["chunk"] == chunk]
        premise = fact["values"][0]
        assert premise in task.chunks[chunk]
        assert q.answers == (mapping[q.metadata["relation"]][premise],)
        assert not said(q.answers[0], task.chunks[chunk])  # inferred, not read


def test_adversarial_questions_ask_of_one_person_what_only_the_other_told(tasks):
    for task, q in questions(tasks, 5):
        assert q.answers == (NOT_MENTIONED,)
        options = q.metadata["options"]
        assert sorted(options) == ["a", "b"] and NOT_MENTIONED in options.values()
        (tempting,) = [v for v in options.values() if v != NOT_MENTIONED]
        asked, (other,) = q.metadata["subject"], set(task.metadata["speakers"]) - {q.metadata["subject"]}
        assert asked in q.question and other not in q.question
        saying = [c for c in task.chunks if said(tempting, c)]
        assert saying and all(speaker(c) == other for c in saying)
        own = [f for f in task.metadata["facts"] if f["speaker"] == asked and f["relation"] == q.metadata["relation"]]
        if q.metadata["relation"] == "pet":  # the other speaker's species, which no pet of the asked one is
            (species,) = [s for s in SPECIES if said(s, q.question)]
            assert not [f for f in own if said(species, task.chunks[f["chunk"]])]
        else:
            assert not own
    orders = Counter(q.metadata["options"]["a"] == NOT_MENTIONED for _, q in questions(tasks, 5))
    assert len(orders) == 2  # seeded per question, not one order for all


def test_every_category_in_every_default_task_and_sampling_is_stratified(tasks):
    counts = Counter(q.metadata["category"] for t in tasks for q in t.questions)
    assert set(counts) == set(CATEGORY_NAMES)
    assert all({q.metadata["category"] for q in t.questions} == set(CATEGORY_NAMES) for t in tasks)
    assert all(10 <= len(t.questions) <= 40 for t in tasks)
    for k in (1, 3, 5):
        env = DialoguesEnv(num_tasks=6, questions_per_task=k, seed=SEED)
        for i in range(6):
            task = env.task(i)
            assert len(task.questions) == k
            assert len({q.metadata["category"] for q in task.questions}) == k  # one per category, up to five
            assert task.chunks == tasks[i].chunks  # same conversation, fewer questions
            assert {q.question for q in task.questions} <= {q.question for q in tasks[i].questions}
    many = DialoguesEnv(num_tasks=1, questions_per_task=1000, seed=SEED).task(0)
    assert many.questions == tasks[0].questions
    few = DialoguesEnv(num_tasks=3, categories=[2, 5], seed=SEED)
    for i in range(3):
        assert {q.metadata["category"] for q in few.task(i).questions} == {2, 5}
        assert few.task(i).chunks == tasks[i].chunks


def test_asked_questions_carry_their_metadata(tasks):
    task = tasks[0]
    asked = task.asked()
    assert len(asked) == len(task.questions)
    for i, (one, q) in enumerate(zip(asked, task.questions)):
        assert one.task_id == f"{task.task_id}/q{i}" == one.metadata["question_id"]
        assert one.metadata["sample_id"] == task.task_id and one.chunks == task.chunks
        assert one.metadata["category"] == q.metadata["category"] and one.answers == q.answers


# ---- scoring and prompts -------------------------------------------------------------------------------------


def test_score_by_hand(tasks):
    env = DialoguesEnv(num_tasks=30, seed=SEED)
    asked = [one for t in tasks for one in t.asked()]
    by_category = {c: [a for a in asked if a.metadata["category"] == c] for c in CATEGORY_NAMES}
    for category in (2, 3, 4):
        task = by_category[category][0]
        assert env.score(task, task.answers[0]) == {"reward": 1.0, "f1": 1.0, "em": 1.0}
        assert env.score(task, "Zanzibar")["reward"] == 0.0
    multi = by_category[1][0]
    first, second = multi.answers[0].split(", ")
    assert env.score(multi, f"{second}, {first}")["f1"] == 1.0
    assert env.score(multi, first)["f1"] == pytest.approx(0.5)
    adversarial = by_category[5][0]
    options = adversarial.metadata["options"]
    right = "a" if options["a"] == NOT_MENTIONED else "b"
    wrong = "b" if right == "a" else "a"
    assert env.score(adversarial, "Not mentioned in the conversation")["reward"] == 1.0
    assert env.score(adversarial, f"({right})")["reward"] == env.score(adversarial, right)["reward"] == 1.0
    assert env.score(adversarial, f"({wrong})")["reward"] == 0.0
    assert env.score(adversarial, options[wrong])["reward"] == 0.0
    assert env.score(by_category[4][0], "a")["reward"] == 0.0  # a letter means nothing outside category 5


def test_answer_prompt_and_summary_are_locomos(tasks):
    env = DialoguesEnv(num_tasks=30, seed=SEED)
    locomo = LocomoEnv.__new__(LocomoEnv)  # the prompts need no data
    for one in tasks[0].asked():
        assert env.answer_prompt(one.question, "CTX", one) == locomo.answer_prompt(one.question, "CTX", one)
    temporal = next(a for a in tasks[0].asked() if a.metadata["category"] == 2)
    assert env.answer_prompt(temporal.question, "CTX", temporal) == (
        "CTX\n\n" + QA_PROMPT.format(temporal.question + DATE_HINT))
    adversarial = next(a for a in tasks[0].asked() if a.metadata["category"] == 5)
    options = adversarial.metadata["options"]
    assert f"Select the correct answer: (a) {options['a']} (b) {options['b']}." in env.answer_prompt(
        adversarial.question, "CTX", adversarial)
    assert env.answer_prompt("Who?", "") == QA_PROMPT.format("Who?")
    records = [{"category": 4, "f1": 1.0, "em": 1.0}, {"category": 5, "f1": 0.0, "em": 0.0}]
    summary = env.summarize(records)
    assert summary["f1_1_4"] == 1.0 and summary["f1_1_5"] == 0.5 and summary["f1_by_category"]["4"] == 1.0
    assert env.summary_columns == ("f1_1_4", "f1_1_5") and env.default_l_max == 512


# ---- reference pairs -------------------------------------------------------------------------------------------


def test_reference_pairs_are_grounded_in_the_chunk_that_states_them(tasks):
    for task in tasks:
        pairs, where = task.reference_pairs, task.metadata["reference_chunks"]
        assert len(pairs) == len(where) and pairs
        for pair, chunk in zip(pairs, where):
            assert grounded([pair], task.chunks[chunk])[0] == [pair], (pair, task.chunks[chunk])
        # One pair or more per statement, in stream order (a dated pair's answer is on its session's DATE line).
        stating = [c for c in where if not task.chunks[c].startswith("DATE: ")]
        assert stating == sorted(stating)
        facts = task.metadata["facts"]
        assert all(any(v == p.output for p in pairs for v in f["values"]) or f["relation"] == "event" for f in facts)
        dated = [p for p in pairs if re.fullmatch(r"\d{1,2} [A-Z][a-z]+, 20\d\d", p.output)]
        assert dated and all(p.instruction.startswith("When ") for p in dated)
        # A relative phrase ("yesterday") as an answer would teach an answer that scores nothing.
        relative = {q.metadata["when"] for q in task.questions if q.metadata["when"]}
        assert relative and not relative & {p.output for p in pairs}


# ---- registration, split, settings ---------------------------------------------------------------------------


def test_make_env_and_the_env_listing():
    env = make_env("dialogues", num_tasks=3)
    assert isinstance(env, DialoguesEnv) and len(env) == 3
    (row,) = [s for s in env_sources() if s.name == "dialogues"]
    assert row.target == "tmem_rl.envs.dialogues:DialoguesEnv" and row.kind == "stream" and not row.error


def test_train_and_heldout_splits_partition_the_tasks():
    env = DialoguesEnv(num_tasks=40)
    train, heldout = split_env(env, "train", 0.25, 0), split_env(env, "heldout", 0.25, 0)
    train_ids = {t.task_id for t in train.tasks()}
    heldout_ids = {t.task_id for t in heldout.tasks()}
    assert not train_ids & heldout_ids and train_ids | heldout_ids == {t.task_id for t in env.tasks()}
    assert heldout_ids


@pytest.mark.parametrize("kwargs, field", [
    ({"num_tasks": 0}, "num_tasks"),
    ({"num_sessions": 0}, "num_sessions"),
    ({"num_sessions": 2.5}, "num_sessions"),
    ({"turns_per_session": 3}, "turns_per_session"),
    ({"facts_per_speaker": 7}, "facts_per_speaker"),
    ({"facts_per_speaker": True}, "facts_per_speaker"),
    ({"questions_per_task": 0}, "questions_per_task"),
    ({"categories": []}, "categories"),
    ({"categories": [6]}, "categories"),
    ({"categories": [2, 2]}, "categories"),
    ({"categories": "12"}, "categories"),
    ({"seed": "0"}, "seed"),
])
def test_bad_settings_are_one_line_naming_the_field(kwargs, field):
    with pytest.raises(InputError) as err:
        DialoguesEnv(**kwargs)
    message = str(err.value)
    assert message.startswith(f"dialogues env: {field} must be") and "\n" not in message


def test_small_settings_still_ask_questions():
    env = DialoguesEnv(num_tasks=5, num_sessions=1, turns_per_session=4, facts_per_speaker=1)
    for task in env.tasks():
        assert task.questions and len(task.metadata["session_starts"]) == 1
    with pytest.raises(IndexError):
        env.task(5)
