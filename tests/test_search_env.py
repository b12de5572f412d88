"""The synthetic `search` environment: seeded worlds, solvable questions, the search tool and the k-answer scorer."""

from __future__ import annotations

import re

import pytest

from tmem_rl.envs import Action, ActionKind, Task, make_env
from tmem_rl.envs.search import COMPANY_SUFFIXES, TOWN_PREFIXES, SearchEnv, answer_parts
from tmem_rl.errors import InputError
from tmem_rl.records import QAPair
from tmem_rl.retrieval import BM25Index


def _kind(name: str) -> str:
    """An entity's kind, read off its name: companies end in a suffix, towns are one word or a prefix and a word."""
    words = name.split()
    if words[-1] in COMPANY_SUFFIXES:
        return "company"
    if len(words) == 1 or words[0] in TOWN_PREFIXES:
        return "town"
    return "person"


# ---- generation -----------------------------------------------------------------------------------------------


def test_same_seed_same_worlds_other_seed_different():
    a, b, c = (SearchEnv(num_tasks=4, k=3, seed=s) for s in (7, 7, 8))
    assert a.tasks() == b.tasks()
    assert [a.documents(t) for t in a.tasks()] == [b.documents(t) for t in b.tasks()]
    for x, y in zip(a.tasks(), c.tasks()):
        assert x.question != y.question
        assert a.documents(x) != c.documents(y)
    assert a.task(2).task_id == "search-7-2" and c.task(0).task_id == "search-8-0"


def test_task_does_not_depend_on_generation_order_or_cache():
    first = SearchEnv(num_tasks=10, seed=1)
    alone = first.task(7)
    warm = SearchEnv(num_tasks=10, seed=1)
    warm.CACHE_SIZE = 2  # evicted worlds are rebuilt: they must come back the same
    for i in (3, 0, 9, 5, 7, 1, 2):
        warm.task(i)
    assert warm.task(7) == alone
    assert warm.documents(warm.task(7)) == first.documents(alone)


def test_task_shape_and_metadata():
    env = SearchEnv(num_tasks=3, k=2, seed=0)
    task = env.task(1)
    meta = task.metadata
    assert task.chunks == ()
    assert len(meta["sub_questions"]) == len(meta["sub_answers"]) == len(meta["gold_documents"]) == 2
    assert task.answers == ("; ".join(meta["sub_answers"]),)
    assert task.question == (f"Answer these 2 questions, in order, separated by ';': (1) {meta['sub_questions'][0]} "
                             f"(2) {meta['sub_questions'][1]}")
    assert meta["k"] == 2 and meta["category"] == "2" and meta["num_documents"] == 40 == len(env.documents(task))
    assert task.reference_pairs == tuple(QAPair(q, a) for q, a in zip(meta["sub_questions"], meta["sub_answers"]))

    single = SearchEnv(num_tasks=1, k=1).task(0)
    assert single.question == f"Answer this question: {single.metadata['sub_questions'][0]}"
    assert single.answers == (single.metadata["sub_answers"][0],)


def test_questions_are_about_distinct_entities_of_mixed_kinds():
    env = SearchEnv(num_tasks=30, k=3, seed=4)
    assert {_kind(task.metadata["entities"][0]) for task in env.tasks()} == {"company", "person", "town"}
    for task in env.tasks():
        entities = task.metadata["entities"]
        assert len(set(task.metadata["gold_documents"])) == 3
        assert sorted(map(_kind, entities)) == ["company", "person", "town"]  # round-robin over the kinds
        for question, entity in zip(task.metadata["sub_questions"], entities):
            assert entity in question


def test_every_answer_is_in_its_gold_document_and_bm25_finds_it():
    env = SearchEnv(num_tasks=50, k=4, seed=2)
    found = total = 0
    for task in env.tasks():
        documents = env.documents(task)
        index = BM25Index(documents)
        meta = task.metadata
        for question, answer, gold, entity in zip(meta["sub_questions"], meta["sub_answers"],
                                                  meta["gold_documents"], meta["entities"]):
            title, body = documents[gold].split("\n", 1)
            assert title == entity
            assert answer in body
            assert 100 <= len(body.split()) <= 200
            found += gold in index.ranked(question, 3)
            total += 1
    assert total == 200
    assert found / total >= 0.95, f"gold document in the top 3 for only {found}/{total} sub-questions"


def test_names_are_unique_and_none_contains_another():
    env = SearchEnv(num_tasks=20, num_entities=60, seed=5)
    for task in env.tasks():
        documents = env.documents(task)
        titles = [d.split("\n", 1)[0] for d in documents]
        rivers = {r for d in documents for r in re.findall(r"\b[A-Z][a-z]+ River\b", d)}
        names = [n.lower() for n in (*titles, *rivers)]
        assert len(set(names)) == len(names) == 60 + len(rivers)
        for a in names:
            assert not [b for b in names if a != b and a in b], f"{a!r} is inside another name"
        # Nor do two names share a coined word ("Orlin Dask", "Orlin Vess"): a search for one would find both.
        affixes = {w.lower() for w in (*COMPANY_SUFFIXES, *TOWN_PREFIXES, "River")}
        coined = [w for n in names for w in n.split() if w not in affixes]
        assert len(set(coined)) == len(coined)
        assert not [(a, b) for a in coined for b in coined if a != b and a in b]


