"""Checkpoint folders of `tmem-rl train`: a manifest written last, finding the newest good one, pruning, the
metrics log cut back to a checkpoint's step on resume, and the recipe a resume must match.

A checkpoint is `<output_dir>/checkpoint-<step>/`. Its `manifest.json` lists every other file with its size and
SHA-256 and is written after all of them, so a folder without it, or whose files no longer match it (a partial
copy, a corrupt disk, a kill in the middle of a save), is recognised as bad and the previous one is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Iterable

from tmem_rl.errors import InputError

MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"
RECIPE = "recipe.yaml"
"""The run's recipe in its output folder, written at every start: the text to rerun, with its hash."""
FREE_KEYS = ("outer_loop.output_dir", "outer_loop.save_steps", "outer_loop.save_total_limit",
             "outer_loop.logging_steps", "outer_loop.report_to")
"""Recipe keys a resume may change unasked: where and how often the run writes checkpoints and logs (output_dir: a
run folder moved or copied), never what it computes."""
TRACKER_RUN = "tmem_rl"
"""The trackers' run name: TensorBoard writes under <output_dir>/<TRACKER_RUN>."""
_NAME = re.compile(r"checkpoint-(\d+)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, step: int) -> None:
    files = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    staging = folder / (MANIFEST + ".tmp")
    staging.write_text(json.dumps({"step": step, "files": files}, indent=1))
    os.replace(staging, folder / MANIFEST)


def checkpoint_problem(folder: Path) -> str | None:
    """Why this checkpoint folder cannot be trusted, or None when every file matches its manifest."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"no {MANIFEST} (the save did not finish)"
    try:
        files = json.loads(manifest.read_bytes())["files"]
        entries = [(rel, int(meta["size"]), str(meta["sha256"])) for rel, meta in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is unreadable"
    for rel, size, sha in entries:
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != size:
            return f"{rel} has {path.stat().st_size} bytes, the manifest says {size}"
        if _sha256(path) != sha:
            return f"{rel} does not match its SHA-256 in {MANIFEST}"
    return None


def checkpoint_step(folder: Path) -> int:
    return int(_NAME.fullmatch(folder.name).group(1))


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """Every `checkpoint-<step>` folder, oldest first (staging folders of unfinished saves excluded)."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and _NAME.fullmatch(p.name)]
    return sorted(found, key=checkpoint_step)


def latest_good_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint whose files match its manifest; each newer bad one gets a warning naming it."""
    for folder in reversed(checkpoint_folders(output_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        warnings.warn(f"checkpoint {folder} is unusable: {problem}; falling back to the previous one", stacklevel=2)
    return None


def verified_checkpoint(folder: str | Path) -> Path:
    """A checkpoint the user named: its files must match its manifest."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"checkpoint {folder}: no such folder")
    problem = checkpoint_problem(folder)
    if problem is not None:
        raise InputError(f"checkpoint {folder}: {problem}")
    return folder


def prune_checkpoints(output_dir: str | Path, keep: int, step: int) -> list[Path]:
    """Delete the oldest checkpoints up to `step` so that `keep` of them remain; step's own is never deleted."""
    folders = [f for f in checkpoint_folders(output_dir) if checkpoint_step(f) <= step]
    doomed = folders[: max(len(folders) - max(keep, 1), 0)]
    for folder in doomed:
        shutil.rmtree(folder, ignore_errors=True)
    return doomed


def set_aside_newer(output_dir: str | Path, step: int) -> list[Path]:
    """Rename the checkpoints newer than `step` (the bad ones a resume passed over) to `<name>.bad`: kept for
    inspection, but never resumed from, pruned, or overwritten by the resumed run's saves."""
    moved = []
    for folder in checkpoint_folders(output_dir):
        if checkpoint_step(folder) > step:
            target = folder.with_name(folder.name + ".bad")
            shutil.rmtree(target, ignore_errors=True)
            folder.rename(target)
            moved.append(target)
    return moved


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the log's records of steps <= `step` (what the resumed run has done); drop later ones and torn lines.
    Returns how many lines were dropped."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            keep = int(record["step"]) <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        staging = path.with_name(path.name + ".tmp")
        staging.write_bytes(b"".join(line + b"\n" for line in kept))
        os.replace(staging, path)
    return dropped


def existing_run(output_dir: str | Path) -> list[str]:
    """What in `output_dir` belongs to an earlier run (checkpoints and the metrics log)."""
    out = Path(output_dir)
    names = [p.name for p in checkpoint_folders(out)]
    return names + ([METRICS] if (out / METRICS).exists() else [])


def remove_run(output_dir: str | Path) -> None:
    """Delete an earlier run's checkpoints, unfinished saves, metrics log, reward curve and tracker logs."""
    out = Path(output_dir)
    for path in out.glob("checkpoint-*"):
        shutil.rmtree(path, ignore_errors=True)
    for name in (METRICS, "reward_curve.png"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / TRACKER_RUN, ignore_errors=True)


def recipe_hash(record: dict) -> str:
    """SHA-256 of a recipe record's canonical JSON: equal settings, equal hash, whatever their order."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def write_recipe(output_dir: str | Path, record: dict) -> Path:
    """<output_dir>/recipe.yaml: the recipe as run (overrides applied, defaults filled in), after a comment line
    with its hash (the recipe_sha256 of the run's checkpoints)."""
    import yaml

    path = Path(output_dir) / RECIPE
    staging = path.with_name(RECIPE + ".tmp")
    staging.write_text(f"# This run's recipe: overrides applied, defaults filled in. sha256: {recipe_hash(record)}\n"
                       + yaml.safe_dump(record, sort_keys=False))
    os.replace(staging, path)
    return path


def _leaves(record: dict, prefix: str = "") -> dict:
    """{dotted key: value} of every setting; a mapping's keys are settings too (env.kwargs.num_facts)."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _common_leaves(saved: dict, current: dict) -> tuple[dict, dict]:
    common = saved.keys() & current.keys()
    return _leaves({k: saved[k] for k in common}), _leaves({k: current[k] for k in common})


def new_settings(saved: dict, current: dict, defaults: dict) -> list[str]:
    """Dotted keys the saved record lacks and the current one holds at their default: settings this version added
    since the checkpoint was written, not changes the user made."""
    old, new = _common_leaves(saved, current)
    default = _leaves(defaults)
    return sorted(k for k in new.keys() - old.keys() if k in default and new[k] == default[k])


def recipe_changes(saved: dict, current: dict, allowed: Iterable[str] = (),
                   defaults: dict | None = None) -> list[tuple[str, str, str]]:
    """(dotted key, saved value, current value) of each setting that differs, bar FREE_KEYS, the keys in `allowed`
    (a section's name allows everything in it) and the new_settings against `defaults`. Only the sections both
    records have are compared."""
    allowed = (*FREE_KEYS, *allowed)
    old, new = _common_leaves(saved, current)
    added = set(new_settings(saved, current, defaults or {}))
    unset = object()
    changes = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key, unset), new.get(key, unset)
        if a != b and key not in added and not any(key == k or key.startswith(k + ".") for k in allowed):
            changes.append((key, "unset" if a is unset else repr(a)[:60], "unset" if b is unset else repr(b)[:60]))
    return changes


def check_allowed_keys(allowed: Iterable[str], saved: dict, current: dict) -> None:
    """Every key of --allow-recipe-change names a setting or section of either record; a typo would otherwise leave
    the refusal standing with no word why."""
    from tmem_rl.errors import did_you_mean

    known = set()
    for key in {**_leaves(saved), **_leaves(current)}:
        parts = key.split(".")
        known.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    for key in allowed:
        if key not in known:
            raise InputError(f"--allow-recipe-change {key}: no such recipe key{did_you_mean(key, sorted(known))}")
