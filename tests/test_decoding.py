"""The static-cache decoding path gives the tokens `model.generate` gives, row by row, fast-weight slot by slot."""

import pytest
import torch

from tmem_rl.chat import left_padded
from tmem_rl.decoding import static_decode
from tmem_rl.envs import make_env
from tmem_rl.memory import FastWeightConfig, FastWeights
from tmem_rl.models import tiny_model
from tmem_rl.records import QAPair
from tmem_rl.rollout import EpisodeConfig, EpisodeRunner


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_model(num_layers=2)
    return model.eval(), tok


def test_greedy_static_decoding_equals_generate_on_padded_rows_and_mixed_slots(tiny):
    model, tok = tiny
    fast = FastWeights(model, 2, FastWeightConfig(num_layers=2, lr=0.5, epochs=3))
    fast.absorb(tok, {0: [QAPair("Who is it?", "Gina")], 1: [QAPair("Where?", "Porto")]})
    texts = ["hello there how are", "a", "the quick brown fox jumps over", "a"]
    ids, mask = left_padded([tok(t, add_special_tokens=False)["input_ids"] for t in texts], tok.pad_token_id)
    slots = [0, -1, 1, 1]  # the base model in one row; the same prompt under two slots
    with fast.use(slots):
        free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                              pad_token_id=tok.pad_token_id, eos_token_id=[tok.eos_token_id],
                              temperature=None, top_p=None, top_k=None)[:, ids.shape[1]:]
    # Stop on tokens that rows actually produce, so that rows end at different steps and are padded after.
    stops = [tok.eos_token_id, free[1, 6].item(), free[2, 2].item()]
    with fast.use(slots):
        reference = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                                   pad_token_id=tok.pad_token_id, eos_token_id=stops,
                                   temperature=None, top_p=None, top_k=None)[:, ids.shape[1]:]
        ours = static_decode(model, ids, mask, 20, stops, tok.pad_token_id)
    assert reference[1, 7:].eq(tok.pad_token_id).all() and reference[2, 3:].eq(tok.pad_token_id).all()
    assert torch.equal(ours[:, : reference.shape[1]], reference)
    assert not torch.equal(ours[1], ours[3]), "rows under different slots must differ"
    fast.remove()


def test_an_episode_samples_the_same_tokens_through_either_decoder(tiny):
    model, tok = tiny
    env = make_env("facts", num_tasks=4, num_facts=2, num_distractors=2)
    episodes = {}
    for decoder in ("generate", "static"):
        fast = FastWeights(model, 4, FastWeightConfig(num_layers=2, epochs=1))
        config = EpisodeConfig(l_max=40, max_extraction_tokens=12, max_answer_tokens=6, do_sample=True,
                               temperature=0.9, top_k=50, seed=3, decoder=decoder)
        episodes[decoder] = EpisodeRunner(model, tok, fast, config).run(env, [env.task(0)] * 4)
        fast.remove()
    for a, b in zip(episodes["generate"].trajectories, episodes["static"].trajectories):
        assert [s.completion_ids for s in a.segments] == [s.completion_ids for s in b.segments]
        assert len(a.segments) >= 2
    rollouts = {tuple(s.completion_ids[0] for s in t.segments) for t in episodes["static"].trajectories}
    assert len(rollouts) > 1, "sampling must differ between rollouts"
    with pytest.raises(ValueError, match="decoder='graph'"):
        EpisodeConfig(decoder="graph")
