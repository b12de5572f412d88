"""HotpotQA questions asked k at once: both file layouts, the official scoring, seeded composition and its split,
the search tool over the task's paragraphs or a retrieval server, and evaluation with every memory method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tmem_rl.envs import Action, ActionKind, make_env
from tmem_rl.envs.hotpotqa import HotpotQAEnv, HotpotQAFormatError, load_hotpotqa
from tmem_rl.envs.split import TaskSplit
from tmem_rl.errors import InputError
from tmem_rl.metrics.qa import exact_match, hotpotqa_f1
from tmem_rl.retrieval.corpus import titled
from tmem_rl.retrieval.server import RetrievalServer, CorpusIndex

FIXTURE = Path(__file__).parent / "fixtures" / "hotpotqa_hf.json"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "hotpotqa" / "hotpot_dev_distractor_first20.json"


def _original_layout(records: list[dict]) -> list[dict]:
    """The original release's layout of the same records: context and supporting facts as lists of pairs."""
    return [{**r, "_id": r["id"], "context": [[t, s] for t, s in zip(r["context"]["title"], r["context"]["sentences"])],
             "supporting_facts": [[t, i] for t, i in zip(r["supporting_facts"]["title"],
                                                         r["supporting_facts"]["sent_id"])]}
            for r in records]


def test_both_layouts_and_jsonl_load_the_same_records(tmp_path):
    raw = json.loads(FIXTURE.read_text())
    original = tmp_path / "original.json"
    original.write_text(json.dumps(_original_layout(raw)))
    lines = tmp_path / "records.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in raw))
    hf = load_hotpotqa(FIXTURE)
    assert load_hotpotqa(original) == hf == load_hotpotqa(lines)
    first = hf[0]
    assert (first.id, first.answer, first.type, first.level) == ("q1", "Orsa", "bridge", "easy")
    assert first.supporting_titles == ("Vellan Clock Tower", "Brimby")
    # Sentences are joined as written: HotpotQA keeps each sentence's leading space.
    assert first.paragraphs[1] == ("Brimby", "Brimby is a market town. The river Orsa runs through Brimby.")


@pytest.mark.skipif(not SHARED.exists(), reason="the shared HotpotQA sample is not present")
def test_the_shared_sample_loads_in_both_layouts(tmp_path):
    records = load_hotpotqa(SHARED)
    assert len(records) == 20 and all(len(r.paragraphs) == 10 for r in records)
    original = tmp_path / "original.json"
    original.write_text(json.dumps(_original_layout([{**r, "id": f"hotpotqa-{i}"} for i, r in
                                                     enumerate(json.loads(SHARED.read_text()))])))
    assert load_hotpotqa(original) == records
    env = HotpotQAEnv(path=str(SHARED), k=4)
    assert len(env) == 5
    for task in env.tasks():  # every supporting paragraph is in the task's own corpus
        titles = {p.title for p in env.passages(task)}
        assert {t for ts in task.metadata["supporting_titles"] for t in ts} <= titles


@pytest.mark.parametrize("record, says", [
    ({"answer": "x", "context": []}, "record 0: missing field 'question'"),
    ({"question": "q", "answer": "x", "context": "text"}, "field 'context' must be"),
    ({"question": "q", "answer": "x", "context": {"title": ["a"], "sentences": []}}, "of the same length"),
    ({"question": "q", "answer": "x", "context": [["a", "not a list"]]}, "title and a list of sentences"),
    ({"question": 3, "answer": "x", "context": []}, "field 'question' must be a string"),
    ({"question": "q", "answer": "x", "context": [], "supporting_facts": 5}, "field 'supporting_facts' must be"),
])
def test_a_malformed_record_is_named(tmp_path, record, says):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([record]))
    with pytest.raises(HotpotQAFormatError, match=says):
        load_hotpotqa(path)


# ---- scoring ---------------------------------------------------------------------------------------------------


