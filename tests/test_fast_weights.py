import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tmem_rl.errors import InputError
from tmem_rl.memory import FastWeightConfig, FastWeights, svd_init
from tmem_rl.memory.fast_weights import INIT_FILE
from tmem_rl.memory.layers import decoder_layers
from tmem_rl.memory.inner_loop import (IGNORE, NO_ANSWER_TOKEN, format_pair, minibatch_schedule, shared_head_length,
                                       slot_generator)
from tmem_rl.records import QAPair

PAIRS = {
    0: [QAPair("Where does Maya live?", "Lisbon"), QAPair("What is Maya's dog called?", "Biscuit"),
        QAPair("When is Omar's birthday?", "March 14")],
    1: [QAPair("What is Lena's job?", "She is a pilot"), QAPair("Lena's favourite number?", "42")],
    2: [QAPair("Where do they meet?", "At the harbour cafe at noon")],
}


def padded(tokenizer, rows):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def probe_batch(tokenizer):
    texts = ["Maya lives in Lisbon with her dog.", "Lena flies planes for a living.", "Meet at noon."]
    return padded(tokenizer, [tokenizer(t)["input_ids"] for t in texts])


def peft_reference(model, fast, tokenizer, slot, pairs, cfg):
    """One standalone PEFT LoRA adapter with the same A, trained by a plain SGD loop on the same minibatches."""
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, lora_dropout=0.0, target_modules=list(cfg.target_modules),
                      layers_to_transform=sorted({int(n.split(".")[2]) for n in fast.modules}))
    peft_model = get_peft_model(copy.deepcopy(model), lora)
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            key = name.removeprefix("base_model.model.")
            module.lora_A["default"].weight.data.copy_(fast._a_init[key])
            module.lora_A["default"].weight.requires_grad_(False)
            module.lora_B["default"].weight.data.zero_()
    params = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    opt = torch.optim.SGD(params, lr=cfg.lr)
    formatted = [format_pair(tokenizer, p, cfg.max_pair_tokens) for p in pairs]
    gen = slot_generator(cfg.seed, slot, 0)
    for _ in range(cfg.epochs):
        for mb in minibatch_schedule(len(pairs), cfg.batch_size, cfg.shuffle, gen):
            ids, mask = padded(tokenizer, [formatted[i][0] for i in mb])
            labels = torch.full_like(ids, IGNORE)
            for row, i in enumerate(mb):
                labels[row, : len(formatted[i][1])] = torch.tensor(formatted[i][1])
            loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    return peft_model


@pytest.mark.kernel_paths
@pytest.mark.parametrize("init", ["svd", "random"])
def test_batched_fast_weights_match_separate_peft_adapters(tiny, init):
    model, tok = tiny
    cfg = FastWeightConfig(init=init, lr=0.05, epochs=3, batch_size=2, shuffle=True, seed=3)
    fast = FastWeights(model, 3, cfg)
    ids, mask = probe_batch(tok)
    references = [peft_reference(model, fast, tok, s, PAIRS[s], cfg) for s in range(3)]
    with torch.no_grad(), fast.use([0, 1, 2]):
        before = model(input_ids=ids, attention_mask=mask).logits
    fast.absorb(tok, PAIRS)
    with torch.no_grad(), fast.use([0, 1, 2]):
        after = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(before, after, atol=1e-4)  # the update did something
    for s, ref in enumerate(references):
        with torch.no_grad():
            ref_logits = ref(input_ids=ids[s : s + 1], attention_mask=mask[s : s + 1]).logits
        valid = mask[s].bool()
        # Two code paths (batched hook vs PEFT): up to 1.6e-5 apart across CPU kernel paths; the update itself
        # moves these logits by 0.2 to 5.
        torch.testing.assert_close(after[s][valid], ref_logits[0][valid], atol=1.5e-4, rtol=1e-4)
        for name, module in ref.named_modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                key = name.removeprefix("base_model.model.")
                torch.testing.assert_close(fast.B[key][s], module.lora_B["default"].weight.data, atol=1e-5, rtol=1e-5)


