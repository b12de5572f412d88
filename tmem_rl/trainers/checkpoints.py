"""Checkpoint folders of `tmem-rl train`: a manifest written last, finding the newest good one, pruning, the
metrics log cut back to a checkpoint's step on resume, the recipe a resume must match, and a trainer's own
checkpoint I/O (`TrainerCheckpoints`).

A checkpoint is `<output_dir>/checkpoint-<step>/`. Its `manifest.json` lists every other file with its size and
SHA-256 and is written after all of them, so a folder without it, or whose files no longer match it (a partial
copy, a corrupt disk, a kill in the middle of a save), is recognised as bad and the previous one is used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Iterable

from accelerate.utils import DistributedType

from tmem_rl.config_types import dotted_leaves
from tmem_rl.episode.config import EpisodeConfig
from tmem_rl.errors import InputError
from tmem_rl.memory.config import FastWeightConfig
from tmem_rl.trainers.cluster import HEARTBEATS

MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"
RECIPE = "recipe.yaml"
"""The run's recipe in its output folder, written at every start: the text to rerun, with its hash."""
FREE_KEYS = ("outer_loop.output_dir", "outer_loop.save_steps", "outer_loop.save_total_limit",
             "outer_loop.logging_steps", "outer_loop.report_to", "outer_loop.collective_timeout_s",
             "episode.temperature", "episode.top_p", "episode.top_k")
"""Recipe keys a resume may change unasked: where and how often the run writes checkpoints and logs (output_dir: a
run folder moved or copied), how long a collective may wait, and the episode's sampling, which training replaces
with outer_loop's; never what it computes."""
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
    """Delete an earlier run's checkpoints, unfinished saves, metrics log, reward curve, tracker logs and
    heartbeats."""
    out = Path(output_dir)
    for path in out.glob("checkpoint-*"):
        shutil.rmtree(path, ignore_errors=True)
    for name in (METRICS, "reward_curve.png"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / TRACKER_RUN, ignore_errors=True)
    shutil.rmtree(out / HEARTBEATS, ignore_errors=True)


def recipe_record_of(run_info: dict, outer_loop, inner_loop: FastWeightConfig, episode: EpisodeConfig) -> dict:
    """The recipe `run_info` carries, else the trainer's own settings, under the recipe's section names; JSON types,
    as run.json holds them."""
    record = run_info.get("recipe") or {"outer_loop": asdict(outer_loop), "inner_loop": inner_loop.to_dict(),
                                        "episode": asdict(episode)}
    return json.loads(json.dumps(record, default=str))


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


def _common_leaves(saved: dict, current: dict) -> tuple[dict, dict]:
    common = saved.keys() & current.keys()
    return dotted_leaves({k: saved[k] for k in common}), dotted_leaves({k: current[k] for k in common})


def new_settings(saved: dict, current: dict, defaults: dict) -> list[str]:
    """Dotted keys the saved record lacks and the current one holds at their default: settings this version added
    since the checkpoint was written, not changes the user made."""
    old, new = _common_leaves(saved, current)
    default = dotted_leaves(defaults)
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
    for key in {**dotted_leaves(saved), **dotted_leaves(current)}:
        parts = key.split(".")
        known.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    for key in allowed:
        if key not in known:
            raise InputError(f"--allow-recipe-change {key}: no such recipe key{did_you_mean(key, sorted(known))}")