def test_official_scoring_rules_by_hand():
    # Normalization: case, punctuation and the articles a / an / the go; whitespace collapses.
    assert exact_match("The  Orsa!", "orsa") == 1.0
    assert hotpotqa_f1("the river Orsa", "Orsa") == pytest.approx(2 * 0.5 * 1 / 1.5)  # P 1/2, R 1
    # yes / no / noanswer: only an exact match scores, on either side.
    assert hotpotqa_f1("yes", "yes") == 1.0
    assert hotpotqa_f1("yes it is", "yes") == 0.0
    assert hotpotqa_f1("no", "no way") == 0.0
    assert hotpotqa_f1("noanswer", "Orsa") == 0.0
    assert hotpotqa_f1("Yes.", "yes") == 1.0  # normalized first
    assert hotpotqa_f1("Ida Fennick", "Ida M. Fennick") == pytest.approx(0.8)  # P 1, R 2/3


def test_k_answers_scored_one_to_one_with_per_objective_f1():
    env = HotpotQAEnv(path=str(FIXTURE), k=2, seed=0)
    task = env.task(0)
    golds = task.metadata["sub_answers"]
    assert env.score(task, "; ".join(golds))["all_correct"] == 1.0
    swapped = env.score(task, "; ".join(reversed(golds)))
    assert swapped["f1"] == 1.0 and swapped["f1_q1"] == swapped["f1_q2"] == 1.0
    half = env.score(task, f"{golds[0]}; wrong")
    assert (half["f1"], half["em"], half["f1_q1"], half["f1_q2"]) == (0.5, 0.5, 1.0, 0.0)


# ---- composition and split -------------------------------------------------------------------------------------


def test_composition_is_seeded_and_asks_each_question_once():
    a, b, c = (HotpotQAEnv(path=str(FIXTURE), k=2, seed=s) for s in (1, 1, 2))
    assert a.tasks() == b.tasks() and a.tasks() != c.tasks()
    assert len(a) == 2
    asked = [i for t in a.tasks() for i in t.metadata["record_ids"]]
    assert sorted(asked) == ["q1", "q2", "q3", "q4"]
    task = a.task(0)
    assert task.question.startswith("Answer these 2 questions, in order, separated by ';': (1) ")
    assert task.reference_pairs[0].output == task.metadata["sub_answers"][0]
    assert len(HotpotQAEnv(path=str(FIXTURE), k=3)) == 1 and len(HotpotQAEnv(path=str(FIXTURE), k=1, num_tasks=2)) == 2
    with pytest.raises(InputError, match="num_tasks must be None or between 1 and 2"):
        HotpotQAEnv(path=str(FIXTURE), k=2, num_tasks=3)
    with pytest.raises(InputError, match="fewer than k=5"):
        HotpotQAEnv(path=str(FIXTURE), k=5)


def test_the_split_shares_no_question():
    env = HotpotQAEnv(path=str(FIXTURE), k=1)
    train, heldout = TaskSplit(env, "train", 0.5, seed=0), TaskSplit(env, "heldout", 0.5, seed=0)
    ids = [{i for t in side.tasks() for i in t.metadata["record_ids"]} for side in (train, heldout)]
    assert ids[0] and ids[1] and not ids[0] & ids[1] and len(ids[0] | ids[1]) == 4


# ---- search -------------------------------------------------------------------------------------------------------


def test_search_finds_supporting_paragraphs_and_reports_recall():
    env = make_env("hotpotqa", path=str(FIXTURE), k=2, seed=0)
    task = env.task(0)
    assert len(env.passages(task)) == len({p for r in (env.records[i] for i in env._groups[0])
                                             for p in r.paragraphs})  # shared paragraphs appear once
    state, _ = env.reset(task)
    first_titles = task.metadata["supporting_titles"][0]
    text = env.step(state, Action(ActionKind.TOOL, task.metadata["sub_questions"][0], tool="search")).observation.text
    assert text.startswith("[1] ")
    assert "No document" in env.call_tool(state, "search", "xylophone zeppelin")
    assert "empty" in env.call_tool(state, "search", "?!")
    result = env.step(state, Action(ActionKind.ANSWER, task.answers[0]))
    gold = {t for ts in task.metadata["supporting_titles"] for t in ts}
    assert result.info["support_recall"] == pytest.approx(len(state.retrieved & gold) / len(gold))
    assert result.info["support_recall"] > 0 and set(first_titles) & state.retrieved
    assert result.info["search_failures"] == 0.0 and result.reward == 1.0


def _corpus(env: HotpotQAEnv, path: Path) -> Path:
    seen = dict.fromkeys(p for r in env.records for p in r.paragraphs)
    path.write_text("\n".join(json.dumps({"id": t, "contents": titled(t, x)}) for t, x in seen))
    return path


