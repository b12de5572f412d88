"""`tmem-rl` command line: demo | eval | train | export | envs | convert."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
import types
import typing
from pathlib import Path
from typing import Any


def _flag_kind(annotation) -> tuple[Any, dict[str, Any]]:
    """argparse settings for a field's type: (type, extra add_argument keywords)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return _flag_kind(args[0])  # X | None: the flag gives an X
    origin = typing.get_origin(annotation) or annotation
    if origin is bool:
        return None, {"action": argparse.BooleanOptionalAction}
    if origin is dict:
        return _json_object, {}
    if origin in (list, tuple):
        item = typing.get_args(annotation)[0]
        return item, {"nargs": "+"}
    return origin, {}


def _add_dataclass_args(parser, cls, *, prefix: str = "", skip: tuple[str, ...] = (),
                        names: dict[str, str] | None = None, given_only: bool = False, shown=None,
                        choices: dict[str, tuple] | None = None) -> None:
    """One flag per field of dataclass `cls`, --<prefix><name> (or names[field]), its help the field's docstring,
    its values `choices[field]` where given. given_only: the flag defaults to None (not given), so that a recipe's
    or the config's value stands unless the flag is given; the help shows the value of `shown` (an instance), else
    the field's default."""
    from tmem_rl.config_docs import field_docs

    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        name = (names or {}).get(f.name, prefix + f.name)
        if shown is not None:
            default = getattr(shown, f.name)
        else:
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        kind, extra = _flag_kind(hints[f.name])
        if kind is not None:
            extra["type"] = kind
        if f.name in (choices or {}):
            extra["choices"] = choices[f.name]
        text = docs.get(f.name, "")
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            extra["required"] = True
        else:
            text += f" (default: {default})"
        parser.add_argument("--" + name.replace("_", "-"), dest=prefix + f.name,
                            default=None if given_only else default, help=text.strip().replace("%", "%%"), **extra)


