"""The inner loop's ablations: supervision format, working-context budget L_max, and the init of A.

(a) supervision: what the fast weights learn at each extraction point, at the same inner-loop settings and
    budget (EpisodeConfig.supervision): the QA pairs the policy writes ("qa_pairs", TMEM), the raw working context
    ("transcript"), or notes the model writes of it ("summary").
(b) l_max: TMEM at several working-context budgets (the paper finds an inverted U).
(c) init: SVD vs random (Kaiming) A on real QA pairs: inner-update steps each needs to reach the same loss.

(a) and (b) run `tmem-rl eval` (the `tmem` method, greedy, plus `none` as the floor) on `facts` and on a LoCoMo
conversation (the `conversation` episode unit: one reading per configuration, then a fixed subset of its
questions). Every run's records stay in --out; the JSON so far is rewritten to <out>/ablations.json after each
run, and the last line of stdout is the whole JSON.

    python benchmarks/ablations.py --locomo-data locomo10_conv-26.json     # everything
    python benchmarks/ablations.py --only init supervision --envs facts
    python benchmarks/ablations.py --quick                                  # tiny model, small sizes
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from tmem_rl.envs import make_env
from tmem_rl.evaluation.harness import EvalConfig, run_eval
from tmem_rl.evaluation.methods import MethodSettings
from tmem_rl.extraction import answer_messages
from tmem_rl.memory import FastWeightConfig, FastWeights
from tmem_rl.models import DEFAULT_MODEL, load_policy
from tmem_rl.records import QAPair
from tmem_rl.episode import SUPERVISIONS, EpisodeConfig

from _quick import parse_args  # noqa: E402  (benchmarks/ is on the path when a script here runs)

ABLATIONS = ("supervision", "l_max", "init")
ENVS = ("facts", "locomo")
SHARED_LOCOMO = Path(__file__).resolve().parents[2] / "shared" / "data" / "locomo" / "locomo10_conv-26.json"
# The demo's streams: ~500 tokens with 5 facts among 19 distractor lines (docs/demo.md).
FACTS_KWARGS = {"num_facts": 5, "num_distractors": 19, "lines_per_chunk": 3}
QUICK = {"model": "tiny", "facts_tasks": 2, "per_category": 1, "facts_l_max": [64, 128], "locomo_l_max": [256, 512],
         "locomo_at": 512,
         "rollouts": 2, "max_steps": 6, "envs": ["facts"], "max_extraction_tokens": 16, "summary_tokens": 16,
         "inner_epochs": 2}


# ---- (a), (b): evaluation runs ----------------------------------------------------------------------------------


def env_settings(env: str, args) -> dict:
    """EvalConfig fields of one environment's runs."""
    if env == "facts":
        return dict(env="facts", env_kwargs={**FACTS_KWARGS, "num_tasks": args.facts_tasks}, l_max=args.facts_at)
    return dict(env="locomo", data=str(args.locomo_data), per_category=args.per_category,
                episode_unit="conversation", l_max=args.locomo_at)


def evaluate(args, out: Path, methods: list[str], **fields) -> dict:
    """One `tmem-rl eval` run -> each method's headline figures."""
    if out.exists():
        shutil.rmtree(out)
    episode = EpisodeConfig(do_sample=False, max_extraction_tokens=args.max_extraction_tokens,
                            summary_tokens=args.summary_tokens, l_max=fields.pop("l_max"),
                            **fields.pop("episode_kwargs", {}))
    config = EvalConfig(out=str(out), model=args.model, methods=methods, device=args.device, episode=episode,
                        fast_weights=FastWeightConfig(lr=args.inner_lr, epochs=args.inner_epochs),
                        methods_settings=MethodSettings(answer_batch_size=args.batch_size), **fields)
    started = time.perf_counter()
    summary = run_eval(config)
    minutes = (time.perf_counter() - started) / 60
    keys = ("n", "f1", "em", "parse_rate", "pairs_per_extraction", "seconds_per_episode", "f1_1_4")
    return {m: {**{k: summary[m].get(k) for k in keys if k in summary[m]}, "run_minutes": round(minutes, 2)}
            for m in methods}


def supervision_ablation(args, env: str, record) -> None:
    base = env_settings(env, args)
    record(("supervision", env, "none"), evaluate(args, args.out / f"supervision-{env}-none", ["none"], **base)["none"])
    for supervision in SUPERVISIONS:
        result = evaluate(args, args.out / f"supervision-{env}-{supervision}", ["tmem"],
                          episode_kwargs={"supervision": supervision}, **base)
        record(("supervision", env, supervision), result["tmem"])


def l_max_ablation(args, env: str, record, done: dict) -> None:
    base = env_settings(env, args)
    for l_max in (args.facts_l_max if env == "facts" else args.locomo_l_max):
        if l_max == base["l_max"] and "qa_pairs" in done.get("supervision", {}).get(env, {}):
            record(("l_max", env, str(l_max)), done["supervision"][env]["qa_pairs"])  # the same run
            continue
        result = evaluate(args, args.out / f"l_max-{env}-{l_max}", ["tmem"], **{**base, "l_max": l_max})
        record(("l_max", env, str(l_max)), result["tmem"])


