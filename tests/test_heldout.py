"""Held-out evaluation: the seeded task partition, checkpoints against the base model, reference pairs, the warm
start's examples and the inner loop's collapse guard."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tmem_rl.envs import make_env
from tmem_rl.errors import InputError
from tmem_rl.envs.split import TaskSplit, split_env
from tmem_rl.evaluation.harness import EvalConfig, read_records, run_eval
from tmem_rl.evaluation.methods import MethodSettings
from tmem_rl.extraction import EXTRACTION_PREFILL, extraction_messages, parse_qa_pairs
from tmem_rl.memory import FastWeightConfig, FastWeights
from tmem_rl.memory.fast_weights import damaged, leaked
from tmem_rl.checkpoint_reader import load_trained_policy
from tmem_rl.models import tiny_model
from tmem_rl.records import QAPair
from tmem_rl.episode import EpisodeConfig, EpisodeRunner
from tmem_rl.trainers.warm_start import (IGNORE, WarmStartConfig, extraction_sft_examples, extraction_windows,
                                        warm_start)

FACTS = dict(num_tasks=40, num_facts=3, num_distractors=4, lines_per_chunk=5)
# Windows past l_max 860 give a first two examples of 1041 and 1123 tokens, the first past TRL's default max_length
# (1024) by its target only, the second by its prompt too.
LONG_FACTS = dict(num_tasks=2, num_facts=3, num_distractors=150, lines_per_chunk=5)
LONG_EPISODE = EpisodeConfig(l_max=860, max_pairs=3, examples=False)


def test_split_partitions_tasks_and_is_stable_as_the_pool_grows():
    env = make_env("facts", **FACTS)
    train, heldout = TaskSplit(env, "train", 0.25), TaskSplit(env, "heldout", 0.25)
    train_ids = {t.task_id for t in train.tasks()}
    heldout_ids = {t.task_id for t in heldout.tasks()}
    assert not train_ids & heldout_ids
    assert train_ids | heldout_ids == {t.task_id for t in env.tasks()}
    assert 4 <= len(heldout) <= 16  # ~10 of 40
    bigger = TaskSplit(make_env("facts", **{**FACTS, "num_tasks": 80}), "heldout", 0.25)
    assert heldout_ids <= {t.task_id for t in bigger.tasks()}, "a task's side must not depend on the pool size"
    assert heldout_ids != {t.task_id for t in TaskSplit(env, "heldout", 0.25, seed=1).tasks()}
    assert split_env(env, "all") is env
    task = heldout.task(0)
    assert heldout.score(task, task.answers[0])["f1"] == 1.0


def test_split_keeps_conversations_together():
    env = make_env("locomo", data="tests/fixtures/locomo_tiny.json")
    for side in ("train", "heldout"):
        try:
            part = TaskSplit(env, side, 0.5, seed=3)
        except ValueError:  # every conversation fell on the other side
            continue
        samples = {t.metadata["sample_id"] for t in part.tasks()}
        assert all(t.metadata["sample_id"] in samples for t in env.tasks() if t.metadata["sample_id"] in samples)
        assert len(part) == sum(t.metadata["sample_id"] in samples for t in env.tasks())


def test_bad_split_settings_are_clear_errors():
    env = make_env("facts", **FACTS)
    with pytest.raises(ValueError, match="heldout_fraction must be in"):
        TaskSplit(env, "heldout", 0.0)
    with pytest.raises(ValueError, match="split must be one of"):
        split_env(env, "test", 0.2)
    with pytest.raises(ValueError, match="is empty"):
        TaskSplit(make_env("facts", num_tasks=1), "heldout", 0.001)


def test_reference_pairs_are_the_planted_facts_asked_one_first():
    env = make_env("facts", **FACTS)
    for task in env.tasks()[:10]:
        stream = "\n".join(task.chunks)
        first = task.reference_pairs[0]
        assert (first.instruction, first.output) == (task.question, task.answers[0])
        assert all(p.output in stream for p in task.reference_pairs)
        assert len(task.reference_pairs) >= 3  # one per fact, two per meeting
        assert task.metadata["category"] == task.metadata["fact_kind"]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(num_layers=2)


def test_warm_start_examples_train_only_the_ideal_extraction_as_the_agent_prompts_it(tiny):
    model, tok = tiny
    env = make_env("facts", **FACTS)
    episode = EpisodeConfig(l_max=56, max_pairs=3, examples=False)
    examples = extraction_sft_examples(env, tok, model, episode, max_examples=6)
    assert len(examples) == 6
    runner = EpisodeRunner(model, tok, None, EpisodeConfig(l_max=56, memory="none"))
    task = env.task(0)
    window = extraction_windows(tok, task, 56)[0]
    prompt = runner.sampler.prompt_ids(extraction_messages(task.question, window, [], 3, False), prefill=EXTRACTION_PREFILL)
    first = examples[0]
    assert first["input_ids"][: len(prompt)] == prompt
    assert all(label == IGNORE for label in first["labels"][: len(prompt)])
    completion = first["input_ids"][len(prompt):]
    assert first["labels"][len(prompt):] == completion and completion[-1] in runner.sampler.stop_ids
    record = parse_qa_pairs(tok.decode(completion, skip_special_tokens=True), prefilled=True, source=window)
    assert record.pairs and record.pairs[0] == QAPair(task.question, task.answers[0])
    assert not record.dropped


def test_warm_start_needs_reference_pairs(tiny):
    model, tok = tiny
    env = make_env("locomo", data="tests/fixtures/locomo_tiny.json")
    with pytest.raises(ValueError, match="has no reference_pairs"):
        extraction_sft_examples(env, tok, model, EpisodeConfig(l_max=56))


def test_warm_start_trains_every_long_example_whole(tmp_path, monkeypatch):
    import trl

    model, tok = tiny_model(num_layers=1)  # its own: training merges a LoRA into it
    env = make_env("facts", **LONG_FACTS)
    examples = extraction_sft_examples(env, tok, model, LONG_EPISODE, max_examples=2)
    assert min(len(e["input_ids"]) for e in examples) > 1024
    trained = []
    train = trl.SFTTrainer.train

    def spy(trainer, *args, **kwargs):
        trained.extend(trainer.train_dataset)
        return train(trainer, *args, **kwargs)

    monkeypatch.setattr(trl.SFTTrainer, "train", spy)
    config = WarmStartConfig(output_dir=str(tmp_path), max_examples=2, per_device_train_batch_size=2,
                             lora_r=2, lora_alpha=4)
    summary = warm_start(model, tok, env, LONG_EPISODE, config)
    lengths = sorted(len(e["input_ids"]) for e in examples)
    assert sorted(len(row["input_ids"]) for row in trained) == lengths, "TRL must train each example whole"
    whole = sorted((e["input_ids"], e["labels"]) for e in examples)
    assert sorted((row["input_ids"], row["labels"]) for row in trained) == whole
    for row in trained:  # the whole JSON list is trained, then the stop token
        target = [label for label in row["labels"] if label != IGNORE]
        assert target[-1] == row["input_ids"][-1] == tok.eos_token_id
        assert json.loads(EXTRACTION_PREFILL + tok.decode(target[:-1]))
    assert summary == json.loads((tmp_path / "warm_start.json").read_text())
    assert summary["examples"] == 2 and summary["examples_cut"] == 0 and summary["steps"] == 1
    assert summary["max_length"] == summary["tokens"]["max"] == max(lengths)
    assert summary["tokens"]["min"] == min(lengths)
    assert summary["target_tokens"]["min"] > 0


def test_warm_start_examples_past_the_models_positions_are_one_clear_error(tmp_path):
    model, tok = tiny_model(num_layers=1)
    model.config.max_position_embeddings = 1000
    env = make_env("facts", **LONG_FACTS)
    with pytest.raises(InputError, match=r"l_max 860.* is 1123 tokens, more than the model's 1000 positions "
                                         r"\(config.max_position_embeddings\); lower episode.l_max by at least 123"
                       ) as raised:
        warm_start(model, tok, env, LONG_EPISODE, WarmStartConfig(output_dir=str(tmp_path), max_examples=2))
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "warm_start.json").exists()


def test_reference_extractor_absorbs_the_ideal_extraction_and_generates_nothing(tiny):
    model, tok = tiny
    env = make_env("facts", **FACTS)
    tasks = [env.task(i) for i in range(3)]
    fast = FastWeights(model, 3, FastWeightConfig(num_layers=2, epochs=1))
    runner = EpisodeRunner(model, tok, fast, EpisodeConfig(l_max=56, max_pairs=3, extractor="reference"))
    episode = runner.read(env, tasks)
    for g, task in enumerate(tasks):
        window = extraction_windows(tok, task, 56)[0]
        expected = [p for p in task.reference_pairs if p.output in window][:3]
        assert episode.rollouts[g].pairs == expected and expected[0] == QAPair(task.question, task.answers[0])
        assert not episode.trajectories[g].segments, "nothing is generated for a reference extraction"
        assert fast.versions[g] == 1
    locomo = make_env("locomo", data="tests/fixtures/locomo_tiny.json")
    runner.config = EpisodeConfig(l_max=8, extractor="reference")
    with pytest.raises(ValueError, match="has no reference_pairs"):
        runner.read(locomo, [locomo.task(0)])
    fast.remove()
    with pytest.raises(ValueError, match="extractor='oracle'"):
        EpisodeConfig(extractor="oracle")


COLLAPSE = [QAPair(q, "Gina") for q in ("Who is it?", "Where?", "When?", "What is it?")]
COLLAPSING = dict(num_layers=2, lr=1.0, epochs=30)  # at lr 2.0 the answers after the collapse vary by kernel path


@pytest.fixture(scope="module")
def turn_ending():
    """The tiny model with an embedding for its end-of-turn token, which tiny_model leaves at zero (the padding
    row): without it no answer ever ends, while a collapse is an answer that ends where the absorbed one does
    (SmolLM2-135M: "Gina" to all six probes)."""
    model, tok = tiny_model(num_layers=2)
    with torch.no_grad():
        row = model.get_input_embeddings().weight[tok.eos_token_id]  # tied: the LM head's row too
        row.copy_(torch.randn(row.shape, generator=torch.Generator().manual_seed(0)) * 0.2)
    return model, tok


@pytest.mark.kernel_paths
def test_collapse_guard_rolls_back_an_absorb_that_answers_everything_with_it(turn_ending):
    model, tok = turn_ending
    fast = FastWeights(model, 2, FastWeightConfig(**COLLAPSING, max_probe_leak=0.5))
    before = fast.snapshot()
    stats = fast.absorb(tok, {0: COLLAPSE})
    assert stats[0].probe_leak > 0.5 and stats[0].rolled_back
    assert all("Gina" in a for a in stats[0].probe_answers)
    assert all(torch.equal(t, before[k]) for k, t in fast.snapshot().items()), "a rollback restores the slot"
    assert fast.versions == [0, 0]
    unguarded = FastWeights(model, 2, FastWeightConfig(**COLLAPSING))
    stats = unguarded.absorb(tok, {0: COLLAPSE})
    assert stats[0].probe_leak is None and not stats[0].rolled_back and unguarded.versions == [1, 0]
    unguarded.remove()
    fast.remove()


def test_collapse_guard_keeps_an_absorb_that_leaves_other_answers_alone(tiny):
    model, tok = tiny
    fast = FastWeights(model, 1, FastWeightConfig(num_layers=2, lr=0.05, epochs=1, max_probe_leak=0.5))
    stats = fast.absorb(tok, {0: [QAPair("What is Maya's pet called?", "Biscuit")]})
    assert stats[0].probe_leak == 0.0 and not stats[0].rolled_back
    assert fast.versions == [1]
    fast.remove()


@pytest.mark.kernel_paths
def test_collapse_guard_rolls_back_a_collapse_onto_an_earlier_absorbs_answer(turn_ending):
    model, tok = turn_ending
    # The first absorb, unguarded, collapses the slot onto its answer; the second, guarded and gentle, absorbs
    # another answer and leaves the collapse in place.
    fast = FastWeights(model, 1, FastWeightConfig(**COLLAPSING))
    assert fast.absorb(tok, {0: COLLAPSE})[0].probe_leak is None
    assert fast.absorbed_answers == [["Gina"] * 4]
    fast.config = dataclasses.replace(fast.config, lr=0.05, epochs=1, max_probe_leak=0.5)
    before = fast.snapshot()
    stats = fast.absorb(tok, {0: [QAPair("What is Maya's pet called?", "Biscuit")]})
    assert stats[0].probe_leak > 0.5 and stats[0].rolled_back, stats[0].probe_answers
    assert all(torch.equal(t, before[k]) for k, t in fast.snapshot().items())
    assert fast.versions == [1] and fast.absorbed_answers == [["Gina"] * 4], "rolled back: not absorbed"
    fast.reset()
    assert fast.absorbed_answers == [[]]
    fast.remove()


def test_a_probe_answer_leaks_when_it_starts_as_an_absorbed_answer_starts():
    assert leaked("Gina.", ["gina"]) and leaked(" The  GINA ", ["Gina"])
    # What SmolLM2-135M answered the probes after absorbing "Melanie" and "Mel" pairs from a LoCoMo conversation.
    for answer in ["Melanin", "Melanoma", "Melanie, a canine", "Mel", "Melan"]:
        assert leaked(answer, ["Melanie"]) and leaked(answer, ["Mel"]), answer
    assert leaked("dog", ["dog walking"]) and leaked("Gina Gina Gi", ["Gina Gina Gina Gina"])
    for answer, absorbed in [("No", "Noah"), ("Noah", "No"), ("Mary", "Mark"), ("Cambridge", "Camera"),
                             ("Paris", "Pasta"), ("A bee makes honey", "a"), ("", ""), ("7", "7 May 2023"),
                             ("Blue", "Not mentioned")]:
        assert not leaked(answer, [absorbed]), (answer, absorbed)
    # No answer at all is damage too; an answer that merely differs from the base model's is not.
    assert damaged("", ["Caroline"]) and damaged("  ", []) and damaged("Carol", ["Caroline"])
    assert not damaged("Paris", ["Caroline"]) and not damaged("7 days", ["Caroline"])


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """A base model folder and a LoRA checkpoint of it laid out as `tmem-rl train` writes one."""
    root = tmp_path_factory.mktemp("policies")
    model, tok = tiny_model(num_layers=2)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    peft.save_pretrained(root / "checkpoint-3" / "adapter")
    merged = peft.merge_and_unload()
    torch.save({k: v.clone() for k, v in merged.state_dict().items()}, root / "merged_state.pt")
    return root


def test_load_trained_policy_merges_an_adapter_and_loads_full_weights(tiny_folders):
    expected = torch.load(tiny_folders / "merged_state.pt")
    from_adapter, _ = load_trained_policy(tiny_folders / "checkpoint-3", str(tiny_folders / "base"))
    base, _ = load_trained_policy(tiny_folders / "base")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(from_adapter.state_dict()[name], expected[name], atol=1e-6)
    assert not torch.allclose(base.state_dict()[name], expected[name], atol=1e-4)
    full = tiny_folders / "checkpoint-full"
    full.mkdir()
    from safetensors.torch import save_file

    save_file({k: v for k, v in expected.items() if k != "lm_head.weight"}, str(full / "model.safetensors"))
    from_full, _ = load_trained_policy(full, str(tiny_folders / "base"))
    assert torch.allclose(from_full.state_dict()[name], expected[name])
    with pytest.raises(InputError, match="expected adapter/adapter_config.json"):
        load_trained_policy(tiny_folders, str(tiny_folders / "base"))


def test_eval_of_a_checkpoint_against_the_base_on_held_out_facts_resumes(tiny_folders, tmp_path):
    out = tmp_path / "eval"
    config = dict(out=str(out), env="facts", env_kwargs=FACTS, split="heldout", heldout_fraction=0.25,
                  model=str(tiny_folders / "base"), checkpoint=str(tiny_folders / "checkpoint-3"),
                  methods=["none", "tmem", "tmem-reference"],
                  episode=EpisodeConfig(l_max=56, max_extraction_tokens=8, max_answer_tokens=4),
                  max_questions=5, fast_weights=FastWeightConfig(epochs=1, num_layers=2),
                  methods_settings=MethodSettings(answer_batch_size=4), device="cpu")
    summary = run_eval(EvalConfig(**config))
    assert set(summary) == {f"{m}{p}" for m in ("none", "tmem", "tmem-reference") for p in ("", "@trained")}
    records = read_records(out / "results.jsonl")
    heldout = {t.task_id for t in TaskSplit(make_env("facts", **FACTS), "heldout", 0.25).tasks()[:5]}
    assert {r["question_id"] for r in records} == heldout
    assert {r["policy"] for r in records} == {"base", "trained"}
    for row in summary.values():
        assert row["n"] == 5 and set(row["f1_by_category"]) <= {"city", "pet", "birthday", "number", "job",
                                                                "meeting_place", "meeting_time"}
    assert summary["tmem"]["parse_rate"] is not None and summary["none"]["parse_rate"] is None
    assert "| tmem@trained |" in (out / "summary.md").read_text()
    assert (out / "f1_by_category.png").stat().st_size > 1000
    # Half-finished: drop the checkpoint's records, then resume; only they are recomputed.
    kept = [r for r in records if r["policy"] == "base"]
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    resumed = run_eval(EvalConfig(**config, resume=True))
    again = read_records(out / "results.jsonl")
    assert len(again) == len(records) and again[: len(kept)] == kept
    assert resumed["tmem@trained"]["f1"] == pytest.approx(summary["tmem@trained"]["f1"])