# ---- scoring --------------------------------------------------------------------------------------------------


def _task(*answers: str) -> Task:
    return Task("t", "q", (), ("; ".join(answers),), metadata={"sub_answers": list(answers), "k": len(answers)})


def _score(prediction: str, *answers: str) -> dict[str, float]:
    return SearchEnv(num_tasks=1).score(_task(*answers), prediction)


@pytest.mark.parametrize("prediction", [
    "1987; Port Aldane",
    "Port Aldane; 1987",  # any order scores the same
    "(1) 1987; (2) Port Aldane",
    "1. 1987\n2. Port Aldane",
    "1) 1987;\n\n 2) port aldane.",
    "1987; Port Aldane; 2001",  # a part past the k-th is not read
])
def test_score_full_marks(prediction):
    assert _score(prediction, "1987", "Port Aldane") == {"reward": 1.0, "f1": 1.0, "em": 1.0, "all_correct": 1.0,
                                                         "f1_q1": 1.0, "f1_q2": 1.0}


def test_score_one_right_one_wrong():
    assert _score("1987; Velmora Systems", "1987", "Port Aldane") == {
        "reward": 0.5, "f1": 0.5, "em": 0.5, "all_correct": 0.0, "f1_q1": 1.0, "f1_q2": 0.0}


def test_score_partial_overlap():
    # "Dask" against "Orlin Dask": precision 1, recall 1/2, F1 2/3; with "1987" exact: (1 + 2/3) / 2 = 5/6.
    metrics = _score("1987; Dask", "1987", "Orlin Dask")
    assert metrics["f1"] == pytest.approx(5 / 6) and metrics["reward"] == metrics["f1"]
    assert (metrics["f1_q1"], metrics["f1_q2"]) == (1.0, pytest.approx(2 / 3))  # each question's own F1
    assert metrics["em"] == 0.5 and metrics["all_correct"] == 0.0
    # "Orlin Dask Vess" against "Orlin Dask": P = 2/3, R = 1, F1 = 0.8; the part is not an exact match.
    metrics = _score("Orlin Dask Vess", "Orlin Dask")
    assert metrics["f1"] == pytest.approx(0.8) and metrics["em"] == 0.0


def test_score_missing_extra_and_empty_parts():
    assert _score("1987", "1987", "Port Aldane", "Orlin Dask")["f1"] == pytest.approx(1 / 3)
    assert _score("Port Aldane", "1987", "Port Aldane")["em"] == 0.5  # one part, matched to the gold it fits
    # Only the first k parts count, so a list of guesses cannot collect every answer.
    assert _score("guess; 1987; Port Aldane", "1987", "Port Aldane")["f1"] == 0.5
    assert _score("1987; 1988; 1989; 1990", "1990", "1991")["f1"] == 0.0
    for empty in ("", "   ", " ; \n ;", "(1) ; (2)"):
        assert _score(empty, "1987", "Port Aldane") == {"reward": 0.0, "f1": 0.0, "em": 0.0, "all_correct": 0.0,
                                                        "f1_q1": 0.0, "f1_q2": 0.0}


def test_score_matches_one_to_one():
    # One part can fill one gold only, even when two golds are equal.
    assert _score("1987", "1987", "1987")["f1"] == 0.5
    assert _score("1987; 1987", "1987", "1987")["em"] == 1.0
    # The best-fitting pair is matched first: "Orlin Vess" goes to "Orlin Vess" (1.0), not to "Orlin Dask" (0.5).
    assert _score("Orlin Vess; Orlin Dask", "Orlin Dask", "Orlin Vess")["em"] == 1.0
    # Equal F1 (same tokens, so 1.0 for every pair): the exact matches are taken, in either order.
    assert _score("Orlin Dask; Dask Orlin", "Orlin Dask", "Dask Orlin")["em"] == 1.0
    assert _score("Dask Orlin; Orlin Dask", "Orlin Dask", "Dask Orlin")["em"] == 1.0
    # Equal F1 and no exact match: "Orlin" (2/3 against both golds) goes to the gold in its own position, the
    # second; "Dask Kel Mor" then gets "Orlin Dask" (P = 1/3, R = 1/2, F1 = 0.4): (0.4 + 2/3) / 2 = 8/15.
    assert _score("Dask Kel Mor; Orlin", "Orlin Dask", "Orlin Vess")["f1"] == pytest.approx(8 / 15)


