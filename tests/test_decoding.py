"""The static-cache decoding path gives the tokens `model.generate` gives, row by row, fast-weight slot by slot."""

from contextlib import contextmanager

import pytest
import torch
from transformers import LogitsProcessorList, StoppingCriteriaList

from tmem_rl.chat import left_padded
from tmem_rl.decoding import StaticDecoder, bucket_rows
from tmem_rl.envs import make_env
from tmem_rl.memory import FastWeightConfig, FastWeights
from tmem_rl.models import tiny_model
from tmem_rl.records import QAPair
from tmem_rl.episode import EpisodeConfig, EpisodeRunner, GumbelNoise, PairStopping, counter_seed


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_model(num_layers=2)
    return model.eval(), tok


def generate(model, fast, ids, mask, slots, stops, pad, n=20):
    with fast.use(slots):
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                              pad_token_id=pad, eos_token_id=stops, temperature=None, top_p=None,
                              top_k=None)[:, ids.shape[1]:]


def decode_both_ways(model, tok, decoder: StaticDecoder, fast: FastWeights) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(decoder's tokens, generate's tokens) for: left-padded rows of different lengths, the base model in one row,
    one prompt under two slots, rows that stop at different steps; then an absorb, and the same bucket again (the
    decoder must see the new fast weights); then fewer rows."""
    compared = []
    texts = ["hello there how are", "a", "the quick brown fox jumps over", "a"]
    ids, mask = left_padded([tok(t, add_special_tokens=False)["input_ids"] for t in texts], tok.pad_token_id)
    ids, mask = ids.to(decoder.device), mask.to(decoder.device)
    # First the base model alone: on a GPU this captures the bucket's graph, which must still serve fast weights.
    base = generate(model, fast, ids, mask, [-1] * 4, [tok.eos_token_id], tok.pad_token_id)
    compared.append((decoder.decode(ids, mask, 20, [tok.eos_token_id], tok.pad_token_id, [-1] * 4), base))
    slots = [0, -1, 1, 1]
    free = generate(model, fast, ids, mask, slots, [tok.eos_token_id], tok.pad_token_id)
    assert not torch.equal(free[0], base[0]), "slot 0 must change row 0"
    # Stop on tokens that rows actually produce, so that rows end at different steps and are padded after.
    stops = [tok.eos_token_id, free[1, 6].item(), free[2, 2].item()]
    reference = generate(model, fast, ids, mask, slots, stops, tok.pad_token_id)
    ours = decoder.decode(ids, mask, 20, stops, tok.pad_token_id, slots)
    assert reference[1, 7:].eq(tok.pad_token_id).all() and reference[2, 3:].eq(tok.pad_token_id).all()
    compared.append((ours, reference))
    assert not torch.equal(ours[1], ours[3]), "rows under different slots must differ"

    fast.absorb(tok, {1: [QAPair("Where is it?", "Lisbon")]})
    after = generate(model, fast, ids, mask, slots, [tok.eos_token_id], tok.pad_token_id)
    assert not torch.equal(after[2:], free[2:]), "the absorb must change slot 1's tokens"
    compared.append((decoder.decode(ids, mask, 20, [tok.eos_token_id], tok.pad_token_id, slots), after))
    three = decoder.decode(ids[:3], mask[:3], 20, [tok.eos_token_id], tok.pad_token_id, slots[:3])
    compared.append((three, after[:3]))
    return compared


def test_greedy_static_decoding_equals_generate_on_padded_rows_and_mixed_slots(tiny):
    model, tok = tiny
    fast = FastWeights(model, 2, FastWeightConfig(num_layers=2, lr=0.5, epochs=3))
    fast.absorb(tok, {0: [QAPair("Who is it?", "Gina")], 1: [QAPair("Where?", "Porto")]})
    compared = decode_both_ways(model, tok, StaticDecoder(model, fast), fast)
    fast.remove()
    assert len(compared) == 4
    for ours, expected in compared:
        assert torch.equal(ours[:, : expected.shape[1]], expected)


def test_a_lora_policy_decodes_the_same_through_either_path():
    """Under LoRA the policy is a PEFT wrapper whose forward takes only **kwargs: the decoder reads the argument
    names from its base model, and the tokens stay those of `generate`."""
    from peft import LoraConfig, get_peft_model

    model, tok = tiny_model(num_layers=2)
    policy = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    policy.eval()
    fast = FastWeights(policy, 2, FastWeightConfig(num_layers=2, lr=0.5, epochs=3))
    fast.absorb(tok, {0: [QAPair("Who is it?", "Gina")], 1: [QAPair("Where?", "Porto")]})
    compared = decode_both_ways(policy, tok, StaticDecoder(policy, fast), fast)
    fast.remove()
    for ours, expected in compared:
        assert torch.equal(ours[:, : expected.shape[1]], expected)


@pytest.mark.kernel_paths
def test_a_decode_step_has_no_host_sync(tiny):
    """A step that reads a tensor's value on the host (a data-dependent branch, `.item()`) cannot be captured as a
    graph. Tracing the step whole (`fullgraph=True`) fails on exactly those, so this checks it on a CPU."""
    model, tok = tiny
    fast = FastWeights(model, 2, FastWeightConfig(num_layers=2))
    decoder = StaticDecoder(model, fast)
    ids = torch.randint(5, 100, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    steps = {}
    for name, step in (("eager", decoder.step_logits),
                       ("traced", torch.compile(decoder.step_logits, backend="eager", fullgraph=True))):
        decoder.decode(ids, mask, 4, [tok.eos_token_id], tok.pad_token_id, [0, -1, 1])  # the same state each time
        bucket = next(iter(decoder._buckets.values()))
        with torch.no_grad(), fast.use([0, -1, 1]):
            steps[name] = step(bucket)
    eager, traced = steps["eager"], steps["traced"]
    assert torch.allclose(traced, eager, atol=5e-5)  # up to 4.8e-6 apart across CPU kernel paths
    fast.remove()


def test_a_model_without_static_cache_support_is_told_to_use_generate():
    model, _ = tiny_model(num_layers=1)
    model._can_compile_fullgraph = False  # what transformers declares for models a static cache does not serve
    with pytest.raises(ValueError, match="LlamaForCausalLM does not support a static KV cache.*decoder='generate'"):
        StaticDecoder(model)


def test_nested_static_slot_buffers_give_the_outer_block_its_slots_back(tiny):
    model, _ = tiny
    fast = FastWeights(model, 4, FastWeightConfig(num_layers=2))
    with fast.use([0, 1, 2], static=True):
        outer = fast._slots
        with fast.use([1, 1], static=True):
            with fast.use([3, 3, 3], static=True):
                assert fast._slots.tolist() == [3, 3, 3]
        assert fast._slots is outer and outer.tolist() == [0, 1, 2]
        assert fast._rows.tolist() == [0, 1, 2] and fast._keep.view(-1).tolist() == [True, True, True]
    fast.remove()


def test_row_buckets_are_powers_of_two():
    assert [bucket_rows(n) for n in (1, 2, 3, 5, 8, 9, 64)] == [1, 2, 4, 8, 8, 16, 64]


def test_an_episode_samples_the_same_tokens_through_either_decoder(tiny):
    model, tok = tiny
    env = make_env("facts", num_tasks=4, num_facts=2, num_distractors=2)
    episodes = {}
    for decoder in ("generate", "static"):
        fast = FastWeights(model, 4, FastWeightConfig(num_layers=2, epochs=1))
        config = EpisodeConfig(l_max=40, max_extraction_tokens=12, max_answer_tokens=6, do_sample=True,
                               temperature=0.9, seed=3, decoder=decoder)
        episodes[decoder] = EpisodeRunner(model, tok, fast, config).run(env, [env.task(0)] * 4)
        fast.remove()
    for a, b in zip(episodes["generate"].trajectories, episodes["static"].trajectories):
        assert [s.completion_ids for s in a.segments] == [s.completion_ids for s in b.segments]
        assert len(a.segments) >= 2
    rollouts = {tuple(s.completion_ids[0] for s in t.segments) for t in episodes["static"].trajectories}
    assert len(rollouts) > 1, "sampling must differ between rollouts"
    with pytest.raises(ValueError, match="decoder='graph'"):
        EpisodeConfig(decoder="graph")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_replayed_decoding_equals_generate_on_a_qwen3_shaped_model():
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from tmem_rl.models import FIXTURE_TOKENIZER

    tok = AutoTokenizer.from_pretrained(str(FIXTURE_TOKENIZER))
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=512)
    model = Qwen3ForCausalLM(config).to("cuda", torch.float32).eval()
    fast = FastWeights(model, 2, FastWeightConfig(num_layers=2, lr=0.5, epochs=3))
    fast.absorb(tok, {0: [QAPair("Who is it?", "Gina")], 1: [QAPair("Where?", "Porto")]})
    decoder = StaticDecoder(model, fast)
    assert decoder.capturing()
    compared = decode_both_ways(model, tok, decoder, fast)
    for ours, expected in compared:
        assert torch.equal(ours[:, : expected.shape[1]], expected)
    assert all(b.graph is not None for b in decoder._buckets.values())


def test_sampled_tokens_do_not_depend_on_when_the_decoder_notices_stops(tiny):
    """The static decoder checks for stops every few steps and runs on past them; `generate` stops at once. Rows
    that stop early, at different steps, over several segments (extractions, retries, the answer) must still sample
    the same tokens through either decoder: the noise of a position never depends on how many steps ran before."""
    model, tok = tiny
    bias = torch.zeros(len(tok))
    bias[tok.eos_token_id] = 9.0  # an end token about one step in five on a random model's flat distribution
    handle = model.get_output_embeddings().register_forward_hook(lambda module, args, out: out + bias)
    env = make_env("facts", num_tasks=4, num_facts=2, num_distractors=4)
    episodes = {}
    try:
        for decoder in ("generate", "static"):
            fast = FastWeights(model, 4, FastWeightConfig(num_layers=2, epochs=1))
            config = EpisodeConfig(l_max=30, max_extraction_tokens=24, max_answer_tokens=24, do_sample=True,
                                   temperature=1.0, top_p=1.0, top_k=0, seed=11, decoder=decoder,
                                   extraction_retries=1)
            episodes[decoder] = EpisodeRunner(model, tok, fast, config).run(env, [env.task(1)] * 4)
            fast.remove()
    finally:
        handle.remove()
    lengths = set()
    for a, b in zip(episodes["generate"].trajectories, episodes["static"].trajectories):
        assert [s.completion_ids for s in a.segments] == [s.completion_ids for s in b.segments]
        lengths |= {len(s.completion_ids) for s in a.segments if s.completion_ids[-1] == tok.eos_token_id}
    assert len(episodes["generate"].trajectories[0].segments) >= 3, "several segments per rollout"
    assert len(lengths) >= 3 and any(n % 8 for n in lengths), f"rows must stop early at varied steps: {lengths}"


# ---- stopping an extraction once its pairs are written ---------------------------------------------------------


@contextmanager
def forced(model, scripts: list[list[int]], then: int | None = None):
    """While active, every generation's n-th new token in row i is scripts[i][n], and after the script `then`
    (None: the model's own choice). A forward with more than one input token is a prefill and starts a generation;
    each later forward gives the next token. Both decoders run the model once per token."""
    state = {"n": 0}

    def hook(module, args, kwargs, output):
        if kwargs["input_ids"].shape[1] > 1:
            state["n"] = 0
        n, state["n"] = state["n"], state["n"] + 1
        for row, script in enumerate(scripts):
            token = script[n] if n < len(script) else then
            if token is not None:
                output.logits[row, -1] = -1e4
                output.logits[row, -1, token] = 1e4  # far beyond any sampling noise
        return output

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


P1 = '{"instruction": "Who founded Acme?", "output": "Jo Park"}'
P2 = '{"instruction": "When?", "output": "1999"}'
P3 = '{"instruction": "Where?", "output": "Oslo"}'
# Continuations of a prefilled "[", one per stop reason with max_pairs=2.
STOPPING_TEXTS = {
    "max_pairs": f" {P1}, {P2}, {P3}]",
    "repeat": f" {P1},\n {P1}, {P2}]",
    "closed": f" {P1}] That is all I found in the text.",
    "eos": f" {P2}",  # the script's end token follows
}


def tokens_through(tok, ids: list[int], text: str) -> int:
    """How many of `ids` it takes to have written `text` (a prefix of their decoded text)."""
    return next(n for n in range(len(ids) + 1) if len(tok.decode(ids[:n])) >= len(text))


def expected_stops(tok, scripts: dict[str, list[int]]) -> dict[str, tuple[int, int]]:
    """(tokens generated when each scripted row stops, tokens it keeps): a repeat keeps through the last new pair,
    an end token is kept."""
    generated = {"max_pairs": tokens_through(tok, scripts["max_pairs"], f" {P1}, {P2}"),
                 "repeat": tokens_through(tok, scripts["repeat"], f" {P1},\n {P1}"),
                 "closed": tokens_through(tok, scripts["closed"], f" {P1}]"),
                 "eos": len(scripts["eos"])}
    kept = dict(generated, repeat=tokens_through(tok, scripts["repeat"], f" {P1}"))
    return {name: (generated[name], kept[name]) for name in generated}


@pytest.mark.parametrize("sample", [False, True])
def test_rows_stop_where_their_pairs_are_done_alike_through_either_decoder(tiny, sample):
    """Rows of one batch stop at different steps, across the static decoder's stop checks; each keeps exactly the
    tokens it had without the criterion up to its stop, and the two decoders stop and pad alike."""
    model, tok = tiny
    eos, pad = tok.eos_token_id, tok.pad_token_id
    scripts = {reason: tok(text, add_special_tokens=False)["input_ids"] for reason, text in STOPPING_TEXTS.items()}
    scripts["eos"] = scripts["eos"] + [eos]
    scripts["free"] = tok(f" {P1}, ", add_special_tokens=False)["input_ids"]  # then the model's own tokens
    names = list(scripts)
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ["a b c", "x", "the quick brown fox", "y z",
                                                                       "one two"]]
    ids, mask = left_padded(prompts, pad)
    budget = max(len(s) for s in scripts.values()) + 6

    def processors():
        if not sample:
            return LogitsProcessorList()
        return LogitsProcessorList([GumbelNoise(torch.Generator(), counter_seed(7), ids.shape[1])])

    def run(decoder: str, stopping: PairStopping | None) -> torch.Tensor:
        with forced(model, [scripts[name] for name in names]):
            if decoder == "static":
                return StaticDecoder(model).decode(ids, mask, budget, [eos], pad, processors=processors(),
                                                   stopping=stopping, stop_check_every=8)
            criteria = StoppingCriteriaList([stopping]) if stopping else None
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=budget, do_sample=False,
                                  pad_token_id=pad, eos_token_id=[eos], temperature=None, top_p=None, top_k=None,
                                  logits_processor=processors(), stopping_criteria=criteria)[:, ids.shape[1]:]

    free = run("generate", None).tolist()
    expected = expected_stops(tok, scripts)
    stops = [generated for generated, _ in expected.values()]
    assert len(set(stops)) == len(stops) and any(n % 8 for n in stops), "rows must stop apart, between checks"
    outputs = {}
    for decoder in ("generate", "static"):
        stopping = PairStopping(tok, len(names), max_pairs=2, prefilled=True, stop_ids=[eos])
        outputs[decoder] = run(decoder, stopping)
        kept = stopping.cut(outputs[decoder].tolist())
        reasons = dict(zip(names, stopping.reasons))
        assert {name: reasons[name] for name in expected} == {name: name for name in expected}
        for row, name in enumerate(names):
            assert kept[row] == free[row][: len(kept[row])], f"{name}: the tokens it had without stopping"
            if name in expected:
                generated, keeps = expected[name]
                assert len(kept[row]) == keeps
                assert outputs[decoder][row, generated:].eq(pad).all(), f"{name}: padded after its stop"
        assert len(kept[names.index("free")]) > len(scripts["free"]), "the free row goes on past its script"
    # The static decoder notices that every row is done only at its next check: it may run on, padding.
    width = outputs["generate"].shape[1]
    assert torch.equal(outputs["static"][:, :width], outputs["generate"]) and outputs["static"][:, width:].eq(pad).all()
