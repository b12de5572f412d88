import json
import math

import pytest
import torch
from test_decoding import P1, P2, STOPPING_TEXTS, expected_stops, forced

from tmem_rl.envs import make_env
from tmem_rl.envs.base import ContractError, Environment, Question, Task
from tmem_rl.metrics.qa import token_f1
from tmem_rl.memory import FastWeightConfig, FastWeights
from tmem_rl.models import tiny_model
from tmem_rl.episode import EpisodeBatch, EpisodeConfig, EpisodeRunner, InnerUpdate


class ScriptedGeneration(EpisodeRunner):
    """The real runner whose sampler generates through the subclass's `generate` (a test's policy); the sampler's
    own stays at hand as `sampler_generate`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sampler_generate, self.sampler.generate = self.sampler.generate, self.generate


class ScriptedRunner(ScriptedGeneration):
    """The real runner with a policy whose text is fixed, so the control flow can be checked exactly."""

    extraction_text = ' {"instruction": "What did Maya say?", "output": "hello there"}]'
    answer_text = "hello there"

    def generate(self, prompts, slots, max_new_tokens, sample, temperature, stop_strings=None, stopping=None):
        text = self.extraction_text if max_new_tokens == self.config.max_extraction_tokens else self.answer_text
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        return [list(ids) for _ in prompts]


def expected_triggers(tokenizer, chunks, l_max):
    triggers, used = [], 0
    for i, chunk in enumerate(chunks):
        used += len(tokenizer(chunk, add_special_tokens=False)["input_ids"])
        if used > l_max:
            triggers.append(i)
            used = 0
    return triggers


@pytest.fixture
def env():
    return make_env("facts", num_tasks=3, num_distractors=14, num_facts=4, lines_per_chunk=2)


@pytest.mark.parametrize("l_max", [30, 75, 160])
def test_extraction_triggers_exactly_when_budget_is_exceeded(tiny, env, l_max):
    model, tok = tiny
    fast = FastWeights(model, 2, FastWeightConfig(lr=0.05, epochs=1))
    runner = ScriptedRunner(model, tok, fast, EpisodeConfig(l_max=l_max, grounding=False))
    tasks = [env.task(0), env.task(1)]
    batch = runner.run(env, tasks)
    for g, (task, traj) in enumerate(zip(tasks, batch.trajectories)):
        triggers = expected_triggers(tok, task.chunks, l_max)
        assert triggers, "the stream must be longer than the budget for this test to mean anything"
        got = [s.chunk_index for s in traj.segments if s.kind == "extraction" and s.attempt == 0]
        assert got == triggers
        assert fast.versions[g] == len(triggers)
        # The answer sees exactly the chunks read since the last extraction cleared the context.
        answer = next(s for s in traj.segments if s.kind == "answer")
        prompt = tok.decode(answer.prompt_ids)
        for i, chunk in enumerate(task.chunks):
            assert (chunk in prompt) == (i > triggers[-1]), f"chunk {i}"
        assert answer.fast_weight_version == len(triggers)
        assert traj.prediction == "hello there"
        assert traj.reward == env.score(task, "hello there")["reward"]


def test_segments_record_the_live_snapshot(tiny, env):
    model, tok = tiny
    fast = FastWeights(model, 1, FastWeightConfig(lr=0.05, epochs=2))
    runner = ScriptedRunner(model, tok, fast, EpisodeConfig(l_max=60, grounding=False))
    batch = runner.run(env, [env.task(0)])
    traj = batch.trajectories[0]
    versions = [s.fast_weight_version for s in traj.segments]
    assert versions == sorted(versions) and versions[0] == 0 and versions[-1] >= 2
    assert traj.segments[0].snapshot is None  # the first extraction runs on the base model
    for seg in traj.segments[1:]:
        assert seg.snapshot == f"0/{seg.fast_weight_version}"
    final = batch.snapshots[traj.segments[-1].snapshot]
    for key, tensor in fast.snapshot([0]).items():
        assert torch.equal(final[key], tensor)
    earlier = batch.snapshots["0/1"]
    assert not torch.equal(earlier[next(iter(earlier))], final[next(iter(final))])
    losses = [e.inner_update for e in traj.extractions]
    assert all(u.loss_after < u.loss_before for u in losses)
    json.dumps(batch.to_dict())  # the record is plain JSON


def test_no_memory_baseline_never_extracts(tiny, env):
    model, tok = tiny
    fast = FastWeights(model, 1, FastWeightConfig())
    runner = ScriptedRunner(model, tok, fast, EpisodeConfig(l_max=60, memory="none"))
    traj = runner.run(env, [env.task(0)]).trajectories[0]
    assert [s.kind for s in traj.segments] == ["answer"]
    assert fast.versions == [0] and traj.segments[0].snapshot is None


def test_unparseable_extractions_are_retried_and_recorded(tiny, env):
    model, tok = tiny
    runner = ScriptedRunner(model, tok, FastWeights(model, 1, FastWeightConfig()),
                            EpisodeConfig(l_max=60, extraction_retries=2))
    runner.extraction_text = "I am not sure what to write."
    traj = runner.run(env, [env.task(0)]).trajectories[0]
    first = traj.extractions[0]
    assert [a.error for a in first.supervision.attempts] == ["no JSON found"] * 3
    assert first.inner_update is None and runner.fast.versions == [0]


def strip_timings(batch):
    record = batch.to_dict()
    for traj in record["trajectories"]:
        traj.pop("timings")
        for e in traj["extractions"]:
            if e["inner_update"]:
                e["inner_update"].pop("seconds")
    return record


def test_same_seed_same_trajectory(tiny, env):
    model, tok = tiny
    fast = FastWeights(model, 2, FastWeightConfig(lr=0.05, epochs=1))
    cfg = dict(l_max=60, do_sample=True, temperature=1.0, max_extraction_tokens=12, max_answer_tokens=6)
    tasks = [env.task(1), env.task(1)]
    runs = [EpisodeRunner(model, tok, fast, EpisodeConfig(seed=s, **cfg)).run(env, tasks) for s in (5, 5, 6)]
    assert strip_timings(runs[0]) == strip_timings(runs[1])
    assert strip_timings(runs[0]) != strip_timings(runs[2])
    # The two rollouts of one task sample different continuations.
    a, b = runs[0].trajectories
    assert [s.completion_ids for s in a.segments] != [s.completion_ids for s in b.segments]


# ---- extractions that stop once their pairs are written --------------------------------------------------------


class ForcedRunner(ScriptedGeneration):
    """The real runner and decoders, with each rollout's extraction text forced token by token (answers: "x")."""

    def __init__(self, *args, extractions: list[list[int]], **kwargs):
        super().__init__(*args, **kwargs)
        self.extractions = extractions

    def generate(self, prompts, slots, max_new_tokens, sample, temperature, stop_strings=None, stopping=None):
        answer = self.tokenizer("x", add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        scripts = [self.extractions[g] if stopping is not None else answer for g in slots]
        with forced(self.model, scripts, then=self.tokenizer.eos_token_id):
            return self.sampler_generate(prompts, slots, max_new_tokens, sample, temperature, stop_strings, stopping)


@pytest.mark.parametrize("decoder, stop", [("generate", True), ("static", True), ("generate", False)])
def test_extraction_segments_keep_what_their_stop_allows_with_its_reason_and_log_probs(decoder, stop, tmp_path):
    model, tok = tiny_model(num_layers=2)
    eos = tok.eos_token_id
    texts = dict(STOPPING_TEXTS, length=f" {P1}, " + '{"instruction": "' + "and so on " * 20)
    scripts = {name: tok(text, add_special_tokens=False)["input_ids"] for name, text in texts.items()}
    scripts["eos"].append(eos)
    names = list(scripts)
    budget = max(len(s) for name, s in scripts.items() if name != "length") + 2
    assert len(scripts["length"]) > budget
    env = make_env("facts", num_tasks=1, num_facts=2, num_distractors=2, lines_per_chunk=4)
    fast = FastWeights(model, len(names), FastWeightConfig(num_layers=1, epochs=1))
    config = EpisodeConfig(l_max=30, max_pairs=2, max_extraction_tokens=budget, max_answer_tokens=4, grounding=False,
                           record_logprobs=True, decoder=decoder, stop_extractions=stop)
    runner = ForcedRunner(model, tok, fast, config, extractions=[scripts[name] for name in names])
    batch = runner.run(env, [env.task(0)] * len(names))
    fast.remove()

    if stop:
        kept = {name: scripts[name][:n] for name, (_, n) in expected_stops(tok, scripts).items()}
        reasons = {name: name for name in names}
    else:  # each script runs to its end token, or to the budget
        kept = {name: (script + [eos])[: budget] if name != "eos" else script for name, script in scripts.items()}
        reasons = {name: "length" if name == "length" else "eos" for name in names}
    kept["length"] = scripts["length"][:budget]
    # The pairs of the text kept: a repeat is no longer there to be dropped as a duplicate.
    q1, q2, q3 = "Who founded Acme?", "When?", "Where?"
    pairs = {"max_pairs": [q1, q2] if stop else [q1, q2, q3], "repeat": [q1] if stop else [q1, q2], "closed": [q1],
             "eos": [q2], "length": [q1]}
    for name, trajectory in zip(names, batch.trajectories):
        segments = [s for s in trajectory.segments if s.kind == "extraction"]
        assert segments and all(s.attempt == 0 for s in segments), "every extraction yields a pair: no retries"
        for segment, extraction in zip(segments, trajectory.extractions):
            assert (segment.stop_reason, segment.completion_ids) == (reasons[name], kept[name]), name
            assert len(segment.logprobs) == len(kept[name]) and all(math.isfinite(lp) for lp in segment.logprobs)
            assert [p.instruction for p in extraction.supervision.pairs] == pairs[name], name
            dropped = extraction.supervision.attempts[0].dropped
            assert ("duplicate" in [d["reason"] for d in dropped]) == (name == "repeat" and not stop)
    batch.save(tmp_path)
    loaded = EpisodeBatch.load(tmp_path).trajectories
    assert [s.stop_reason for s in loaded[0].segments] == [s.stop_reason for s in batch.trajectories[0].segments]
    # Typed again on load: the extraction points, their supervision, attempts and inner updates.
    assert loaded == batch.trajectories and isinstance(loaded[0].extractions[0].inner_update, InnerUpdate)


class ThreeQuestions(Environment):
    """One stream, three questions about it, each scored by token F1 against its own answer."""

    name = "three-questions-test"
    GOLDS = ("hello there", "hello", "goodbye")

    def __len__(self):
        return 1

    def task(self, index):
        chunks = tuple(f"Maya: line {i} of the chat, hello there, says Maya to Leo again." for i in range(6))
        questions = tuple(Question(f"Question {i}?", (gold,), {"category": i}) for i, gold in enumerate(self.GOLDS))
        return Task("chat", "", chunks, (), questions=questions)

    def score(self, task, prediction):
        f1 = token_f1(prediction, task.answers[0])
        return {"reward": f1, "f1": f1, "em": float(f1 == 1.0)}


def test_a_task_of_several_questions_answers_each_under_the_same_fast_weights_and_scores_their_mean(tiny, tmp_path):
    model, tok = tiny
    env = ThreeQuestions()
    runner = ScriptedRunner(model, tok, FastWeights(model, 2, FastWeightConfig(lr=0.05, epochs=1)),
                            EpisodeConfig(l_max=30, grounding=False, record_logprobs=True))
    batch = runner.run(env, [env.task(0)] * 2)
    for traj in batch.trajectories:
        answers = [s for s in traj.segments if s.kind == "answer"]
        extractions = [s for s in traj.segments if s.kind == "extraction"]
        assert len(answers) == 3 and extractions
        # Every answer after the whole stream, under the fast weights the last extraction left, with log-probs.
        assert {s.fast_weight_version for s in answers} == {len(extractions)}
        assert all(s.logprobs is not None and len(s.logprobs) == len(s.completion_ids) for s in answers)
        for i, segment in enumerate(answers):
            assert f"Question {i}?" in tok.decode(segment.prompt_ids)
        scores = [token_f1("hello there", gold) for gold in env.GOLDS]  # 1, 2/3, 0
        assert [a.reward for a in traj.answered] == scores
        assert [(a.question_id, a.category) for a in traj.answered] == [(f"chat/q{i}", i) for i in range(3)]
        assert traj.reward == pytest.approx(sum(scores) / 3)
        assert traj.metrics == pytest.approx({"reward": sum(scores) / 3, "f1": sum(scores) / 3, "em": 1 / 3})
        assert traj.prediction == "hello there"
    batch.save(tmp_path / "batch")
    assert EpisodeBatch.load(tmp_path / "batch").trajectories[1].answered == batch.trajectories[1].answered


def test_a_tool_environment_refuses_a_task_of_several_questions(tiny):
    from test_tool_episodes import NotesEnv

    class SeveralNotes(NotesEnv):
        def task(self, index):
            return Task("t", "Codes?", (), (), questions=(Question("Alpha?", ("4417",)), Question("Beta?", ("9021",))))

    model, tok = tiny
    runner = ScriptedRunner(model, tok, FastWeights(model, 1, FastWeightConfig()), EpisodeConfig(l_max=60))
    with pytest.raises(ContractError, match="tool environment, whose episodes end at one answer; task 't' asks 2"):
        runner.run(SeveralNotes(), [SeveralNotes().task(0)])
