"""Extractors trained with tmem_rl that ship in the package: PEFT adapters of the default model (float16), each with
its model card (`README.md`: the commands that reproduced it, the commit, the seed, held-out scores), the agent
settings it was trained with (`fast_weights.json`) and `shipped.json`, which names the environment and held-out
split it was scored on.

    from tmem_rl import TMEMAgent
    from tmem_rl.extractors import extractor_path
    agent = TMEMAgent.from_pretrained(extractor_path("facts"))

`tmem-rl demo` runs a shipped extractor beside the base model on its held-out episodes.
"""

from __future__ import annotations

import json
from pathlib import Path

from tmem_rl.errors import InputError

SHIPPED_DIR = Path(__file__).resolve().parent / "assets" / "extractors"
SHIPPED_FILE = "shipped.json"


def shipped_extractors() -> list[str]:
    """The names of the extractors in the package."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / SHIPPED_FILE).is_file())


def extractor_path(name: str) -> Path:
    """The folder of shipped extractor `name`: loadable with `TMEMAgent.from_pretrained`, `tmem-rl eval
    --checkpoint` and plain PEFT."""
    folder = SHIPPED_DIR / name
    if not (folder / SHIPPED_FILE).is_file():
        known = ", ".join(shipped_extractors()) or "none"
        raise InputError(f"extractor {name!r}: not shipped in this package (shipped: {known})")
    return folder


def extractor_info(name: str) -> dict:
    """`shipped.json` of extractor `name`: {"env": {"name", "kwargs", "heldout_fraction", "split_seed"},
    "heldout": its scores and the base model's on that split, "commands", "commit", "seed"}."""
    return json.loads((extractor_path(name) / SHIPPED_FILE).read_text())