def test_base_logits_match_peft_before_training(tiny):
    model, tok = tiny
    fast = FastWeights(model, 2, FastWeightConfig())
    ids, mask = probe_batch(tok)
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
        with fast.use([0, 1, 0]):
            with_fast = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(base, with_fast)  # B = 0 adds exactly nothing


@pytest.mark.parametrize("batch_size", [16, 2])
def test_the_loss_before_an_update_costs_a_pass_only_when_the_first_step_does_not_score_every_pair(tiny, batch_size):
    model, tok = tiny
    fast = FastWeights(model, 2, FastWeightConfig(lr=0.05, epochs=3, batch_size=batch_size))
    top = decoder_layers(model)[-1]
    passes = []
    handle = top.register_forward_pre_hook(lambda module, args: passes.append(args[0].shape[0]))
    try:
        stats = fast.absorb(tok, {0: PAIRS[0], 1: PAIRS[1]})
    finally:
        handle.remove()
    steps = 3 * (1 if batch_size == 16 else 2)  # slot 0's 3 pairs take 2 minibatches of 2
    # The prefix capture, the steps, the pass after, and the pass before only when the first step does not score
    # every pair.
    assert len(passes) == 1 + steps + 1 + (batch_size == 2)
    for s in (0, 1):
        if batch_size == 16:  # one minibatch: the first epoch's loss is the loss before
            assert stats[s].loss_before == pytest.approx(stats[s].epoch_losses[0], rel=1e-5)
        assert stats[s].loss_after < stats[s].loss_before


def test_prefix_cache_matches_full_recompute(tiny):
    model, tok = tiny
    results = {}
    for cached in (True, False):
        fast = FastWeights(model, 3, FastWeightConfig(lr=0.05, epochs=4, batch_size=2, prefix_cache=cached))
        stats = fast.absorb(tok, PAIRS)
        results[cached] = (stats, {k: v.clone() for k, v in fast.B.items()})
        fast.remove()
    (s1, b1), (s2, b2) = results[True], results[False]
    for slot in PAIRS:
        assert s1[slot].epoch_losses == pytest.approx(s2[slot].epoch_losses, abs=1e-5)
        assert s1[slot].loss_after == pytest.approx(s2[slot].loss_after, abs=1e-5)
    for key in b1:
        torch.testing.assert_close(b1[key], b2[key], atol=1e-6, rtol=1e-5)