# ---- (c): init of A ---------------------------------------------------------------------------------------------


def facts_pairs(rollouts: int, seed: int) -> dict[int, list[QAPair]]:
    """Each rollout absorbs the gold pair of its episode plus three pairs about other episodes."""
    tasks = make_env("facts", num_tasks=2 * rollouts, seed=seed).tasks()
    pair = [QAPair(t.question, t.answers[0]) for t in tasks]
    return {g: [pair[g]] + pair[rollouts + g : rollouts + g + 3] for g in range(rollouts)}


def init_ablation(args) -> dict:
    """Both inits start from the same loss (B = 0). Each epoch is one SGD step (batch 16 >= pairs); a step count is
    the first step whose loss is at or below --target x the starting loss (None: not within --max-steps)."""
    model, tokenizer = load_policy(args.model, device=args.device)
    pairs = facts_pairs(args.rollouts, args.seed)
    curves = {}
    for init in ("svd", "random"):
        fast = FastWeights(model, args.rollouts, FastWeightConfig(init=init, lr=args.init_lr, epochs=args.max_steps))
        stats = fast.absorb(tokenizer, pairs, prompt_fn=lambda q: answer_messages(f"Question: {q}"))
        stats = {slot: s for slot, s in stats.items() if s.num_pairs}  # slots left with no trainable pair
        fast.remove()
        # Mean over rollouts of the loss before each step (one step per epoch here), then after the last.
        curve = [sum(s.epoch_losses[k] for s in stats.values()) / len(stats) for k in range(args.max_steps)]
        curves[init] = curve + [sum(s.loss_after for s in stats.values()) / len(stats)]
    start = curves["svd"][0]
    result = {"lr": args.init_lr, "rollouts": args.rollouts, "target_fraction": args.target, "start_loss": start,
              "target_loss": args.target * start}
    for init, curve in curves.items():
        result[f"{init}_steps"] = next((k for k, loss in enumerate(curve) if loss <= args.target * start), None)
        result[f"{init}_final_loss"] = curve[-1]
        result[f"{init}_loss_at"] = {str(k): round(curve[k], 4) for k in (0, 5, 10, 20, 40) if k < len(curve)}
    return result


# ---- the run ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=ABLATIONS, default=list(ABLATIONS))
    parser.add_argument("--envs", nargs="+", choices=ENVS, default=list(ENVS))
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--locomo-data", type=Path, default=SHARED_LOCOMO,
                        help="a LoCoMo file (the official locomo10.json or one conversation of it)")
    parser.add_argument("--per-category", type=int, default=4, help="LoCoMo questions per category")
    parser.add_argument("--facts-tasks", type=int, default=16)
    parser.add_argument("--facts-l-max", type=int, nargs="+", default=[64, 128, 256, 512], help="facts budgets (b)")
    parser.add_argument("--facts-at", type=int, default=128, help="the facts budget of (a): the demo's")
    parser.add_argument("--locomo-l-max", type=int, nargs="+", default=[1024, 2048, 4096, 6144],
                        help="LoCoMo budgets (b); the extraction prompt adds ~600 tokens, within SmolLM2's 8192")
    parser.add_argument("--locomo-at", type=int, default=4096, help="the LoCoMo budget of (a): the paper's")
    parser.add_argument("--inner-lr", type=float, default=1e-3,
                        help="inner-loop lr of (a) and (b) (default: the demo's, tuned for the 135M model)")
    parser.add_argument("--inner-epochs", type=int, default=20)
    parser.add_argument("--max-extraction-tokens", type=int, default=192)
    parser.add_argument("--summary-tokens", type=int, default=256, help="budget of each written summary")
    parser.add_argument("--batch-size", type=int, default=8, help="streams read in lockstep")
    parser.add_argument("--rollouts", type=int, default=8, help="(c): rollouts absorbing pairs side by side")
    parser.add_argument("--init-lr", type=float, default=FastWeightConfig.lr, help="(c): the paper's lr")
    parser.add_argument("--target", type=float, default=0.5, help="(c): fraction of the starting loss to reach")
    parser.add_argument("--max-steps", type=int, default=60, help="(c)")
    parser.add_argument("--seed", type=int, default=1, help="(c): seeds the facts the pairs are about")
    parser.add_argument("--out", type=Path, default=Path("runs/ablations"))
    args = parse_args(parser, QUICK, argv)
    envs = list(args.envs)
    results: dict = {"model": args.model, "quick": args.quick, "inner_lr": args.inner_lr,
                     "inner_epochs": args.inner_epochs, "skipped": {}}
    if "locomo" in envs and not args.locomo_data.exists():
        envs.remove("locomo")
        results["skipped"]["locomo"] = f"no LoCoMo file at {args.locomo_data} (--locomo-data)"
    args.out.mkdir(parents=True, exist_ok=True)

    def record(path: tuple[str, ...], value) -> None:
        node = results
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
        (args.out / "ablations.json").write_text(json.dumps(results, indent=2))

    if "init" in args.only:
        record(("init",), init_ablation(args))
    for env in envs:
        if "supervision" in args.only:
            supervision_ablation(args, env, record)
        if "l_max" in args.only:
            l_max_ablation(args, env, record, results)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
