"""One GRPO process on fixed rollouts; run under torchrun by tests/test_distributed.py.

Each process takes its contiguous share of the saved groups, takes `--steps` GRPO steps on them, and writes its
final parameters to OUT/rank<r>.pt.
"""

import argparse
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).parent))

from tmem_rl.envs import make_env  # noqa: E402
from tmem_rl.memory import FastWeightConfig  # noqa: E402
from tmem_rl.models import tiny_model  # noqa: E402
from tmem_rl.rollout import EpisodeBatch, EpisodeConfig  # noqa: E402
from tmem_rl.trainers.grpo import GRPOConfig, GRPOTrainer  # noqa: E402

GROUP = 2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--loss-type", default="dapo")
    parser.add_argument("--optim", default="sgd")
    args = parser.parse_args()
    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    batch = EpisodeBatch.load(args.batch)
    groups = len(batch.trajectories) // GROUP
    model, tok = tiny_model(num_layers=2, tokenizer_path=Path(__file__).parent / "fixtures" / "tokenizer")
    cfg = GRPOConfig(output_dir=str(Path(args.out) / "run"), num_generations=GROUP, questions_per_step=groups,
                     learning_rate=0.05, optim=args.optim, report_to=[], save_steps=0, micro_batch_size=3, loss_type=args.loss_type,
                     max_completion_length=16, seed=3)
    env = make_env("facts", num_tasks=4)
    trainer = GRPOTrainer(cfg, model, tok, env, FastWeightConfig(num_layers=2), EpisodeConfig(), accelerator=acc)
    per_rank = groups // acc.num_processes
    mine = batch.trajectories[acc.process_index * per_rank * GROUP : (acc.process_index + 1) * per_rank * GROUP]
    for _ in range(args.steps):
        trainer.train_step(EpisodeBatch(mine, batch.snapshots))
        trainer.step += 1
    state = {k: v.detach().clone() for k, v in acc.unwrap_model(trainer.model).state_dict().items()}
    torch.save(state, Path(args.out) / f"rank{acc.process_index}.pt")
    acc.wait_for_everyone()


if __name__ == "__main__":
    main()