def test_shared_head_length_stops_at_the_first_divergence_and_before_any_answer():
    ids = torch.tensor([[5, 6, 7, 8, 9, 0], [5, 6, 7, 3, 9, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    labels = torch.full_like(ids, IGNORE)
    labels[:, 4:] = ids[:, 4:]
    assert shared_head_length(ids, mask, labels) == 3
    labels[1, 3] = 3  # an answer token at 3 is predicted from position 2: the head ends before it
    assert shared_head_length(ids, mask, labels) == 2
    assert shared_head_length(ids[:1], mask[:1], labels[:1]) == 0  # one row shares with nothing


@pytest.mark.kernel_paths
@pytest.mark.parametrize("slow_lora", [False, True])
def test_shared_head_trains_as_every_pair_run_whole_with_fewer_tokens_through_the_adapted_layers(tiny, slow_lora):
    model, tok = tiny
    if slow_lora:  # a policy whose slow weights are a PEFT LoRA, as in training
        model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    layers = decoder_layers(model)  # the last two are adapted
    results = {}
    for shared in (True, False):
        tokens = {2: [], 3: []}
        handles = [layers[i].mlp.gate_proj.register_forward_pre_hook(
            lambda module, args, seen=tokens[i]: seen.append(args[0].shape[:2].numel())) for i in tokens]
        fast = FastWeights(model, 3, FastWeightConfig(lr=0.05, epochs=4, batch_size=2, num_layers=2,
                                                      shared_head=shared))
        try:
            stats = fast.absorb(tok, PAIRS)
        finally:
            for handle in handles:
                handle.remove()
        results[shared] = (stats, {k: v.clone() for k, v in fast.B.items()}, sum(tokens[2]), sum(tokens[3]))
        fast.remove()
    (s1, b1, tokens_shared, top_tokens), (s2, b2, tokens_whole, _) = results[True], results[False]
    for slot in PAIRS:
        assert s1[slot].loss_before == pytest.approx(s2[slot].loss_before, abs=1e-5)
        assert s1[slot].epoch_losses == pytest.approx(s2[slot].epoch_losses, abs=1e-5)
        assert s1[slot].loss_after == pytest.approx(s2[slot].loss_after, abs=1e-5)
        assert s1[slot].loss_after < s1[slot].loss_before
    for key in b1:
        assert b1[key].abs().sum() > 0
        torch.testing.assert_close(b1[key], b2[key], atol=1e-6, rtol=1e-4)
    # Every pair starts with the chat template's system and user headers: they run once per slot and step (here
    # a step holds at most 2 pairs of a slot).
    assert tokens_shared < 0.8 * tokens_whole
    # The top layer's MLP runs only where an answer token is predicted, and on one position of each head.
    assert top_tokens < 0.5 * tokens_shared


@pytest.mark.kernel_paths
def test_a_sliding_window_shorter_than_the_head_runs_every_pair_whole(tiny):
    """A sliding-window layer's cache keeps only its window of the head, so the head cannot be put in front of the
    tails: the update falls back to running every pair whole and trains exactly as with `shared_head` off."""
    from transformers import MistralConfig, MistralForCausalLM

    _, tok = tiny
    config = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=8, initializer_range=0.2,
                           pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    results = {}
    for shared in (True, False):
        fast = FastWeights(model, 3, FastWeightConfig(lr=0.05, epochs=2, num_layers=2, shared_head=shared))
        stats = fast.absorb(tok, PAIRS)
        results[shared] = [stats[s].loss_after for s in PAIRS], {k: v.clone() for k, v in fast.B.items()}
        fast.remove()
    assert results[True][0] == pytest.approx(results[False][0], abs=1e-6)
    for key, b in results[True][1].items():
        torch.testing.assert_close(b, results[False][1][key], atol=1e-7, rtol=1e-5)


def test_absorb_changes_only_targeted_b_and_reset_restores_base(tiny):
    model, tok = tiny
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    fast = FastWeights(model, 4, FastWeightConfig(lr=0.05, epochs=2))
    a_before = {k: v.clone() for k, v in fast.A.items()}
    ids, mask = probe_batch(tok)
    with torch.no_grad():
        base_logits = model(input_ids=ids, attention_mask=mask).logits
    fast.absorb(tok, {1: PAIRS[0], 3: PAIRS[1]})
    for k, v in model.state_dict().items():
        assert torch.equal(v, base_state[k]), f"base weight {k} changed"
    for k in fast.A:
        assert torch.equal(fast.A[k], a_before[k])
        assert fast.B[k][[0, 2]].abs().sum() == 0, "slots that absorbed nothing must stay zero"
        assert fast.B[k][[1, 3]].abs().sum() > 0
    assert fast.versions == [0, 1, 0, 1]
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad(), fast.use([1, 3, 1]):
        adapted = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.equal(adapted, base_logits)
    fast.reset([1, 3])
    with torch.no_grad(), fast.use([1, 3, 1]):
        after_reset = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(after_reset, base_logits)


def test_absorbing_lowers_loss_by_a_large_margin(tiny):
    model, tok = tiny
    fast = FastWeights(model, 1, FastWeightConfig(lr=0.5, epochs=40, init="svd"))
    stats = fast.absorb(tok, {0: [QAPair("What is the name of Maya's dog?", "Biscuit")]})[0]
    assert stats.loss_after < 0.3 * stats.loss_before
    assert stats.epoch_losses[-1] < stats.epoch_losses[0]


def test_snapshot_restore_and_save_load_round_trip(tiny, tmp_path):
    model, tok = tiny
    fast = FastWeights(model, 2, FastWeightConfig(lr=0.05, epochs=2, train_a=True))
    fast.absorb(tok, {0: PAIRS[0]})
    snap = fast.snapshot([0])
    ids, mask = probe_batch(tok)
    with torch.no_grad(), fast.use([0, 0, 0]):
        trained = model(input_ids=ids, attention_mask=mask).logits
    fast.save(tmp_path / "fw")
    saved = {name: (fast.A[name].clone(), fast.B[name].clone()) for name in fast.modules}
    fast.restore(snap, [1])
    for key, tensor in fast.trainable().items():
        assert torch.equal(tensor[1], tensor[0]), key  # a copy of stored values: exact by construction
    with torch.no_grad(), fast.use([1, 1, 1]):
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, trained, atol=1e-5, rtol=1e-5)
    fast.remove()
    loaded = FastWeights.load(model, tmp_path / "fw")
    assert loaded.config.train_a and loaded.versions == [1, 0]
    for name, (a, b) in saved.items():
        assert torch.equal(loaded.A[name], a) and torch.equal(loaded.B[name], b)
    with torch.no_grad(), loaded.use([0, 0, 0]):
        # Same values, but a kernel may take another path: close, not bit-equal.
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, trained, atol=1e-5, rtol=1e-5)


def test_a_is_stored_contiguous(tiny):
    model, _ = tiny
    for init in ("svd", "random"):
        fast = FastWeights(model, 2, FastWeightConfig(init=init))
        assert all(a.is_contiguous() for a in fast.A.values()), init
        fast.remove()


def test_fast_weights_follow_the_model_to_another_device(tiny):
    """Built before the model moves (as before `accelerator.prepare`), they go where the model went. The meta
    device stands in for a GPU here; tests on a GPU machine also run the trainer there."""
    model, _ = tiny
    fast = FastWeights(model, 2, FastWeightConfig())
    model.to("meta")
    linear = next(iter(fast.modules.values()))
    with fast.use([0, 1, -1]):
        out = linear(torch.randn(3, 5, linear.in_features, device="meta"))  # runs the fast-weight hook
    assert out.device.type == "meta" and out.shape == (3, 5, linear.out_features)
    assert all(b.device.type == "meta" for b in fast.B.values())
    assert all(a.device.type == "meta" for a in fast.A.values())


def test_loss_before_is_the_loss_before_any_step(tiny):
    """Per slot, the token-mean answer loss under the fast weights as they were, not the first epoch's running
    mean (which already includes steps)."""
    model, tok = tiny
    cfg = FastWeightConfig(lr=0.5, epochs=2, batch_size=1)
    fast = FastWeights(model, 2, cfg)
    reference = FastWeights(model, 2, cfg)

    def true_loss(slot, pairs):
        total = count = 0.0
        for pair in pairs:
            ids, labels = format_pair(tok, pair, cfg.max_pair_tokens)
            with torch.no_grad(), fast.use([slot]):
                logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            targets = torch.tensor(labels[1:])
            keep = targets != IGNORE
            total += torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
            count += keep.sum().item()
        return total / count

    expected = {s: true_loss(s, PAIRS[s]) for s in (0, 1)}
    first = fast.absorb(tok, {0: PAIRS[0], 1: PAIRS[1]})
    for s in (0, 1):
        assert first[s].loss_before == pytest.approx(expected[s], rel=1e-4)
        assert first[s].loss_before != pytest.approx(first[s].epoch_losses[0], rel=1e-3)
    again = true_loss(0, PAIRS[0])  # now under slot 0's trained fast weights
    second = fast.absorb(tok, {0: PAIRS[0]})
    assert second[0].loss_before == pytest.approx(again, rel=1e-4)
    assert second[0].loss_before == pytest.approx(first[0].loss_after, rel=1e-4)
    reference.remove()


def test_pairs_without_an_answer_token_after_truncation_are_dropped_with_a_reason(tiny):
    model, tok = tiny
    long_question = "Tell me everything about the harbour " * 40
    cfg = FastWeightConfig(lr=0.05, epochs=1, max_pair_tokens=64)
    fast = FastWeights(model, 2, cfg)
    stats = fast.absorb(tok, {0: [QAPair(long_question, "Biscuit"), *PAIRS[0]], 1: [QAPair(long_question, "x")]})
    assert stats[0].num_pairs == len(PAIRS[0])
    assert [d["reason"] for d in stats[0].dropped] == [NO_ANSWER_TOKEN]
    assert stats[0].dropped[0]["item"]["output"] == "Biscuit"
    assert stats[1].num_pairs == 0 and stats[1].loss_before is None
    assert fast.versions == [1, 0], "a slot that trained nothing keeps its version"
    assert all(b[1].abs().sum() == 0 for b in fast.B.values())


def test_train_a_changes_a_per_slot_only(tiny):
    model, tok = tiny
    fast = FastWeights(model, 2, FastWeightConfig(lr=0.05, epochs=2, train_a=True))
    a0 = {k: v.clone() for k, v in fast.A.items()}
    fast.absorb(tok, {0: PAIRS[0]})
    key = next(iter(fast.A))
    assert not torch.equal(fast.A[key][0], a0[key][0])
    assert torch.equal(fast.A[key][1], a0[key][1])
    fast.reset([0])
    assert torch.equal(fast.A[key][0], a0[key][0])


def test_a_saved_with_a_lora_policy_is_the_a_its_trained_merged_model_gets(tiny, tmp_path):
    model, _ = tiny
    cfg = FastWeightConfig(train_a=True)
    # Built as in a LoRA training run: the module names carry PEFT's prefixes, the weights are the initial ones.
    training = FastWeights(get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["up_proj"])), 2, cfg)
    training.save_init(tmp_path)
    with torch.no_grad():  # the slow weights train on
        for p in model.parameters():
            p.mul_(1.1).add_(0.01)
    loaded = FastWeights(model, 1, cfg, init_from=tmp_path)
    assert loaded.init_tensors().keys() == training.init_tensors().keys()
    for key, a in loaded.init_tensors().items():
        assert torch.equal(a, training.init_tensors()[key]), key  # stored values, read back
    assert all(torch.equal(loaded.A[n][0], a) for n, a in zip(loaded.modules, loaded.init_tensors().values()))
    recomputed = FastWeights(model, 1, cfg).init_tensors()
    assert all((recomputed[k] - a).abs().max() > 1e-2 for k, a in loaded.init_tensors().items())


