"""`tmem-rl export`: checkpoints of full and LoRA runs -> merged models and PEFT adapters that plain transformers /
PEFT load, with the same logits as the checkpoint's model."""

import json

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer

from tmem_rl.agent import read_agent_settings
from tmem_rl.cli import main
from tmem_rl.envs import make_env
from tmem_rl.memory import FastWeightConfig
from tmem_rl.models import FIXTURE_TOKENIZER, tiny_model
from tmem_rl.records import QAPair
from tmem_rl.rollout import EpisodeConfig
from tmem_rl.trainers.grpo import GRPOConfig, GRPOTrainer


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    """A tiny base model saved as an HF folder, so a LoRA checkpoint can name it."""
    folder = tmp_path_factory.mktemp("base")
    model, tok = tiny_model(num_layers=2, tokenizer_path=FIXTURE_TOKENIZER)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def alternating_reward(trajectories, **_):
    """1, 0, 1, 0, ...: every group has a better rollout, so every step moves the policy."""
    return [float(i % 2 == 0) for i in range(len(trajectories))]


def train_one_step(out, base_folder, use_peft, nudge=True, **outer_loop):
    """A run of one step (or as `outer_loop` overrides say) and its checkpoint. `nudge`: move the trained
    parameters by hand before saving."""
    from tmem_rl.models import load_policy

    model, tok = load_policy(str(base_folder))
    env = make_env("facts", num_tasks=4, num_distractors=6, num_facts=3, lines_per_chunk=3)
    settings = dict(output_dir=str(out), num_generations=2, questions_per_step=1, learning_rate=3e-2, max_steps=1,
                    report_to=[], save_steps=1, micro_batch_size=4, use_peft=use_peft, max_completion_length=8,
                    seed=1, lora_r=4, lora_alpha=16)
    cfg = GRPOConfig(**{**settings, **outer_loop})
    episode = EpisodeConfig(l_max=60, max_extraction_tokens=8, max_answer_tokens=6,
                            chat_template_kwargs={"custom_flag": True})
    trainer = GRPOTrainer(cfg, model, tok, env, FastWeightConfig(lr=0.05, epochs=1, num_layers=2), episode,
                          reward_funcs={"alternating": alternating_reward}, accelerator=Accelerator(cpu=True),
                          run_info={"base_model": str(base_folder)})
    trainer.train()
    if nudge:
        # One step of a tiny model often sees equal rewards (zero advantage): move the trained parameters by hand
        # so that an export of the base would show, then save that state as the checkpoint.
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in trainer.policy.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return trainer, trainer.save_checkpoint()


def logits(model, tok):
    ids = tok(["Maya lives in Lisbon since 2019."], return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_full_run_exports_a_merged_model_plain_transformers_loads(tmp_path, base_folder, capsys):
    trainer, checkpoint = train_one_step(tmp_path / "run", base_folder, use_peft=False)
    out = tmp_path / "export"
    assert main(["export", str(checkpoint), "--out", str(out), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "verify: max abs logit diff" in printed and ": ok" in printed

    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    trained = trainer.policy.state_dict()
    base = tiny_model(num_layers=2, tokenizer_path=FIXTURE_TOKENIZER)[0].state_dict()
    moved = 0
    for name, value in exported.state_dict().items():
        torch.testing.assert_close(value, trained[name], atol=1e-6, rtol=0)
        moved += not torch.equal(value, base[name])
    assert moved > len(base) // 2, "the export must hold the trained weights, not the base"
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template
    fast, episode, info = read_agent_settings(out)
    assert (fast.lr, fast.num_layers) == (0.05, 2)
    assert episode.l_max == 60 and episode.chat_template_kwargs == {"custom_flag": True}
    assert info["step"] == 1 and info["base_model"] == str(base_folder)
    card = (out / "README.md").read_text()
    assert f"base_model: {base_folder}" in card and "reward_mean" in card
    assert tok.eos_token_id in json.loads((out / "generation_config.json").read_text())["eos_token_id"]

    # The path a user takes next: run the export as an agent with the settings it was trained with.
    from tmem_rl import TMEMAgent

    agent = TMEMAgent.from_pretrained(str(out), device="cpu")
    assert agent.config.l_max == 60 and agent.fast.config.lr == 0.05
    torch.testing.assert_close(logits(agent.model, tok), logits(exported, tok), atol=1e-5, rtol=0)
    assert isinstance(agent.answer("Where does Maya live?"), str)


@pytest.mark.kernel_paths
def test_lora_run_exports_an_adapter_and_a_merged_model_with_the_same_logits(tmp_path, base_folder, capsys):
    from peft import PeftModel

    trainer, checkpoint = train_one_step(tmp_path / "run", base_folder, use_peft=True)
    saved = {p.name for p in checkpoint.iterdir()}
    assert "adapter" in saved
    size = (checkpoint / "model.safetensors").stat().st_size
    full = sum(p.numel() * 4 for p in trainer.policy.parameters())
    assert size < full / 4, "a LoRA checkpoint holds the trained parameters, not the whole base model"
    with torch.no_grad():
        expected = logits(trainer.policy, trainer.tokenizer)

    assert main(["export", str(checkpoint), "--out", str(tmp_path / "adapter"), "--format", "adapter",
                 "--verify"]) == 0
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "merged"), "--verify"]) == 0
    assert capsys.readouterr().out.count(": ok") == 2

    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    base_logits = logits(base, trainer.tokenizer)
    adapter = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    for model in (adapter, merged):
        torch.testing.assert_close(logits(model, trainer.tokenizer), expected, atol=2e-4, rtol=0)
    assert (expected - base_logits).abs().max() > 1e-3, "the LoRA step must have moved the model"
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["lora_alpha"] == 16


