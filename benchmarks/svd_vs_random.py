"""SVD vs random (Kaiming) init of A: inner-update steps each needs to reach the same loss.

On the default pretrained model and QA pairs written about real `facts` streams (each rollout absorbs the gold
pair of its episode plus three pairs about other episodes), both inits start from the same loss (B = 0). Each
epoch is one SGD step (batch 16 >= pairs); the step count is the first step whose loss is at or below
`--target` x the starting loss. Prints JSON with svd_steps and random_steps (null: not reached within
--max-steps, with the loss reached reported beside it).

    python benchmarks/svd_vs_random.py                    # paper settings: lr 5e-4, rank 6, last 4 FFN
    python benchmarks/svd_vs_random.py --lr 1e-3 --target 0.25
    python benchmarks/svd_vs_random.py --quick            # 2 rollouts, 10 steps
"""

from __future__ import annotations

import argparse
import json

from tmem_rl.envs import make_env
from tmem_rl.records import QAPair
from tmem_rl.extraction import answer_messages
from tmem_rl.memory import FastWeightConfig, FastWeights
from tmem_rl.models import DEFAULT_MODEL, load_policy

from _quick import parse_args  # noqa: E402  (benchmarks/ is on the path when a script here runs)

QUICK = {"rollouts": 2, "max_steps": 10}


def facts_pairs(rollouts: int, seed: int) -> dict[int, list[QAPair]]:
    env = make_env("facts", num_tasks=2 * rollouts, seed=seed)
    tasks = env.tasks()
    pair = [QAPair(t.question, t.answers[0]) for t in tasks]
    return {g: [pair[g]] + pair[rollouts + g : rollouts + g + 3] for g in range(rollouts)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--rollouts", type=int, default=8)
    parser.add_argument("--lr", type=float, default=FastWeightConfig.lr)
    parser.add_argument("--target", type=float, default=0.5, help="fraction of the starting loss to reach")
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=1)
    args = parse_args(parser, QUICK, argv)

    model, tokenizer = load_policy(args.model)
    pairs = facts_pairs(args.rollouts, args.seed)
    results = {"model": args.model, "lr": args.lr, "rollouts": args.rollouts, "target_fraction": args.target,
               "quick": args.quick}
    curves = {}
    for init in ("svd", "random"):
        fast = FastWeights(model, args.rollouts, FastWeightConfig(init=init, lr=args.lr, epochs=args.max_steps))
        stats = fast.absorb(tokenizer, pairs, prompt_fn=lambda q: answer_messages(f"Question: {q}"))
        stats = {slot: s for slot, s in stats.items() if s["num_pairs"]}  # slots left with no trainable pair
        fast.remove()
        # Mean over rollouts of the loss before each step (one step per epoch here).
        curve = [sum(s["epoch_losses"][k] for s in stats.values()) / len(stats) for k in range(args.max_steps)]
        curve.append(sum(s["loss_after"] for s in stats.values()) / len(stats))
        curves[init] = curve
    start = curves["svd"][0]
    target = args.target * start
    results["start_loss"] = start
    results["target_loss"] = target
    for init, curve in curves.items():
        reached = next((k for k, loss in enumerate(curve) if loss <= target), None)
        results[f"{init}_steps"] = reached
        results[f"{init}_final_loss"] = curve[-1]
        results[f"{init}_loss_at"] = {str(k): round(curve[k], 4) for k in (0, 5, 10, 20, 40) if k < len(curve)}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
