"""The answer scorers and the synthetic `facts` environment."""

from __future__ import annotations

import hashlib
import math
import random

import pytest

from tmem_rl.envs import Action, ActionKind, make_env
from tmem_rl.envs.facts import NAMES, FactsEnv
from tmem_rl.metrics.qa import best_over_golds, exact_match, normalize_answer, token_f1

# ---- rewards --------------------------------------------------------------------------------------------------


def test_normalize_answer():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert normalize_answer("An apple a day") == "apple day"
    # Articles only as whole words: "theatre" and "Anna" keep their letters.
    assert normalize_answer("Theatre for Anna.") == "theatre for anna"
    assert normalize_answer("  \tMarch   14 ") == "march 14"


def test_token_f1_hand_computed():
    # "the" is dropped: pred {cat, sat}, gold {cat, sat, down}; P = 1, R = 2/3, F1 = 0.8.
    assert token_f1("the cat sat", "cat sat down") == pytest.approx(0.8)
    # pred {cat, cat, sat}, gold {cat, sat, sat}: overlap 2, P = R = 2/3.
    assert token_f1("cat cat sat", "cat sat sat") == pytest.approx(2 / 3)
    assert token_f1("Biscuit", "biscuit.") == 1.0
    assert token_f1("dog", "cat") == 0.0


def test_token_f1_empty():
    assert token_f1("", "") == 1.0
    assert token_f1("the", "a") == 1.0  # both normalise to nothing
    assert token_f1("", "cat") == 0.0
    assert token_f1("cat", "") == 0.0


def test_exact_match_and_best_over_golds():
    assert exact_match("The Harbor Cafe!", "harbor cafe") == 1.0
    assert exact_match("harbor cafe downtown", "harbor cafe") == 0.0
    assert best_over_golds(exact_match, "Lisbon", ("Porto", "lisbon")) == 1.0
    assert best_over_golds(token_f1, "the cat sat", ("dog", "cat sat down")) == pytest.approx(0.8)
    assert best_over_golds(token_f1, "anything", ()) == 0.0


# ---- environment ----------------------------------------------------------------------------------------------


def test_same_seed_same_tasks_different_seed_different():
    a = FactsEnv(num_tasks=5, seed=3).tasks()
    b = FactsEnv(num_tasks=5, seed=3).tasks()
    c = FactsEnv(num_tasks=5, seed=4).tasks()
    assert a == b
    assert [t.chunks for t in a] != [t.chunks for t in c]
    assert all(x.chunks != y.chunks for x, y in zip(a, c))
    assert a[0].task_id == "facts-3-0" and c[4].task_id == "facts-4-4"


def test_tasks_differ_within_a_seed():
    tasks = FactsEnv(num_tasks=8).tasks()
    assert len({t.chunks for t in tasks}) == 8
    assert len({t.question for t in tasks}) > 1


def test_task_independent_of_generation_order():
    env = FactsEnv(num_tasks=6, seed=1)
    forward = [env.task(i) for i in range(6)]
    fresh = FactsEnv(num_tasks=6, seed=1)
    assert fresh.task(4) == forward[4]  # nothing generated before it
    assert [fresh.task(i) for i in reversed(range(6))][::-1] == forward


@pytest.mark.parametrize("position", ["early", "anywhere", "late"])
def test_gold_answer_sits_in_the_recorded_line_and_chunk(position):
    env = FactsEnv(num_tasks=20, fact_position=position, seed=7)
    for task in env.tasks():
        (gold,) = task.answers
        meta = task.metadata
        lines = "\n".join(task.chunks).split("\n")
        assert gold in lines[meta["fact_line_index"]], (task.question, lines[meta["fact_line_index"]])
        assert gold in task.chunks[meta["fact_chunk_index"]]
        assert meta["fact_chunk_index"] == meta["fact_line_index"] // env.lines_per_chunk
        assert meta["num_chunks"] == len(task.chunks)
        assert meta["fact_kind"] in {"city", "pet", "birthday", "number", "job", "meeting_place", "meeting_time"}
        # Everyone the question names is named in that line.
        asked = [w for w in task.question.replace("'s", " ").rstrip("?").split() if w in NAMES]
        assert asked and all(name in lines[meta["fact_line_index"]] for name in asked)


