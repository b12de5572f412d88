"""Continual learning (fast weights carried across episodes) and the inner loop's supervision ablations."""

import dataclasses
import json

import pytest
import torch

from tmem_rl.envs import make_env
from tmem_rl.errors import InputError
from tmem_rl.evaluation.continual import CONTINUAL, continual_summary
from tmem_rl.evaluation.harness import EvalConfig, read_records, run_eval
from tmem_rl.evaluation.methods import MethodSettings
from tmem_rl.memory import FastWeightConfig, FastWeights
from tmem_rl.models import FIXTURE_TOKENIZER, tiny_model
from tmem_rl.episode import RECALL_REQUEST, EpisodeConfig
from tmem_rl.episode.memory import text_pieces
from tmem_rl.extraction import answer_messages

from test_rollout import ScriptedGeneration


class ScriptedRunner(ScriptedGeneration):
    """The real runner with fixed generated text: extractions write one grounded pair, summaries fixed notes."""

    notes = "Maya lives in Lisbon and has a dog called Biscuit."

    def generate(self, prompts, slots, max_new_tokens, sample, temperature, stop_strings=None, stopping=None):
        if max_new_tokens == self.config.max_extraction_tokens:
            text = ' {"instruction": "Who spoke?", "output": "Maya"}]'
        elif max_new_tokens == self.config.summary_tokens:
            text = self.notes
        else:
            text = "Maya"
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        return [list(ids) for _ in prompts]


@pytest.fixture
def env():
    return make_env("facts", num_tasks=4, num_distractors=10, num_facts=3, lines_per_chunk=2)


def runner_for(tiny, **episode):
    model, tok = tiny
    fast = FastWeights(model, 2, FastWeightConfig(lr=0.05, epochs=1, max_pair_tokens=64))
    return ScriptedRunner(model, tok, fast, EpisodeConfig(l_max=40, grounding=False, **episode))


def b_norm(runner, slot):
    return sum(float(b[slot].norm()) for b in runner.fast.B.values())


# ---- carried fast weights ------------------------------------------------------------------------------------


def test_carried_fast_weights_are_live_from_the_next_episodes_first_segment(tiny, env):
    runner = runner_for(tiny, carry_fast_weights=True)
    first = runner.run(env, [env.task(0), env.task(1)])
    versions = list(runner.fast.versions)
    assert all(v > 0 for v in versions), "the first episode must absorb something for this test to mean anything"
    carried = {slot: b_norm(runner, slot) for slot in (0, 1)}

    second = runner.run(env, [env.task(2), env.task(3)])
    for g, traj in enumerate(second.trajectories):
        opening = traj.segments[0]
        assert opening.fast_weight_version == versions[g]  # not 0: the base model is not where it starts
        assert torch.equal(second.snapshots[opening.snapshot]["B." + next(iter(runner.fast.B))],
                           first.snapshots[f"{g}/{versions[g]}"]["B." + next(iter(runner.fast.B))])
        assert runner.fast.versions[g] > versions[g]  # and it goes on absorbing
        assert b_norm(runner, g) != carried[g]


def test_without_carrying_every_episode_starts_from_the_base_model(tiny, env):
    runner = runner_for(tiny)
    runner.run(env, [env.task(0), env.task(1)])
    second = runner.run(env, [env.task(2), env.task(3)])
    assert all(t.segments[0].fast_weight_version == 0 and t.segments[0].snapshot is None
               for t in second.trajectories)


def test_reset_fast_weights_clears_carried_weights_when_asked(tiny, env):
    runner = runner_for(tiny, carry_fast_weights=True)
    runner.run(env, [env.task(0), env.task(1)])
    assert b_norm(runner, 0) > 0
    runner.reset_fast_weights([0])
    assert b_norm(runner, 0) == 0 and runner.fast.versions[0] == 0
    assert b_norm(runner, 1) > 0 and runner.fast.versions[1] > 0  # only the slot asked for
    second = runner.run(env, [env.task(2), env.task(3)])
    assert second.trajectories[0].segments[0].fast_weight_version == 0
    assert second.trajectories[1].segments[0].fast_weight_version > 0


# ---- supervision ablations -----------------------------------------------------------------------------------


