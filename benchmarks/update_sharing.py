"""The GRPO update with and without shared prompts (`GRPOConfig.shared_prompts`), on one step of a recipe's rollouts.

The rollouts of a group share the first extraction's prompt token for token, and each answer's text (under each
rollout's own fast weights). With shared prompts the update scores each prompt once per micro-batch and fast
weights, and the layers below the fast weights once per prompt text; without, every segment runs whole. One batch
of rollouts is generated (its rewards then spread over each group, so the gradient is not zero), and the same
update runs from the same weights both ways: timed, and counted (GFLOP, free of a shared CPU's noise), with the
largest difference of the two runs' gradients (float rounding only).

    python benchmarks/update_sharing.py --recipe recipes/facts_multi_grpo_cpu.yaml \\
        --model runs/lc_facts_multi/warm_start/model
    python benchmarks/update_sharing.py --quick      # a 4-layer random model on the recipe's environment: seconds

Prints one JSON object: update_s and unshared_update_s, update_speedup, update_gflop and unshared_update_gflop,
work_ratio, max_grad_difference (relative to the largest gradient), and the batch's segments and prompts.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import tempfile
from pathlib import Path

import torch
from accelerate import Accelerator

from tmem_rl.cpu import configure_cpu_threads
from tmem_rl.models import FIXTURE_TOKENIZER, load_policy, tiny_model
from tmem_rl.recipes import ALGORITHMS, load_recipe

from _quick import parse_args  # noqa: E402  (benchmarks/ is on the path when a script here runs)
from inner_update import gflop  # noqa: E402

QUICK = {"layers": 4}
RECIPE = Path(__file__).resolve().parents[1] / "recipes/facts_multi_grpo_cpu.yaml"


def update(trainer, batch, weights, shared: bool, count: bool) -> dict:
    """One train_step on `batch` from `weights`: its seconds, GFLOP when counted, and the gradient it stepped on."""
    trainer.policy.load_state_dict(weights)
    trainer.optimizer.load_state_dict(trainer.initial_state["optimizer"])
    trainer.scheduler.load_state_dict(trainer.initial_state["scheduler"])
    trainer.config.shared_prompts = shared
    trainer.shared_layers, trainer.reference_shared_layers = trainer.all_shared_layers if shared else (None, None)
    grads = {}
    step = trainer.optimizer.step

    def recorded(*args, **kwargs):
        if not grads:  # the first optimizer step's: later ones start from weights the two runs moved differently
            grads.update({n: p.grad.clone() for n, p in trainer.policy.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)

    trainer.optimizer.step = recorded
    metrics = {}
    run = lambda: metrics.update(trainer.train_step(copy.deepcopy(batch)))  # noqa: E731
    try:
        work = gflop(run) if count else run()
    finally:
        trainer.optimizer.step = step
    return {"seconds": metrics["update_seconds"], "grads": grads, "gflop": work}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(RECIPE))
    parser.add_argument("--model", default=None, help="default: the recipe's model")
    parser.add_argument("--layers", type=int, default=None, help="a random model of this many layers instead")
    args = parse_args(parser, QUICK, argv)
    configure_cpu_threads()
    recipe = load_recipe(args.recipe)
    if args.layers:
        model, tokenizer = tiny_model(num_layers=args.layers, tokenizer_path=FIXTURE_TOKENIZER)
        fast_config = dataclasses.replace(recipe.inner_loop, num_layers=min(recipe.inner_loop.num_layers,
                                                                            args.layers - 1))
    else:
        model, tokenizer = load_policy(args.model or recipe.model.name, dtype=recipe.model.torch_dtype)
        fast_config = recipe.inner_loop
    with tempfile.TemporaryDirectory() as out:
        config = dataclasses.replace(recipe.outer_loop, output_dir=out, max_steps=1, save_steps=0, report_to=[],
                                     shared_prompts=True)
        trainer = ALGORITHMS[recipe.algorithm][1](config, model, tokenizer, recipe.env.make("train"), fast_config,
                                                  recipe.episode, accelerator=Accelerator(cpu=True))
        trainer.all_shared_layers = trainer.shared_layers, trainer.reference_shared_layers
        trainer.initial_state = copy.deepcopy({"optimizer": trainer.optimizer.state_dict(),
                                               "scheduler": trainer.scheduler.state_dict()})
        weights = copy.deepcopy(trainer.policy.state_dict())
        batch = trainer.generate_rollouts(0)
        # Rewards spread within each group, so that the gradient compared is not zero (the work does not depend on
        # them).
        for i, trajectory in enumerate(batch.trajectories):
            trajectory.reward = (i % config.num_generations) / config.num_generations
        segments = [s for t in batch.trajectories for s in t.segments if s.completion_ids]
        # Shared first: the first update also warms up allocators and kernels, which counts against it.
        runs = {(shared, count): update(trainer, batch, weights, shared, count)
                for count in (False, True) for shared in (True, False)}
    unshared, shared = runs[(False, False)], runs[(True, False)]
    scale = max(g.abs().max().item() for g in unshared["grads"].values())
    difference = max((shared["grads"][n] - g).abs().max().item() for n, g in unshared["grads"].items())
    result = {
        "recipe": args.recipe, "model": "random" if args.layers else (args.model or recipe.model.name),
        "segments": len(segments), "distinct_prompts": len({tuple(s.prompt_ids) for s in segments}),
        "micro_batch_size": config.micro_batch_size, "threads": torch.get_num_threads(), "quick": args.quick,
        "update_s": shared["seconds"], "unshared_update_s": unshared["seconds"],
        "update_speedup": unshared["seconds"] / shared["seconds"],
        "update_gflop": runs[(True, True)]["gflop"], "unshared_update_gflop": runs[(False, True)]["gflop"],
        "work_ratio": runs[(False, True)]["gflop"] / runs[(True, True)]["gflop"],
        "max_grad_difference": difference / scale,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
