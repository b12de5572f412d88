"""The trained extractor as an agent: read text, remember it in fast weights, answer questions.

    agent = TMEMAgent.from_pretrained("smollm2-135m-instruct", episode={"l_max": 256})
    agent.read(text)                      # extracts QA pairs and absorbs them whenever the context passes L_max
    agent.answer("Where does Maya live?")  # base + fast weights, with the working context in the prompt

The agent is one rollout of the episode runner (`tmem_rl.episode.EpisodeRunner`, one fast-weight slot) that never
ends: every `read` continues the same episode, so fast weights, pairs and the working context accumulate until
`reset`. This module also owns the settings file an exported model folder carries (`fast_weights.json`).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file

from tmem_rl.config_types import type_name, value_fits
from tmem_rl.cpu import configure_cpu_threads
from tmem_rl.envs import read_json_file
from tmem_rl.envs.base import Environment, Task
from tmem_rl.errors import InputError
from tmem_rl.memory.config import FastWeightConfig
from tmem_rl.memory.fast_weights import FastWeights
from tmem_rl.checkpoint_reader import load_trained_policy
from tmem_rl.models import DEFAULT_MODEL, check_safetensors, load_policy
from tmem_rl.records import QAPair
from tmem_rl.episode import EpisodeConfig, EpisodeRunner, Extraction

SETTINGS_FILE = "fast_weights.json"
SETTINGS_FORMAT = "tmem_rl.agent/1"
AGENT_EPISODE_FIELDS = (
    "l_max", "max_pairs", "max_extraction_tokens", "max_answer_tokens", "extraction_retries", "prefill", "examples",
    "grounding", "retry_temperature", "decoder", "chat_template_kwargs", "do_sample", "temperature", "top_p", "top_k",
    "seed", "supervision", "summary_tokens", "stop_extractions",
)
"""The EpisodeConfig fields that shape how the agent reads and answers; the rest belong to training."""

MEMORY_FILE = "memory.json"
MEMORY_FORMAT = "tmem_rl.memory/1"
FAST_WEIGHTS_DIR = "fast_weights"
# What the saved tensors mean: a memory taken under other values of these cannot be loaded. The learning settings
# (lr, epochs, ...) only govern absorbs still to come, so they may differ.
MEMORY_DEFINING_FIELDS = ("rank", "target_modules", "num_layers", "layers", "init", "train_a", "seed")


# ---- the settings file -------------------------------------------------------------------------------------------


def write_agent_settings(folder: str | Path, fast_config: FastWeightConfig, episode_config: EpisodeConfig,
                         **info: Any) -> Path:
    """Write `folder/fast_weights.json`: the fast-weight and episode settings an agent runs with, plus `info`
    (e.g. base_model, steps). Returns the file's path."""
    clashes = {"format", "fast_weights", "episode"} & set(info)
    if clashes:
        raise ValueError(f"write_agent_settings: info keys {sorted(clashes)} are the file's own")
    episode = dataclasses.asdict(episode_config)
    settings = {
        "format": SETTINGS_FORMAT,
        "fast_weights": fast_config.to_dict(),
        "episode": {name: episode[name] for name in AGENT_EPISODE_FIELDS},
        **info,
    }
    path = Path(folder) / SETTINGS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n")
    return path


def read_agent_settings(folder: str | Path) -> tuple[FastWeightConfig, EpisodeConfig, dict[str, Any]]:
    """(fast-weight settings, episode settings, the other top-level entries) from `folder/fast_weights.json`.
    Settings the file leaves out take their defaults; anything unreadable is an InputError naming the key."""
    path = Path(folder) / SETTINGS_FILE
    settings = read_json_file(path, "the agent's settings (a JSON object)")
    if not isinstance(settings, dict):
        raise InputError(f"agent settings {path}: expected a JSON object, got {type(settings).__name__}")
    if settings.get("format") != SETTINGS_FORMAT:
        raise InputError(f"agent settings {path}: format {settings.get('format')!r}, expected {SETTINGS_FORMAT!r}")
    fast = _config_from(path, "fast_weights", settings.get("fast_weights", {}), FastWeightConfig,
                        [f.name for f in dataclasses.fields(FastWeightConfig)])
    episode = _config_from(path, "episode", settings.get("episode", {}), EpisodeConfig, AGENT_EPISODE_FIELDS)
    info = {k: v for k, v in settings.items() if k not in ("format", "fast_weights", "episode")}
    return fast, episode, info


