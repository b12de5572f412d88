"""Does the outer loop learn? Held-out F1 of the TMEM agent before and after GRPO, on tasks training never saw.

    python benchmarks/learning_curve.py                      # the full run: 128 held-out episodes, seeds 0 and 1
    python benchmarks/learning_curve.py --episodes 32 --steps 8 --seeds 0    # a shorter one
    python benchmarks/learning_curve.py --quick      # every stage at the smallest size: 2 episodes, 1 step, 1 seed

Stages (each writes under --out; a stage whose output exists is reused, so an interrupted run resumes):
  1. base      the untrained model on the held-out split: TMEM (with the prompt's worked example, which the
               untrained model needs to write JSON at all), and the --baselines (no memory, full context, summary,
               BM25 retrieval)                                                                   -> f1_base
  2. warm      SFT of the extraction action on the training split's reference pairs (TRL SFTTrainer, LoRA merged),
               evaluated at the recipe's settings                                                -> f1_before
  3. grpo      per seed: the recipe (default `recipes/facts_grpo_cpu.yaml`) from the warm-started model; the final
               checkpoint evaluated on the same held-out episodes                                -> f1_after
  4. transfer  with --transfer FILE: real LoCoMo conversations, every question, conversation unit, the collapse
               guard on: base no memory / retrieval / TMEM, warm-started and trained TMEM        -> transfer
Evaluation is greedy, so before and after answer the same episodes deterministically; the intervals of
after - before and of after - each baseline are paired bootstraps over episodes (an episode's F1 is the mean over
the questions it asked; pooled over seeds). Training curves go to training_curves.png.
Every stage also evaluates `tmem-reference`: the same policy answering through fast weights written from the
environment's reference pairs instead of its own extractions: the score of the supervision a warm start imitates
(f1_reference_base / _before / _after).
The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from tmem_rl.errors import InputError
from tmem_rl.evaluation.harness import read_records, run_eval
from tmem_rl.models import load_policy
from tmem_rl.recipes import eval_config, load_recipe, run_recipe
from tmem_rl.trainers.warm_start import WarmStartConfig, warm_start

from _quick import parse_args  # noqa: E402  (benchmarks/ is on the path when a script here runs)

CURVES = ("reward_mean", "reward_std", "f1", "extraction_parse_rate", "frac_reward_zero_std", "entropy", "kl",
          "grad_norm", "clip_fraction", "inner_loss_after", "pairs_absorbed", "extraction_length_mean")
SMOOTHED = ("reward_mean", "f1", "pairs_absorbed")  # one question per step: the trend is under the noise
OUT, QUICK_OUT = "runs/learning_curve", "runs/learning_curve_quick"
# A group of 2 is the smallest GRPO takes; 4 examples are one warm-start batch.
QUICK = {"episodes": 2, "seeds": [0], "steps": 1, "warm_examples": 4, "baselines": ["none"],
         "overrides": ["outer_loop.num_generations=2"]}
BASELINES = ("none", "full-context", "summary", "retrieval")

# The collapse guard's max_probe_leak on real conversations: more than half the probes damaged rolls back.
TRANSFER_GUARD = 0.5


def evaluate(recipe, out: Path, episodes: int, methods: list[str], model: str, checkpoint: str | None = None,
             **episode) -> dict:
    config = eval_config(recipe, str(out), methods=methods, model=model, max_questions=episodes, resume=True,
                         checkpoint=checkpoint, evaluate_base=checkpoint is None)
    config = dataclasses.replace(config, episode=dataclasses.replace(config.episode, do_sample=False, **episode))
    summary = run_eval(config)
    return {"summary": summary, "records": read_records(out / "results.jsonl")}


def transfer_row(summary: dict, records: list[dict], row: str) -> dict:
    """One policy's figures on the real conversations: LoCoMo's official F1s, the most common answer's share
    (collapse), and what the collapse guard rolled back (each conversation's extractions once)."""
    extractions = {}
    for r in records:
        if r["method"] == row:
            extractions.setdefault(r["sample_id"], r.get("extractions") or [])
    updates = [e["inner_update"] for es in extractions.values() for e in es if e.get("inner_update")]
    s = summary[row]
    return {"f1_1_4": s["f1_1_4"], "f1_1_5": s["f1_1_5"], "f1_by_category": s["f1_by_category"], "em": s["em"],
            "n": s["n"], "parse_rate": s["parse_rate"], "top_answer": s["top_answer"],
            "top_answer_share": s["top_answer_share"], "absorbs": len(updates),
            "rolled_back": sum(bool(u.get("rolled_back")) for u in updates)}


def transfer_check(recipe, out: Path, data: str, l_max: int, base_model: str, start_model: str,
                   checkpoints: dict[int, Path], guard: float = TRANSFER_GUARD) -> dict:
    """Every question of the real LoCoMo conversations in `data`, one conversation-unit episode each (the questions
    unknown while reading, as in `dialogues`), greedy, official metric, the collapse guard on: the base model's no
    memory, BM25 retrieval and TMEM (with the worked example it needs), the warm-started and each trained policy's
    TMEM. `guard`: the collapse guard's max_probe_leak; another than the default writes to folders named by it."""
    tag = "" if guard == TRANSFER_GUARD else f"_guard{guard:g}"
    fast_weights = dataclasses.replace(recipe.inner_loop, max_probe_leak=guard)

    def run(path: Path, methods: list[str], model: str, checkpoint: Path | None = None, **episode) -> dict:
        config = eval_config(recipe, str(path), env="locomo", env_kwargs={}, data=data, split="all",
                             heldout_fraction=0.0, episode_unit="conversation", methods=methods, model=model,
                             resume=True, fast_weights=fast_weights, checkpoint=str(checkpoint) if checkpoint else None,
                             evaluate_base=checkpoint is None)
        config = dataclasses.replace(config, episode=dataclasses.replace(config.episode, l_max=l_max, do_sample=False,
                                                                         **episode))
        summary = run_eval(config)
        return {"summary": summary, "records": read_records(path / "results.jsonl")}

    rows = {}
    base = run(out / f"transfer{tag}_base", ["none", "retrieval", "tmem"], base_model, examples=True)
    for method in ("none", "retrieval", "tmem"):
        rows[f"base {method}"] = transfer_row(base["summary"], base["records"], method)
    if start_model != base_model:
        warm = run(out / f"transfer{tag}_warm", ["tmem"], start_model)
        rows["warm-started tmem"] = transfer_row(warm["summary"], warm["records"], "tmem")
    for seed, checkpoint in checkpoints.items():
        trained = run(out / f"transfer{tag}_seed{seed}", ["tmem"], start_model, checkpoint)
        rows[f"trained tmem, seed {seed}"] = transfer_row(trained["summary"], trained["records"], "tmem@trained")
    return rows


def f1_by_episode(records: list[dict], method: str) -> dict[str, float]:
    """Each episode's F1, the mean over the questions it asked: the questions of one reading share its fast
    weights, so the episode, not the question, is the unit that is resampled."""
    scores: dict[str, list[float]] = {}
    for r in records:
        if r["method"] == method:
            scores.setdefault(str(r["sample_id"]), []).append(r["f1"])
    return {k: sum(v) / len(v) for k, v in scores.items()}


def paired_bootstrap(before: dict[str, float], after: dict[str, float], samples: int = 10_000,
                     seed: int = 0) -> tuple[float, list[float]]:
    """Mean of after - before over shared episodes, and its 95% percentile interval."""
    keys = sorted(set(before) & set(after))
    diffs = [after[k] - before[k] for k in keys]
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(diffs, k=len(diffs))) / len(diffs) for _ in range(samples))
    return sum(diffs) / len(diffs), [means[int(0.025 * samples)], means[int(0.975 * samples) - 1]]


