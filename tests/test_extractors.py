"""The trained extractors that ship in the package: each loads as a PEFT adapter of the default model, holds what its
card says, and (on the real model) extracts better than the base model on its held-out episodes."""

import json

import pytest
import torch

from tmem_rl.agent import read_agent_settings
from tmem_rl.extractors import SHIPPED_FILE, extractor_info, extractor_path, shipped_extractors
from tmem_rl.models import DEFAULT_MODEL, KNOWN_MODELS

# SmolLM2-135M-Instruct's shape (its config.json), so that the adapter's fit is checked without the model's weights.
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)


def test_the_package_ships_a_facts_extractor():
    assert "facts" in shipped_extractors()


@pytest.mark.parametrize("name", shipped_extractors())
def test_a_shipped_extractor_is_a_small_float16_adapter_of_the_default_model_that_plain_peft_loads(name):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = extractor_path(name)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == KNOWN_MODELS[DEFAULT_MODEL].hub_id
    weights = folder / "adapter_model.safetensors"
    assert weights.stat().st_size < 12 * 2**20, "a few MB, not a model"
    with safe_open(str(weights), "pt") as f:
        stored = {key: f.get_tensor(key) for key in f.keys()}
    assert {t.dtype for t in stored.values()} == {torch.float16}

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE))
    model = PeftModel.from_pretrained(base, str(folder))
    loaded = dict(model.named_parameters())
    lora = {name for name in loaded if "lora_" in name}
    assert lora == {key.replace(".weight", ".default.weight") for key in stored}, "nothing left at its initialisation"
    for key, value in stored.items():  # every stored weight in its place
        name_in_model = key.replace(".weight", ".default.weight")
        torch.testing.assert_close(loaded[name_in_model].detach().half(), value, rtol=0, atol=0)

    fast, episode, settings = read_agent_settings(folder)
    assert settings["base_model"] == DEFAULT_MODEL and fast.num_layers == 4 and episode.l_max > 0
    info = extractor_info(name)
    assert set(settings["files"]) == {p.name for p in folder.iterdir()}
    assert SHIPPED_FILE in settings["files"]
    scores = info["heldout"]
    assert scores["shipped_minus_base_ci95"][0] > 0, "only an extractor that beats the base ships"
    assert scores["shipped"]["f1"] > scores["base"]["f1"]
    card = (folder / "README.md").read_text()
    assert info["commit"] in card and all(command in card for command in info["commands"])
    assert f"{scores['shipped']['f1']:.3f}" in card


@pytest.mark.slow
@pytest.mark.parametrize("name", shipped_extractors())
def test_a_shipped_extractor_beats_the_base_models_extraction_on_the_real_model(name, tmp_path):
    """The demo's side by side on 4 of the extractor's held-out episodes, greedy: the trained extraction's answers
    score above the base model's (given its worked example)."""
    from tmem_rl.demo import DemoConfig, compare_extractors
    from tmem_rl.models import load_policy

    model, tokenizer = load_policy(DEFAULT_MODEL)
    side = compare_extractors(DemoConfig(extractor=name, extractor_episodes=4), model, tokenizer, tmp_path)
    base, trained = side["results"]["base"], side["results"]["trained"]
    assert trained["parse_rate"] >= 0.75
    assert trained["f1"] > base["f1"] + 0.1, side["results"]