def _config_from(path: Path, section: str, values: Any, cls: type, allowed: Sequence[str]):
    if not isinstance(values, dict):
        raise InputError(f"agent settings {path}: {section!r} must be an object, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key not in allowed:
            raise InputError(f"agent settings {path}: unknown key {section}.{key} (known: {', '.join(allowed)})")
        if not value_fits(value, hints[key]):
            raise InputError(f"agent settings {path}: {section}.{key}={value!r}, expected {type_name(hints[key])}")
    try:
        return cls(**values)
    except ValueError as err:  # the config's own range checks
        raise InputError(f"agent settings {path}: {section}: {err}") from None


# ---- the agent -----------------------------------------------------------------------------------------------------


class _TextStream(Environment):
    """The agent's environment: each `read` is a task whose chunks are the text given. Nothing is scored."""

    name = "text"

    def __len__(self) -> int:
        return 0

    def task(self, index: int) -> Task:
        raise IndexError("the agent's text stream holds no stored tasks")

    def score(self, task: Task, prediction: str) -> dict[str, float]:
        return {"reward": 0.0}


def _text_task(chunks: Sequence[str], question: str = "") -> Task:
    # An empty question is the extraction prompt's own case: pairs about what someone may ask later.
    return Task(task_id="agent", question=question, chunks=tuple(chunks), answers=())


@dataclass
class ReadReport:
    """What one `read` did."""

    pairs: list[QAPair]
    """Pairs absorbed during this read, in order."""
    extractions: list[Extraction] = field(default_factory=list)
    """The runner's record of each extraction (attempts, parse errors, the inner update)."""
    chunks: int = 0
    """Chunks read."""
    context_tokens: int = 0
    """Working context left unabsorbed at the end (it stays in the answer prompt)."""


class TMEMAgent:
    """An extraction policy run as a reading agent with fast-weight memory (one slot of `FastWeights`)."""

    def __init__(self, model, tokenizer, fast_config: FastWeightConfig | None = None,
                 episode_config: EpisodeConfig | None = None, init_from: str | Path | None = None):
        """`init_from`: a folder holding the fast weights' A as training saved it (`FastWeights(init_from=...)`)."""
        episode_config = episode_config or EpisodeConfig()
        if episode_config.memory != "fast_weights" or episode_config.extractor != "policy":
            raise ValueError("TMEMAgent: the agent writes and absorbs its own pairs; expected memory='fast_weights' "
                             f"and extractor='policy', got {episode_config.memory!r} and {episode_config.extractor!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.fast = FastWeights(model, 1, fast_config or FastWeightConfig(), init_from=init_from)
        self.runner = EpisodeRunner(model, tokenizer, self.fast, episode_config)
        self.stream = _TextStream()
        self.reset()

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_MODEL, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, *, fast_weights: FastWeightConfig | dict | None = None,
                        episode: EpisodeConfig | dict | None = None, base: str | None = None) -> "TMEMAgent":
        """An agent from an exported folder, an HF folder or hub id, or a known short name.

        A folder holding a PEFT adapter (`adapter_config.json`) is merged into `base` when given (a known name, HF
        folder or hub id: a local copy of the base, say), else into the base its `fast_weights.json` names (the
        exact weights training ran on), else the one its `adapter_config.json` names. Settings come from the
        folder's `fast_weights.json` when it has one, else the defaults. `fast_weights` / `episode` override them:
        a dict replaces the named fields, a config object replaces the whole section. The fast weights' A is the
        one training used, saved next to the settings, unless an override changes what defines it (rank, layers,
        init, ...).
        Default device: CUDA when available; default dtype: float32.
        """
        configure_cpu_threads()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or torch.float32
        folder = Path(name_or_path).expanduser()
        is_folder = folder.is_dir()
        # Settings first: a bad file or override fails before the model is loaded.
        fast_config, episode_config, info = FastWeightConfig(), EpisodeConfig(), {}
        exported = is_folder and (folder / SETTINGS_FILE).exists()
        if exported:
            fast_config, episode_config, info = read_agent_settings(folder)
        saved_fast = fast_config
        fast_config = _overridden(fast_config, fast_weights, "fast_weights")
        episode_config = _overridden(episode_config, episode, "episode")
        same_a = all(getattr(saved_fast, f) == getattr(fast_config, f) for f in MEMORY_DEFINING_FIELDS)
        if is_folder:  # a truncated copy fails here, naming the file, not deep inside a loader
            check_safetensors(folder)
        if is_folder and any((folder / sub / "adapter_config.json").exists() for sub in ("", "adapter")):
            named = info.get("base_model") if isinstance(info.get("base_model"), str) else ""
            source = info.get("base_model_source")
            if isinstance(source, str) and Path(source).is_dir():  # the very folder training read, when still here
                named = source
            model, tokenizer = load_trained_policy(folder, base=base or named, dtype=dtype, device=device)
        else:
            if base:
                raise InputError(f"TMEMAgent.from_pretrained({name_or_path!r}, base={base!r}): base is for an "
                                 "adapter folder, and this is not one")
            model, tokenizer = load_policy(name_or_path, dtype=dtype, device=device)
        return cls(model, tokenizer, fast_config, episode_config, init_from=folder if exported and same_a else None)

    # ---- state --------------------------------------------------------------------------------------------------

    @property
    def pairs(self) -> list[QAPair]:
        """Every pair absorbed since the last reset, in order."""
        return list(self.episode.rollouts[0].pairs)

    @property
    def context(self) -> list[str]:
        """The working context: chunks read since the last extraction."""
        return list(self.episode.rollouts[0].pieces)

    @property
    def config(self) -> EpisodeConfig:
        return self.runner.config

    def reset(self) -> None:
        """Back to the base model: no fast weights, no pairs, an empty working context."""
        # A fresh episode that reads nothing: the runner resets the slot and reseeds its sampling.
        self.episode = self.runner.read(self.stream, [_text_task(())])

    # ---- acting -------------------------------------------------------------------------------------------------

    def read(self, text: str | Sequence[str], question: str | None = None) -> ReadReport:
        """Read text into memory: a string is split into lines (blank ones dropped, lines over L_max tokens cut);
        a list of strings is read as those chunks. Whenever the working context passes L_max tokens the agent
        writes QA pairs about it (useful for `question` when given), absorbs them and clears the context."""
        chunks = self.split(text) if isinstance(text, str) else list(text)
        if not all(isinstance(c, str) for c in chunks):
            raise TypeError("TMEMAgent.read: expected a string or a list of strings")
        already = len(self.episode.rollouts[0].pairs)
        self.runner.read(self.stream, [_text_task(chunks, question or "")], episode=self.episode)
        trajectory = self.episode.trajectories[0]
        report = ReadReport(pairs=self.episode.rollouts[0].pairs[already:], extractions=list(trajectory.extractions),
                            chunks=len(chunks), context_tokens=self.episode.rollouts[0].tokens)
        # The agent reads without end: the prompts and per-version snapshots kept for the outer loop would only
        # grow. Only the live snapshot is needed to go on.
        trajectory.extractions.clear()
        trajectory.segments.clear()
        self._keep_live_snapshot()
        return report

    def answer(self, question: str | Sequence[str]) -> str | list[str]:
        """Answer with base + fast weights and the working context in the prompt; a list of questions is answered
        in one batch, an answer per question."""
        questions = [question] if isinstance(question, str) else list(question)
        if not all(isinstance(q, str) for q in questions):
            raise TypeError("TMEMAgent.answer: expected a question or a list of questions (strings)")
        if not questions:
            return []
        tasks = [_text_task((), q) for q in questions]
        context = self.episode.rollouts[0].window()
        answers = [out.text for out in self.runner.answer(self.stream, [0] * len(tasks), tasks,
                                                          [context] * len(tasks))]
        return answers[0] if isinstance(question, str) else answers

    def split(self, text: str) -> list[str]:
        """The chunks `read` makes of a string: its non-blank lines, each cut into pieces of at most L_max
        tokens, so that no single chunk overshoots the budget by more than itself."""
        window = self.config.budget(self.stream)
        chunks = []
        for line in text.splitlines():
            if not line.strip():
                continue
            encoded = self.tokenizer(line, add_special_tokens=False, return_offsets_mapping=True)
            offsets = encoded["offset_mapping"]
            if len(offsets) <= window:
                chunks.append(line)
                continue
            starts = [0] + [offsets[i][0] for i in range(window, len(offsets), window)]
            chunks += [line[a:b] for a, b in zip(starts, [*starts[1:], len(line)])]
        return chunks

    # ---- memory on disk -----------------------------------------------------------------------------------------

    def save_memory(self, path: str | Path, overwrite: bool = False) -> Path:
        """Save what this conversation left: fast weights (safetensors, `FastWeights.save`), absorbed pairs and the
        working context (JSON), in one folder. Returns the folder.

        A folder that already holds anything (another memory, other files) is refused unless `overwrite`: then the
        memory's own files are replaced and any other file is left as it is."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise InputError(f"memory {path}: a file, expected a folder")
        held = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        if held and not overwrite:
            what = "another memory" if MEMORY_FILE in held else f"{len(held)} other file(s) ({', '.join(held[:3])})"
            raise InputError(f"memory {path}: already holds {what}; choose another folder or pass overwrite=True")
        self.fast.save(path / FAST_WEIGHTS_DIR)
        memory = {
            "format": MEMORY_FORMAT,
            "pairs": [p.to_dict() for p in self.episode.rollouts[0].pairs],
            "context": self.episode.rollouts[0].pieces,
            "context_tokens": self.episode.rollouts[0].tokens,
        }
        (path / MEMORY_FILE).write_text(json.dumps(memory, indent=2, ensure_ascii=False) + "\n")
        return path

    def load_memory(self, path: str | Path) -> None:
        """Replace this agent's memory with one `save_memory` wrote; it must come from the same fast-weight
        settings and a model of the same shape (else InputError)."""
        path = Path(path)
        memory = self._read_json(path / MEMORY_FILE)
        if memory.get("format") != MEMORY_FORMAT:
            raise InputError(f"memory {path / MEMORY_FILE}: format {memory.get('format')!r}, expected "
                             f"{MEMORY_FORMAT!r}")
        meta_path = path / FAST_WEIGHTS_DIR / "fast_weights.json"
        meta = self._read_json(meta_path)
        self._check_settings(meta_path, meta)
        tensors_path = path / FAST_WEIGHTS_DIR / "fast_weights.safetensors"
        if not tensors_path.exists():
            raise InputError(f"memory {tensors_path}: no such file")
        check_safetensors(tensors_path.parent)
        tensors = load_file(str(tensors_path))
        self._check_shapes(tensors_path, tensors)
        try:
            pairs = [QAPair(p["instruction"], p["output"]) for p in memory["pairs"]]
            context, context_tokens = list(memory["context"]), int(memory["context_tokens"])
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"memory {path / MEMORY_FILE}: expected pairs, context and context_tokens ({err!r})")
        self.reset()
        self.fast.restore({key: tensors[key] for key in self.fast.trainable()}, [0])
        self.fast.versions[0] = int(meta["versions"][0])
        self.fast.absorbed_answers[0] = [p.output for p in pairs]
        rollout = self.episode.rollouts[0]
        rollout.pairs, rollout.pieces, rollout.tokens = pairs, context, context_tokens
        self._keep_live_snapshot()

    def _check_settings(self, meta_path: Path, meta: dict) -> None:
        try:
            saved = FastWeightConfig(**meta["config"])
            slots, versions = meta["num_slots"], meta["versions"]
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"memory {meta_path}: not a fast-weight settings file ({err!r})") from None
        if slots != 1 or not isinstance(versions, list) or len(versions) != 1:
            raise InputError(f"memory {meta_path}: {slots} fast-weight slots, an agent's memory has 1")
        ours = self.fast.config
        differing = [f"{name}={getattr(saved, name)!r} (this agent: {getattr(ours, name)!r})"
                     for name in MEMORY_DEFINING_FIELDS if getattr(saved, name) != getattr(ours, name)]
        if differing:
            raise InputError(f"memory {meta_path}: saved with other fast-weight settings: {', '.join(differing)}")

    def _check_shapes(self, tensors_path: Path, tensors: dict[str, torch.Tensor]) -> None:
        expected = {f"A.{n}": a.shape for n, a in self.fast.A.items()}
        expected.update({f"B.{n}": b.shape for n, b in self.fast.B.items()})
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise InputError(f"memory {tensors_path}: made for another model: it lacks {missing[:3]} and has "
                             f"{unexpected[:3]} that this model does not adapt")
        for key, shape in expected.items():
            if tensors[key].shape != shape:
                raise InputError(f"memory {tensors_path}: made for another model shape: {key} is "
                                 f"{tuple(tensors[key].shape)}, this model's is {tuple(shape)}")

    @staticmethod
    def _read_json(path: Path) -> dict:
        value = read_json_file(path, "a saved agent memory (a JSON object)")
        if not isinstance(value, dict):
            raise InputError(f"memory {path}: expected a JSON object")
        return value

    def _keep_live_snapshot(self) -> None:
        # Extraction segments are stamped with the snapshot of the version live when they were generated; the
        # runner names it, and nothing older is needed.
        self.episode.snapshots.clear()
        if self.fast.versions[0]:
            self.episode.snapshots[self.runner.snapshot_key(0)] = self.fast.snapshot([0])


def _overridden(config, override, section: str):
    """`config` with `override` applied: None keeps it, a config object replaces it, a dict replaces fields."""
    if override is None:
        return config
    if isinstance(override, type(config)):
        return override
    if not isinstance(override, dict):
        raise TypeError(f"{section}: expected a {type(config).__name__} or a dict of its fields, "
                        f"got {type(override).__name__}")
    known = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(override) - known)
    if unknown:
        raise InputError(f"{section}: unknown settings {unknown} (known: {', '.join(sorted(known))})")
    return dataclasses.replace(config, **override)
