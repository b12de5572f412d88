"""Typed YAML recipes for `tmem-rl train`.

A recipe has the sections model / env / inner_loop / episode / outer_loop; each maps onto a config dataclass, and
every key is checked against the dataclass field's type. Errors name the file and the dotted key. Command-line
overrides use the same dotted keys: `outer_loop.learning_rate=1e-5 env.kwargs.num_facts=3`. A `reward_funcs`
section adds reward functions by import path ("package.module:function"), weighed in outer_loop.reward_weights.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import typing
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import yaml

from tmem_rl.config_types import type_name, value_fits
from tmem_rl.errors import InputError
from tmem_rl.memory import FastWeightConfig
from tmem_rl.models import DEFAULT_MODEL
from tmem_rl.episode import EpisodeConfig
from tmem_rl.trainers.grpo import GRPOConfig, GRPOTrainer
from tmem_rl.trainers.ppo import PPOConfig, PPOTrainer


class RecipeError(InputError):
    pass


DTYPES = ("float32", "bfloat16", "float16")
# "module:function", each part dotted identifiers: what an import and attribute lookups can resolve.
_FUNCTION_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


@dataclass
class ModelSection:
    name: str = DEFAULT_MODEL
    """Known short name, HF folder or hub id."""
    dtype: str = "float32"
    """float32 | bfloat16 | float16. Full fine-tuning wants float32 master weights with
    outer_loop.mixed_precision: bf16; bfloat16 suits LoRA slow weights and evaluation."""

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


@dataclass
class EnvSection:
    name: str = "facts"
    """A registered environment (`tmem-rl envs list`): a built-in one (facts, dialogues, locomo, longmemeval,
    context_learning, search, hotpotqa, dataset) or one a plugin package adds."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Passed to the environment's constructor."""
    heldout_fraction: float = 0.0
    """Share of tasks kept out of training for `tmem-rl eval --split heldout` (0: train on every task)."""
    split_seed: int = 0
    """Seeds the train / held-out partition (tmem_rl.envs.split)."""
    curriculum: list[dict[str, Any]] = field(default_factory=list)
    """Training stages before the environment as `kwargs` sets it, e.g. shorter streams first: [{until_step: 4,
    kwargs: {num_distractors: 1}}, {until_step: 8, kwargs: {num_distractors: 2}}] trains steps 1-4 and 5-8 on
    `kwargs` updated with each stage's, the rest on `kwargs`. Evaluation always uses `kwargs`."""

    def __post_init__(self):
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction!r}")
        previous = 0
        for i, stage in enumerate(self.curriculum):
            where = f"curriculum[{i}]"
            if not isinstance(stage, dict) or set(stage) != {"until_step", "kwargs"}:
                raise ValueError(f"{where}: expected {{until_step: N, kwargs: {{...}}}}, got {stage!r}")
            until = stage["until_step"]
            if isinstance(until, bool) or not isinstance(until, int) or until <= previous:
                raise ValueError(f"{where}.until_step: expected an integer above {previous} (stages in order), "
                                 f"got {until!r}")
            if not isinstance(stage["kwargs"], dict):
                raise ValueError(f"{where}.kwargs: expected a mapping of environment settings, got "
                                 f"{stage['kwargs']!r}")
            previous = until

    def make(self, split: str = "train", kwargs: dict[str, Any] | None = None):
        """The environment (with `kwargs` in place of the section's), cut to one side of the partition when a share
        is held out."""
        from tmem_rl.envs import make_env
        from tmem_rl.envs.split import split_env

        env = make_env(self.name, **(self.kwargs if kwargs is None else kwargs))
        if not self.heldout_fraction:
            return env
        return split_env(env, split, self.heldout_fraction, self.split_seed)

    def curriculum_envs(self, split: str = "train") -> list[tuple[int, Any]]:
        """(until_step, environment) of each curriculum stage, in order."""
        return [(stage["until_step"], self.make(split, {**self.kwargs, **stage["kwargs"]}))
                for stage in self.curriculum]


@dataclass
class TrainRecipe:
    algorithm: str = "grpo"
    """grpo | ppo: the outer-loop trainer, and which settings the outer_loop section takes."""
    model: ModelSection = field(default_factory=ModelSection)
    """The policy: its slow weights are what the outer loop trains."""
    env: EnvSection = field(default_factory=EnvSection)
    """The environment the episodes run in, and the share of its tasks held out of training."""
    inner_loop: FastWeightConfig = field(default_factory=FastWeightConfig)
    """The fast weights and their inner update (the paper's settings by default)."""
    episode: EpisodeConfig = field(default_factory=EpisodeConfig)
    """How an episode reads, extracts and answers. Training always samples, with outer_loop's temperature, top_p
    and top_k in place of these, and caps every generation budget at outer_loop.max_completion_length."""
    outer_loop: GRPOConfig = field(default_factory=GRPOConfig)
    """GRPOConfig, or PPOConfig when algorithm is ppo."""
    reward_funcs: dict[str, str] = field(default_factory=dict)
    """Reward name -> "package.module:function", called as fn(prompts, completions, trajectories) -> one float
    per rollout; outer_loop.reward_weights weighs them by name."""


