import pytest
import torch
from accelerate import Accelerator

from tmem_rl.envs import make_env
from tmem_rl.logprobs import completion_logprobs, load_snapshots, score_completions, segment_rows
from tmem_rl.memory import FastWeightConfig, FastWeights
from tmem_rl.models import FIXTURE_TOKENIZER, tiny_model
from tmem_rl.episode import AnsweredQuestion, EpisodeConfig, EpisodeRunner, Segment, Trajectory
from tmem_rl.trainers.grpo import GRPOConfig, GRPOTrainer, group_advantages

from test_rollout import ScriptedRunner


@pytest.fixture
def env():
    return make_env("facts", num_tasks=4, num_distractors=6, num_facts=3, lines_per_chunk=3)


def all_segments(batch):
    return [s for t in batch.trajectories for s in t.segments]


def test_recomputed_logprobs_equal_those_recorded_under_the_live_snapshot(tiny, env):
    model, tok = tiny
    fast = FastWeights(model, 2, FastWeightConfig(lr=0.5, epochs=3))
    runner = ScriptedRunner(model, tok, fast, EpisodeConfig(l_max=40, grounding=False, record_logprobs=True))
    batch = runner.run(env, [env.task(0), env.task(1)])
    segments = all_segments(batch)
    assert len({s.snapshot for s in segments}) >= 4, "need several distinct live snapshots to mean anything"
    replay = FastWeights(model, 8, FastWeightConfig())
    rows = segment_rows(segments, tok.pad_token_id, "cpu")
    load_snapshots(replay, rows.snapshot_keys, batch.snapshots)
    with torch.no_grad():
        recomputed = completion_logprobs(model, replay, rows)
        base = completion_logprobs(model, None, rows)
    for i, seg in enumerate(segments):
        n = len(seg.completion_ids)
        torch.testing.assert_close(recomputed[i, :n], torch.tensor(seg.logprobs), atol=1e-4, rtol=1e-4)
        if seg.snapshot is not None:  # the fast weights matter: the base model scores these tokens differently
            assert (recomputed[i, :n] - base[i, :n]).abs().max() > 1e-3


def test_recorded_logprobs_match_the_sampling_distribution(tiny, env):
    """Independent path: the log-softmax of generate()'s own logits at the sampled tokens."""
    model, tok = tiny
    fast = FastWeights(model, 1, FastWeightConfig())
    fast.B[next(iter(fast.B))].normal_(0, 0.05)  # a live, non-zero delta
    runner = EpisodeRunner(model, tok, fast, EpisodeConfig(record_logprobs=True, do_sample=True, max_answer_tokens=6))
    prompt = runner.sampler.prompt_ids([{"role": "user", "content": "Where does Maya live?"}])
    torch.manual_seed(0)
    with torch.no_grad(), fast.use([0]):
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=True, top_k=0,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    completion = out.sequences[0, len(prompt):].tolist()
    expected = [torch.log_softmax(l[0], -1)[t].item() for l, t in zip(out.logits, completion)]
    recorded = runner.sampler.logprobs([prompt], [completion], [0], 1.0)[0]
    assert recorded == pytest.approx(expected, abs=1e-4)


def test_group_advantages():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5]), 2, scale=False)
    assert adv.tolist() == [0.5, -0.5, 0.0, 0.0]
    scaled = group_advantages(torch.tensor([1.0, 0.0]), 2, scale=True)
    assert scaled[0] > 0.7 and scaled[1] < -0.7


def make_trainer(tmp_path, env, use_peft=False, **overrides):
    model, tok = tiny_model(num_layers=2, tokenizer_path=FIXTURE_TOKENIZER)
    settings = dict(output_dir=str(tmp_path), num_generations=2, questions_per_step=1, learning_rate=3e-3,
                    max_steps=3, report_to=[], save_steps=0, micro_batch_size=4, use_peft=use_peft,
                    max_completion_length=8, seed=1)
    cfg = GRPOConfig(**{**settings, **overrides})
    episode = EpisodeConfig(l_max=60, max_extraction_tokens=8, max_answer_tokens=6)
    return GRPOTrainer(cfg, model, tok, env, FastWeightConfig(lr=0.05, epochs=1, num_layers=2), episode,
                       accelerator=Accelerator(cpu=True))


