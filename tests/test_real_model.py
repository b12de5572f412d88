"""End to end on the real default model (slow: loads SmolLM2-135M, converting it on first use)."""

import pytest

from tmem_rl.envs import make_env
from tmem_rl.records import QAPair
from tmem_rl.extraction import answer_messages
from tmem_rl.memory import FastWeightConfig, FastWeights
from tmem_rl.models import load_policy
from tmem_rl.episode import EpisodeConfig, EpisodeRunner

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    return load_policy()


def test_paper_inner_update_lowers_loss_on_the_real_model(smol):
    model, tok = smol
    fast = FastWeights(model, 2, FastWeightConfig())  # paper settings
    pairs = {1: [QAPair("What is the name of Maya's dog?", "Biscuit"), QAPair("Where does Omar live?", "Tromso")]}
    stats = fast.absorb(tok, pairs, prompt_fn=lambda q: answer_messages(f"Question: {q}"))[1]
    fast.remove()
    assert stats.loss_after < 0.85 * stats.loss_before
    assert stats.epoch_losses == sorted(stats.epoch_losses, reverse=True)


def test_real_episode_extracts_absorbs_and_answers(smol):
    model, tok = smol
    env = make_env("facts", num_tasks=2, num_facts=3, num_distractors=6, lines_per_chunk=3)
    fast = FastWeights(model, 2, FastWeightConfig(lr=1e-3, epochs=5))
    runner = EpisodeRunner(model, tok, fast, EpisodeConfig(l_max=60, max_extraction_tokens=96, max_answer_tokens=12))
    batch = runner.run(env, env.tasks())
    fast.remove()
    for traj in batch.trajectories:
        assert traj.extractions, "streams are longer than L_max, so the agent must have extracted"
        assert traj.segments[-1].kind == "answer" and traj.prediction
        assert 0.0 <= traj.reward <= 1.0
    attempts = [a for t in batch.trajectories for e in t.extractions for a in e.supervision.attempts]
    assert any(a.pairs for a in attempts), "with the example turn the model writes at least one parseable list"