ALGORITHMS = {"grpo": (GRPOConfig, GRPOTrainer), "ppo": (PPOConfig, PPOTrainer)}


def _build(cls, data: Any, where: str, path: str):
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: '{where}' must be a mapping of settings, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else key
        if key not in fields:
            from tmem_rl.errors import did_you_mean

            close = did_you_mean(key, fields, f"{where}." if where else "")
            raise RecipeError(f"{path}: unknown key {dotted!r}{close}; known keys: {', '.join(fields)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, dotted, path)
            continue
        if isinstance(value, str) and not value_fits(value, hint) and value_fits(0.5, hint):
            # PyYAML reads 1e-5 (no dot) as a string; accept it where a float is expected.
            try:
                value = float(value)
            except ValueError:
                pass
        if not value_fits(value, hint):
            expected = type_name(hint)
            raise RecipeError(f"{path}: '{dotted}' must be {expected}, got {value!r} ({type(value).__name__})")
        kwargs[key] = tuple(value) if typing.get_origin(hint) is tuple else value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{path}: section '{where or 'top level'}': {err}") from err


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _apply_override(data: dict, override: str, path: str) -> None:
    if "=" not in override:
        raise RecipeError(f"override {override!r}: expected key=value, e.g. outer_loop.max_steps=10")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise RecipeError(f"override {override!r}: expected a dotted key like outer_loop.max_steps before '='")
    try:
        value = yaml.safe_load(raw)
    except (yaml.YAMLError, RecursionError, ValueError) as err:
        raise RecipeError(f"override {override!r}: the value is not valid YAML ({_one_line(err)[:200]})") from err
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"{path}: override '{key}': '{part}' is not a section")
    node[parts[-1]] = value


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> TrainRecipe:
    from tmem_rl.envs import printable

    source, path = Path(path), printable(path)  # read the path as given; name it printably
    try:
        text = source.read_bytes().decode("utf-8")
        data = yaml.safe_load(text)
    except RecursionError as err:
        raise RecipeError(f"{path}: YAML nested too deeply to read") from err
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {_one_line(err)}") from err
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from err
    except FileNotFoundError as err:
        raise RecipeError(f"{path}: no such recipe file") from err
    except (OSError, ValueError) as err:  # a folder, no permission, a path the OS cannot take, a huge integer
        detail = getattr(err, "strerror", None) or " ".join(str(err).split())[:120]
        raise RecipeError(f"{path}: cannot read the recipe ({detail})") from err
    if data is None:
        raise RecipeError(f"{path}: the recipe is empty; expected sections such as model, env, inner_loop, "
                          "episode, outer_loop (see recipes/quickstart_cpu.yaml)")
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    for override in overrides or []:
        _apply_override(data, override, path)
    algorithm = data.get("algorithm", "grpo")
    if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
        raise RecipeError(f"{path}: 'algorithm' must be one of {tuple(ALGORITHMS)}, got {algorithm!r}")
    outer = data.pop("outer_loop", {})
    reward_funcs = _reward_funcs(data.pop("reward_funcs", None) or {}, path)  # an empty section reads as None
    recipe = _build(TrainRecipe, data, "", path)
    recipe.outer_loop = _build(ALGORITHMS[algorithm][0], outer, "outer_loop", path)
    unweighed = [name for name in reward_funcs if name not in recipe.outer_loop.reward_weights]
    if unweighed:  # it would never be called: most likely a name that differs between the two sections
        raise RecipeError(f"{path}: 'reward_funcs.{printable(unweighed[0])}' has no weight in "
                          f"'outer_loop.reward_weights' (weighed: {', '.join(recipe.outer_loop.reward_weights)})")
    recipe.reward_funcs = reward_funcs
    return recipe