FACTS_PAIRS = [QAPair("Where does Maya live?", "Lisbon"), QAPair("What is Maya's pet called?", "Biscuit"),
               QAPair("When did Maya move?", "In 2019")]


def absorbed_b(fast, tokenizer) -> list[torch.Tensor]:
    """Slot 0's B of each adapted module (in layer order) after absorbing FACTS_PAIRS from a fresh start."""
    fast.reset([0])
    stats = fast.absorb(tokenizer, {0: FACTS_PAIRS})
    assert stats[0]["num_pairs"] == len(FACTS_PAIRS) and not stats[0].get("rolled_back")
    return [b[0].clone() for b in fast.B.values()]


def max_b_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


@pytest.mark.kernel_paths
def test_checkpoint_export_and_agent_run_the_inner_loop_and_episode_training_ran(tmp_path, base_folder, capsys):
    """Full fine-tuning moves the weights, so the SVD of the trained ones is another A: the checkpoint and export
    carry the A training built, and eval, export --verify and the agent absorb exactly as the trainer does. The
    episode settings recorded are those the runner ran with."""
    from tmem_rl import TMEMAgent
    from tmem_rl.evaluation.harness import TRAINED, EvalConfig, make_runner
    from tmem_rl.memory import FastWeights
    from tmem_rl.memory.fast_weights import INIT_FILE
    from tmem_rl.models import load_trained_policy

    trainer, checkpoint = train_one_step(tmp_path / "run", base_folder, use_peft=False, nudge=False, max_steps=2,
                                         save_steps=2, reward_weights={"alternating": 1.0}, temperature=0.7)
    assert (checkpoint / INIT_FILE).is_file()
    base = tiny_model(num_layers=2, tokenizer_path=FIXTURE_TOKENIZER)[0].state_dict()
    moved = max((p - base[n]).abs().max().item() for n, p in trainer.policy.named_parameters())
    assert moved > 1e-2, "two steps at lr 3e-2 must move the slow weights"
    trainer.policy.eval()
    tok = trainer.tokenizer
    expected = absorbed_b(trainer.fast, tok)

    assert main(["export", str(checkpoint), "--out", str(tmp_path / "export"), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "fast-weight A diff 0 " in printed and ": ok" in printed
    agent = TMEMAgent.from_pretrained(str(tmp_path / "export"), device="cpu")
    model, _ = load_trained_policy(checkpoint, "")
    config = EvalConfig(out=str(tmp_path / "eval"), checkpoint=str(checkpoint), device="cpu", l_max=60,
                        fast_weights=trainer.fast_config)
    evaluated = make_runner(config, model, tok, 1, TRAINED).fast
    run = json.loads((checkpoint / "run.json").read_text())
    given = run["episode_as_given"]
    assert (given["do_sample"], given["temperature"], given["summary_tokens"]) == (False, 1.0, 256)
    ran = (run["episode"]["do_sample"], run["episode"]["temperature"], run["episode"]["summary_tokens"])
    assert ran == (True, 0.7, 8) == (agent.config.do_sample, agent.config.temperature, agent.config.summary_tokens)
    for fast in (agent.fast, evaluated):
        assert max_b_diff(absorbed_b(fast, tok), expected) < 1e-5
    # What they did before A was saved: the SVD of the trained weights, a different inner loop.
    recomputed = FastWeights(agent.model, 1, trainer.fast_config)
    agent.fast.remove()
    assert max_b_diff(absorbed_b(recomputed, tok), expected) > 1e-3
    # An override of what defines A asks for another one, which the saved A cannot be.
    other = TMEMAgent.from_pretrained(str(tmp_path / "export"), device="cpu", fast_weights={"rank": 4})
    assert all(a.shape[0] == 4 for a in other.fast.init_tensors().values())


def one_error_line(err: str) -> bool:
    return "Traceback" not in err and [line.startswith("tmem-rl: error:") for line in err.splitlines()] == [True]


def test_export_refuses_what_it_cannot_do_in_one_line(tmp_path, base_folder, capsys):
    _, checkpoint = train_one_step(tmp_path / "run", base_folder, use_peft=False)
    capsys.readouterr()  # the training's own output
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "a"), "--format", "adapter"]) == 2
    err = capsys.readouterr().err
    assert "trained all weights" in err and "--format merged" in err and one_error_line(err)

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "full" / "x").read_text() == "keep me"

    with open(checkpoint / "model.safetensors", "r+b") as f:  # a flipped byte in the weights
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert str(checkpoint) in err and "model.safetensors" in err and one_error_line(err)
    assert not (tmp_path / "b").exists()