class TrainerCheckpoints:
    """A trainer's checkpoint I/O: save, find, check and load. Mixed into `GRPOTrainer`, whose accelerator,
    config, fast weights, runner, policy, step and history it reads."""

    def save_checkpoint(self) -> Path:
        """Model (only the trained parameters under LoRA), optimizer, scheduler, RNG states, the step (the data
        position), what export needs (run.json, the fast weights' A, the model config and tokenizer under hf/) and,
        last, a manifest of every file's size and hash. Written to a temporary folder and renamed into place."""
        acc = self.accelerator
        final = Path(self.config.output_dir) / f"checkpoint-{self.step}"
        staging = final.with_name(final.name + ".tmp")
        if acc.is_main_process and staging.exists():
            shutil.rmtree(staging)
        acc.wait_for_everyone()
        acc.save_state(str(staging))
        acc.wait_for_everyone()  # every process has written its shard and RNG state before the rename
        if acc.is_main_process:
            (staging / "trainer_state.json").write_text(json.dumps({"step": self.step, "history": self.history}))
            (staging / "run.json").write_text(json.dumps(self.run_record(), indent=2, default=str))
            # The A the fast weights were built with, from the initial weights: eval, export and the agent would
            # otherwise recompute it from the trained ones.
            self.fast.save_init(staging)
            self.policy.config.save_pretrained(staging / "hf")
            self.tokenizer.save_pretrained(staging / "hf")
            if self.config.use_peft:
                self.policy.save_pretrained(staging / "adapter")
            write_manifest(staging, self.step)
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)
            if self.config.save_total_limit:
                prune_checkpoints(self.config.output_dir, self.config.save_total_limit, self.step)
        acc.wait_for_everyone()
        return final

    def run_record(self) -> dict:
        """The settings a checkpoint was trained with, for export and for running it as an agent."""
        base = self.run_info.get("base_model") or getattr(self.policy.config, "name_or_path", "") or ""
        return {**self.run_info, "base_model": base, "algorithm": type(self.config).__name__,
                "distributed_type": str(self.accelerator.distributed_type),
                "num_processes": self.accelerator.num_processes,
                "step": self.step, "use_peft": self.config.use_peft, "outer_loop": asdict(self.config),
                "recipe_sha256": recipe_hash(self.recipe_record()),
                "fast_weights": self.fast_config.to_dict(),
                # What the runner ran with (budgets capped, the outer loop's sampling), which export and the agent
                # take; it is reseeded every step, so the seed recorded is the one given.
                "episode": asdict(dataclasses.replace(self.runner.config, seed=self.episode_config.seed)),
                "episode_as_given": asdict(self.episode_config)}

    def latest_checkpoint(self) -> Path | None:
        """The newest checkpoint that passes its manifest, chosen on the main process for all of them."""
        found = str(latest_good_checkpoint(self.config.output_dir) or "") if self.accelerator.is_main_process else ""
        found = self.main_process_value(found)
        return Path(found) if found else None

    def main_process_value(self, value):
        """`value` as the main process has it, on every process: a decision about the shared output folder that
        every process must take alike (a file may appear between two processes' looks)."""
        from accelerate.utils import broadcast_object_list

        box = [value]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(box)
        return box[0]

    def load_checkpoint(self, path: Path | None = None, allow_recipe_change: Iterable[str] = ()) -> None:
        """Load `path`, else the newest good checkpoint; checkpoints that are all unusable are an error rather than
        a silent restart, and so is one trained with another recipe (dotted keys other than FREE_KEYS and
        `allow_recipe_change`)."""
        path = path or self.latest_checkpoint()
        if path is None:
            found = [p.name for p in checkpoint_folders(self.config.output_dir)]
            if found:
                raise InputError(f"{self.config.output_dir}: no usable checkpoint to resume from ({', '.join(found)} "
                                 "failed their manifest, see the warnings); pass --overwrite to start over")
            if self.accelerator.is_main_process:
                warnings.warn(f"--resume: {self.config.output_dir} holds no checkpoint to resume from; starting a "
                              "fresh run", stacklevel=3)
            return
        run = self._check_recipe(path, allow_recipe_change)
        self._note_world_size(path, run.get("num_processes"))
        if self._trainable_only():
            self._check_trainable_keys(path)
        try:
            state = json.loads((path / "trainer_state.json").read_text())
            step, history = int(state["step"]), list(state["history"])
            self.accelerator.load_state(str(path))
        except Exception as err:  # a checkpoint of another model or recipe: name it, not the library's internals
            detail = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
            raise InputError(f"checkpoint {path} does not fit this run ({type(err).__name__}: {detail})") from err
        self.step = step
        self.history = history

    def _note_world_size(self, path: Path, saved: int | None) -> None:
        """A checkpoint resumes at any number of processes (docs/launching.md: resharding) but under DeepSpeed: the
        weights and the optimizer are whole in it, and each step's questions are drawn from the seed and the step,
        then shared out anew. What differs from a resume at the same count is said once: the step's questions go to
        other processes, and the random state of processes the checkpoint did not have starts from the seed."""
        now = self.accelerator.num_processes
        if saved is not None and saved != now and self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise InputError(f"{path} was saved by {saved} DeepSpeed process(es); this launch has {now}: ZeRO keeps "
                             f"each process's part of the optimizer state apart, so resume it with {saved} (or "
                             f"convert it with DeepSpeed's universal checkpoint first)")
        if saved is not None and saved != now and self.accelerator.is_main_process:
            warnings.warn(f"{path} was saved by {saved} process(es) and resumes on {now}: each process now takes "
                          f"{self.config.questions_per_step // now} of a step's {self.config.questions_per_step} "
                          f"questions (docs/launching.md: resharding)", stacklevel=3)

    def recipe_record(self) -> dict:
        """What a resume must match, under the recipe's section names: the recipe when run_info carries one, else
        the trainer's own settings. JSON types, as run.json holds them."""
        return recipe_record_of(self.run_info, self.config, self.fast_config, self.episode_config)

    def _check_recipe(self, path: Path, allowed: Iterable[str]) -> dict:
        """A resume continues the run the checkpoint belongs to: a changed setting (a lora_r whose shapes would
        not load, an environment whose questions differ, a max_steps that stretches the schedule) must be named.
        Returns the checkpoint's run.json."""
        try:
            run = json.loads((path / "run.json").read_text())
            saved = run.get("recipe") or {"outer_loop": run["outer_loop"], "inner_loop": run["fast_weights"],
                                          "episode": run["episode_as_given"]}  # a run without a recipe
        except (OSError, ValueError, KeyError, AttributeError) as err:
            raise InputError(f"checkpoint {path}: run.json does not hold the settings it was trained with "
                             f"({type(err).__name__}: {err})") from err
        current, allowed = self.recipe_record(), list(allowed)
        check_allowed_keys(allowed, saved, current)
        defaults = json.loads(json.dumps({"outer_loop": asdict(type(self.config)()),
                                          "inner_loop": FastWeightConfig().to_dict(),
                                          "episode": asdict(EpisodeConfig())}, default=str))
        added = new_settings(saved, current, defaults)
        if added and self.accelerator.is_main_process:
            warnings.warn(f"checkpoint {path} predates the settings {', '.join(added)}: resuming with their "
                          "defaults", stacklevel=3)
        changes = recipe_changes(saved, current, allowed, defaults)
        if changes:
            shown = ", ".join(f"{key} ({old} -> {new})" for key, old, new in changes[:8])
            more = f" and {len(changes) - 8} more" if len(changes) > 8 else ""
            raise InputError(f"checkpoint {path} was trained with another recipe: {shown}{more}; pass "
                             f"--allow-recipe-change {','.join(key for key, _, _ in changes)} to resume with these "
                             "changes, or --overwrite to start over")
        return run

    def _trainable_only(self) -> bool:
        """Checkpoints hold only the trained parameters (LoRA runs outside DeepSpeed / FSDP)."""
        return self.config.use_peft and self.accelerator.distributed_type not in (DistributedType.DEEPSPEED,
                                                                                  DistributedType.FSDP)

    def _check_trainable_keys(self, path: Path) -> None:
        """Loading only the trained parameters is not strict: a checkpoint of another adapter would load nothing
        and raise nothing. Its names must be exactly this run's trainable parameters."""
        from safetensors import safe_open

        weights = path / "model.safetensors"
        if not weights.is_file():
            raise InputError(f"checkpoint {path}: no model.safetensors (the trained parameters)")
        with safe_open(str(weights), framework="pt") as f:
            saved = {_own_name(key) for key in f.keys()}
        expected = {name for name, p in self.policy.named_parameters() if p.requires_grad}
        if saved != expected:
            raise InputError(f"checkpoint {path} does not fit this run: its trained parameters differ (missing "
                             f"{sorted(expected - saved)[:2]}, unexpected {sorted(saved - expected)[:2]})")

    def _weights_to_save(self, models, weights, output_dir) -> None:
        """Accelerate save hook: each model's state dict under its own names, not its wrapper's; under LoRA only
        the trained parameters (adapter, value head), the frozen base being the recipe's model."""
        for i, model in enumerate(models):
            model = self.accelerator.unwrap_model(model)
            state = self.accelerator.get_state_dict(model)
            if self._trainable_only():
                trainable = {name for name, p in model.named_parameters() if p.requires_grad}
                state = {k: v for k, v in state.items() if k in trainable}
            weights[i] = state

    def _load_weights(self, models, input_dir) -> None:
        """Accelerate load hook: the weights into the unwrapped model, by the names _weights_to_save gave them
        (all of them unless only the trained parameters were saved: _check_trainable_keys compared those)."""
        from safetensors.torch import load_file

        for i, model in enumerate(models):
            model = self.accelerator.unwrap_model(model)
            name = "model.safetensors" if i == 0 else f"model_{i}.safetensors"
            state = {_own_name(k): v for k, v in load_file(str(Path(input_dir) / name)).items()}
            missing, unexpected = model.load_state_dict(state, strict=False)
            # Safetensors keeps one of each set of tied weights (embeddings and LM head): the others are loaded.
            tensors = model.state_dict()
            loaded = {tensors[k].data_ptr() for k in state}
            missing = [k for k in missing if tensors[k].data_ptr() not in loaded]
            if unexpected or (missing and not self._trainable_only()):
                raise RuntimeError(f"{name}: missing {missing[:2]}, unexpected {unexpected[:2]}")
        models.clear()  # loaded: Accelerate would load them again under the wrapper's names


def _own_name(key: str) -> str:
    """A weight's name in the model itself: checkpoints written before names were saved that way carry DDP's."""
    return key.removeprefix("module.")