@pytest.mark.parametrize("use_peft", [False, True])
def test_grpo_step_moves_policy_toward_the_higher_reward_completion(tmp_path, env, use_peft):
    trainer = make_trainer(tmp_path, env, use_peft=use_peft)
    batch = trainer.generate_rollouts(0)
    good, bad = batch.trajectories
    assert good.segments[-1].completion_ids != bad.segments[-1].completion_ids
    good.reward, bad.reward = 1.0, 0.0

    def answer_logp(traj):
        rows = segment_rows([traj.segments[-1]], trainer.tokenizer.pad_token_id, "cpu")
        load_snapshots(trainer.replay, rows.snapshot_keys, batch.snapshots)
        with torch.no_grad():
            return completion_logprobs(trainer.model, trainer.replay, rows).sum().item()

    before = answer_logp(good) - answer_logp(bad)
    frozen = {n: p.clone() for n, p in trainer.policy.named_parameters() if not p.requires_grad}
    metrics = trainer.train_step(batch)
    after = answer_logp(good) - answer_logp(bad)
    assert after > before + 0.05, (before, after)
    assert metrics["reward_mean"] == pytest.approx(0.5)
    for n, p in trainer.policy.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen parameter {n} changed"


def test_resume_reproduces_the_uninterrupted_run(tmp_path, env):
    straight = make_trainer(tmp_path / "a", env)
    straight.train()
    interrupted = make_trainer(tmp_path / "b", env, save_steps=2)
    interrupted.config.max_steps = 2
    interrupted.train()
    resumed = make_trainer(tmp_path / "b", env)
    resumed.train(resume=True, allow_recipe_change=["outer_loop.max_steps"])  # it was stopped by a smaller one
    assert resumed.step == 3
    keys = ["reward_mean", "loss", "f1", "completion_tokens"]
    a, b = straight.history[-1], resumed.history[-1]
    assert {k: a[k] for k in keys} == pytest.approx({k: b[k] for k in keys}, abs=1e-5)
    for (n, p), (_, q) in zip(straight.policy.named_parameters(), resumed.policy.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    assert (tmp_path / "a" / "reward_curve.png").exists()
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 3


def test_gae_on_known_numbers():
    from tmem_rl.trainers.ppo import gae

    adv, ret = gae([0.0, 0.0, 1.0], [0.5, 0.5, 0.5], gamma=1.0, lam=1.0)
    assert adv == pytest.approx([0.5, 0.5, 0.5]) and ret == pytest.approx([1.0, 1.0, 1.0])
    adv, _ = gae([0.0, 0.0, 1.0], [0.5, 0.5, 0.5], gamma=1.0, lam=0.5)
    assert adv == pytest.approx([0.125, 0.25, 0.5])
    adv, _ = gae([0.0, 1.0], [0.0, 0.0], gamma=0.9, lam=1.0)
    assert adv == pytest.approx([0.9, 1.0])


def test_ppo_step_moves_policy_and_fits_the_value_head(tmp_path, env):
    from tmem_rl.trainers.ppo import PPOConfig, PPOTrainer

    model, tok = tiny_model(num_layers=2, tokenizer_path=FIXTURE_TOKENIZER)
    cfg = PPOConfig(output_dir=str(tmp_path), num_generations=2, questions_per_step=1, learning_rate=3e-3,
                    report_to=[], save_steps=0, micro_batch_size=4, max_completion_length=8, seed=1, vf_coef=1.0)
    trainer = PPOTrainer(cfg, model, tok, env, FastWeightConfig(lr=0.05, epochs=1, num_layers=2),
                         EpisodeConfig(l_max=60, max_extraction_tokens=8, max_answer_tokens=6),
                         accelerator=Accelerator(cpu=True))
    batch = trainer.generate_rollouts(0)
    good, bad = batch.trajectories
    good.reward, bad.reward = 1.0, 0.0

    def answer_logp(traj):
        rows = segment_rows([traj.segments[-1]], tok.pad_token_id, "cpu")
        load_snapshots(trainer.replay, rows.snapshot_keys, batch.snapshots)
        with torch.no_grad():
            logp, values, _ = score_completions(trainer.model, trainer.replay, rows, trainer.value_head)
        return logp.sum().item(), values[0, -1].item()

    (g0, gv0), (b0, bv0) = answer_logp(good), answer_logp(bad)
    assert gv0 == bv0 == 0.0  # zero-initialised critic
    for _ in range(3):
        trainer.train_step(batch)
    (g1, gv1), (b1, bv1) = answer_logp(good), answer_logp(bad)
    assert (g1 - b1) > (g0 - b0) + 0.05
    assert gv1 > bv1, "the critic must learn that the rewarded answer's last state is worth more"


@pytest.mark.parametrize("level", ["segment", "token"])
def test_ppo_credits_every_extraction_of_a_rewarded_episode(tmp_path, env, level):
    """A 192-token extraction, then an 8-token answer rewarded 1 (another rollout: 0), under a zero critic."""
    from tmem_rl.trainers.ppo import PPOConfig, PPOTrainer, ValuedSegment

    model, tok = tiny_model(num_layers=2, tokenizer_path=FIXTURE_TOKENIZER)
    cfg = PPOConfig(output_dir=str(tmp_path), questions_per_step=1, report_to=[], save_steps=0,
                    advantage_level=level)
    trainer = PPOTrainer(cfg, model, tok, env, FastWeightConfig(num_layers=2), accelerator=Accelerator(cpu=True))
    segments = []
    for rollout in (0, 1):
        for kind, n in (("extraction", 192), ("answer", 8)):
            seg = Segment(kind, 0, 0, [1], [5] * n, "", 0, None, 1.0)
            segments.append(ValuedSegment(seg, rollout, old_values=[0.0] * n))
    trajectories = [Trajectory(r, "t", "q", ["a"]) for r in (0, 1)]
    trainer.assign_advantages(segments, torch.tensor([1.0, 0.0]), {}, trajectories)
    extraction, answer = segments[0].advantages, segments[1].advantages
    if level == "segment":
        assert min(extraction) > 0 and min(extraction) > 0.5 * max(answer)
    else:  # per-token lambda discounting: what the segment level is for
        assert extraction[0] < 0.01 * answer[0]


@pytest.mark.parametrize("use_peft", [False, True])
def test_kl_to_the_reference_is_zero_before_training_and_grows_after(tmp_path, env, use_peft):
    trainer = make_trainer(tmp_path, env, use_peft=use_peft, beta=0.1, learning_rate=1e-2)
    batch = trainer.generate_rollouts(0)
    batch.trajectories[0].reward, batch.trajectories[1].reward = 1.0, 0.0
    first = trainer.train_step(batch)
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy still is the reference when step 1 is scored
    second = trainer.train_step(batch)
    assert second["kl"] > 1e-6


def test_first_step_with_retries_and_several_temperatures_has_ratio_one(tmp_path, env):
    """Fully on-policy, every token's ratio is 1: each segment is re-scored at the temperature it was sampled at."""
    trainer = make_trainer(tmp_path, env, temperature=0.9)
    trainer.runner.config.extraction_retries = 2
    trainer.runner.config.retry_temperature = 0.4
    trainer.runner.config.max_extraction_tokens = 12
    batch = trainer.generate_rollouts(0)
    temperatures = {s.temperature for s in all_segments(batch)}
    assert temperatures == {0.9, 0.4}, "the random policy's extractions must fail and be retried at 0.4"
    batch.trajectories[0].reward, batch.trajectories[1].reward = 1.0, 0.0
    metrics = trainer.train_step(batch)
    assert metrics["clip_fraction"] == 0.0


def test_trainer_copies_the_episode_config(tmp_path, env):
    model, tok = tiny_model(num_layers=2, tokenizer_path=FIXTURE_TOKENIZER)
    episode = EpisodeConfig(l_max=60, max_extraction_tokens=8, max_answer_tokens=6)
    given = dict(vars(episode))
    cfg = GRPOConfig(output_dir=str(tmp_path), num_generations=2, questions_per_step=1, report_to=[], save_steps=0,
                     temperature=0.5, max_completion_length=4)
    trainer = GRPOTrainer(cfg, model, tok, env, FastWeightConfig(num_layers=2), episode,
                          accelerator=Accelerator(cpu=True))
    assert vars(episode) == given
    assert trainer.runner.config.temperature == 0.5 and trainer.runner.config.max_answer_tokens == 4


def test_more_questions_per_step_than_tasks_is_a_clear_error(tmp_path, env):
    model, tok = tiny_model(num_layers=2, tokenizer_path=FIXTURE_TOKENIZER)
    cfg = GRPOConfig(output_dir=str(tmp_path), num_generations=2, questions_per_step=len(env) + 1, report_to=[])
    with pytest.raises(ValueError, match=rf"questions_per_step={len(env) + 1} but environment 'facts' has"):
        GRPOTrainer(cfg, model, tok, env, FastWeightConfig(num_layers=2), accelerator=Accelerator(cpu=True))


def test_training_refuses_carried_fast_weights(tmp_path, env):
    model, tok = tiny_model(num_layers=2, tokenizer_path=FIXTURE_TOKENIZER)
    cfg = GRPOConfig(output_dir=str(tmp_path), num_generations=2, questions_per_step=1, report_to=[])
    with pytest.raises(ValueError, match="carry_fast_weights is for evaluation"):
        GRPOTrainer(cfg, model, tok, env, FastWeightConfig(num_layers=2), EpisodeConfig(carry_fast_weights=True),
                    accelerator=Accelerator(cpu=True))


def moved_fraction(trainer, before):
    """Share of the decoder layers' elements that an optimizer step changed (embeddings of unseen tokens get no
    gradient, so they are left out)."""
    changed = total = 0
    for name, p in trainer.policy.named_parameters():
        if ".layers." in name:
            changed += (p.detach().float() != before[name].float()).sum().item()
            total += p.numel()
    return changed / total


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate's state is process-wide; a test that asks for other mixed precision starts and ends clean."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_full_fine_tuning_keeps_fp32_masters_under_bf16_autocast(tmp_path, env, weights, fresh_accelerate_state):
    model, tok = tiny_model(num_layers=2, tokenizer_path=FIXTURE_TOKENIZER)
    model.to(getattr(torch, weights))
    cfg = GRPOConfig(output_dir=str(tmp_path), num_generations=2, questions_per_step=1, learning_rate=1e-6,
                     report_to=[], save_steps=0, micro_batch_size=4, max_completion_length=8, seed=1,
                     mixed_precision="bf16")
    build = lambda: GRPOTrainer(cfg, model, tok, env, FastWeightConfig(num_layers=2),  # noqa: E731
                                EpisodeConfig(l_max=60, max_extraction_tokens=8, max_answer_tokens=6),
                                accelerator=Accelerator(cpu=True, mixed_precision="bf16"))
    if weights == "bfloat16":
        with pytest.warns(UserWarning, match="full fine-tuning of torch.bfloat16 weights.*float32"):
            trainer = build()
    else:
        trainer = build()
    batch = trainer.generate_rollouts(0)
    batch.trajectories[0].reward, batch.trajectories[1].reward = 1.0, 0.0
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    trainer.train_step(batch)
    moved = moved_fraction(trainer, before)
    if weights == "float32":
        assert moved > 0.9, f"only {moved:.1%} of the fp32 master weights moved at lr 1e-6"
    else:
        assert moved < 0.1, f"{moved:.1%} moved: bf16 weights were expected to round lr-1e-6 steps away"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_trainer_on_gpu_places_fast_weights_replay_and_reference_with_the_model(tmp_path, env, algorithm,
                                                                                fresh_accelerate_state):
    from tmem_rl.trainers.ppo import PPOConfig, PPOTrainer

    config_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if algorithm == "grpo" else (PPOConfig, PPOTrainer)
    model, tok = tiny_model(num_layers=2, tokenizer_path=FIXTURE_TOKENIZER)  # built on the CPU, as users load
    cfg = config_cls(output_dir=str(tmp_path), num_generations=2, questions_per_step=1, learning_rate=1e-3,
                     report_to=[], save_steps=0, micro_batch_size=4, max_completion_length=8, beta=0.1)
    trainer = trainer_cls(cfg, model, tok, env, FastWeightConfig(num_layers=2),
                          EpisodeConfig(l_max=60, max_extraction_tokens=8, max_answer_tokens=6),
                          accelerator=Accelerator())
    metrics = trainer.train_step(trainer.generate_rollouts(0))
    assert next(trainer.policy.parameters()).device.type == "cuda"
    for fast in (trainer.fast, trainer.replay, trainer.reference_replay):
        assert all(b.device.type == "cuda" for b in fast.B.values())
    assert next(trainer.reference.parameters()).device.type == "cuda"
    assert metrics["clip_fraction"] == 0.0 and torch.isfinite(torch.tensor(metrics["loss"]))


def test_step_metrics_on_known_batches(tmp_path, env):
    trainer = make_trainer(tmp_path, env)
    batch = trainer.generate_rollouts(0)
    batch.trajectories[0].reward, batch.trajectories[1].reward = 1.0, 0.0
    metrics = trainer.train_step(batch)
    assert metrics["frac_reward_zero_std"] == 0.0
    assert metrics["clip_ratio_low"] == metrics["clip_ratio_high"] == 0.0  # first step: on-policy
    assert 0.0 < metrics["entropy"] < torch.log(torch.tensor(float(len(trainer.tokenizer)))).item()
    answers = [len(t.segments[-1].completion_ids) for t in batch.trajectories]
    assert metrics["answer_length_mean"] == pytest.approx(sum(answers) / 2)
    assert metrics["answer_length_max"] == max(answers)
    limit = trainer.runner.config.max_answer_tokens
    ended = [t.segments[-1].completion_ids[-1] in trainer.runner.sampler.stop_ids for t in batch.trajectories]
    assert metrics["answer_clipped"] == pytest.approx(sum(n >= limit and not e for n, e in zip(answers, ended)) / 2)
    assert metrics["pairs_absorbed"] == 0.0  # a random model's extractions never parse
    batch.trajectories[1].reward = 1.0
    assert trainer.train_step(batch)["frac_reward_zero_std"] == 1.0


def text_variety(completions, **_):
    """A reward that a random model's answers spread over: distinct characters in the answer."""
    return [len(set(c)) / 10 for c in completions]


# A seeded 3-step GRPO run on the tiny model (CPU), pinned: per step a fingerprint of every sampled token id
# (discrete: exact, and what drifts first when sampling or the fast weights change), then loss, grad norm, entropy
# and reward. The floats are compared at 1e-3 relative: the largest difference measured between kernel paths
# (1 or 2 threads, oneDNN on or off, ATEN_CPU_CAPABILITY=default, MKL_CBWR=COMPATIBLE) was 3e-6 relative here and
# up to 9.5e-5 on an earlier version of this run (drift grows step by step); 2e-5 between two machines' CPUs. A
# change to the loss or its gradient moves them by far more. When they change on
# purpose, regenerate them: run this test and copy the `got` values it prints on failure.
PINNED = [["a7b8690c96177a6b", -2e-07, 4.4064717, 9.0560369, 1.85],
          ["c849da7365c106c8", 4e-07, 5.8210578, 9.056778, 1.7750001],
          ["f2ad4e06782c7456", 0.0, 3.9570689, 9.0368614, 1.7]]
PINNED_KEYS = ("loss", "grad_norm", "entropy", "reward_mean")


def token_fingerprint(batch) -> str:
    import hashlib

    ids = [s.completion_ids for t in batch.trajectories for s in t.segments]
    return hashlib.sha256(repr(ids).encode()).hexdigest()[:16]


@pytest.mark.kernel_paths
def test_seeded_grpo_run_matches_pinned_values(tmp_path, env):
    model, tok = tiny_model(num_layers=2, tokenizer_path=FIXTURE_TOKENIZER)
    cfg = GRPOConfig(output_dir=str(tmp_path), num_generations=2, questions_per_step=2, learning_rate=3e-3,
                     max_steps=3, report_to=[], save_steps=0, micro_batch_size=4, max_completion_length=8, seed=7,
                     reward_weights={"outcome": 1.0, "text_variety": 1.0})
    trainer = GRPOTrainer(cfg, model, tok, env, FastWeightConfig(lr=0.05, epochs=1, num_layers=2),
                          EpisodeConfig(l_max=60, max_extraction_tokens=8, max_answer_tokens=6),
                          reward_funcs={"text_variety": text_variety}, accelerator=Accelerator(cpu=True))
    fingerprints = []
    generate = trainer.generate_rollouts
    trainer.generate_rollouts = lambda step: fingerprints.append(token_fingerprint(batch := generate(step))) or batch
    history = trainer.train()
    got = [[f, *(round(h[k], 7) for k in PINNED_KEYS)] for f, h in zip(fingerprints, history)]
    assert all(step[2] > 1e-3 for step in got), "every pinned step must have a gradient to pin"
    assert len({step[0] for step in got}) == 3, "the steps must sample differently"
    assert [step[0] for step in got] == [step[0] for step in PINNED], f"got = {got}"
    assert got == [[step[0], *(pytest.approx(v, rel=1e-3, abs=1e-5) for v in step[1:])] for step in PINNED], \
        f"got = {got}"


class LogitsWidth(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the most sequences in any tensor of logits over several positions ([n, T > 1, vocab]) made inside."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.most_rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[1] > 1 and t.shape[-1] == self.vocab:
                self.most_rows = max(self.most_rows, t.shape[0])
        return out


def test_several_updates_per_batch_clip_and_keep_log_prob_passes_to_the_micro_batch(tmp_path, env):
    trainer = make_trainer(tmp_path / "mu", env, num_iterations=2, questions_per_step=2, micro_batch_size=2,
                           learning_rate=2e-2)
    watch = LogitsWidth(trainer.policy.config.vocab_size)
    with watch:
        batch = trainer.generate_rollouts(0)
        for i, traj in enumerate(batch.trajectories):
            traj.reward = float(i % 2)
        metrics = trainer.train_step(batch)
    segments = sum(len(t.segments) for t in batch.trajectories)
    assert segments > 2 * trainer.config.micro_batch_size
    # Every teacher-forced pass (old log-probs, the loss) holds one micro-batch of logits, never the batch.
    assert watch.most_rows == trainer.config.micro_batch_size
    assert metrics["log_ratio_max/iteration_1"] < 1e-5 and metrics["clip_fraction/iteration_1"] == 0.0
    assert metrics["clip_fraction/iteration_2"] > 0.0, "the second pass runs on a policy the first one moved"

    trainer = make_trainer(tmp_path / "mini", env, num_iterations=2, num_mini_batches=2, questions_per_step=2,
                           lr_scheduler_type="linear", max_steps=2)
    metrics = trainer.train_step(trainer.generate_rollouts(0))
    # 2 passes x 2 mini-batches = 4 optimizer steps of a linear decay over 2 steps x 4.
    assert metrics["learning_rate"] == pytest.approx(3e-3 * (1 - 4 / 8))
    with pytest.raises(ValueError, match="num_mini_batches=5 but each process has 4 rollouts"):
        make_trainer(tmp_path / "bad", env, num_mini_batches=5, questions_per_step=2)


def test_one_update_per_batch_records_no_log_probs(tmp_path, env):
    trainer = make_trainer(tmp_path, env)
    batch = trainer.generate_rollouts(0)
    assert all(s.logprobs is None for t in batch.trajectories for s in t.segments)
    assert trainer.train_step(batch)["clip_fraction"] == 0.0


def test_segment_weights_scale_each_kinds_share_of_the_gradient_on_several_question_episodes(tmp_path):
    """Under plain SGD an update is linear in the loss: weighing answers by 2 moves the weights by the extraction
    tokens' update plus twice the answers' update."""
    env = make_env("facts", num_tasks=4, num_distractors=6, num_facts=3, lines_per_chunk=3, questions_per_task=2)
    settings = dict(optim="sgd", max_grad_norm=0.0, learning_rate=0.5)
    first = make_trainer(tmp_path / "a", env, segment_weights={"answer": 2.0}, **settings)
    batch = first.generate_rollouts(0)
    for traj in batch.trajectories:
        assert [s.kind for s in traj.segments].count("answer") == 2 and len(traj.answered) == 2
    batch.trajectories[0].reward, batch.trajectories[1].reward = 1.0, 0.0

    def moved(trainer):
        before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
        metrics = trainer.train_step(batch)
        return metrics, {n: p.detach() - before[n] for n, p in trainer.policy.named_parameters()}

    metrics, both = moved(first)
    assert metrics["questions_per_episode"] == 2.0
    _, extraction_only = moved(make_trainer(tmp_path / "b", env, segment_weights={"answer": 0.0}, **settings))
    _, answers_only = moved(make_trainer(tmp_path / "c", env, segment_weights={"extraction": 0.0}, **settings))
    _, nothing = moved(make_trainer(tmp_path / "d", env, segment_weights={"extraction": 0.0, "answer": 0.0},
                                    **settings))
    assert any(d.abs().max() > 1e-4 for d in answers_only.values())
    assert all(torch.equal(d, torch.zeros_like(d)) for d in nothing.values())
    for name, delta in both.items():
        torch.testing.assert_close(delta, extraction_only[name] + 2 * answers_only[name], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="segment_weights"):
        GRPOConfig(segment_weights={"answers": 1.0})


def two_question_rollouts(scores: list[list[float]]) -> tuple[list[Trajectory], list[Segment]]:
    """Rollouts of one group, each an extraction then one answer per question with these scores."""
    trajectories, segments = [], []
    for r, row in enumerate(scores):
        traj = Trajectory(r, "t", "", [], reward=sum(row) / len(row))
        traj.answered = [AnsweredQuestion(f"t/q{q}", "?", ["a"], "a", score, {"f1": score}) for q, score in enumerate(row)]
        traj.segments = [Segment("extraction", 0, 0, [1], [5] * 4, "", 0, None, 1.0)]
        traj.segments += [Segment("answer", 1, 0, [1], [6] * 2, "", 0, None, 1.0, question=q) for q in range(len(row))]
        trajectories.append(traj)
    return trajectories, [s for t in trajectories for s in t.segments]


def test_answer_credit_by_question_gives_each_answer_its_own_questions_advantage(tmp_path, env):
    trainer = make_trainer(tmp_path, env, answer_credit="question")
    trajectories, segments = two_question_rollouts([[1.0, 0.0], [0.0, 1.0]])  # equal episodes, opposite answers
    training = [trainer.segment_type(seg, r) for r, t in enumerate(trajectories) for seg in t.segments]
    trainer.assign_advantages(training, torch.tensor([t.reward for t in trajectories]), {}, trajectories)
    first = [s.advantages[0] for s in training[:3]]
    second = [s.advantages[0] for s in training[3:]]
    assert first[0] == second[0] == 0.0  # the extraction: the episode's advantage
    assert first[1] > 0.7 and first[2] < -0.7 and second[1] < -0.7 and second[2] > 0.7
    episode = make_trainer(tmp_path / "e", env)
    trainer_segments = [episode.segment_type(seg, r) for r, t in enumerate(trajectories) for seg in t.segments]
    episode.assign_advantages(trainer_segments, torch.tensor([t.reward for t in trajectories]), {}, trajectories)
    assert all(a == 0.0 for s in trainer_segments for a in s.advantages)
    with pytest.raises(ValueError, match="answer_credit"):
        GRPOConfig(answer_credit="token")


@pytest.mark.parametrize("level", ["segment", "token"])
def test_ppo_answers_of_several_questions_are_parallel_last_steps(tmp_path, env, level):
    from tmem_rl.trainers.ppo import PPOConfig, PPOTrainer, ValuedSegment

    model, tok = tiny_model(num_layers=2, tokenizer_path=FIXTURE_TOKENIZER)
    cfg = PPOConfig(output_dir=str(tmp_path), questions_per_step=1, report_to=[], save_steps=0, lam=1.0,
                    whiten_advantages=False, advantage_level=level)
    trainer = PPOTrainer(cfg, model, tok, env, FastWeightConfig(num_layers=2), accelerator=Accelerator(cpu=True))

    def advantages(scores):
        trajectories, _ = two_question_rollouts([scores])
        segments = [ValuedSegment(seg, 0, old_values=[0.0] * len(seg.completion_ids))
                    for seg in trajectories[0].segments]
        trainer.assign_advantages(segments, torch.tensor([trajectories[0].reward]), {}, trajectories)
        return [s.advantages for s in segments]

    # Zero critic, no discount: the extraction gets the episode's reward, each answer its own question's score
    # (the episode's reward moved by how its question did against the mean), whatever the other answers did.
    extraction, *answers = advantages([1.0, 0.0, 0.5])
    assert extraction == pytest.approx([0.5] * 4)
    assert [a[-1] for a in answers] == pytest.approx([1.0, 0.0, 0.5])
    first, _, _ = advantages([1.0, 1.0, 0.0])[1:]
    assert first[-1] == pytest.approx(1.0)  # a0 does not depend on a2's score