def test_answer_parts():
    assert answer_parts("(1) 1987; (2) Port Aldane") == ["1987", "Port Aldane"]
    assert answer_parts("1. Orlin Dask\n2) 4120.\n\n") == ["Orlin Dask", "4120."]
    assert answer_parts("1987.; 120") == ["1987.", "120"]  # a number answer keeps its digits
    assert answer_parts(" ; ;\n") == []


def test_generated_task_scores_its_own_answer():
    env = SearchEnv(num_tasks=2, k=4, seed=3)
    task = env.task(1)
    answers = task.metadata["sub_answers"]
    assert env.score(task, task.answers[0])["all_correct"] == 1.0
    assert env.score(task, "; ".join(reversed(answers)))["f1"] == 1.0
    assert env.score(task, "; ".join(answers[:2] + ["nothing", "nothing"]))["f1"] == 0.5


# ---- the tool and the episode -----------------------------------------------------------------------------------


def test_search_tool_through_step():
    env = SearchEnv(num_tasks=2, k=2, seed=0)
    task = env.task(0)
    documents = env.documents(task)
    state, observation = env.reset(task)
    assert observation.kind == "question" and observation.text == task.question

    for calls, (question, gold) in enumerate(zip(task.metadata["sub_questions"], task.metadata["gold_documents"]), 1):
        result = env.step(state, Action(ActionKind.TOOL, question, tool="search"))
        assert result.observation.kind == "tool" and not result.done and result.reward == 0.0
        assert state.tool_calls == calls
        shown = result.observation.text.split("\n\n")
        assert len(shown) == env.top_k_docs == 3
        assert shown[0] == f"[1] {documents[gold]}"
        for rank, text in enumerate(shown, 1):
            assert text.startswith(f"[{rank}] ") and text.removeprefix(f"[{rank}] ") in documents

    empty = env.step(state, Action(ActionKind.TOOL, "  ", tool="search"))
    assert empty.observation.kind == "tool" and "empty" in empty.observation.text
    assert state.tool_calls == 3

    with pytest.raises(ValueError, match="no tool 'lookup'"):
        env.step(state, Action(ActionKind.TOOL, "x", tool="lookup"))

    end = env.step(state, Action(ActionKind.ANSWER, task.answers[0]))
    assert end.done and state.done and end.reward == 1.0 and end.info["all_correct"] == 1.0
    with pytest.raises(RuntimeError):
        env.step(state, Action(ActionKind.TOOL, "x", tool="search"))


def test_top_k_docs_and_tool_description():
    env = SearchEnv(num_tasks=1, top_k_docs=5, num_entities=10)
    state, _ = env.reset(env.task(0))
    text = env.call_tool(state, "search", "founded")
    assert len(text.split("\n\n")) == 5 and text.startswith("[1] ") and "[5] " in text
    assert "top 5 documents" in env.tools["search"]
    assert "<search>" in env.instructions(env.task(0))


def test_search_refuses_another_environments_task():
    mine, other = SearchEnv(num_tasks=2, seed=0), SearchEnv(num_tasks=2, seed=1)
    state, _ = mine.reset(other.task(0))
    with pytest.raises(ValueError, match="not a task of this environment"):
        mine.call_tool(state, "search", "founded")


def test_answer_prompt_asks_for_the_answers_in_order():
    env = SearchEnv(num_tasks=1, k=3)
    task = env.task(0)
    prompt = env.answer_prompt(task.question, "[1] Some document", task)
    assert "[1] Some document" in prompt and task.question in prompt
    assert prompt.endswith("Write only the 3 short answers, in order, separated by ';'.")
    # An extracted pair's question (no task) keeps the plain shape.
    assert env.answer_prompt("Who founded X?", "", None) == "Question: Who founded X?"


def test_defaults_and_registry():
    env = make_env("search")
    assert isinstance(env, SearchEnv)
    assert len(env) == 200 and env.k == 2 and env.max_turns == 10 and env.top_k_docs == 3
    assert env.default_l_max == 8192 and list(env.tools) == ["search"]
    assert env.task(0).metadata["category"] == "2"
    with pytest.raises(IndexError):
        env.task(200)


@pytest.mark.parametrize("kwargs, setting", [
    ({"k": 0}, "k"),
    ({"k": 9, "num_entities": 8}, "k"),
    ({"k": "2"}, "k"),
    ({"num_tasks": 0}, "num_tasks"),
    ({"num_entities": 3}, "num_entities"),
    ({"top_k_docs": 0}, "top_k_docs"),
    ({"top_k_docs": 11, "num_entities": 10}, "top_k_docs"),
    ({"max_turns": 0}, "max_turns"),
    ({"seed": 1.5}, "seed"),
])
def test_bad_settings(kwargs, setting):
    with pytest.raises(InputError, match=rf"^search env: {setting} "):
        SearchEnv(**kwargs)