def test_a_folder_without_saved_a_warns_and_one_that_does_not_fit_is_one_error_line(tiny, tmp_path):
    model, _ = tiny
    with pytest.warns(UserWarning, match=f"{INIT_FILE}: not found.*SVD"):
        fallback = FastWeights(model, 1, FastWeightConfig(), init_from=tmp_path)
    computed = FastWeights(model, 1, FastWeightConfig())
    assert all(torch.equal(a, b) for a, b in zip(fallback.init_tensors().values(), computed.init_tensors().values()))
    FastWeights(model, 1, FastWeightConfig(rank=4, num_layers=2)).save_init(tmp_path)
    with pytest.raises(InputError) as err:
        FastWeights(model, 1, FastWeightConfig(rank=6, num_layers=2), init_from=tmp_path)
    message = str(err.value)
    assert str(tmp_path / INIT_FILE) in message and "is (4, 128), expected (6, 128)" in message
    assert "\n" not in message
    with pytest.raises(InputError, match="'0.mlp.down_proj' is missing"):
        FastWeights(model, 1, FastWeightConfig(rank=4, num_layers=4), init_from=tmp_path)


def test_bad_target_module_and_rank_errors(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="not_a_proj.*available: .*down_proj.*gate_proj"):
        FastWeights(model, 1, FastWeightConfig(target_modules=("not_a_proj",)))
    with pytest.raises(ValueError, match="rank 65 exceeds"):
        FastWeights(model, 1, FastWeightConfig(rank=65))
    with pytest.raises(ValueError, match="FastWeightConfig.init"):
        FastWeightConfig(init="orthogonal")


