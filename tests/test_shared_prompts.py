"""The update's forward with shared prompts: rows with the same prompt under the same fast weights run it once, and
the layers below the fast weights once per prompt text; log-probs, values, entropies and gradients are those of
one pass over every row whole."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tmem_rl.logprobs import build_rows, score_completions
from tmem_rl.memory import FastWeightConfig, FastWeights
from tmem_rl.memory.layers import decoder_layers
from tmem_rl.models import tiny_model

PROMPT_A = [5, 17, 23, 99, 41, 8, 12]
PROMPT_B = [61, 3, 70]
COMPLETIONS = [[11, 12, 13, 14], [21, 22], [31, 32, 33], [41, 42, 43, 44], [51, 52], [61, 62, 63]]
# Three rows of A on the base model, two of A under fast weights (slots 0 and 1), one of B under slot 0.
PROMPTS = [PROMPT_A, PROMPT_A, PROMPT_A, PROMPT_A, PROMPT_A, PROMPT_B]
SLOTS = [-1, -1, -1, 0, 1, 0]


def setup(peft: bool):
    torch.manual_seed(0)
    model, tok = tiny_model(num_layers=4)
    if peft:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        for name, p in model.named_parameters():  # LoRA's B starts at 0: give it a gradient path that matters
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
    fast = FastWeights(model, 2, FastWeightConfig(num_layers=2))
    with torch.no_grad():
        for b in fast.B.values():
            b.normal_(std=0.05)
    value_head = torch.nn.Linear(model.config.hidden_size, 1)
    rows = build_rows(PROMPTS, COMPLETIONS, [0.7, 1.0, 0.7, 0.9, 0.7, 1.0], SLOTS, tok.pad_token_id, "cpu")
    return model, fast, value_head, rows


def scored(model, fast, value_head, rows, shared):
    model.zero_grad(set_to_none=True)
    value_head.zero_grad(set_to_none=True)
    scores = score_completions(model, fast, rows, value_head, entropy=True, shared=shared)
    (scores.logp.sum() + scores.values.pow(2).sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["value_head"] = value_head.weight.grad.clone()
    return scores, grads


@pytest.mark.kernel_paths
@pytest.mark.parametrize("peft", [False, True])
def test_shared_prompts_give_the_log_probs_values_and_gradients_of_one_pass(peft):
    model, fast, value_head, rows = setup(peft)
    model.train()
    lower = list(decoder_layers(model)[:2])
    whole, whole_grads = scored(model, fast, value_head, rows, shared=None)
    seen = {i: [] for i in range(4)}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, args, i=i: seen[i].append(args[0].shape[:2]))
             for i, layer in enumerate(decoder_layers(model))]
    try:
        shared, shared_grads = scored(model, fast, value_head, rows, shared=lower)
    finally:
        for h in hooks:
            h.remove()
    mask = rows.completion_mask.bool()
    # Float rounding only (another summation order): measured differences ~1e-6 of each tensor's scale.
    torch.testing.assert_close(shared.logp[mask], whole.logp[mask], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(shared.values[mask], whole.values[mask], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(shared.entropy[mask], whole.entropy[mask], atol=1e-4, rtol=1e-4)
    assert (shared.logp[~mask] == 0).all()
    assert shared_grads.keys() == whole_grads.keys() and len(whole_grads) > 1
    for name, grad in whole_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-4 * grad.abs().max().item(), rtol=1e-3,
                                   msg=name)
    # Prompt pass: 2 prompt texts in the lower layers, 4 (prompt, fast weights) rows above them; then every row's
    # completion (4 columns) on every layer.
    width = len(PROMPT_A)
    assert [shape for shape in seen[0]] == [(2, width), (6, 4)]
    assert [shape for shape in seen[3]] == [(4, width), (6, 4)]


def test_prompts_that_all_differ_are_scored_in_one_pass_unless_every_process_must_make_two():
    model, fast, value_head, _ = setup(False)
    # Completions of 1 token: nothing is left to score after the prompt's last position.
    rows = build_rows([PROMPT_A, PROMPT_B], [[7], [9]], [1.0, 1.0], [-1, -1], 0, "cpu")
    calls = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs["input_ids"].shape),
                                           with_kwargs=True)
    try:
        with torch.no_grad():
            whole = score_completions(model, fast, rows, shared=[])
            assert calls == [rows.input_ids.shape]
            calls.clear()
            # Under several processes every forward of a wrapped model is a collective: always two.
            both = score_completions(model, fast, rows, shared=[], collective=True)
    finally:
        hook.remove()
    assert calls == [(2, len(PROMPT_A)), (2, 1)]
    torch.testing.assert_close(both.logp, whole.logp, atol=1e-5, rtol=1e-5)


def test_one_token_completions_need_only_the_prompt_pass():
    model, fast, value_head, _ = setup(False)
    rows = build_rows(PROMPTS, [[7]] * 6, [1.0] * 6, SLOTS, 0, "cpu")
    calls = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs["input_ids"].shape),
                                           with_kwargs=True)
    try:
        with torch.no_grad():
            shared = score_completions(model, fast, rows, value_head, entropy=True, shared=[])
    finally:
        hook.remove()
    with torch.no_grad():
        whole = score_completions(model, fast, rows, value_head, entropy=True)
    assert calls == [(4, len(PROMPT_A))]  # 4 distinct (prompt, fast weights)
    for got, want in zip(shared, whole):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_scores_in_one_pass():
    """Checkpointed layers drop the KV cache in training: the prompt could not be put in front of the completions."""
    import tmem_rl.prefill as prefill

    model, _, value_head, rows = setup(False)
    model.gradient_checkpointing_enable()
    model.train()
    whole, whole_grads = scored(model, None, value_head, rows, shared=None)
    calls = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs["input_ids"].shape),
                                           with_kwargs=True)
    try:
        shared, shared_grads = scored(model, None, value_head, rows, shared=[])
    finally:
        hook.remove()
    assert calls == [rows.input_ids.shape]  # known beforehand: no prompt pass wasted, sharing not given up
    assert model not in prefill.CACHE_TOO_SHORT
    torch.testing.assert_close(shared.logp, whole.logp)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, msg=name)


@pytest.mark.kernel_paths
@pytest.mark.parametrize("algorithm, beta", [("grpo", 0.0), ("grpo", 0.1), ("ppo", 0.0)])
def test_a_training_step_gets_the_gradient_it_gets_without_sharing(tmp_path, monkeypatch, algorithm, beta):
    """The same rollouts trained with and without shared prompts: the same gradient at the optimizer, and the
    shared pass ran (the group's extraction prompts; each answer's text under the rollouts' fast weights). With
    beta the reference model's log-probs are shared too: a wrong one would give the KL a gradient."""
    import tmem_rl.logprobs as logprobs
    from accelerate import Accelerator

    from tmem_rl.envs import make_env
    from tmem_rl.episode import EpisodeConfig
    from tmem_rl.models import FIXTURE_TOKENIZER
    from tmem_rl.trainers.grpo import GRPOConfig, GRPOTrainer
    from tmem_rl.trainers.ppo import PPOConfig, PPOTrainer

    config_type, trainer_type = (GRPOConfig, GRPOTrainer) if algorithm == "grpo" else (PPOConfig, PPOTrainer)
    env = make_env("facts", num_tasks=4, num_distractors=6, num_facts=3, lines_per_chunk=3)

    def trainer(shared: bool):
        torch.manual_seed(0)
        model, tok = tiny_model(num_layers=4, tokenizer_path=FIXTURE_TOKENIZER)
        cfg = config_type(output_dir=str(tmp_path / str(shared)), num_generations=4, questions_per_step=1,
                          learning_rate=1e-2, max_steps=1, report_to=[], save_steps=0, micro_batch_size=4,
                          max_completion_length=8, seed=3, shared_prompts=shared, beta=beta)
        return trainer_type(cfg, model, tok, env, FastWeightConfig(lr=0.05, epochs=1, num_layers=2),
                            EpisodeConfig(l_max=60, max_extraction_tokens=8, max_answer_tokens=6),
                            accelerator=Accelerator(cpu=True))

    plain, shared = trainer(False), trainer(True)
    batch = plain.generate_rollouts(0)
    for i, traj in enumerate(batch.trajectories):
        traj.reward = float(i % 2)
    passes = []
    original = logprobs._shared_prompt_pass
    monkeypatch.setattr(logprobs, "_shared_prompt_pass", lambda *a, **k: passes.append(original(*a, **k)) or passes[-1])
    grads = {}
    for name, t in (("plain", plain), ("shared", shared)):
        step = t.optimizer.step

        def recorded(*a, t=t, name=name, step=step, **k):  # the gradient the optimizer gets (AdamW's first step is
            # ~lr * sign(g): it would magnify rounding where a gradient is ~0)
            grads[name] = {n: p.grad.clone() for n, p in t.policy.named_parameters() if p.grad is not None}
            return step(*a, **k)

        t.optimizer.step = recorded
    plain.train_step(batch)
    assert passes == []
    shared.train_step(batch)
    assert any(p is not None for p in passes)
    assert grads["shared"].keys() == grads["plain"].keys() and grads["plain"]
    for name, grad in grads["plain"].items():
        torch.testing.assert_close(grads["shared"][name], grad, atol=1e-4 * grad.abs().max().item(), rtol=1e-3,
                                   msg=name)


def test_a_sliding_window_model_is_scored_in_one_pass():
    """Its cache keeps only a window of each prompt (here shorter than the prompts), which could not be put in front
    of the completions: the first micro-batch finds out, and every later one is scored whole without trying."""
    model, tok = tiny_model(num_layers=4, sliding_window=4)
    rows = build_rows(PROMPTS, COMPLETIONS, [1.0] * 6, [-1] * 6, tok.pad_token_id, "cpu")
    calls = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs["input_ids"].shape),
                                           with_kwargs=True)
    try:
        with torch.no_grad():
            whole = score_completions(model, None, rows)
            first = score_completions(model, None, rows, shared=[])
            later = score_completions(model, None, rows, shared=[])
    finally:
        hook.remove()
    assert calls == [rows.input_ids.shape, (2, len(PROMPT_A)), rows.input_ids.shape, rows.input_ids.shape]
    torch.testing.assert_close(first.logp, whole.logp)
    torch.testing.assert_close(later.logp, whole.logp)
