"""A seeded GRPO run on a tiny model that can kill itself with SIGKILL in the middle of a step; run by
tests/test_faults.py."""

import argparse
import os
import signal
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).parent))

from tmem_rl.envs import make_env  # noqa: E402
from tmem_rl.memory import FastWeightConfig  # noqa: E402
from tmem_rl.models import FIXTURE_TOKENIZER, tiny_model  # noqa: E402
from tmem_rl.rollout import EpisodeConfig  # noqa: E402
from tmem_rl.trainers.grpo import GRPOConfig, GRPOTrainer  # noqa: E402


def build(out: str, max_steps: int, save_steps: int, kill_at: int | None) -> GRPOTrainer:
    torch.set_num_threads(1)
    model, tok = tiny_model(num_layers=2, tokenizer_path=FIXTURE_TOKENIZER)
    env = make_env("facts", num_tasks=4, num_distractors=6, num_facts=3, lines_per_chunk=3)
    cfg = GRPOConfig(output_dir=out, num_generations=2, questions_per_step=1, learning_rate=3e-3, max_steps=max_steps,
                     report_to=[], save_steps=save_steps, micro_batch_size=4, max_completion_length=8, seed=1,
                     reward_weights={"outcome": 1.0, "fault": 0.0})
    trainer = None

    def fault(prompts, **_):
        # Called after the step's rollouts and before its optimizer update: the middle of the step.
        if kill_at is not None and trainer.step + 1 == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return [0.0] * len(prompts)

    trainer = GRPOTrainer(cfg, model, tok, env, FastWeightConfig(lr=0.05, epochs=1, num_layers=2),
                          EpisodeConfig(l_max=60, max_extraction_tokens=8, max_answer_tokens=6),
                          reward_funcs={"fault": fault}, accelerator=Accelerator(cpu=True))
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-steps", type=int, default=5)
    parser.add_argument("--save-steps", type=int, default=2)
    parser.add_argument("--kill-at-step", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    trainer = build(args.out, args.max_steps, args.save_steps, args.kill_at_step)
    trainer.train(resume=args.resume)
    torch.save(trainer.policy.state_dict(), Path(args.out) / "final.pt")


if __name__ == "__main__":
    main()