def test_svd_init_is_scaled_top_singular_directions(tiny):
    model, _ = tiny
    fast = FastWeights(model, 1, FastWeightConfig(rank=3))
    name, module = next(iter(fast.modules.items()))
    u, s, vh = torch.linalg.svd(module.weight.detach().double(), full_matrices=False)
    a = fast.A[name].double()
    # Rows are the top singular directions up to sign, scaled by the singular values.
    torch.testing.assert_close(a.abs(), (torch.diag(s[:3]) @ vh[:3]).abs(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a @ a.T, torch.diag(s[:3] ** 2), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", [(96, 40), (40, 96)])
def test_truncated_svd_init_matches_the_full_svd(shape):
    """Gram-eigendecomposition init vs the full SVD: singular values within 1e-5 relative, the top-r row space
    within 1e-4 (projector distance), on a spectrum with a gap at r and on a plain random matrix."""
    rank = 6
    generator = torch.Generator().manual_seed(0)
    d_out, d_in = shape
    left, _ = torch.linalg.qr(torch.randn(d_out, d_out, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=generator, dtype=torch.float64))
    spectrum = torch.logspace(1, -3, min(shape), dtype=torch.float64)
    designed = (left[:, : min(shape)] * spectrum) @ right[:, : min(shape)].T
    plain = torch.randn(shape, generator=generator, dtype=torch.float64) * 0.02
    for weight in (designed.float(), plain.float()):
        a = svd_init(weight, rank).double()
        _, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
        norms = a.norm(dim=1)
        torch.testing.assert_close(norms, s[:rank], rtol=1e-5, atol=0)
        directions = a / norms[:, None]
        projector_gap = (directions.T @ directions - vh[:rank].T @ vh[:rank]).norm()
        assert projector_gap < 1e-4, projector_gap
        assert a.dtype == torch.float64 and svd_init(weight, rank).dtype == torch.float32
        largest = a.gather(1, a.abs().argmax(dim=1, keepdim=True))
        assert (largest > 0).all(), "signs are fixed so every process builds the same A"


def test_the_hook_has_no_data_dependent_branch(tiny):
    """A host sync (`bool(tensor)`) in the hook would stall every adapted linear at every decoding step on a GPU
    and break graph capture; a full-graph trace of a hooked linear fails on one."""
    model, _ = tiny
    fast = FastWeights(model, 2, FastWeightConfig())
    for b in fast.B.values():
        b.normal_(0, 0.1)
    linear = next(iter(fast.modules.values()))
    x = torch.randn(3, 5, linear.in_features)
    with torch.no_grad():
        base = torch.nn.functional.linear(x, linear.weight, linear.bias)
    # A static block (what a captured decode step runs) masks base-model rows arithmetically; any other block
    # leaves them out of the delta, from one host check when the block opens.
    for static in (True, False):
        torch._dynamo.reset()
        with fast.use([0, -1, 1], static=static):
            traced = torch.compile(linear, backend="eager", fullgraph=True)(x)
            eager = linear(x)
        torch.testing.assert_close(traced, eager)
        torch.testing.assert_close(eager[1], base[1])  # slot -1: the base model exactly
        assert not torch.allclose(eager[0], base[0], atol=1e-4)
        assert not torch.allclose(eager[2], base[2], atol=1e-4)