@pytest.mark.parametrize("num_distractors", [24, 25, 26])
def test_fact_position_early_and_late(num_distractors):
    total = 6 + num_distractors
    early = FactsEnv(num_tasks=30, num_distractors=num_distractors, fact_position="early").tasks()
    late = FactsEnv(num_tasks=30, num_distractors=num_distractors, fact_position="late").tasks()
    assert all(t.metadata["fact_line_index"] < total / 3 for t in early)
    assert all(t.metadata["fact_line_index"] >= 2 * total / 3 for t in late)
    anywhere = FactsEnv(num_tasks=30, num_distractors=num_distractors, fact_position="anywhere").tasks()
    assert max(t.metadata["fact_line_index"] for t in anywhere) >= total / 3  # not secretly "early"


def test_single_line_stream():
    for position in FactsEnv.POSITIONS:
        task = FactsEnv(num_tasks=1, num_facts=1, num_distractors=0, fact_position=position).task(0)
        assert len(task.chunks) == 1 and task.metadata["fact_line_index"] == 0
        assert task.answers[0] in task.chunks[0]


@pytest.mark.parametrize("lines_per_chunk", [1, 3, 4, 7])
def test_chunking_respects_lines_per_chunk(lines_per_chunk):
    env = FactsEnv(num_tasks=3, num_facts=5, num_distractors=12, lines_per_chunk=lines_per_chunk)
    total = 5 + 12
    for task in env.tasks():
        sizes = [len(chunk.split("\n")) for chunk in task.chunks]
        assert len(task.chunks) == math.ceil(total / lines_per_chunk)
        assert all(size == lines_per_chunk for size in sizes[:-1])
        assert 1 <= sizes[-1] <= lines_per_chunk
        assert sum(sizes) == total
        # Every line is one speaker's turn.
        assert all(": " in line for chunk in task.chunks for line in chunk.split("\n"))


