"""`tmem-rl` command line: demo | eval | train | export | envs | convert."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import traceback
from pathlib import Path


def _add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    from tmem_rl.config_docs import field_docs

    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        text = f"{docs[f.name]} " if f.name in docs else ""
        parser.add_argument(flag, type=type(f.default), default=f.default, help=f"{text}(default: {f.default})")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err.msg}): {text!r}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"enable_thinking\": false}}', got {text!r}")
    return value


def _eval_config(args):
    """EvalConfig from `tmem-rl eval` flags, on top of a recipe's settings when --recipe is given."""
    from tmem_rl.evaluation.harness import EvalConfig
    from tmem_rl.evaluation.methods import MethodSettings
    from tmem_rl.memory import FastWeightConfig

    settings = MethodSettings(**{k: v for k, v in (("context_budget", args.context_budget),
                                                   ("retrieval_k", args.retrieval_k),
                                                   ("answer_batch_size", args.batch_size)) if v is not None})
    given = {k: v for k, v in (
        ("model", args.model), ("l_max", args.l_max), ("device", args.device), ("split", args.split),
        ("heldout_fraction", args.heldout_fraction), ("split_seed", args.split_seed),
        ("chat_template_kwargs", args.chat_template_kwargs),
    ) if v is not None}
    common = dict(out=args.out, data=args.data, methods=args.method, max_questions=args.max_questions,
                  per_category=args.per_category, sample_ids=args.sample_ids, episode_unit=args.episode_unit,
                  greedy=args.greedy, resume=args.resume, methods_settings=settings, seed=args.seed,
                  checkpoint=args.checkpoint, continual=args.continual)
    inner = {k: v for k, v in (("lr", args.inner_lr), ("epochs", args.inner_epochs)) if v is not None}
    if args.recipe:
        from tmem_rl.recipes import eval_config, load_recipe

        recipe = load_recipe(args.recipe)
        config = eval_config(recipe, **common, **given)
        if args.env and args.env != recipe.env.name:  # another environment: none of the recipe's env settings
            config = dataclasses.replace(config, env=args.env, env_kwargs=dict(args.env_kwargs),
                                         split=args.split or "all")
        elif args.env_kwargs:
            config.env_kwargs = {**config.env_kwargs, **args.env_kwargs}
        if inner:
            config.fast_weights = dataclasses.replace(config.fast_weights, **inner)
    else:
        config = EvalConfig(env=args.env or "locomo", env_kwargs=args.env_kwargs,
                            fast_weights=FastWeightConfig(**inner), **common, **given)
    if args.max_pairs is not None:
        config.episode_kwargs["max_pairs"] = args.max_pairs
    return config


def _print_envs() -> None:
    """`tmem-rl envs list`: a table of env_sources(); a row that failed to load or clashes with another says so."""
    from tmem_rl.envs import env_sources

    rows = [("NAME", "PACKAGE", "TARGET", "KIND")]
    for s in env_sources():
        kind = s.kind or f"error: {s.error}"
        if s.conflicts:
            kind += f"  CONFLICT: also registered by {', '.join(s.conflicts)}"
        rows.append((s.name, s.origin, s.target, kind))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])


