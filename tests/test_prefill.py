"""A prefill shared by identical prompts gives the tokens of an unshared one, through either decoder, greedy or
sampled, and runs the layers below the fast weights once per distinct prompt; prompts that begin alike run their
common beginning once (through every layer under one slot, below the fast weights under any), with the same
tokens."""

import dataclasses
import os

import pytest
import torch

from tmem_rl.chat import left_padded
from tmem_rl.envs import make_env
from tmem_rl.episode import EpisodeConfig, EpisodeRunner
from tmem_rl.evaluation.methods import METHODS, MethodSettings
from tmem_rl.memory import FastWeightConfig, FastWeights
from tmem_rl.memory.layers import decoder_layers, layers_below_fast_weights
from tmem_rl.models import tiny_model
from tmem_rl.prefill import distinct_rows, prefill_prefixes, prefix_layout, shared_prefill


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_model(num_layers=4)  # fast weights on the top 2: the bottom 2 can be shared
    return model.eval(), tok


def batch_rows(model):
    """Rows each decoder layer's MLP computed, per call: the layer's own work, after any narrowing."""
    seen = {i: [] for i in range(len(decoder_layers(model)))}
    handles = [layer.mlp.register_forward_pre_hook(lambda m, args, i=i: seen[i].append(args[0].shape[0]))
               for i, layer in enumerate(decoder_layers(model))]
    return seen, handles


def live_fast_weights(model):
    """Four slots on the top 2 layers, every one live and different."""
    fast = FastWeights(model, 4, FastWeightConfig(num_layers=2))
    torch.manual_seed(0)
    for b in fast.B.values():
        b.normal_(0, 0.05)
    return fast


def generated_both_ways(model, tok, fast, prompts, slots, decoder, sample):
    """{shared_prefill: tokens} and {shared_prefill: rows each layer computed per call} of one batch."""
    tokens, calls = {}, {}
    for shared in (False, True):
        config = EpisodeConfig(decoder=decoder, do_sample=sample, temperature=1.0, top_p=1.0, top_k=0, seed=1,
                               shared_prefill=shared)
        seen, handles = batch_rows(model)
        try:
            tokens[shared] = EpisodeRunner(model, tok, fast, config).sampler.generate(prompts, slots, 10, sample, 1.0)
        finally:
            for handle in handles:
                handle.remove()
        calls[shared] = seen
    return tokens, calls


def test_distinct_rows_maps_each_row_to_the_first_of_its_kind():
    ids = torch.tensor([[0, 5, 6], [1, 2, 3], [0, 5, 6], [0, 5, 6], [4, 4, 4]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1], [1, 1, 1], [1, 1, 1]])  # row 3: same ids, other mask
    first, inverse = distinct_rows(ids, mask)
    assert first[inverse].tolist() == [0, 1, 0, 3, 4]


def test_prompts_that_all_differ_leave_the_forward_as_it_is(tiny):
    model, tok = tiny
    ids, mask = left_padded([tok(t, add_special_tokens=False)["input_ids"] for t in ("a b", "c d e")],
                            tok.pad_token_id)
    with shared_prefill(list(decoder_layers(model))[:2], ids, mask) as shared:
        assert not shared and all(not layer._forward_pre_hooks for layer in decoder_layers(model))


@pytest.mark.kernel_paths
def test_a_group_reads_the_same_episode_shared_or_not(tiny):
    model, tok = tiny
    env = make_env("facts", num_tasks=2, num_facts=2, num_distractors=2)
    batches = {}
    for shared in (False, True):
        fast = FastWeights(model, 4, FastWeightConfig(num_layers=2, epochs=1, lr=0.05))
        config = EpisodeConfig(l_max=40, max_extraction_tokens=12, max_answer_tokens=6, do_sample=True,
                               temperature=1.0, top_p=1.0, top_k=0, seed=3, shared_prefill=shared, grounding=False)
        batches[shared] = EpisodeRunner(model, tok, fast, config).run(env, [env.task(0)] * 4)
        fast.remove()
    for a, b in zip(batches[False].trajectories, batches[True].trajectories):
        assert [s.completion_ids for s in a.segments] == [s.completion_ids for s in b.segments]
        assert [s.kind for s in a.segments].count("extraction") >= 1