def plot_curves(runs: dict[int, Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 6, figsize=(21, 6.5))
    for seed, metrics in runs.items():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        steps = [r["step"] for r in rows]
        for ax, key in zip(axes.flat, CURVES):
            values = [r.get(key, float("nan")) for r in rows]
            line, = ax.plot(steps, values, label=f"seed {seed}", alpha=0.45 if key in SMOOTHED else 1.0)
            if key in SMOOTHED:
                window = [values[max(0, i - 3) : i + 1] for i in range(len(values))]
                ax.plot(steps, [sum(w) / len(w) for w in window], color=line.get_color(),
                        label=f"seed {seed}, mean of last 4")
    for ax, key in zip(axes.flat, CURVES):
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_recipes(path: str, overrides: list[str], train_overrides: list[str], steps: int | None):
    """(the recipe every evaluation uses, the one GRPO trains with: `train_overrides` on top of it)."""
    recipe = load_recipe(path, overrides)
    trained = load_recipe(path, overrides + train_overrides)
    if steps is not None:
        for r in (recipe, trained):
            r.outer_loop.max_steps = steps
            r.outer_loop.save_steps = steps
    return recipe, trained


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(Path(__file__).resolve().parents[1] / "recipes/facts_grpo_cpu.yaml"))
    parser.add_argument("--out", default=None, help=f"default {OUT} ({QUICK_OUT} with --quick)")
    parser.add_argument("--episodes", type=int, default=128, help="held-out episodes per evaluation")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=None, help="GRPO steps (default: the recipe's max_steps)")
    parser.add_argument("--no-warm-start", action="store_true", help="GRPO from the base model")
    parser.add_argument("--warm-epochs", type=float, default=1.0)
    parser.add_argument("--warm-lr", type=float, default=5e-4)
    parser.add_argument("--shared-stages", default=None, metavar="DIR",
                        help="take the base evaluation, warm start and its evaluation from (or build them in) DIR, "
                             "so that runs comparing GRPO settings share them; GRPO and its evaluations go to --out")
    parser.add_argument("--transfer", default=None, metavar="LOCOMO_JSON",
                        help="also evaluate on real LoCoMo conversations (official-format file): every question, "
                             "conversation unit, collapse guard on; base no memory / retrieval / TMEM against the "
                             "warm-started and trained extractors")
    parser.add_argument("--transfer-l-max", type=int, default=512,
                        help="working-context budget on the real conversations (hundreds of turns)")
    parser.add_argument("--transfer-guard", type=float, default=TRANSFER_GUARD, metavar="SHARE",
                        help="the collapse guard's max_probe_leak on the real conversations: an absorb that damages "
                             "more than this share of the six probe answers is rolled back")
    parser.add_argument("--warm-examples", type=int, default=128,
                        help="cap on SFT examples (each ~28 s per batch of 8 on 2 CPU cores)")
    parser.add_argument("--baselines", nargs="*", default=list(BASELINES),
                        help="memory methods evaluated on the base model beside TMEM, each compared with the trained "
                             "policy's TMEM on the same episodes")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the reference-pairs evaluation after the base stage (a diagnostic that costs as "
                             "much as the TMEM evaluation itself)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override, e.g. --set outer_loop.learning_rate=1e-4 (repeatable)")
    parser.add_argument("--train-set", dest="train_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override for GRPO only, every evaluation keeping the recipe's setting, e.g. "
                             "--train-set inner_loop.epochs=10: a training lever judged by the same evaluation as "
                             "the recipe (repeatable); a GRPO run already in --out is reused, so give each lever "
                             "its own --out")
    args = parse_args(parser, QUICK, argv)
    started = time.perf_counter()
    if args.out is None and args.quick:
        # A quick run measures every stage, so it never resumes from an earlier one.
        shutil.rmtree(QUICK_OUT, ignore_errors=True)
    out = Path(args.out or (QUICK_OUT if args.quick else OUT))
    recipe, trained_recipe = load_recipes(args.recipe, args.overrides, args.train_overrides, args.steps)
    base_name = recipe.model.name
    traced = [] if args.no_reference else ["tmem-reference"]  # the evaluations after the base stage

    baselines = [m for m in args.baselines if m != "tmem"]
    shared = Path(args.shared_stages) if args.shared_stages else out
    base = evaluate(recipe, shared / "eval_base", args.episodes, [*baselines, "tmem", "tmem-reference"], base_name,
                    examples=True)
    base_f1 = f1_by_episode(base["records"], "tmem")
    result = {"f1_base": base["summary"]["tmem"]["f1"], "parse_rate_base": base["summary"]["tmem"]["parse_rate"],
              "f1_reference_base": base["summary"]["tmem-reference"]["f1"],
              "f1_by_category_base": base["summary"]["tmem"]["f1_by_category"],
              "baselines": {m: {"f1": base["summary"][m]["f1"], "em": base["summary"][m]["em"],
                                "f1_by_category": base["summary"][m]["f1_by_category"]} for m in baselines}}
    if "none" in baselines:
        result["no_memory_f1"] = base["summary"]["none"]["f1"]

    if args.no_warm_start:
        start_model, before, before_f1 = base_name, base["summary"]["tmem"], base_f1
        result["f1_reference_before"] = result["f1_reference_base"]
    else:
        warm_dir = shared / "warm_start"
        if not (warm_dir / "warm_start.json").exists():
            model, tokenizer = load_policy(base_name)
            warm = warm_start(model, tokenizer, recipe.env.make("train"), recipe.episode,
                              WarmStartConfig(output_dir=str(warm_dir), num_train_epochs=args.warm_epochs,
                                              learning_rate=args.warm_lr, max_examples=args.warm_examples))
            del model
        warm = json.loads((warm_dir / "warm_start.json").read_text())
        start_model = warm["model"]
        result["warm_start"] = {k: warm[k] for k in ("examples", "steps", "loss_first", "loss_last", "seconds")}
        ev = evaluate(recipe, shared / "eval_warm", args.episodes, ["tmem", *traced], start_model)
        before, before_f1 = ev["summary"]["tmem"], f1_by_episode(ev["records"], "tmem")
        result["f1_reference_before"] = ev["summary"].get("tmem-reference", {}).get("f1")
        result["f1_by_category_before"] = before["f1_by_category"]

    per_seed, after_all, before_all, curves, finals = {}, {}, {}, {}, {}
    for seed in args.seeds:
        run_dir = out / f"grpo_seed{seed}"
        final = run_dir / f"checkpoint-{trained_recipe.outer_loop.max_steps}"
        if not final.exists():
            if run_dir.exists():
                shutil.rmtree(run_dir)  # a partial run: the metrics of a resumed one would repeat steps
            seeded = dataclasses.replace(trained_recipe, outer_loop=dataclasses.replace(
                trained_recipe.outer_loop, output_dir=str(run_dir), seed=seed,
                save_steps=trained_recipe.outer_loop.max_steps))
            seeded.model = dataclasses.replace(trained_recipe.model, name=start_model)
            run_recipe(seeded)
        curves[seed], finals[seed] = run_dir / "metrics.jsonl", final
        ev = evaluate(recipe, out / f"eval_seed{seed}", args.episodes, ["tmem", *traced], start_model,
                      str(final))
        after, after_f1 = ev["summary"]["tmem@trained"], f1_by_episode(ev["records"], "tmem@trained")
        delta, ci = paired_bootstrap(before_f1, after_f1, seed=seed)
        per_seed[seed] = {"f1_before": before["f1"], "f1_after": after["f1"], "f1_delta": delta,
                          "f1_delta_ci95": ci, "em_before": before["em"], "em_after": after["em"],
                          "parse_rate_before": before["parse_rate"], "parse_rate_after": after["parse_rate"],
                          "pairs_per_extraction_before": before["pairs_per_extraction"],
                          "pairs_per_extraction_after": after["pairs_per_extraction"],
                          "f1_reference_after": ev["summary"].get("tmem-reference@trained", {}).get("f1"),
                          "f1_by_category_after": after["f1_by_category"]}
        for method in baselines:
            gain, interval = paired_bootstrap(f1_by_episode(base["records"], method), after_f1, seed=seed)
            per_seed[seed][f"f1_after_minus_{method}"] = gain
            per_seed[seed][f"f1_after_minus_{method}_ci95"] = interval
        after_all.update({f"{seed}:{k}": v for k, v in after_f1.items()})
        before_all.update({f"{seed}:{k}": v for k, v in before_f1.items()})
    plot_curves(curves, out / "training_curves.png")
    delta, ci = paired_bootstrap(before_all, after_all)
    base_all = {f"{seed}:{k}": v for seed in args.seeds for k, v in base_f1.items()}
    delta_base, ci_base = paired_bootstrap(base_all, after_all)
    mean = lambda key: sum(s[key] for s in per_seed.values()) / len(per_seed)  # noqa: E731
    for method in baselines:
        pooled = {f"{seed}:{k}": v for seed in args.seeds for k, v in f1_by_episode(base["records"], method).items()}
        gain, interval = paired_bootstrap(pooled, after_all)
        result["baselines"][method].update({"f1_after_minus": gain, "f1_after_minus_ci95": interval})
    result.update({
        "f1_before": before["f1"], "f1_after": mean("f1_after"), "f1_delta": delta, "f1_delta_ci95": ci,
        "em_before": before["em"], "em_after": mean("em_after"),
        "parse_rate_before": before["parse_rate"], "parse_rate_after": mean("parse_rate_after"),
        "f1_delta_vs_base": delta_base, "f1_delta_vs_base_ci95": ci_base,
        "f1_reference_after": None if args.no_reference else mean("f1_reference_after"),
        "per_seed": per_seed, "episodes": args.episodes, "seeds": args.seeds,
        "grpo_steps": recipe.outer_loop.max_steps, "warm_start_used": not args.no_warm_start, "quick": args.quick,
        "minutes": (time.perf_counter() - started) / 60,
        "curves_png": str(out / "training_curves.png"),
        "command": " ".join(["python", "benchmarks/learning_curve.py", *(argv if argv is not None else sys.argv[1:])]),
    })
    if args.transfer:
        result["transfer"] = transfer_check(recipe, out, args.transfer, args.transfer_l_max, base_name, start_model,
                                            finals, args.transfer_guard)
        result["transfer_guard"] = args.transfer_guard
    result["minutes"] = (time.perf_counter() - started) / 60
    (out / "learning_curve.json").write_text(json.dumps(result) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except InputError as err:  # a bad --recipe or --set: one line, as argparse reports its own errors
        sys.exit(f"learning_curve.py: {err}")