def _reward_funcs(data: Any, path: str) -> dict[str, str]:
    """The reward_funcs section with every path checked for its form; resolving one imports user code, which
    waits for run_recipe."""
    from tmem_rl.envs import printable

    if not isinstance(data, dict):
        raise RecipeError(f"{path}: 'reward_funcs' must be a mapping of reward name -> \"package.module:function\", "
                          f"got {type(data).__name__}")
    for name, target in data.items():
        if not isinstance(name, str):
            raise RecipeError(f"{path}: 'reward_funcs': a reward name must be text, got {name!r}")
        if name == "outcome":
            raise RecipeError(f"{path}: 'reward_funcs.outcome': outcome is the environment's own score; give the "
                              "function another name")
        if not isinstance(target, str) or not _FUNCTION_PATH.fullmatch(target):
            raise RecipeError(f"{path}: 'reward_funcs.{printable(name)}' must be \"package.module:function\", "
                              f"got {target!r}")
    return dict(data)


def resolve_reward_funcs(reward_funcs: dict[str, str]) -> dict[str, Callable[..., list[float]]]:
    """{name: the function at "module:function"}; one that cannot be imported, found or called is a RecipeError
    naming `reward_funcs.NAME` and the path."""
    funcs = {}
    for name, target in reward_funcs.items():
        where = f"reward_funcs.{name}: {target!r}"
        module_name, _, attribute = target.partition(":")
        try:
            value = importlib.import_module(module_name)
        except Exception as err:  # not installed, or its own import failed: either way the run cannot start
            raise RecipeError(f"{where}: cannot import module {module_name!r} "
                              f"({type(err).__name__}: {_one_line(err)})") from err
        for part in attribute.split("."):
            if not hasattr(value, part):
                raise RecipeError(f"{where}: module {module_name!r} has no attribute {attribute!r}")
            value = getattr(value, part)
        if not callable(value):
            raise RecipeError(f"{where}: {attribute!r} is not callable (it is a {type(value).__name__}); expected "
                              "a function fn(prompts, completions, trajectories) -> list of floats")
        funcs[name] = value
    return funcs


def run_recipe(recipe: TrainRecipe, resume: bool | str = False, overwrite: bool = False,
               allow_recipe_change: list[str] | tuple[str, ...] = ()) -> list[dict]:
    """Train with `recipe`; `resume` continues the run in its output_dir, which must have been trained with the same
    recipe but for bookkeeping keys and the dotted keys in `allow_recipe_change` (see GRPOTrainer.train); "auto":
    continue it if there is one, else start."""
    import torch

    from tmem_rl.cpu import configure_cpu_threads

    configure_cpu_threads()
    from accelerate import PartialState

    from tmem_rl.models import load_policy
    from tmem_rl.trainers.cluster import init_process_group

    env = recipe.env.make("train")  # before the model: a typo in env.kwargs is reported in a second
    curriculum = recipe.env.curriculum_envs("train")  # and in a stage's kwargs
    reward_funcs = resolve_reward_funcs(recipe.reward_funcs)  # likewise a wrong reward function path
    # Straight onto this process's accelerator: the fast weights' SVD and every copy then start there too.
    # cpu= as the trainer's Accelerator will say: a state first made without it stays single-process on CPU.
    # The process group starts here, with the recipe's collective timeout (the trainer's Accelerator reuses it).
    timeout_s = recipe.outer_loop.collective_timeout_s
    init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout_s)
    device = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=timeout_s)).device
    model, tokenizer = load_policy(recipe.model.name, dtype=recipe.model.torch_dtype, device=device)
    trainer_cls = ALGORITHMS[recipe.algorithm][1]
    trainer = trainer_cls(recipe.outer_loop, model, tokenizer, env, recipe.inner_loop, recipe.episode,
                          reward_funcs=reward_funcs, curriculum=curriculum,
                          run_info={"base_model": recipe.model.name, "recipe": dataclasses.asdict(recipe)})
    return trainer.train(resume=resume, overwrite=overwrite, allow_recipe_change=allow_recipe_change)


def eval_config(recipe: TrainRecipe, out: str, **overrides):
    """Evaluation settings matching a recipe: its model, environment and held-out side, inner loop, and its episode
    section sampled as training samples (outer_loop's temperature, top_p, top_k; `overrides` win)."""
    from tmem_rl.episode import EpisodeConfig
    from tmem_rl.evaluation.harness import SET_BY_METHODS, EvalConfig

    outer = recipe.outer_loop
    episode = dataclasses.replace(recipe.episode, do_sample=True, temperature=outer.temperature, top_p=outer.top_p,
                                  top_k=outer.top_k,
                                  **{name: getattr(EpisodeConfig(), name) for name in SET_BY_METHODS})
    fields = dict(
        out=out, env=recipe.env.name, env_kwargs=dict(recipe.env.kwargs), model=recipe.model.name,
        split="heldout" if recipe.env.heldout_fraction else "all", heldout_fraction=recipe.env.heldout_fraction,
        split_seed=recipe.env.split_seed, fast_weights=recipe.inner_loop, episode=episode,
    )
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return EvalConfig(**fields)