def test_transcript_supervision_learns_the_context_itself_in_pieces_that_fit(tiny, env):
    runner = runner_for(tiny, supervision="transcript")
    batch = runner.run(env, [env.task(0)])
    traj = batch.trajectories[0]
    assert not [s for s in traj.segments if s.kind == "extraction"]  # nothing is written by the policy
    chunks = env.task(0).chunks
    assert traj.extractions, "the stream must pass the budget"
    start = 0
    for point in traj.extractions:
        assert point.supervision_kind == "transcript"
        pieces = [p.output for p in point.supervision.pairs]
        assert len(pieces) >= 2  # 64-token pairs: the ~40-token context does not fit one with its prompt
        assert all(p.instruction == RECALL_REQUEST for p in point.supervision.pairs)
        # Exactly the window since the last extraction point, in order (pieces cut lines, so compare without
        # whitespace).
        window = "\n".join(chunks[start : point.chunk_index + 1])
        assert "".join("".join(pieces).split()) == "".join(window.split())
        start = point.chunk_index + 1
        assert point.inner_update.num_pairs == len(pieces) and not point.inner_update.dropped
    assert runner.fast.versions[0] == len(traj.extractions)


def test_summary_supervision_learns_the_notes_the_model_wrote(tiny, env):
    runner = runner_for(tiny, supervision="summary")
    traj = runner.run(env, [env.task(0)]).trajectories[0]
    summaries = [s for s in traj.segments if s.kind == "summary"]
    assert len(summaries) == len(traj.extractions) > 0
    for point in traj.extractions:
        assert [p.output for p in point.supervision.pairs] == [ScriptedRunner.notes]
    answer = next(s for s in traj.segments if s.kind == "answer")
    # Learned, not shown: the notes never reach a later prompt.
    assert ScriptedRunner.notes not in runner.tokenizer.decode(answer.prompt_ids)


def test_an_unknown_supervision_is_refused():
    with pytest.raises(ValueError, match="supervision"):
        EpisodeConfig(supervision="raw")
    with pytest.raises(ValueError, match="extractor='reference' does not apply"):
        EpisodeConfig(supervision="transcript", extractor="reference")


@pytest.mark.parametrize("text", ["日本語のテキスト" * 30, "🙂 " * 60, "word " * 200, "x" * 400])
def test_text_pieces_fit_the_budget_and_never_split_a_character(tiny, text):
    runner = runner_for(tiny)
    pieces = text_pieces(text, 16, runner.sampler)
    assert all(runner.sampler.count_tokens(p) <= 16 for p in pieces)
    assert "\ufffd" not in "".join(pieces)
    assert "".join("".join(pieces).split()) == "".join(text.split())
    if " " in text.strip():  # cut at spaces: every piece is whole words
        assert all(set(p.split()) <= set(text.split()) for p in pieces)


def test_a_pair_budget_too_small_for_the_recall_request_is_one_clear_error(tiny, env):
    runner = runner_for(tiny, supervision="transcript")
    # The chat-formatted recall request and the answer turn's margin of 8, plus 4 tokens of text.
    small = len(runner.sampler.prompt_ids(answer_messages(RECALL_REQUEST))) + 8 + 4
    runner.fast.config = dataclasses.replace(runner.fast.config, max_pair_tokens=small)
    with pytest.raises(ValueError, match=f"inner_loop.max_pair_tokens={small} leaves 4 tokens"):
        runner.run(env, [env.task(0)])


# ---- continual evaluation ------------------------------------------------------------------------------------


def record(row, phase, sequence, position, f1):
    return {"continual_row": row, "phase": phase, "sequence": sequence, "position": position, "f1": f1}


