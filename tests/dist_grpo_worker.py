"""One GRPO process on fixed rollouts; run under torchrun by tests/test_distributed.py.

Each process takes its contiguous share of the saved groups, takes `--steps` GRPO steps on them, and writes its
final parameters to OUT/rank<r>.pt and the learning rate of each step to OUT/lrs<r>.json.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).parent))

from tmem_rl.envs import make_env  # noqa: E402
from tmem_rl.memory import FastWeightConfig, FastWeights, svd_init  # noqa: E402
from tmem_rl.models import FIXTURE_TOKENIZER, tiny_model  # noqa: E402
from tmem_rl.episode import EpisodeBatch, EpisodeConfig  # noqa: E402
from tmem_rl.trainers.grpo import GRPOConfig, GRPOTrainer  # noqa: E402
from tmem_rl.trainers.ppo import PPOConfig, PPOTrainer  # noqa: E402

ALGORITHMS = {"grpo": (GRPOConfig, GRPOTrainer), "ppo": (PPOConfig, PPOTrainer)}

GROUP = 2


def deepspeed_accelerator(config: str) -> Accelerator:
    """Accelerate supports DeepSpeed on GPUs only: on CPU it starts the gloo process group but records a single
    process. Correct the shared process counts so the CPU test exercises the multi-process DeepSpeed path."""
    import os

    import torch.distributed as dist
    from accelerate.state import PartialState
    from accelerate.utils import DeepSpeedPlugin

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    acc = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config))
    state = PartialState()
    state.num_processes, state.process_index = dist.get_world_size(), dist.get_rank()
    state.local_process_index = int(os.environ.get("LOCAL_RANK", 0))
    return acc


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--loss-type", default="dapo")
    parser.add_argument("--optim", default="sgd")
    parser.add_argument("--deepspeed", default=None, help="DeepSpeed config file (ZeRO-2 / ZeRO-3)")
    parser.add_argument("--algorithm", default="grpo", choices=sorted(ALGORITHMS))
    parser.add_argument("--lr-scheduler", default="linear")
    parser.add_argument("--warmup-steps", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    acc = deepspeed_accelerator(args.deepspeed) if args.deepspeed else Accelerator(cpu=True)
    batch = EpisodeBatch.load(args.batch)
    groups = len(batch.trajectories) // GROUP
    model, tok = tiny_model(num_layers=2, tokenizer_path=FIXTURE_TOKENIZER)
    config_cls, trainer_cls = ALGORITHMS[args.algorithm]
    cfg = config_cls(output_dir=str(Path(args.out) / "run"), num_generations=GROUP, questions_per_step=groups,
                     learning_rate=0.05, optim=args.optim, report_to=[], save_steps=0, micro_batch_size=3, loss_type=args.loss_type,
                     max_completion_length=16, seed=3, lr_scheduler_type=args.lr_scheduler,
                     warmup_steps=args.warmup_steps, max_steps=args.steps + 1)
    env = make_env("facts", num_tasks=4)
    trainer = trainer_cls(cfg, model, tok, env, FastWeightConfig(num_layers=2), EpisodeConfig(), accelerator=acc)
    per_rank = groups // acc.num_processes
    mine = batch.trajectories[acc.process_index * per_rank * GROUP : (acc.process_index + 1) * per_rank * GROUP]
    lrs = []
    for _ in range(args.steps):
        lrs.append(trainer.train_step(EpisodeBatch(mine, batch.snapshots))["learning_rate"])
        trainer.step += 1
    (Path(args.out) / f"lrs{acc.process_index}.json").write_text(json.dumps(lrs))
    if args.deepspeed:
        import deepspeed

        state = acc.get_state_dict(trainer.model)  # whole tensors, on the main process
        # Fast weights built on the (under ZeRO-3 partitioned) model must take the SVD of the whole weights.
        late = FastWeights(acc.unwrap_model(trainer.model), 1, FastWeightConfig(num_layers=2))
        whole = {}
        for name, module in late.modules.items():
            with deepspeed.zero.GatheredParameters([module.weight]):
                whole[name] = svd_init(module.weight.detach().float(), late.config.rank)
        same_a = all(torch.allclose(late.A[name], whole[name], atol=1e-4, rtol=1e-4) for name in late.A)
        local_shapes = [list(m.weight.shape) for m in late.modules.values()]
        late.remove()
        trainer.save_checkpoint()
        trainer.step = 0
        trainer.load_checkpoint()
        (Path(args.out) / f"rank{acc.process_index}.json").write_text(json.dumps(
            {"same_a": same_a, "step_after_reload": trainer.step, "local_weight_shapes": local_shapes}))
    else:
        state = acc.unwrap_model(trainer.model).state_dict()
        trainer.save_checkpoint()  # for the export test: a DDP checkpoint
    if state is not None:
        torch.save({k: v.detach().clone() for k, v in state.items()}, Path(args.out) / f"rank{acc.process_index}.pt")
    acc.wait_for_everyone()


if __name__ == "__main__":
    main()
