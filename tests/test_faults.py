"""Fault tolerance of training: a process killed mid-step, resumes of LoRA and full fine-tuning runs at 1 and 2
processes, bad checkpoints, an existing run, inner updates that blow up, and reproducibility from the seed."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from tmem_rl.envs import make_env
from tmem_rl.errors import InputError
from tmem_rl.memory import FastWeightConfig, FastWeights
from tmem_rl.models import FIXTURE_TOKENIZER, tiny_model
from tmem_rl.records import QAPair
from tmem_rl.episode import EpisodeConfig
from tmem_rl.trainers.grpo import GRPOConfig, GRPOTrainer

WORKER = Path(__file__).parent / "fault_train_worker.py"
TIMINGS = ("update_seconds", "rollout_seconds", "step_seconds", "tokens_per_s")


def logged(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]


def run_worker(out: Path, *flags: str, nproc: int = 1, port: int = 29640) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                  str(nproc), "--master_port", str(port)]
    return subprocess.run([*launch, str(WORKER), "--out", str(out), *flags], capture_output=True, text=True,
                          timeout=900, env=env)


def test_sigkill_in_the_middle_of_a_step_then_resume_equals_the_uninterrupted_run(tmp_path):
    straight = run_worker(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = run_worker(tmp_path / "killed", "--kill-at-step", "4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # Killed inside step 4: steps 1-3 were logged, the newest checkpoint is step 2's.
    assert [m["step"] for m in logged(tmp_path / "killed")] == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "killed").glob("checkpoint-*")) == ["checkpoint-2"]

    resumed = run_worker(tmp_path / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, got = logged(tmp_path / "straight"), logged(tmp_path / "killed")
    assert [m["step"] for m in got] == [1, 2, 3, 4, 5], "each step exactly once in metrics.jsonl"
    for a, b in zip(expected, got):
        assert b == pytest.approx(a, abs=1e-6), f"step {a['step']}"
    final_a = torch.load(tmp_path / "straight" / "final.pt")
    final_b = torch.load(tmp_path / "killed" / "final.pt")
    for name, value in final_a.items():
        torch.testing.assert_close(final_b[name], value, atol=1e-6, rtol=0)


def assert_moved(checkpoint: Path, lora: bool) -> dict:
    """The checkpoint's weights, checked to have moved off the initial model: otherwise a resume that loaded none
    of them would pass for one that did."""
    from safetensors.torch import load_file

    saved = load_file(str(checkpoint / "model.safetensors"))
    assert not [k for k in saved if k.startswith("module.")], "names must not depend on the DDP wrapper"
    if lora:
        assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k), "the adapter starts at B = 0"
    else:
        initial = tiny_model(num_layers=2, tokenizer_path=FIXTURE_TOKENIZER)[0].state_dict()
        assert sum(not torch.allclose(v, initial[k]) for k, v in saved.items()) > len(saved) // 2
    return saved


def test_a_lora_run_resumes_equal_to_the_uninterrupted_run(tmp_path):
    from fault_train_worker import build

    straight = build(str(tmp_path), max_steps=3, save_steps=2, kill_at=None, use_peft=True)
    straight.train()
    expected = without_timings(straight.history)
    weights = {k: v.clone() for k, v in straight.policy.state_dict().items()}
    assert_moved(tmp_path / "checkpoint-2", lora=True)
    # Step 3 again, from checkpoint-2 alone.
    resumed = build(str(tmp_path), max_steps=3, save_steps=2, kill_at=None, use_peft=True)
    resumed.train(resume=True)
    assert [m["step"] for m in logged(tmp_path)] == [1, 2, 3]
    for a, b in zip(expected, without_timings(resumed.history), strict=True):
        assert b == pytest.approx(a, abs=1e-6), f"step {a['step']}"
    for name, value in resumed.policy.state_dict().items():
        torch.testing.assert_close(value, weights[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("weights", ["lora", "full"])
def test_a_two_process_run_resumes_equal_to_the_uninterrupted_run(tmp_path, weights):
    """2 processes (DDP, gloo): checkpoints name the weights as the model does, not as its DDP wrapper, so the run
    resumes, and a single process loads its checkpoint too."""
    from fault_train_worker import build

    lora = weights == "lora"
    flags = ["--questions-per-step", "2", "--max-steps", "3", "--save-steps", "2", *(["--peft"] if lora else [])]
    port = 29641 + lora
    straight = run_worker(tmp_path, *flags, nproc=2, port=port)
    assert straight.returncode == 0, straight.stderr[-3000:]
    expected, final = logged(tmp_path), torch.load(tmp_path / "final.pt")
    saved = assert_moved(tmp_path / "checkpoint-2", lora)
    # Step 3 again, from checkpoint-2 alone.
    (tmp_path / "final.pt").unlink()
    resumed = run_worker(tmp_path, *flags, "--resume", nproc=2, port=port)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = logged(tmp_path)
    assert [m["step"] for m in got] == [1, 2, 3]
    for a, b in zip(expected, got):
        assert b == pytest.approx(a, abs=1e-6), f"step {a['step']}"
    for name, value in torch.load(tmp_path / "final.pt").items():
        torch.testing.assert_close(value, final[name], atol=1e-6, rtol=0)

    one = build(str(tmp_path), max_steps=3, save_steps=2, kill_at=None, use_peft=lora, questions_per_step=2)
    one.load_checkpoint(tmp_path / "checkpoint-2")
    state = one.policy.state_dict()
    for name, value in saved.items():
        assert torch.equal(state[name], value), f"{name} did not load in one process"


def make_trainer(out, env, num_layers=2, **overrides):
    model, tok = tiny_model(num_layers=num_layers, tokenizer_path=FIXTURE_TOKENIZER)
    settings = dict(output_dir=str(out), num_generations=2, questions_per_step=1, learning_rate=3e-3, max_steps=2,
                    report_to=[], save_steps=1, micro_batch_size=4, max_completion_length=8, seed=1)
    cfg = GRPOConfig(**{**settings, **overrides})
    return GRPOTrainer(cfg, model, tok, env, FastWeightConfig(lr=0.05, epochs=1, num_layers=2),
                       EpisodeConfig(l_max=60, max_extraction_tokens=8, max_answer_tokens=6),
                       accelerator=Accelerator(cpu=True))


@pytest.fixture
def env():
    return make_env("facts", num_tasks=4, num_distractors=6, num_facts=3, lines_per_chunk=3)


def without_timings(history):
    return [{k: v for k, v in h.items() if k not in TIMINGS} for h in history]


def test_two_runs_with_the_same_seed_give_identical_metrics(tmp_path, env):
    a = make_trainer(tmp_path / "a", env, save_steps=0).train()
    b = make_trainer(tmp_path / "b", env, save_steps=0).train()
    assert len(a) == 2 and without_timings(a) == without_timings(b)
    c = make_trainer(tmp_path / "c", env, save_steps=0, seed=2).train()
    assert without_timings(c) != without_timings(a), "the seed must matter for the comparison to mean anything"


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip optimizer.bin", "truncate model.safetensors", "delete trainer_state.json",
                                    "delete manifest.json"])
def test_a_bad_latest_checkpoint_is_named_and_the_previous_one_used(tmp_path, env, damage):
    make_trainer(tmp_path, env).train()
    action, name = damage.split()
    bad = tmp_path / "checkpoint-2" / name
    if action == "flip":
        flip_byte(bad)
    elif action == "truncate":
        bad.write_bytes(bad.read_bytes()[:100])
    else:
        bad.unlink()
    resumed = make_trainer(tmp_path, env)
    with pytest.warns(UserWarning, match=r"checkpoint-2 is unusable"):
        resumed.train(resume=True)
    assert resumed.step == 2 and len(resumed.history) == 2
    assert [m["step"] for m in logged(tmp_path)] == [1, 2], "step 2 redone from checkpoint-1, logged once"


def test_a_checkpoint_of_another_model_is_a_clear_error(tmp_path, env):
    make_trainer(tmp_path, env).train()
    other = make_trainer(tmp_path, env, num_layers=3)  # the same settings: only the weights tell
    with pytest.raises(InputError, match=r"checkpoint .*checkpoint-2 does not fit this run"):
        other.train(resume=True)


def test_train_refuses_a_folder_that_holds_a_run_unless_resume_or_overwrite(tmp_path, env):
    make_trainer(tmp_path, env, max_steps=3, save_steps=1).train()
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(InputError, match="holds a run .*--resume.*--overwrite"):
        make_trainer(tmp_path, env, max_steps=1).train()
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert (tmp_path / "checkpoint-3").exists()

    make_trainer(tmp_path, env, max_steps=1).train(overwrite=True)
    assert [m["step"] for m in logged(tmp_path)] == [1]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1"], \
        "the old run's later checkpoints must not survive to be resumed from"


def test_resume_cuts_the_metrics_log_back_to_the_checkpoint(tmp_path, env):
    make_trainer(tmp_path, env, max_steps=3, save_steps=2).train()
    assert [m["step"] for m in logged(tmp_path)] == [1, 2, 3]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "reward_me')  # a torn line from a kill during the write
    make_trainer(tmp_path, env, max_steps=4, save_steps=2).train(resume=True,
                                                                 allow_recipe_change=["outer_loop.max_steps"])
    assert [m["step"] for m in logged(tmp_path)] == [1, 2, 3, 4]


def test_save_total_limit_keeps_the_newest_checkpoints(tmp_path, env):
    make_trainer(tmp_path, env, max_steps=3, save_steps=1, save_total_limit=2).train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    manifest = json.loads((tmp_path / "checkpoint-3" / "manifest.json").read_text())
    assert {"model.safetensors", "optimizer.bin", "trainer_state.json", "run.json"} <= set(manifest["files"])


# ---- inner updates that blow up ------------------------------------------------------------------------------

PAIRS = [QAPair("Where does Maya live?", "Lisbon"), QAPair("What is Tom's dog called?", "Rex")]


def test_a_non_finite_inner_update_is_rolled_back_for_that_slot_only(tiny, monkeypatch):
    import tmem_rl.memory.fast_weights as fw

    model, tok = tiny
    fast = FastWeights(model, 2, FastWeightConfig(lr=0.05, epochs=2))
    real_update = fw.inner_update

    def poisoned(fast_weights, *args, **kwargs):
        stats = real_update(fast_weights, *args, **kwargs)
        with torch.no_grad():
            next(iter(fast_weights.B.values()))[1].fill_(float("nan"))
        return stats

    monkeypatch.setattr(fw, "inner_update", poisoned)
    stats = fast.absorb(tok, {0: PAIRS, 1: PAIRS})
    assert stats[1].rolled_back and stats[1].rollback_reason == "non-finite"
    assert not stats[0].rolled_back
    assert fast.versions == [1, 0]
    assert all(torch.equal(b[1], torch.zeros_like(b[1])) for b in fast.B.values()), "slot 1 back to its last state"
    assert any(b[0].abs().sum() > 0 for b in fast.B.values()), "slot 0 keeps its update"


def test_a_diverging_inner_update_is_rolled_back_and_the_run_goes_on(tmp_path, env):
    from test_rollout import ScriptedRunner

    trainer = make_trainer(tmp_path, env, max_steps=1, save_steps=0)
    config = dataclasses.replace(trainer.runner.config, grounding=False)  # the scripted pairs always absorb
    trainer.runner = ScriptedRunner(trainer.policy, trainer.tokenizer, trainer.fast, config)
    # Every absorb overflows. (A merely huge lr need not: the final RMSNorm rescales whatever the deltas add.)
    trainer.fast.config.lr = float("inf")
    batch = trainer.generate_rollouts(0)
    metrics = trainer.train_step(batch)
    updates = [e.inner_update for t in batch.trajectories for e in t.extractions
               if e.inner_update and e.inner_update.num_pairs]
    assert updates, "the episode must have absorbed something for the test to mean anything"
    assert all(u.rolled_back and u.rollback_reason == "non-finite" for u in updates)
    assert all(t.isfinite().all() for t in trainer.fast.B.values())
    assert all(s.fast_weight_version == 0 for t in batch.trajectories for s in t.segments), \
        "nothing rolled back may count as a live fast-weight version"
    assert metrics["inner_rollbacks"] == 1.0
    assert torch.isfinite(torch.tensor(metrics["loss"]))


def test_an_update_whose_loss_grows_past_the_ratio_is_rolled_back(tiny, monkeypatch):
    import tmem_rl.memory.fast_weights as fw

    model, tok = tiny
    fast = FastWeights(model, 2, FastWeightConfig(lr=0.05, epochs=2, divergence_ratio=2.0))
    real_update = fw.inner_update

    def worse_on_slot_0(fast_weights, *args, **kwargs):
        stats = real_update(fast_weights, *args, **kwargs)
        stats[0].loss_after = 2.5 * stats[0].loss_before  # as if the update had diverged
        stats[1].loss_after = 1.5 * stats[1].loss_before  # worse, but within the ratio
        return stats

    monkeypatch.setattr(fw, "inner_update", worse_on_slot_0)
    stats = fast.absorb(tok, {0: PAIRS, 1: PAIRS})
    assert stats[0].rolled_back and stats[0].rollback_reason == "diverged"
    assert not stats[1].rolled_back and fast.versions == [0, 1]


def test_resume_with_only_bad_checkpoints_is_an_error_and_keeps_the_log(tmp_path, env):
    make_trainer(tmp_path, env, max_steps=1).train()
    (tmp_path / "checkpoint-1" / "manifest.json").unlink()
    log = (tmp_path / "metrics.jsonl").read_text()
    with pytest.warns(UserWarning, match="checkpoint-1 is unusable"):
        with pytest.raises(InputError, match="no usable checkpoint to resume from .*checkpoint-1"):
            make_trainer(tmp_path, env).train(resume=True)
    assert (tmp_path / "metrics.jsonl").read_text() == log


def test_bad_newer_checkpoints_are_set_aside_and_never_pruned_over_new_ones(tmp_path, env):
    make_trainer(tmp_path, env, max_steps=2).train()
    flip_byte(tmp_path / "checkpoint-2" / "optimizer.bin")
    with pytest.warns(UserWarning, match="checkpoint-2 is unusable"):
        make_trainer(tmp_path, env, max_steps=3, save_total_limit=1).train(
            resume=True, allow_recipe_change=["outer_loop.max_steps"])
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-"))
    assert names == ["checkpoint-2.bad", "checkpoint-3"]


def test_a_lora_checkpoint_of_other_target_modules_is_a_clear_error(tmp_path, env):
    make_trainer(tmp_path, env, max_steps=1, use_peft=True, lora_target_modules=["q_proj"]).train()
    other = make_trainer(tmp_path, env, max_steps=2, use_peft=True, lora_target_modules=["o_proj"])
    changes = r"outer_loop.lora_target_modules \(\['q_proj'\] -> \['o_proj'\]\), outer_loop.max_steps \(1 -> 2\)"
    with pytest.raises(InputError, match=f"checkpoint-1 was trained with another recipe: {changes}"):
        other.train(resume=True)
    # Allowed as a recipe change, the adapter's parameter names still have to fit.
    with pytest.raises(InputError, match="checkpoint-1 does not fit this run: its trained parameters differ"):
        other.train(resume=True, allow_recipe_change=["outer_loop"])
    same = make_trainer(tmp_path, env, max_steps=2, use_peft=True, lora_target_modules=["q_proj"])
    same.train(resume=True, allow_recipe_change=["outer_loop.max_steps"])
    assert [m["step"] for m in logged(tmp_path)] == [1, 2]