def test_continual_summary_on_hand_checked_records():
    records = []
    # 2 sequences x 3 positions.
    fresh = {(0, 0): 0.5, (0, 1): 0.2, (0, 2): 0.4, (1, 0): 0.5, (1, 1): 0.0, (1, 2): 0.6}
    carried = {(0, 0): 0.5, (0, 1): 0.6, (0, 2): 0.4, (1, 0): 0.5, (1, 1): 0.4, (1, 2): 0.2}
    only = {(0, 0): 0.8, (0, 1): 0.4, (0, 2): 1.0, (1, 0): 0.4, (1, 1): 0.4, (1, 2): 0.0}
    end = {(0, 0): 0.2, (0, 1): 0.4, (0, 2): 1.0, (1, 0): 0.2, (1, 1): 0.2, (1, 2): 0.0}
    for phase, values in (("fresh", fresh), ("carried", carried), ("carried-only", only), ("end", end)):
        records += [record("tmem", phase, s, p, f1) for (s, p), f1 in values.items()]
    records.append(record("other", "fresh", 0, 0, 1.0))  # another row's records are not mixed in
    s = continual_summary(records, "tmem")
    assert (s["sequences"], s["length"]) == (2, 3)
    # Positions 1 and 2: carried (0.6 + 0.4 + 0.4 + 0.2) / 4 = 0.4, fresh (0.2 + 0.4 + 0 + 0.6) / 4 = 0.3.
    assert s["forward_transfer"] == pytest.approx(0.1)
    # Positions 0 and 1: weights only right after (0.8 + 0.4 + 0.4 + 0.4) / 4 = 0.5, at the end 1.0 / 4 = 0.25.
    assert s["retention"] == pytest.approx(0.5)
    assert s["forgetting"] == pytest.approx(0.25)
    assert s["f1_by_position"]["end"] == pytest.approx([0.2, 0.3, 0.5])


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    model, tok = tiny_model(num_layers=4, tokenizer_path=FIXTURE_TOKENIZER)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def continual_config(tiny_path, out, **overrides):
    base = dict(out=str(out), env="facts", model=tiny_path,
                episode=EpisodeConfig(l_max=40, max_answer_tokens=4, max_extraction_tokens=8),
                continual=True, methods=["tmem-reference"],
                env_kwargs={"num_tasks": 4, "num_facts": 3, "num_distractors": 8, "lines_per_chunk": 2},
                fast_weights=FastWeightConfig(lr=0.05, epochs=2), device="cpu",
                methods_settings=MethodSettings(answer_batch_size=2))
    base.update(overrides)
    return EvalConfig(**base)


def test_continual_eval_writes_every_phase_and_the_transfer_report(tiny_path, tmp_path):
    summary = run_eval(continual_config(tiny_path, tmp_path))
    assert set(summary) == {f"tmem-reference:{p}" for p in ("fresh", "carried", "carried-only", "end")}
    records = read_records(tmp_path / "results.jsonl")
    by_phase = {}
    for r in records:
        by_phase.setdefault(r["phase"], []).append(r)
    assert {p: len(rs) for p, rs in by_phase.items()} == {"fresh": 4, "carried": 4, "carried-only": 4, "end": 4}
    # Position 0 of a carried sequence is the fresh episode itself: same answers (greedy).
    fresh0 = {r["sequence"]: r["prediction"] for r in by_phase["fresh"] if r["position"] == 0}
    carried0 = {r["sequence"]: r["prediction"] for r in by_phase["carried"] if r["position"] == 0}
    assert fresh0 == carried0
    # The end answers come from weights that absorbed both episodes of their sequence.
    versions = {(r["sequence"], r["position"]): r["fast_weight_version"] for r in by_phase["carried-only"]}
    assert all(versions[(s, 1)] > versions[(s, 0)] > 0 for s in (0, 1))
    assert all(r["fast_weight_version"] == versions[(r["sequence"], 1)] for r in by_phase["end"])
    report = json.loads((tmp_path / CONTINUAL).read_text())["tmem-reference"]
    assert (report["sequences"], report["length"]) == (2, 2)
    assert set(report) >= {"forward_transfer", "retention", "forgetting", "f1_by_position"}
    assert "forward transfer" in (tmp_path / "summary.md").read_text()


def test_continual_rows_of_a_checkpoint_are_labelled_by_policy(tiny_path, tmp_path):
    summary = run_eval(continual_config(tiny_path, tmp_path, checkpoint=tiny_path, evaluate_base=False))
    assert set(summary) == {f"tmem-reference:{p}@trained" for p in ("fresh", "carried", "carried-only", "end")}
    assert all(row["n"] == 4 for row in summary.values())
    assert set(json.loads((tmp_path / CONTINUAL).read_text())) == {"tmem-reference@trained"}


@pytest.mark.parametrize("overrides, message", [
    ({"methods": ["tmem", "none"]}, "method(s) none have none"),
    ({"resume": True}, "cannot --resume"),
    ({"episode_unit": "conversation"}, "episode_unit='conversation' does not apply"),
    ({"max_questions": 3}, "3 task(s) in 2 sequences"),
    ({"env_kwargs": {"num_tasks": 4, "num_facts": 3, "questions_per_task": 2}}, "task 'facts-0-0' of 'facts' asks 2"),
])
def test_continual_refuses_what_it_cannot_do(tiny_path, tmp_path, overrides, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_eval(continual_config(tiny_path, tmp_path, **overrides))
