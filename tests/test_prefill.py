"""A prefill shared by identical prompts gives the tokens of an unshared one, through either decoder, greedy or
sampled, and runs the layers below the fast weights once per distinct prompt."""

import pytest
import torch

from tmem_rl.chat import left_padded
from tmem_rl.envs import make_env
from tmem_rl.episode import EpisodeConfig, EpisodeRunner
from tmem_rl.memory import FastWeightConfig, FastWeights
from tmem_rl.memory.layers import decoder_layers
from tmem_rl.models import tiny_model
from tmem_rl.prefill import distinct_rows, shared_prefill


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


def test_distinct_rows_maps_each_row_to_the_first_of_its_kind():
    ids = torch.tensor([[0, 5, 6], [1, 2, 3], [0, 5, 6], [0, 5, 6], [4, 4, 4]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1], [1, 1, 1], [1, 1, 1]])  # row 3: same ids, other mask
    first, inverse = distinct_rows(ids, mask)
    assert first[inverse].tolist() == [0, 1, 0, 3, 4]


@pytest.mark.kernel_paths
@pytest.mark.parametrize("decoder", ["generate", "static"])
@pytest.mark.parametrize("sample", [False, True])
def test_shared_prefill_gives_the_same_tokens_and_runs_the_lower_layers_once_per_prompt(tiny, decoder, sample):
    model, tok = tiny
    fast = FastWeights(model, 4, FastWeightConfig(num_layers=2))
    torch.manual_seed(0)
    for b in fast.B.values():
        b.normal_(0, 0.05)  # every slot live and different
    long, short = (tok(t, add_special_tokens=False)["input_ids"] for t in ("the quick brown fox jumps", "hello"))
    # A group of four on one prompt (one row under the base model), and a prompt of its own.
    prompts, slots = [long, long, short, long, long], [0, 1, 2, 3, -1]
    tokens = {}
    for shared in (False, True):
        config = EpisodeConfig(decoder=decoder, do_sample=sample, temperature=1.0, top_p=1.0, top_k=0, seed=1,
                               shared_prefill=shared)
        runner = EpisodeRunner(model, tok, fast, config)
        seen, handles = batch_rows(model)
        try:
            tokens[shared] = runner.sampler.generate(prompts, slots, 10, sample, 1.0)
        finally:
            for handle in handles:
                handle.remove()
        prefill = {i: calls[0] for i, calls in seen.items()}
        assert prefill == ({0: 2, 1: 2, 2: 5, 3: 5} if shared else {i: 5 for i in range(4)})
        assert all(rows == 5 for calls in seen.values() for rows in calls[1:])  # decode steps: every row
    assert tokens[True] == tokens[False]
    assert len({tuple(t) for t in tokens[True]}) == 5, "each row's fast weights (or noise) must show"
    fast.remove()


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
