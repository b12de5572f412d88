import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tmem_rl.envs.base import QAPair
from tmem_rl.memory import FastWeightConfig, FastWeights
from tmem_rl.memory.inner_loop import IGNORE, format_pair, minibatch_schedule, slot_generator

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
        torch.testing.assert_close(after[s][valid], ref_logits[0][valid], atol=1e-5, rtol=1e-5)
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
        assert s1[slot]["epoch_losses"] == pytest.approx(s2[slot]["epoch_losses"], abs=1e-5)
        assert s1[slot]["loss_after"] == pytest.approx(s2[slot]["loss_after"], abs=1e-5)
    for key in b1:
        torch.testing.assert_close(b1[key], b2[key], atol=1e-6, rtol=1e-5)


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
    assert stats["loss_after"] < 0.3 * stats["loss_before"]
    assert stats["epoch_losses"][-1] < stats["epoch_losses"][0]


def test_snapshot_restore_and_save_load_round_trip(tiny, tmp_path):
    model, tok = tiny
    fast = FastWeights(model, 2, FastWeightConfig(lr=0.05, epochs=2, train_a=True))
    fast.absorb(tok, {0: PAIRS[0]})
    snap = fast.snapshot([0])
    ids, mask = probe_batch(tok)
    with torch.no_grad(), fast.use([0, 0, 0]):
        trained = model(input_ids=ids, attention_mask=mask).logits
    fast.save(tmp_path / "fw")
    fast.restore(snap, [1])
    with torch.no_grad(), fast.use([1, 1, 1]):
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, trained)
    fast.remove()
    loaded = FastWeights.load(model, tmp_path / "fw")
    assert loaded.config.train_a and loaded.versions == [1, 0]
    with torch.no_grad(), loaded.use([0, 0, 0]):
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, trained)


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
    u, s, vh = torch.linalg.svd(module.weight.detach(), full_matrices=False)
    torch.testing.assert_close(fast.A[name], torch.diag(s[:3]) @ vh[:3])
    # A A^T = S_r^2: rows are orthogonal with the singular values' squares as norms.
    torch.testing.assert_close(fast.A[name] @ fast.A[name].T, torch.diag(s[:3] ** 2), atol=1e-4, rtol=1e-4)