def test_a_server_that_goes_down_is_a_recorded_failure_not_a_lost_episode(tmp_path):
    index = CorpusIndex.from_jsonl(_corpus(HotpotQAEnv(path=str(FIXTURE)), tmp_path / "corpus.jsonl"))
    with RetrievalServer(index, port=0) as server:
        env = HotpotQAEnv(path=str(FIXTURE), k=2, retriever={"kind": "http", "url": server.url, "retries": 0})
        task = env.task(0)
        state, _ = env.reset(task)
        assert env.call_tool(state, "search", "Orsa river").startswith("[1] ")
    text = env.call_tool(state, "search", "railway opened")
    assert text.startswith("The search failed (retriever at http://") and "cannot connect" in text
    result = env.step(state, Action(ActionKind.ANSWER, "x; y"))
    assert result.done and result.info["search_failures"] == 1.0


def test_a_turns_searches_go_in_one_request(tmp_path):
    """prefetch asks for every rollout's search of a turn at once; each call_tool then takes its own result."""
    index = CorpusIndex.from_jsonl(_corpus(HotpotQAEnv(path=str(FIXTURE)), tmp_path / "corpus.jsonl"))
    with RetrievalServer(index, port=0) as server:
        env = HotpotQAEnv(path=str(FIXTURE), k=2, retriever={"kind": "http", "url": server.url, "cache_size": 0})
        states = [env.reset(env.task(0))[0] for _ in range(3)]
        queries = ["Orsa river", "railway opened", "Orsa river"]
        sent = env._shared.requests
        env.prefetch([(s, "search", q) for s, q in zip(states, queries)])
        assert env._shared.requests == sent + 1
        texts = [env.call_tool(s, "search", q) for s, q in zip(states, queries)]
        assert env._shared.requests == sent + 1  # nothing asked again
        assert texts[0] == texts[2] != texts[1] and all(t.startswith("[1] ") for t in texts)
        assert all(not s.prefetched for s in states)
    # A server gone by prefetch time: every rollout's call records the failure; the episode goes on.
    env.prefetch([(states[0], "search", "Orsa river")])
    assert env.call_tool(states[0], "search", "Orsa river").startswith("The search failed")
    assert states[0].search_failures == 1


def test_an_episode_through_the_server_equals_one_in_process(tiny, tmp_path):
    """The same scripted searches through a retrieval server and through the in-process index of the same corpus:
    the same observations, prompts, tokens and metrics."""
    from test_tool_episodes import _runner

    corpus = _corpus(HotpotQAEnv(path=str(FIXTURE)), tmp_path / "corpus.jsonl")
    script = ["<search>river town clock tower</search>", "<search>Marrow Glass founded</search>",
              "<answer>Orsa; Ida Fennick</answer>"]
    batches = []
    with RetrievalServer(CorpusIndex.from_jsonl(corpus), port=0) as server:
        for retriever in ({"kind": "bm25", "corpus": str(corpus)}, {"kind": "http", "url": server.url}):
            env = HotpotQAEnv(path=str(FIXTURE), k=2, retriever=retriever)
            runner, _ = _runner(tiny, {0: list(script), 1: list(script)}, rollouts=2, l_max=4000)
            batches.append(runner.run(env, [env.task(0)] * 2))
    local, remote = ([t.to_dict() for t in b.trajectories] for b in batches)
    for a, b in zip(local, remote):
        for t in (a, b):
            t.pop("timings")
        assert a == b
    assert local[0]["tool_calls"] == 2 and local[0]["metrics"]["support_recall"] > 0
    assert local[0]["prediction"] == "Orsa; Ida Fennick"


def test_eval_runs_every_memory_method(tmp_path):
    from test_tool_episodes import AGENT_METHODS, eval_agent_methods

    summary, records = eval_agent_methods(tmp_path, "hotpotqa", l_max=60, path=str(FIXTURE), k=2, max_turns=2)
    for record in records:
        assert {"f1_q1", "f1_q2", "support_recall", "search_failures", "tool_calls", "malformed_actions"} <= set(record)
    for method in AGENT_METHODS:
        assert set(summary[method]) >= {"f1_q1", "f1_q2", "support_recall", "turns", "tool_calls"}
    assert "support_recall" in (tmp_path / "summary.md").read_text()