def words(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def questions_of_two_readings(tok):
    """Three questions after one reading (slot 0), two after another (slot 1), a short prompt of its own, and two
    of the first reading's questions again under slot 2 (a second rollout that read the same)."""
    first = words(tok, "the quick brown fox jumps over the lazy dog and runs into the forest " * 3)
    second = words(tok, "long ago in a galaxy far away there were many bright stars " * 3)
    prompts = [first + words(tok, " who jumps?"), first + words(tok, " where is it?"), second + words(tok, " when?"),
               first + words(tok, " what runs?"), second + words(tok, " how many stars?"), words(tok, "hello"),
               first + words(tok, " who jumps?"), first + words(tok, " where is it?")]
    return prompts, [0, 0, 1, 0, 1, -1, 2, 2], (first, second)


def test_prefix_layout_shares_what_rows_under_one_slot_begin_with(tiny):
    _, tok = tiny
    prompts, slots, (first, second) = questions_of_two_readings(tok)
    layout = prefix_layout(prompts, slots, tok.pad_token_id)
    width = layout.prefix_width
    for row, prompt in enumerate(prompts):
        mask = layout.attention_mask[row].bool()
        assert layout.input_ids[row][mask].tolist() == prompt  # every token, in order, nothing else
        assert layout.positions[row][mask].tolist() == list(range(len(prompt)))
        prefix = layout.input_ids[row, :width][mask[:width]].tolist()
        assert prefix == {0: first, 1: second, 2: first, -1: []}[slots[row]]
    # The same prompts under different slots share nothing through all layers; prompts that differ neither.
    assert prefix_layout(prompts, list(range(len(prompts))), tok.pad_token_id) is None
    assert prefix_layout([first, second, words(tok, "hello there")], [0, 0, 0], tok.pad_token_id) is None


def shared_beginnings(layout, prompts):
    """Each row's prefix part, after checking that the layout holds the row's prompt whole, positions in order."""
    width, prefixes = layout.prefix_width, []
    for row, prompt in enumerate(prompts):
        mask = layout.attention_mask[row].bool()
        assert layout.input_ids[row][mask].tolist() == prompt
        assert layout.positions[row][mask].tolist() == list(range(len(prompt)))
        prefixes.append(layout.input_ids[row, :width][mask[:width]].tolist())
    return prefixes


def test_prefix_layout_shares_a_beginning_across_slots_below_the_fast_weights(tiny):
    _, tok = tiny
    prompts, slots, _ = a_group_after_its_first_extraction(tok)
    assert prefix_layout(prompts, slots, tok.pad_token_id, lower=0.0) is None  # fast weights in every layer
    layout = prefix_layout(prompts, slots, tok.pad_token_id, lower=0.5)
    assert shared_beginnings(layout, prompts) == [os.path.commonprefix(prompts)] * len(prompts)
    # Seven rollouts on one prompt and one with pairs of its own: the beginning all eight share is still worth it,
    # though the seven alone would share more of theirs (and share it already, below the fast weights).
    same, own = prompts[2], prompts[0]
    layout = prefix_layout([same] * 7 + [own], list(range(8)), tok.pad_token_id, lower=26 / 30)
    assert shared_beginnings(layout, [same] * 7 + [own]) == [os.path.commonprefix([same, own])] * 8
    # Identical prompts under different slots: nothing to add to what the lower layers share already.
    assert prefix_layout([same] * 4, list(range(4)), tok.pad_token_id, lower=26 / 30) is None


def test_prefix_layout_drops_a_run_that_costs_more_than_it_saves():
    """Two short identical prompts under two slots would share their beginning below the fast weights, but as rows
    of the prefix pass each pays the long prefixes' width: the layout leaves them whole and shares the long ones."""
    reading = [3] * 30
    prompts = [reading + [9, 6], reading + [4, 4, 4, 6, 8], [1, 1, 1, 1, 4], [1, 1, 1, 1, 4],
               reading + [9, 7, 6, 8, 4, 5, 5, 6, 9, 9], reading + [4, 4, 4, 6, 8]]
    layout = prefix_layout(prompts, [0, 0, -1, 1, -1, 2], pad_id=0, lower=0.5)
    assert shared_beginnings(layout, prompts) == [reading, reading, [], [], reading, reading]


def test_the_prefixes_cache_keeps_one_row_per_prefix_below_the_fast_weights(tiny):
    model, tok = tiny
    fast = live_fast_weights(model)
    prompts, slots, _ = a_group_after_its_first_extraction(tok)
    layout = prefix_layout(prompts, slots, tok.pad_token_id, lower=0.5)
    prefixes = prefill_prefixes(model, fast, layout.input_ids, layout.attention_mask, layout.prefix_width,
                                torch.tensor(slots), layers_below_fast_weights(model, fast.config))
    assert [layer.keys.shape[0] for layer in prefixes.cache.layers] == [1, 1, 4, 4]
    cache = prefixes.fanned_out()
    assert [layer.keys.shape[0] for layer in cache.layers] == [4, 4, 4, 4]
    torch.testing.assert_close(cache.layers[0].keys[0], cache.layers[0].keys[3])  # below: the same for every slot
    assert not torch.allclose(cache.layers[3].keys[0], cache.layers[3].keys[3])  # above: each its own
    fast.remove()


def test_prefix_layout_leaves_out_a_run_that_would_widen_every_tail(tiny):
    """Two long prompts that share only their first words would make every row's tail as long as theirs; the
    questions of a reading are shared without them."""
    _, tok = tiny
    head = words(tok, "read this:")
    one, two = (head + words(tok, f" {text} " * 12) for text in ("apples and pears", "boats on rivers"))
    reading = words(tok, "long ago in a galaxy far away there were many bright stars " * 3)
    prompts = [one, two] + [reading + words(tok, f" question {i}?") for i in range(4)]
    layout = prefix_layout(prompts, [-1] * len(prompts), tok.pad_token_id, lower=1.0)
    width = layout.prefix_width
    assert layout.input_ids.shape[1] - width <= len(words(tok, " question 0?"))
    common = os.path.commonprefix(prompts[2:])  # the reading and the questions' first word
    assert len(common) > len(reading)
    for row in range(2, 6):
        assert layout.input_ids[row, :width][layout.attention_mask[row, :width].bool()].tolist() == common


def a_group_on_one_prompt(tok):
    """A group of four on one prompt (one row under the base model), and a prompt of its own: the layers below the
    fast weights (0 and 1) run once per prompt in the prefill, the others on every row; decode steps on every row."""
    long, short = (words(tok, t) for t in ("the quick brown fox jumps", "hello"))
    return [long, long, short, long, long], [0, 1, 2, 3, -1], {0: [2, 5], 1: [2, 5], 2: [5, 5], 3: [5, 5]}


def questions_after_readings(tok):
    """One prefix row per (reading, slot), one per reading below the fast weights; then every row's tail, below
    the fast weights once per distinct prompt."""
    prompts, slots, _ = questions_of_two_readings(tok)
    return prompts, slots, {0: [2, 6], 1: [2, 6], 2: [3, 8], 3: [3, 8]}


def a_group_after_its_first_extraction(tok):
    """Four rollouts, each under its slot, with the same instructions and window and their own earlier pairs: the
    layers below the fast weights run the common beginning once, the others once per slot; the tails on every row."""
    head = words(tok, "the quick brown fox jumps over the lazy dog and runs into the forest " * 3)
    prompts = [head + words(tok, f" pairs already written: {text}") for text in ("fox", "dog and forest", "", "run")]
    return prompts, [0, 1, 2, 3], {0: [1, 4], 1: [1, 4], 2: [4, 4], 3: [4, 4]}


@pytest.mark.kernel_paths
@pytest.mark.parametrize("batch", [a_group_on_one_prompt, questions_after_readings, a_group_after_its_first_extraction])
@pytest.mark.parametrize("decoder", ["generate", "static"])
@pytest.mark.parametrize("sample", [False, True])
def test_a_shared_prefill_gives_the_same_tokens_and_runs_each_layer_on_the_rows_it_must(tiny, batch, decoder, sample):
    model, tok = tiny
    fast = live_fast_weights(model)
    prompts, slots, shared_calls = batch(tok)
    tokens, calls = generated_both_ways(model, tok, fast, prompts, slots, decoder, sample)
    assert {i: rows[:2] for i, rows in calls[True].items()} == shared_calls
    assert all(rows[0] == len(prompts) for rows in calls[False].values())  # unshared: every row whole
    assert all(rows == len(prompts) for rows in calls[True][3][2:])  # decode steps: every row
    assert tokens[True] == tokens[False]
    assert len({tuple(t) for t in tokens[True]}) == len(prompts), "each row's fast weights (or noise) must show"
    fast.remove()


def test_a_sliding_window_model_prefills_prompts_whole():
    """Its window counts cache columns, so padding between a prefix and its tail would change what a row sees: the
    questions of one reading are prefilled left-padded, as without sharing, with the same tokens."""
    model, tok = tiny_model(num_layers=2, sliding_window=8)
    prompts, _, _ = questions_of_two_readings(tok)
    tokens, widths = {}, {}
    for shared in (False, True):
        runner = EpisodeRunner(model, tok, None, EpisodeConfig(memory="full", decoder="generate",
                                                               shared_prefill=shared))
        seen = []
        hook = model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"].shape),
                                               with_kwargs=True)
        try:
            tokens[shared] = runner.sampler.generate(prompts, [-1] * len(prompts), 6, False, 1.0)
        finally:
            hook.remove()
        widths[shared] = seen[0]
    assert widths[True] == widths[False] == (len(prompts), max(len(p) for p in prompts))
    assert tokens[True] == tokens[False]


@pytest.mark.kernel_paths
def test_full_context_answers_the_questions_of_a_reading_the_same_with_the_prefix_shared(tiny):
    model, tok = tiny
    env = make_env("facts", num_tasks=2, num_facts=3, num_distractors=3)
    readings = [env.task(0), env.task(1)]
    questions = [[reading, dataclasses.replace(reading, question="Which fact came first?"),
                  dataclasses.replace(reading, question="What else was said?")] for reading in readings]
    answers = {}
    for shared in (False, True):
        runner = EpisodeRunner(model, tok, None, EpisodeConfig(memory="full", max_answer_tokens=8,
                                                                    shared_prefill=shared))
        seen, handles = batch_rows(model)
        try:
            method = METHODS["full-context"](runner, env, MethodSettings(answer_batch_size=6))
            answers[shared] = [[a.prediction for a in per_reading] for per_reading in method.run(readings, questions)]
        finally:
            for handle in handles:
                handle.remove()
        assert seen[0][0] == (2 if shared else 6)  # the prefill's rows: one per reading's context, or every row
    assert answers[True] == answers[False]
