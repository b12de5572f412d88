"""The `--quick` flag every benchmark takes: a smoke run of the same code path at small sizes."""

from __future__ import annotations

import argparse


def parse_args(parser: argparse.ArgumentParser, quick_defaults: dict, argv: list[str] | None = None):
    """Parses argv; with --quick, `quick_defaults` replace the parser's defaults, so flags given explicitly still
    win. `args.quick` tells the script which run it is (every script reports it in its JSON)."""
    parser.add_argument("--quick", action="store_true",
                        help="small shapes, few steps: the same code path in about a minute (run_all.py --quick)")
    known, _ = parser.parse_known_args(argv)
    if known.quick:
        parser.set_defaults(**quick_defaults)
    return parser.parse_args(argv)
