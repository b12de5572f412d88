"""Chat settings: one rendering for extraction prompts, answer prompts and the inner loop's pairs; every stop id."""

from pathlib import Path

import pytest
import torch

from tmem_rl.chat import chat_template_kwargs, stop_token_ids, strip_thinking
from tmem_rl.envs import make_env
from tmem_rl.extraction import answer_messages
from tmem_rl.memory import FastWeightConfig, FastWeights
from tmem_rl.memory.inner_loop import format_pair
from tmem_rl.records import QAPair
from tmem_rl.episode import EpisodeConfig, EpisodeRunner

from test_rollout import ScriptedRunner

QWEN3_TEMPLATE = (Path(__file__).parent / "fixtures" / "qwen3_chat_template.jinja").read_text()
NO_THINKING = "<think>\n\n</think>\n\n"


@pytest.fixture
def qwen3_style(tiny):
    model, tok = tiny
    tok.chat_template = QWEN3_TEMPLATE
    return model, tok


@pytest.fixture
def env():
    return make_env("facts", num_tasks=2, num_distractors=6, num_facts=3, lines_per_chunk=3)


def test_thinking_is_off_by_default_only_where_the_template_has_the_switch(qwen3_style):
    from tmem_rl.models import tiny_model

    assert chat_template_kwargs(tiny_model(num_layers=1)[1]) == {}
    _, qwen = qwen3_style
    assert chat_template_kwargs(qwen) == {"enable_thinking": False}
    assert chat_template_kwargs(qwen, {"enable_thinking": True}) == {"enable_thinking": True}


def test_prompts_and_absorbed_pairs_share_one_rendering(qwen3_style, env):
    model, tok = qwen3_style
    fast = FastWeights(model, 1, FastWeightConfig(lr=0.05, epochs=1))
    seen = {}
    absorb = fast.absorb

    def recording_absorb(tokenizer, pairs, prompt_fn=None, chat_template_kwargs=None):
        seen["kwargs"], seen["prompt_fn"] = chat_template_kwargs, prompt_fn
        return absorb(tokenizer, pairs, prompt_fn, chat_template_kwargs)

    fast.absorb = recording_absorb
    runner = ScriptedRunner(model, tok, fast, EpisodeConfig(l_max=40, grounding=False))
    batch = runner.run(env, [env.task(0)])
    extraction, answer = batch.trajectories[0].segments[0], batch.trajectories[0].segments[-1]
    assert tok.decode(answer.prompt_ids).endswith("<|im_start|>assistant\n" + NO_THINKING)
    assert tok.decode(extraction.prompt_ids).endswith(NO_THINKING + "[")
    assert seen["kwargs"] == {"enable_thinking": False}
    # A pair is learned behind exactly the prompt the agent answers from.
    question = "What did Maya say?"
    ids, labels = format_pair(tok, QAPair(question, "hello there"), 256, seen["prompt_fn"], seen["kwargs"])
    prompt = runner.sampler.prompt_ids(answer_messages(env.answer_prompt(question, "")))
    assert ids[: len(prompt)] == prompt and all(label == -100 for label in labels[: len(prompt)])
    assert tok.decode([t for t in labels if t != -100]).startswith("hello there")


def test_thinking_can_be_switched_back_on(qwen3_style, env):
    model, tok = qwen3_style
    runner = EpisodeRunner(model, tok, None, EpisodeConfig(memory="none",
                                                             chat_template_kwargs={"enable_thinking": True}))
    ids = runner.sampler.prompt_ids(answer_messages("Question: where?"))
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_reasoning_text_is_not_the_answer():
    assert strip_thinking("<think>\nIt is Lisbon, I think.\n</think>\n\nLisbon") == "Lisbon"
    assert strip_thinking("<think>still reasoning when the budget ran out") == ""
    assert strip_thinking("Lisbon") == "Lisbon"
    # Tags inside the content are content: an extraction may quote one.
    quoted = '[{"instruction": "Which tag opens reasoning?", "output": "<think>"}, {"instruction": "q", "output": "a"}]'
    assert strip_thinking(quoted) == quoted
    assert strip_thinking("use <think> then </think> tags") == "use <think> then </think> tags"


def test_generation_stops_at_every_eos_of_the_generation_config(tiny):
    model, tok = tiny
    runner = EpisodeRunner(model, tok, None, EpisodeConfig(memory="none"))
    prompt = runner.sampler.prompt_ids(answer_messages("Question: where does Maya live?"))
    free = runner.sampler.generate([prompt], [-1], 8, sample=False, temperature=1.0)[0]
    stop = next(t for t in free[2:] if t not in free[:2] and t != tok.eos_token_id)
    model.generation_config.eos_token_id = [tok.eos_token_id, stop]
    runner = EpisodeRunner(model, tok, None, EpisodeConfig(memory="none"))
    assert stop_token_ids(model, tok) == [tok.eos_token_id, stop]
    stopped = runner.sampler.generate([prompt], [-1], 8, sample=False, temperature=1.0)[0]
    assert stopped == free[: free.index(stop) + 1]


def test_sampling_uses_the_runner_generator_and_leaves_the_global_rng_alone(tiny):
    model, tok = tiny
    runner = EpisodeRunner(model, tok, None, EpisodeConfig(memory="none", seed=5))
    prompt = runner.sampler.prompt_ids(answer_messages("Question: where does Maya live?"))
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    runner.reseed()
    first = runner.sampler.generate([prompt] * 2, [-1, -1], 6, sample=True, temperature=1.0)
    assert torch.equal(torch.rand(3), expected_next), "sampling must not draw from the global RNG"
    assert runner.sampler.generate([prompt] * 2, [-1, -1], 6, sample=True, temperature=1.0) != first, "a new call, new noise"
    runner.reseed()
    assert runner.sampler.generate([prompt] * 2, [-1, -1], 6, sample=True, temperature=1.0) == first
    runner.config.seed = 6
    runner.reseed()
    assert runner.sampler.generate([prompt] * 2, [-1, -1], 6, sample=True, temperature=1.0) != first