def test_each_person_has_at_most_one_fact_per_kind():
    # As many facts as the cast can hold, so a missing uniqueness check would collide.
    env = FactsEnv(num_facts=FactsEnv.MAX_FACTS)
    for seed in range(5):
        cast = random.Random(seed).sample(NAMES, 20)
        facts = env._facts(random.Random(seed), cast)
        assert len(facts) == FactsEnv.MAX_FACTS
        slots = [(f.subject, f.kind) for f in facts]
        slots += [(f.values["q"], f.kind) for f in facts if f.kind == "meeting"]
        assert len(slots) == len(set(slots))
        for kind in FactsEnv.KINDS:
            answers = [f.values.get("value", f.values.get("place")) for f in facts if f.kind == kind]
            assert len(answers) == len(set(answers)), kind


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        ({"num_tasks": 0}, "num_tasks"),
        ({"num_facts": 0}, "num_facts"),
        ({"num_facts": 1000}, "num_facts"),
        ({"num_distractors": -1}, "num_distractors"),
        ({"lines_per_chunk": 0}, "lines_per_chunk"),
        ({"lines_per_chunk": 2.5}, "lines_per_chunk"),
        ({"fact_position": "middle"}, "fact_position"),
        ({"questions_per_task": 0}, "questions_per_task"),
        ({"questions_per_task": 7, "num_facts": 6}, "questions_per_task"),
        ({"seed": "zero"}, "seed"),
    ],
)
def test_bad_constructor_args_raise(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        FactsEnv(**kwargs)


def test_task_index_out_of_range():
    env = FactsEnv(num_tasks=2)
    with pytest.raises(IndexError):
        env.task(2)
    with pytest.raises(IndexError):
        env.task(-1)


def test_score():
    env = FactsEnv(num_tasks=4)
    for task in env.tasks():
        gold = task.answers[0]
        assert env.score(task, gold) == {"reward": 1.0, "f1": 1.0, "em": 1.0}
        assert env.score(task, f"  {gold.upper()}.")["em"] == 1.0
        assert env.score(task, "purple elephant umbrella") == {"reward": 0.0, "f1": 0.0, "em": 0.0}


def test_episode_through_reset_and_step():
    env = FactsEnv(num_tasks=2, seed=5)
    task = env.task(1)
    state, obs = env.reset(task)
    assert obs.kind == "question" and obs.text == task.question

    seen = []
    while True:
        result = env.step(state, Action(ActionKind.READ))
        assert not result.done and result.reward == 0.0
        if result.observation.kind == "end":
            break
        assert result.observation.kind == "chunk"
        assert result.observation.index == len(seen)
        seen.append(result.observation.text)
        env.step(state, Action(ActionKind.EXTRACT, "Q: ... A: ..."))
    assert tuple(seen) == task.chunks

    result = env.step(state, Action(ActionKind.ANSWER, task.answers[0]))
    assert result.done and result.reward == 1.0
    assert result.info["em"] == 1.0
    with pytest.raises(RuntimeError):
        env.step(state, Action(ActionKind.READ))


def test_wrong_answer_gets_zero_reward():
    env = FactsEnv(num_tasks=1)
    state, _ = env.reset(env.task(0))
    result = env.step(state, Action(ActionKind.ANSWER, "no idea"))
    assert result.done and result.reward == 0.0


def test_make_env():
    env = make_env("facts", num_tasks=3)
    assert isinstance(env, FactsEnv)
    assert env.name == "facts" and len(env) == 3
    assert make_env("facts", num_tasks=3, seed=0).task(2) == env.task(2)


def test_builtin_environments_work_from_a_source_checkout(tmp_path):
    """No installed package metadata (no site-packages, the repo on PYTHONPATH): the shipped environments are
    still found, as on a machine that runs the code without installing it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    code = "from tmem_rl.envs import make_env, available_envs; print(available_envs(), len(make_env('facts', num_tasks=3)))"
    result = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(repo)}, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == ("['context_learning', 'dataset', 'dialogues', 'facts', 'hotpotqa', 'locomo', "
                                     "'longmemeval', 'search'] 3")


def test_several_questions_per_task_ask_distinct_planted_facts_after_the_stream():
    one = FactsEnv(num_tasks=6, num_facts=4, seed=3)
    several = FactsEnv(num_tasks=6, num_facts=4, seed=3, questions_per_task=3)
    every = FactsEnv(num_tasks=6, num_facts=4, seed=3, questions_per_task=None)
    # One question per task is the environment as it was before several could be asked: the same tasks, pinned.
    fields = [(t.task_id, t.question, t.chunks, t.answers, t.metadata, t.reference_pairs) for t in one.tasks()]
    assert hashlib.sha256(repr(fields).encode()).hexdigest() == \
        "cfe77fc835de58d6ac24df84ea049132382f035ce8e48b6cffad4961340c67f1"
    for single, task, all_of_them in zip(one.tasks(), several.tasks(), every.tasks()):
        assert task.chunks == single.chunks and task.question == "" and not single.questions
        assert len(task.questions) == 3 and len(all_of_them.questions) == 4
        first = task.questions[0]
        # The one-question task's fact is asked first, in the same words; the others are other facts of the stream.
        assert (first.question, first.answers) == (single.question, single.answers)
        stream = "\n".join(task.chunks)
        golds = [q.answers[0] for q in task.questions]
        assert len(set(golds)) == 3 and all(gold in stream for gold in golds)
        asked = task.asked()
        assert [a.task_id for a in asked] == [f"{task.task_id}/q{i}" for i in range(3)]
        assert all(a.metadata["sample_id"] == task.task_id and a.chunks == task.chunks for a in asked)
        for a in asked:
            assert several.score(a, a.answers[0])["f1"] == 1.0


def test_an_episode_of_several_questions_ends_at_its_last_answer():
    env = FactsEnv(num_tasks=1, num_facts=3, questions_per_task=3)
    task = env.task(0)
    state, obs = env.reset(task)
    assert obs.text == ""
    golds = [q.answers[0] for q in task.questions]
    rewards = []
    for i, answer in enumerate([golds[0], "no idea", golds[2]]):
        result = env.step(state, Action(ActionKind.ANSWER, answer, question=i))
        rewards.append(result.reward)
        assert result.done == (i == 2)
    assert rewards == [1.0, 0.0, 1.0]
    with pytest.raises(RuntimeError, match="is over"):
        env.step(state, Action(ActionKind.ANSWER, golds[1], question=1))
    state, _ = env.reset(task)
    with pytest.raises(ValueError, match="asks 3 question"):
        env.step(state, Action(ActionKind.ANSWER, "x", question=3))