def _given(args, cls, prefix: str = "", skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of `cls` whose flags were given."""
    given = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, prefix + f.name, None)
        if f.name not in skip and value is not None:
            given[f.name] = tuple(value) if isinstance(value, list) and isinstance(f.default, tuple) else value
    return given


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err.msg}): {text!r}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"enable_thinking\": false}}', got {text!r}")
    return value


# EvalConfig's nested settings, each with its flags' prefix.
EVAL_SECTIONS = (("episode", ""), ("fast_weights", "inner_"), ("methods_settings", ""))


def _add_eval_args(ev: argparse.ArgumentParser) -> None:
    from tmem_rl.envs.split import SPLITS
    from tmem_rl.episode import DECODERS, SUPERVISIONS
    from tmem_rl.evaluation.harness import EPISODE_UNITS, SET_BY_METHODS, EvalConfig

    choices = {"split": SPLITS, "episode_unit": EPISODE_UNITS, "decoder": DECODERS, "supervision": SUPERVISIONS}
    shown = EvalConfig(out="")
    ev.add_argument("--recipe", default=None,
                    help="take the model, environment, split, inner loop and episode settings from a training "
                         "recipe (flags given here still win)")
    _add_dataclass_args(ev, EvalConfig, skip=tuple(name for name, _ in EVAL_SECTIONS), names={"methods": "method"},
                        given_only=True, shown=shown, choices=choices)
    ev.add_argument("--greedy", dest="do_sample", action="store_false", default=None,
                    help="greedy decoding instead of the paper's sampling (--no-do-sample)")
    ev.add_argument("--batch-size", dest="answer_batch_size", type=int, default=None,
                    help="the same as --answer-batch-size")
    titles = {"episode": "episode settings (EpisodeConfig; a recipe's episode section)",
              "fast_weights": "inner loop (FastWeightConfig; a recipe's inner_loop section)",
              "methods_settings": "baselines (MethodSettings)"}
    for name, prefix in EVAL_SECTIONS:
        value = getattr(shown, name)
        _add_dataclass_args(ev.add_argument_group(titles[name]), type(value), prefix=prefix, skip=SET_BY_METHODS,
                            given_only=True, shown=value, choices=choices)


def _eval_config(args):
    """EvalConfig from `tmem-rl eval` flags, on top of a recipe's settings when --recipe is given."""
    from tmem_rl.evaluation.harness import EvalConfig

    own = _given(args, EvalConfig, skip=tuple(name for name, _ in EVAL_SECTIONS))
    if args.recipe:
        from tmem_rl.recipes import eval_config, load_recipe

        recipe = load_recipe(args.recipe)
        env, env_kwargs = own.pop("env", None), own.pop("env_kwargs", None)
        config = eval_config(recipe, **own)
        if env and env != recipe.env.name:  # another environment: none of the recipe's env settings
            config = dataclasses.replace(config, env=env, env_kwargs=env_kwargs or {}, split=own.get("split", "all"))
        elif env_kwargs:
            config = dataclasses.replace(config, env_kwargs={**config.env_kwargs, **env_kwargs})
    else:
        config = EvalConfig(**own)
    nested = {name: dataclasses.replace(getattr(config, name), **_given(args, type(getattr(config, name)), prefix))
              for name, prefix in EVAL_SECTIONS}
    return dataclasses.replace(config, **nested)


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
    from tmem_rl.errors import InputError, RunError

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
    except RunError as err:  # the run stopped for a reason outside its input: 1, which a launcher restarts
        if flags.debug:
            traceback.print_exc()
        print(f"tmem-rl: error: {err}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand and flag of `tmem-rl`."""
    parser = argparse.ArgumentParser(prog="tmem-rl", description="RL for LLM agents with fast-weight memory")
    parser.add_argument("--debug", action="store_true",
                        help="with an error's one-line message, print its full traceback (for a plugin that fails "
                             "to import: the import's)")
    sub = parser.add_subparsers(dest="command", required=True)

    from tmem_rl.demo import DemoConfig

    demo = sub.add_parser("demo", help="TMEM vs no memory on the facts environment with the default model")
    _add_dataclass_args(demo, DemoConfig)
    ev = sub.add_parser("eval", help="run memory methods side by side on a benchmark; JSONL + summary + table + chart",
                        description="The defaults shown are EvalConfig's; with --recipe, the recipe's settings (model, "
                                    "environment, held-out split, inner loop, episode section and sampling) replace "
                                    "them, and flags given still win.")
    _add_eval_args(ev)
    train = sub.add_parser("train", help="train with a YAML recipe (GRPO); key=value overrides after the recipe")
    train.add_argument("recipe", help="a YAML recipe, e.g. recipes/quickstart_cpu.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. outer_loop.max_steps=2")
    again = train.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in outer_loop.output_dir from its newest good checkpoint; "
                            "--resume auto: continue it if there is one, else start (for a job that restarts)")
    again.add_argument("--resume-auto", action="store_true", help=argparse.SUPPRESS)  # what --resume auto becomes
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
    status = sub.add_parser("status", help="where each rank of a training run is (its heartbeat) and which has "
                                           "gone quiet")
    status.add_argument("run", help="the run's outer_loop.output_dir")
    status.add_argument("--quiet-after", type=float, default=300.0, metavar="SECONDS",
                        help="flag a rank whose last heartbeat is older than this (default 300: above a healthy "
                             "phase of the CPU recipes; a GPU run's steps are shorter)")
    serve = sub.add_parser("serve-retriever", help="serve BM25 search over a JSONL corpus with the Search-R1 "
                                                   "retrieval protocol (POST /retrieve)")
    serve.add_argument("--corpus", required=True, help='a JSONL file of {"id", "contents"} lines')
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000, help="the port to listen on (0: a free one)")
    serve.add_argument("--topk", type=int, default=3, help="passages per query when a request gives no topk")
    return parser


def _demo(args) -> int:
    from tmem_rl.demo import DemoConfig, format_table, run_demo

    config = DemoConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)})
    summary = run_demo(config)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    print()
    print(format_table(summary))
    print(f"\ntrajectories and summary written to {config.out}/")
    return 0


