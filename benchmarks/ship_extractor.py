"""Ship a trained extractor in the package, if it beats the base model on held-out episodes.

    python benchmarks/ship_extractor.py --recipe recipes/facts_multi_grpo_cpu.yaml --run runs/lc_facts_multi \
        --seed 0 --name facts --rank 16

Takes a `benchmarks/learning_curve.py` output folder (its base evaluation and a seed's final GRPO checkpoint),
exports the checkpoint as a float16 PEFT adapter of the base model (`tmem-rl export --adapter-of`: the warm start
and GRPO's LoRA in one adapter, cut to --rank), evaluates that adapter itself on the same held-out episodes, and
writes it to `tmem_rl/assets/extractors/NAME` with `shipped.json` and a model card holding the held-out scores and
the commands that reproduce it, only when its gain over the base model's TMEM has a paired-bootstrap 95% interval
above zero. The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

from learning_curve import evaluate, f1_by_episode, paired_bootstrap  # noqa: E402  (benchmarks/ is on the path)

from tmem_rl.errors import InputError
from tmem_rl.export import export_checkpoint
from tmem_rl.extractors import SHIPPED_DIR, SHIPPED_FILE
from tmem_rl.recipes import load_recipe

# What the package needs of an export: the base's tokenizer and chat template ship with tmem_rl already.
KEEP = ("adapter_config.json", "adapter_model.safetensors", "fast_weights.json", "fast_weights_init.safetensors",
        "generation_config.json", "README.md")


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def score_row(summary: dict) -> dict:
    return {k: summary[k] for k in ("f1", "em", "parse_rate", "pairs_per_extraction", "n") if k in summary}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="the recipe the learning curve ran")
    parser.add_argument("--run", required=True, help="that learning_curve.py run's --out folder")
    parser.add_argument("--seed", type=int, default=0, help="the GRPO seed whose final checkpoint ships")
    parser.add_argument("--name", required=True, help="the extractor's name in the package")
    parser.add_argument("--rank", type=int, default=16, help="the adapter's rank")
    parser.add_argument("--dtype", default="float16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", default=str(SHIPPED_DIR), help="where extractors ship (default: the package's)")
    args = parser.parse_args(argv)
    run = Path(args.run)
    curve = json.loads((run / "learning_curve.json").read_text())
    episodes = curve["episodes"]
    checkpoint = run / f"grpo_seed{args.seed}" / f"checkpoint-{curve['grpo_steps']}"
    recipe = load_recipe(args.recipe)
    recorded = json.loads((checkpoint / "run.json").read_text())
    if recorded.get("recipe", {}).get("env") != json.loads(json.dumps(dataclasses.asdict(recipe.env))):
        raise InputError(f"--recipe {args.recipe}: its env is not the one {checkpoint} was trained on")
    base_name = recipe.model.name
    staging = run / f"ship_{args.name}"
    export = export_checkpoint(checkpoint, staging, "adapter", adapter_of=base_name, rank=args.rank,
                               adapter_dtype=args.dtype, overwrite=True)
    # One folder per adapter shape: a rerun with another rank must not resume the last one's records.
    shipped = evaluate(recipe, run / f"eval_ship_{args.name}_r{export['fit']['rank']}_{args.dtype}", episodes,
                       ["tmem"], base_name, str(staging))
    base = evaluate(recipe, run / "eval_base", episodes, ["tmem"], base_name, examples=True)
    gain, interval = paired_bootstrap(f1_by_episode(base["records"], "tmem"),
                                      f1_by_episode(shipped["records"], "tmem@trained"))
    seed_row = curve["per_seed"][str(args.seed)]
    scores = {
        "base": score_row(base["summary"]["tmem"]),
        "warm_start": {"f1": curve["f1_before"], "em": curve["em_before"], "parse_rate": curve["parse_rate_before"]},
        "trained": {"f1": seed_row["f1_after"], "em": seed_row["em_after"], "parse_rate": seed_row["parse_rate_after"]},
        "shipped": score_row(shipped["summary"]["tmem@trained"]),
        "shipped_minus_base": gain, "shipped_minus_base_ci95": interval,
    }
    result = {"name": args.name, "episodes": episodes, "seed": args.seed, "fit": export["fit"], "heldout": scores,
              "shipped": interval[0] > 0}
    if not result["shipped"]:
        result["why_not"] = "its gain over the base model's TMEM has an interval that does not exclude zero"
        print(json.dumps(result))
        return result
    env = recorded["recipe"]["env"]
    # The learning curve's own command line when it recorded one; else its flags that shaped this seed's run.
    curve_command = curve.get("command") or (f"python benchmarks/learning_curve.py --recipe {args.recipe} "
                                             f"--episodes {episodes} --seeds {args.seed} --out {run}")
    commands = [
        curve_command,
        f"python benchmarks/ship_extractor.py --recipe {args.recipe} --run {run} --seed {args.seed} "
        f"--name {args.name} --rank {args.rank} --dtype {args.dtype}",
    ]
    info = {"env": {"name": env["name"], "kwargs": env.get("kwargs", {}),
                    "heldout_fraction": env["heldout_fraction"], "split_seed": env.get("split_seed", 0)},
            "heldout": scores, "episodes": episodes, "seed": args.seed, "commit": commit(), "commands": commands,
            "adapter": {"rank": export["fit"]["rank"], "dtype": args.dtype,
                        "max_residual": export["fit"]["max_residual"]}}
    target = Path(args.out) / args.name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for name in KEEP:
        shutil.copy2(staging / name, target / name)
    settings = json.loads((target / "fast_weights.json").read_text())
    settings["files"] = sorted([*KEEP, SHIPPED_FILE])
    (target / "fast_weights.json").write_text(json.dumps(settings, indent=2) + "\n")
    (target / SHIPPED_FILE).write_text(json.dumps(info, indent=2) + "\n")
    with open(target / "README.md", "a") as card:
        card.write(card_section(info))
    print(json.dumps(result))
    return result


def card_section(info: dict) -> str:
    s = info["heldout"]
    rows = [("base model, TMEM (worked example in the prompt)", s["base"]), ("warm start", s["warm_start"]),
            ("after GRPO (the checkpoint)", s["trained"]),
            (f"this adapter (rank {info['adapter']['rank']}, {info['adapter']['dtype']})", s["shipped"])]
    low, high = s["shipped_minus_base_ci95"]
    lines = ["## Held-out scores", "",
             f"{info['episodes']} held-out episodes of `{info['env']['name']}` ({json.dumps(info['env']['kwargs'])}, "
             f"held-out fraction {info['env']['heldout_fraction']}, split seed {info['env']['split_seed']}), "
             f"greedy, every question of each episode; GRPO seed {info['seed']}.", "",
             "| policy | F1 | EM | extraction parse rate |", "|---|---|---|---|"]
    lines += [f"| {name} | {r['f1']:.3f} | {r['em']:.3f} | {r['parse_rate']:.2f} |" for name, r in rows]
    lines += ["", f"This adapter minus the base model: {s['shipped_minus_base']:+.3f} F1, 95% interval "
                  f"[{low:+.3f}, {high:+.3f}] (paired bootstrap over episodes).", "",
              "## Reproduce", "", f"From commit `{info['commit']}`:", "", "```", *info["commands"], "```", ""]
    return "\n" + "\n".join(lines)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except InputError as err:
        sys.exit(f"ship_extractor.py: {err}")