def main(argv: list[str] | None = None) -> int:
    """Entry point: a user's mistake (InputError) is printed as one line and exits 2, like argparse's own errors;
    with --debug, after its traceback (and that of its cause, e.g. a plugin's failed import)."""
    from tmem_rl.errors import InputError

    # Read apart from the full parse, which may itself end in an InputError that --debug should show; taken from
    # anywhere in the line, as a user adds it at the end of a command that failed.
    early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    early.add_argument("--debug", action="store_true")
    flags, argv = early.parse_known_args(argv)
    try:
        return _run(argv)
    except InputError as err:
        if flags.debug:
            traceback.print_exc()
        print(f"tmem-rl: error: {err}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand and flag of `tmem-rl`."""
    parser = argparse.ArgumentParser(prog="tmem-rl", description="RL for LLM agents with fast-weight memory")
    parser.add_argument("--debug", action="store_true",
                        help="with an error's one-line message, print its full traceback (for a plugin that fails "
                             "to import: the import's)")
    sub = parser.add_subparsers(dest="command", required=True)

    from tmem_rl.demo import DemoConfig
    from tmem_rl.evaluation.methods import METHODS

    demo = sub.add_parser("demo", help="TMEM vs no memory on the facts environment with the default model")
    _add_dataclass_args(demo, DemoConfig)
    ev = sub.add_parser("eval", help="run memory methods side by side on a benchmark; JSONL + summary + table + chart")
    ev.add_argument("--env", default=None, help="an environment name (default: the recipe's, else locomo); with "
                                                "--recipe, another environment takes none of the recipe's env settings")
    ev.add_argument("--data", default=None, help="benchmark file, for environments that read one (LoCoMo: the "
                                                 "official locomo10.json)")
    ev.add_argument("--env-kwargs", type=_json_object, default={},
                    help='JSON for the environment\'s constructor, e.g. \'{"num_tasks": 512, "num_facts": 3}\'')
    ev.add_argument("--recipe", default=None,
                    help="take the model, environment, split, inner loop and episode settings from a training "
                         "recipe (flags given here still win)")
    ev.add_argument("--split", choices=["all", "train", "heldout"], default=None,
                    help="side of the seeded task partition to evaluate (default: heldout with --recipe, else all)")
    ev.add_argument("--heldout-fraction", type=float, default=None,
                    help="share of tasks held out of training (default: the recipe's, else 0)")
    ev.add_argument("--split-seed", type=int, default=None, help="seed of the train / held-out partition")
    ev.add_argument("--checkpoint", default=None,
                    help="a trained policy (tmem-rl train checkpoint, PEFT adapter or HF folder), evaluated after "
                         "the base model on the same tasks")
    ev.add_argument("--method", nargs="+", default=["tmem"], help=" ".join(METHODS))
    ev.add_argument("--model", default=None,
                    help="a known name (smollm2-135m-instruct, tiny), an HF folder or a hub id (default: the "
                         "recipe's, else the default model)")
    ev.add_argument("--max-questions", type=int, default=None, help="evaluate only the first N tasks (a task may ask several questions)")
    ev.add_argument("--per-category", type=int, default=None, help="first N questions of each category")
    ev.add_argument("--sample-ids", nargs="+", default=None, help="only these samples (LoCoMo: conversation ids; LongMemEval: question ids)")
    ev.add_argument("--episode-unit", choices=["question", "conversation"], default="question",
                    help="question: one episode per question (the stream read with it in mind); conversation: "
                         "read each stream once, then answer all its questions from the same memory")
    ev.add_argument("--greedy", action="store_true", help="deterministic decoding instead of the paper's sampling")
    ev.add_argument("--continual", action="store_true",
                    help="carry fast weights across a sequence of episodes (one per slot) and report forward "
                         "transfer, retention and forgetting in continual.json")
    ev.add_argument("--out", required=True, help="folder for results.jsonl, summary.json / .md and the chart")
    ev.add_argument("--resume", action="store_true",
                    help="continue an interrupted evaluation in --out with the same settings: every (method, "
                         "question) already recorded is kept and not run again")
    ev.add_argument("--l-max", type=int, default=None, help="working-context budget in tokens (default: the environment's own, e.g. search 8192, else the paper's LoCoMo 4096)")
    ev.add_argument("--max-pairs", type=int, default=None, help="pairs asked for per extraction (default 8)")
    ev.add_argument("--inner-lr", type=float, default=None, help="inner-loop SGD learning rate (default 5e-4)")
    ev.add_argument("--inner-epochs", type=int, default=None, help="inner-loop epochs per extraction (default 5)")
    ev.add_argument("--context-budget", type=int, default=None, help="full-context prompt budget in tokens")
    ev.add_argument("--retrieval-k", type=int, default=None, help="chunks the retrieval baseline puts in the prompt")
    ev.add_argument("--batch-size", type=int, default=None, help="streams read in lockstep and questions answered per batch (one fast-weight slot per stream)")
    ev.add_argument("--seed", type=int, default=0, help="seeds sampling and the question order")
    ev.add_argument("--device", default=None, help="cuda, cuda:1, cpu ... (default: cuda when available)")
    ev.add_argument("--chat-template-kwargs", type=_json_object, default=None,
                    help='JSON passed to the chat template, e.g. \'{"enable_thinking": true}\' '
                         "(default: thinking off where the template has the switch)")
    train = sub.add_parser("train", help="train with a YAML recipe (GRPO); key=value overrides after the recipe")
    train.add_argument("recipe", help="a YAML recipe, e.g. recipes/quickstart_cpu.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. outer_loop.max_steps=2")
    again = train.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in outer_loop.output_dir from its newest good checkpoint")
    again.add_argument("--overwrite", action="store_true",
                       help="delete the run already in outer_loop.output_dir (checkpoints, metrics) and start over")
    # One value, comma-separated, repeatable: a list of values would swallow the recipe path that may follow it.
    train.add_argument("--allow-recipe-change", action="extend", type=lambda text: [k for k in text.split(",") if k],
                       default=[], metavar="KEY[,KEY...]",
                       help="with --resume: dotted recipe keys that may differ from the checkpoint's recipe, e.g. "
                            "outer_loop.max_steps,inner_loop.epochs (others are refused; save_steps, save_total_limit, logging_steps, "
                            "report_to and output_dir may always change)")
    export = sub.add_parser("export", help="a training checkpoint -> a merged HF model or a PEFT adapter folder, "
                                           "with tokenizer, generation config, fast_weights.json and a model card")
    export.add_argument("checkpoint", help="a checkpoint-<step> folder written by tmem-rl train")
    export.add_argument("--out", required=True, help="the folder to write (must not exist or be empty)")
    export.add_argument("--format", choices=["merged", "adapter"], default="merged",
                        help="merged: slow LoRA merged into the base, loads with AutoModelForCausalLM; adapter: a "
                             "PEFT adapter folder (LoRA runs on a base with a hub id or known name only)")
    export.add_argument("--verify", action="store_true",
                        help="reload the export with plain transformers / PEFT and compare logits, and the "
                             "fast weights' A an agent loads, with the checkpoint's in fp32 (fails above "
                             "--verify-tolerance)")
    export.add_argument("--verify-tolerance", type=float, default=None,
                        help="largest max abs logit difference --verify accepts (default: 8 x the checkpoint's "
                             "own fp32 rounding noise, its logits in fp32 against fp64, at least 8 x eps(fp32) x "
                             "max |logit|; ~1e-3 on the default model; measuring that noise holds the model in float64 for a moment: "
                             "twice its fp32 memory)")
    export.add_argument("--base", default=None,
                        help="the base model to load a LoRA checkpoint onto and name in the export (default: the "
                             "one the run recorded)")
    export.add_argument("--adapter-of", default=None, metavar="BASE",
                        help="write a PEFT adapter of this public base (hub id or known name) holding the trained "
                             "model's whole difference from it, for a run that started from a local fine-tune "
                             "such as a warm start (with --format adapter)")
    export.add_argument("--rank", type=int, default=None,
                        help="--adapter-of: the adapter's rank (default: the smallest that leaves out at most 1e-3 "
                             "of any layer's difference)")
    export.add_argument("--adapter-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="--adapter-of: the dtype the adapter's weights are stored in")
    export.add_argument("--eval", default=None, help="a summary.json of tmem-rl eval to put in the model card")
    export.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --out: replaces the files an export writes (and an earlier "
                             "export's), keeps any other")
    envs = sub.add_parser("envs", help="the available environments: tmem-rl envs list")
    envs.add_argument("action", nargs="?", choices=["list"], default="list",
                      help="list: one line per environment: name, package, module:Class, stream or tool")
    convert = sub.add_parser("convert", help="convert a known packaged model into the HF cache folder; print it")
    convert.add_argument("name", nargs="?", default=None, help="a known model name (default: the default model)")
    return parser


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "train":  # overrides may also come after a flag: train r.yaml --resume a.b=1
        args.overrides += [a for a in extra if "=" in a and not a.startswith("-")]
        extra = [a for a in extra if a not in args.overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "demo":
        from tmem_rl.demo import DemoConfig, format_table, run_demo

        config = DemoConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)})
        summary = run_demo(config)
        print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
        print()
        print(format_table(summary))
        print(f"\ntrajectories and summary written to {config.out}/")
    elif args.command == "eval":
        from tmem_rl.evaluation.harness import run_eval

        from tmem_rl.errors import InputError

        try:
            config = _eval_config(args)
        except InputError:
            raise
        except (TypeError, ValueError) as err:  # a settings class refused a flag's value
            raise InputError(f"tmem-rl eval: {err}") from err
        run_eval(config)
        print((Path(config.out) / "summary.md").read_text().rstrip())
        print(f"\nrecords, summary.json, summary.md and f1_by_category.png written to {config.out}/")
    elif args.command == "train":
        from tmem_rl.errors import InputError
        from tmem_rl.recipes import load_recipe, run_recipe

        allowed, overrides = args.allow_recipe_change, args.overrides
        if allowed and not args.resume:
            raise InputError("--allow-recipe-change applies only with --resume: it names recipe keys a resumed run "
                             "may change")
        history = run_recipe(load_recipe(args.recipe, overrides), resume=args.resume, overwrite=args.overwrite,
                             allow_recipe_change=allowed)
        if history:
            print(json.dumps({k: float(f"{v:.4g}") for k, v in history[-1].items()}, indent=2))
    elif args.command == "export":
        from tmem_rl.export import export_checkpoint

        result = export_checkpoint(args.checkpoint, args.out, args.format, verify=args.verify, base=args.base,
                                   eval_summary=args.eval, overwrite=args.overwrite,
                                   tolerance=args.verify_tolerance, adapter_of=args.adapter_of, rank=args.rank,
                                   adapter_dtype=args.adapter_dtype)
        print(f"exported {args.checkpoint} ({result['format']}, base {result['base_model'] or 'none'}) to "
              f"{result['out']}")
        if result.get("note"):
            print(f"note: {result['note']}")
        if result.get("fit"):
            fit = result["fit"]
            print(f"adapter of {fit['base']}: rank {fit['rank']} over {fit['layers']} layers, largest share of a "
                  f"layer's difference left out {fit['max_residual']:.1e} (mean {fit['mean_residual']:.1e})")
        if args.verify:
            verdict = "ok" if result["verified"] else "FAILED"
            print(f"verify: max abs logit diff {result['max_logit_diff']:.3g}, fast-weight A diff "
                  f"{result['max_init_diff']:.3g} (tolerance {result['tolerance']:.3g}; the checkpoint's fp32 "
                  f"rounding noise {result['noise']:.3g}): {verdict}")
            if not result["verified"]:
                return 1
    elif args.command == "envs":
        _print_envs()
    elif args.command == "convert":
        from tmem_rl.models import DEFAULT_MODEL, resolve_model_path

        print(resolve_model_path(args.name or DEFAULT_MODEL))
    return 0


if __name__ == "__main__":
    sys.exit(main())
