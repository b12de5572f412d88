"""A seeded GRPO run on a tiny model that can kill itself with SIGKILL in the middle of a step; run by
tests/test_faults.py, alone or under torchrun (then each process takes its share of --questions-per-step)."""

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
from tmem_rl.episode import EpisodeConfig  # noqa: E402
from tmem_rl.trainers.grpo import GRPOConfig, GRPOTrainer  # noqa: E402


def build(out: str, max_steps: int, save_steps: int, kill_at: int | None, use_peft: bool = False,
          questions_per_step: int = 1) -> GRPOTrainer:
    model, tok = tiny_model(num_layers=2, tokenizer_path=FIXTURE_TOKENIZER)
    env = make_env("facts", num_tasks=4, num_distractors=6, num_facts=3, lines_per_chunk=3)
    cfg = GRPOConfig(output_dir=out, num_generations=2, questions_per_step=questions_per_step, learning_rate=3e-3,
                     max_steps=max_steps, report_to=[], save_steps=save_steps, micro_batch_size=4,
                     max_completion_length=8, seed=1, reward_weights={"outcome": 1.0, "fault": 1.0},
                     use_peft=use_peft, lora_r=4, lora_target_modules=["q_proj", "v_proj"])
    trainer = None

    def fault(prompts, completions, **_):
        # Called after the step's rollouts and before its optimizer update: the middle of the step.
        if kill_at is not None and trainer.step + 1 == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        # The tiny model never answers right: a reward that differs within a group makes the weights move.
        return [len(c) % 3 / 2 for c in completions]

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
    parser.add_argument("--peft", action="store_true", help="train a LoRA instead of all the weights")
    parser.add_argument("--questions-per-step", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    trainer = build(args.out, args.max_steps, args.save_steps, args.kill_at_step, args.peft, args.questions_per_step)
    trainer.train(resume=args.resume)
    if trainer.accelerator.is_main_process:
        torch.save(trainer.policy.state_dict(), Path(args.out) / "final.pt")


if __name__ == "__main__":
    main()
