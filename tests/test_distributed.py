"""Multi-process GRPO on CPU (gloo, DeepSpeed ZeRO-2/3): the same update as one process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tmem_rl.envs import make_env
from tmem_rl.memory import FastWeightConfig, FastWeights
from tmem_rl.episode import EpisodeBatch, EpisodeConfig

from test_rollout import ScriptedRunner

WORKER = Path(__file__).parent / "dist_grpo_worker.py"


@pytest.fixture(scope="module")
def fixed_batch(tmp_path_factory):
    from tmem_rl.models import FIXTURE_TOKENIZER, tiny_model

    model, tok = tiny_model(num_layers=2, tokenizer_path=FIXTURE_TOKENIZER)
    env = make_env("facts", num_tasks=4, num_distractors=6, num_facts=3, lines_per_chunk=3)
    fast = FastWeights(model, 8, FastWeightConfig(num_layers=2, lr=0.5, epochs=2))
    runner = ScriptedRunner(model, tok, fast, EpisodeConfig(l_max=40, grounding=False, record_logprobs=True))
    batch = runner.run(env, [env.task(i // 2) for i in range(8)])  # 4 groups of 2
    for i, traj in enumerate(batch.trajectories):
        traj.reward = [1.0, 0.0, 0.3, 0.6, 0.0, 0.0, 0.9, 0.1][i]
        # The scripted policy writes the same text everywhere: vary the answers so groups differ.
        seg = traj.segments[-1]
        seg.completion_ids = seg.completion_ids[: 1 + i % 3] + [tok.eos_token_id]
        seg.logprobs = None
    for traj in batch.trajectories[6:]:
        # Fewer segments on the second process: it must still run as many forward passes as the first.
        traj.segments = traj.segments[3:]
    path = tmp_path_factory.mktemp("batch")
    batch.save(path)
    return path


LAUNCH = Path(__file__).resolve().parents[1] / "launch"


def run_workers(nproc, batch, out, loss_type, deepspeed=None, algorithm="grpo", timeout=600, extra=()):
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = 29500 + nproc + hash((loss_type, deepspeed, algorithm, *extra)) % 400
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(port), str(WORKER), "--batch", str(batch), "--out", str(out), "--loss-type", loss_type,
           "--algorithm", algorithm, *extra]
    if deepspeed:
        cmd += ["--deepspeed", str(deepspeed)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(nproc) if (out / f"rank{r}.pt").exists()]


@pytest.fixture(scope="module")
def one_process(fixed_batch, tmp_path_factory):
    """The one-process reference run of a loss type, run once per module: (its weights, its output folder)."""
    runs = {}

    def run(loss_type):
        if loss_type not in runs:
            out = tmp_path_factory.mktemp(f"one_{loss_type}")
            (weights,) = run_workers(1, fixed_batch, out, loss_type)
            runs[loss_type] = (weights, out)
        return runs[loss_type]

    return run


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_two_process_gloo_matches_one_process(fixed_batch, one_process, tmp_path, loss_type):
    single, one = one_process(loss_type)
    rank0, rank1 = run_workers(2, fixed_batch, tmp_path / "two", loss_type)
    from tmem_rl.models import FIXTURE_TOKENIZER, tiny_model

    initial = tiny_model(num_layers=2, tokenizer_path=FIXTURE_TOKENIZER)[0].state_dict()
    moved = 0
    assert learning_rates(tmp_path / "two") == learning_rates(one)
    for key in single:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs across ranks"
        torch.testing.assert_close(rank0[key], single[key], atol=2e-5, rtol=1e-4)
        moved += 0 if torch.allclose(single[key], initial[key]) else 1
    assert moved > len(single) // 2, "the steps must have changed most parameters for the comparison to mean anything"
    if loss_type == "dapo":
        assert_export_holds(tmp_path / "two" / "run" / "checkpoint-2", rank0, tmp_path / "export")


def learning_rates(out, ranks=(0,)):
    (lrs,) = {tuple(json.loads((out / f"lrs{r}.json").read_text())) for r in ranks}
    return list(lrs)


def test_the_schedule_takes_one_step_per_optimizer_step_at_any_process_count(fixed_batch, tmp_path):
    """Accelerate steps a prepared schedule once per process unless told otherwise: on 2 processes a decay would
    reach 0 at half of max_steps and warm-up would end after half its steps. (A linear schedule with warm-up is
    checked by the tests above: the workers' default.)"""
    args = ("--lr-scheduler", "cosine", "--warmup-steps", "2", "--steps", "5")
    run_workers(1, fixed_batch, tmp_path / "one", "dapo", extra=args)
    run_workers(2, fixed_batch, tmp_path / "two", "dapo", extra=args)
    one, two = learning_rates(tmp_path / "one"), learning_rates(tmp_path / "two", ranks=(0, 1))
    assert two == pytest.approx(one, rel=1e-12)
    assert one[0] == pytest.approx(0.025) and one[1] == pytest.approx(0.05), "two warm-up steps to the peak"
    assert 0 < one[-1] < one[2] < one[1], "then a decay that has not reached 0 one step before the end"


def assert_export_holds(checkpoint, weights, out):
    """`tmem-rl export --verify` of a multi-process checkpoint loads in plain transformers with these weights."""
    from transformers import AutoModelForCausalLM

    from tmem_rl.cli import main

    assert main(["export", str(checkpoint), "--out", str(out), "--verify"]) == 0
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    for key, value in exported.items():
        torch.testing.assert_close(value, weights[key].float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_two_processes(fixed_batch, one_process, tmp_path, stage):
    single, one = one_process("dapo")
    (gathered, *_) = run_workers(2, fixed_batch, tmp_path / "ds", "dapo", LAUNCH / f"deepspeed_zero{stage}.json")
    assert learning_rates(tmp_path / "ds") == learning_rates(one)
    for key in single:
        torch.testing.assert_close(gathered[key].float(), single[key], atol=2e-5, rtol=1e-4)
    for rank in (0, 1):
        report = json.loads((tmp_path / "ds" / f"rank{rank}.json").read_text())
        assert report["same_a"], "fast weights must take the SVD of the whole weight, not a shard"
        assert report["step_after_reload"] == 2, "the checkpoint must reload"
        if stage == 3:
            assert all(shape == [0] for shape in report["local_weight_shapes"]), "ZeRO-3 should partition weights"
    assert (tmp_path / "ds" / "run" / "checkpoint-2" / "trainer_state.json").exists()
    if stage == 3:  # ZeRO-3 shards, consolidated by the export
        assert_export_holds(tmp_path / "ds" / "run" / "checkpoint-2", gathered, tmp_path / "export")


def test_ppo_under_zero3_with_unequal_segment_counts(fixed_batch, tmp_path):
    """The second process holds fewer segments: its value passes are collective too (ZeRO-3 gathers), so it must
    run as many as the first or both hang."""
    from tmem_rl.models import FIXTURE_TOKENIZER, tiny_model

    batch = EpisodeBatch.load(fixed_batch)
    segments = [sum(len(t.segments) for t in batch.trajectories[r * 4 : r * 4 + 4]) for r in (0, 1)]
    assert -(-segments[0] // 3) > -(-segments[1] // 3), "the processes must have different micro-batch counts"
    (gathered, *_) = run_workers(2, fixed_batch, tmp_path / "ppo", "dapo", LAUNCH / "deepspeed_zero3.json",
                                 algorithm="ppo", timeout=300)
    initial = tiny_model(num_layers=2, tokenizer_path=FIXTURE_TOKENIZER)[0].state_dict()
    moved = sum(not torch.allclose(gathered[k].float(), initial[k]) for k in initial if k in gathered)
    assert moved > len(initial) // 2, "the PPO steps must have changed most parameters"
    assert "value_head.weight" in gathered
    report = json.loads((tmp_path / "ppo" / "rank1.json").read_text())
    assert report["step_after_reload"] == 2


def test_tmem_rl_train_under_torchrun_is_one_run_of_two_processes(tmp_path):
    """The user's path: `torchrun --nproc_per_node 2 -m tmem_rl.cli train RECIPE` on CPU. Each process must see the
    other (a recipe whose one question per step cannot be shared by two is refused, naming both), not train alone."""
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart_cpu.yaml"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29977",
           "-m", "tmem_rl.cli", "train", str(recipe), "model.name=tiny", "outer_loop.questions_per_step=1",
           f"outer_loop.output_dir={tmp_path / 'run'}", "outer_loop.report_to=[]"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert "2 processes" in result.stderr, result.stderr[-3000:]