def _eval(args) -> int:
    from tmem_rl.errors import InputError
    from tmem_rl.evaluation.harness import run_eval

    try:
        config = _eval_config(args)
    except InputError:
        raise
    except (TypeError, ValueError) as err:  # a settings class refused a flag's value
        raise InputError(f"tmem-rl eval: {err}") from err
    run_eval(config)
    print((Path(config.out) / "summary.md").read_text().rstrip())
    print(f"\nrecords, summary.json, summary.md and f1_by_category.png written to {config.out}/")
    return 0


def _train(args) -> int:
    from tmem_rl.errors import InputError
    from tmem_rl.recipes import load_recipe, run_recipe

    allowed, overrides = args.allow_recipe_change, args.overrides
    if allowed and not (args.resume or args.resume_auto):
        raise InputError("--allow-recipe-change applies only with --resume: it names recipe keys a resumed run "
                         "may change")
    resume = "auto" if args.resume_auto else args.resume
    history = run_recipe(load_recipe(args.recipe, overrides), resume=resume, overwrite=args.overwrite,
                         allow_recipe_change=allowed)
    if history:
        print(json.dumps({k: float(f"{v:.4g}") for k, v in history[-1].items()}, indent=2))
    return 0


def _export(args) -> int:
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
    if not args.verify:
        return 0
    verdict = "ok" if result["verified"] else "FAILED"
    print(f"verify: max abs logit diff {result['max_logit_diff']:.3g}, fast-weight A diff "
          f"{result['max_init_diff']:.3g} (tolerance {result['tolerance']:.3g}; the checkpoint's fp32 "
          f"rounding noise {result['noise']:.3g}): {verdict}")
    return 0 if result["verified"] else 1


def _envs(args) -> int:
    _print_envs()
    return 0


def _convert(args) -> int:
    from tmem_rl.models import DEFAULT_MODEL, resolve_model_path

    print(resolve_model_path(args.name or DEFAULT_MODEL))
    return 0


def _status(args) -> int:
    from tmem_rl.trainers.cluster import status

    table, flagged = status(args.run, args.quiet_after)
    print(table)
    if flagged:
        print(f"\nranks {', '.join(map(str, flagged))} quiet for over {args.quiet_after:g} s; a rank behind the "
              f"others is what they wait for (docs/launching.md: when a job hangs)")
    return 1 if flagged else 0


def _serve_retriever(args) -> int:
    from tmem_rl.errors import InputError
    from tmem_rl.retrieval.corpus import CorpusIndex
    from tmem_rl.retrieval.server import MAX_TOPK, RetrievalServer

    if not 0 <= args.port <= 65535:
        raise InputError(f"serve-retriever: --port must be between 0 and 65535, got {args.port}")
    if not 1 <= args.topk <= MAX_TOPK:
        raise InputError(f"serve-retriever: --topk must be between 1 and {MAX_TOPK}, got {args.topk}")
    started = time.perf_counter()
    index = CorpusIndex.from_jsonl(args.corpus)
    try:
        server = RetrievalServer(index, args.host, args.port, default_topk=args.topk)
    except (OSError, UnicodeError) as err:  # a port in use, a host that does not resolve
        raise InputError(f"serve-retriever: cannot listen on {args.host}:{args.port} ({err.strerror or err})") from err
    print(f"serving {len(index)} passages of {args.corpus} at {server.url} (index built in "
          f"{time.perf_counter() - started:.1f} s); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


COMMANDS = {"demo": _demo, "eval": _eval, "train": _train, "export": _export, "envs": _envs, "convert": _convert,
            "status": _status, "serve-retriever": _serve_retriever}


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # `--resume auto` (a value) and `--resume` (a switch before the recipe's path) both parse: the pair becomes one
    # flag.
    for i, word in enumerate(argv[:-1]):
        if word == "--resume" and argv[i + 1] == "auto":
            argv[i:i + 2] = ["--resume-auto"]
            break
    argv = ["--resume-auto" if word == "--resume=auto" else word for word in argv]
    args, extra = parser.parse_known_args(argv)
    if args.command == "train":  # overrides may also come after a flag: train r.yaml --resume a.b=1
        args.overrides += [a for a in extra if "=" in a and not a.startswith("-")]
        extra = [a for a in extra if a not in args.overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
