"""Fast-weight-aware GRPO.

One step: sample questions; run `num_generations` TMEM rollouts of each (the episode runner: extraction, inner
update, answer); score them; group-relative advantages; then the clipped policy-gradient loss on every token the
policy generated -- extraction and answer tokens alike -- each re-scored under the fast-weight snapshot that was
live when it was generated (the inner update is a stop-gradient). Environment text gets no loss.

Distribution is Accelerate's: the same loop runs single-process, under `accelerate launch` / `torchrun` (DDP,
gloo on CPU or NCCL on GPU); each process runs its share of the step's questions.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
import warnings
from contextlib import nullcontext
from datetime import timedelta
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from accelerate import Accelerator
from accelerate.scheduler import AcceleratedScheduler
from accelerate.utils import DistributedType, InitProcessGroupKwargs, set_seed
from transformers import get_scheduler
from trl.models.utils import unwrap_model_for_generation

from tmem_rl.actions import closing_tags
from tmem_rl.envs.base import Environment
from tmem_rl.errors import InputError
from tmem_rl.logprobs import (
    SegmentRows,
    TokenScores,
    load_snapshots,
    score_completions,
    segment_rows,
)
from tmem_rl.memory import FastWeightConfig, FastWeights
from tmem_rl.memory.layers import layers_below_fast_weights
from tmem_rl.episode import SEGMENT_KINDS, EpisodeBatch, EpisodeConfig, EpisodeRunner, Segment, Trajectory
from tmem_rl.trainers.cluster import (RankMonitor, code_version, model_fingerprint, preflight,
                                      tokenizer_fingerprint)
from tmem_rl.trainers.checkpoints import (METRICS, TRACKER_RUN, TrainerCheckpoints, existing_run, recipe_record_of,
                                          remove_run, set_aside_newer, truncate_metrics, write_recipe)

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
RewardFunc = Callable[..., list[float]]


@dataclass
class GRPOConfig:
    output_dir: str = "runs/grpo"
    """Checkpoints, logs and the reward curve go here."""
    max_steps: int = 200
    """Steps to run. A step generates rollouts of questions_per_step questions, then takes num_iterations x
    num_mini_batches optimizer steps on them; the schedule runs over all of those optimizer steps."""
    questions_per_step: int = 8
    """Distinct questions per step, over all processes (must divide evenly among them)."""
    num_generations: int = 8
    """Rollouts per question: the GRPO group."""
    num_iterations: int = 1
    """Passes over each batch of rollouts (mu; TRL's num_iterations). 1: fully on-policy, the recorded old
    log-probs are the current ones; more: an expensive rollout teaches several times, and the clip engages."""
    num_mini_batches: int = 1
    """Optimizer steps per pass: each process's rollouts are split into this many mini-batches, whole rollouts
    each (verl's ppo_mini_batch_size, as a count)."""
    learning_rate: float = 1e-6
    """Learning rate of the slow-weight optimizer (the fast weights' is inner_loop.lr)."""
    optim: str = "adamw_torch"
    """adamw_torch | sgd (plain SGD: lighter, and exactly linear in the gradient)."""
    lr_scheduler_type: str = "constant"
    """A transformers scheduler name (constant, constant_with_warmup, linear, cosine, ...) over max_steps."""
    warmup_steps: int = 0
    """Warm-up steps of the schedule, counted in steps like max_steps; the constant schedule ignores them (use
    constant_with_warmup)."""
    weight_decay: float = 0.0
    """Weight decay of the slow-weight optimizer (AdamW's decoupled decay; SGD's L2 term)."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this before each optimizer step (0: no clipping). Under DeepSpeed the config
    file's gradient_clipping applies instead."""
    epsilon: float = 0.2
    """Lower clip range of the policy ratio."""
    epsilon_high: float | None = None
    """Upper clip range (None: same as epsilon)."""
    beta: float = 0.0
    """KL coefficient to the reference (initial) policy; 0 loads no reference."""
    loss_type: str = "dapo"
    """Token-level aggregation: grpo (per-rollout mean), bnpo (per-process token mean), dapo (global token mean),
    dr_grpo (sum / (rollouts * max_completion_length))."""
    scale_rewards: bool = True
    """Divide group-centred rewards by the group's std."""
    max_completion_length: int = 1024
    """Token budget of each generated segment: answer, extraction, action, summary (the paper's response
    budget); caps the episode's own budgets."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (replaces episode.temperature; retried extractions sample at
    episode.retry_temperature). Log-probs are taken at the temperature each segment was sampled at."""
    top_p: float = 1.0
    """Nucleus sampling of the rollouts (replaces episode.top_p; 1.0: no filtering)."""
    top_k: int = 0
    """Top-k sampling of the rollouts (replaces episode.top_k; 0: no filtering)."""
    micro_batch_size: int = 8
    """Generated segments per forward/backward pass."""
    shared_prompts: bool = True
    """Score segments with the same prompt together: micro-batches take them in turn, and within one, each prompt
    runs once per fast weights (the layers below the fast weights once per prompt text), its keys and values put
    in front of every completion (gradient included). A group's rollouts share the first extraction's prompt and
    each answer's text: the same loss and gradients for less work (docs/benchmarks.md)."""
    mixed_precision: str | None = None
    """no | bf16 | fp16: Accelerate's autocast over fp32 master weights (load the model in float32). None: what
    `accelerate launch` configured, else no."""
    answer_credit: str = "episode"
    """What an answer's tokens are credited with when an episode asks several questions (`Task.questions`).
    "episode": the episode's advantage, as every other token. "question": the group-relative advantage of that
    question's own score (the same question is asked of every rollout of a group): the other answers' scores do
    not depend on this answer, so leaving them out removes their noise from its gradient without biasing it."""
    segment_weights: dict[str, float] = field(default_factory=dict)
    """Loss weight per generated segment kind (extraction, action, answer, summary; 1.0 for those not named),
    multiplying the policy-gradient and KL terms of every token under loss_type (PPO's value loss is not
    weighed): a rollout's extraction tokens far outnumber its answer tokens (~60 to ~3 on `facts`), so under
    token-level aggregation the answers carry ~5% of the gradient unless weighed up."""
    reward_weights: dict[str, float] = field(default_factory=lambda: {"outcome": 1.0})
    """Weight per reward: "outcome" is the environment's score; others name functions passed to the trainer
    (their `prompts` and `completions` are each rollout's question and answer; an episode of several questions
    has every answer in `trajectories[i]["answered"]`)."""
    use_peft: bool = False
    """Train a LoRA adapter on the slow weights instead of all of them."""
    lora_r: int = 16
    """Rank of the slow-weight LoRA (use_peft only; the fast weights' rank is inner_loop.rank)."""
    lora_alpha: int = 32
    """Scale of the slow-weight LoRA: its delta is multiplied by lora_alpha / lora_r (use_peft only)."""
    lora_dropout: float = 0.0
    """Dropout on the slow-weight LoRA's input (use_peft only)."""
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Linear modules (by name) that get the slow-weight LoRA (use_peft only)."""
    logging_steps: int = 1
    """Send the metrics to the report_to trackers every this many steps (metrics.jsonl gets every step)."""
    save_steps: int = 50
    """Write a checkpoint every this many steps (0: none)."""
    save_total_limit: int | None = None
    """Keep only the newest this many checkpoints (None: keep all)."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Accelerate trackers for the metrics (tensorboard, wandb, ...; TensorBoard writes under
    <output_dir>/tmem_rl); []: none."""
    seed: int = 42
    """Seeds the run (Accelerate's set_seed), the questions each step draws, and each step's rollout sampling."""
    collective_timeout_s: float = 600.0
    """How long a process waits in a collective (the gradient all-reduce, a gather, the checkpoint barrier) for the
    others: a rank that died or hung fails the job within this, for its launcher to restart (gloo's own default is
    30 minutes, NCCL's 10). With gloo (CPUs) the process stops with a line naming its rank and phase; NCCL's
    watchdog ends the process itself. Set it above the longest wait a healthy step has (a rank that finishes its
    rollouts first waits in the update for the slowest)."""

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"GRPOConfig.loss_type={self.loss_type!r}: expected one of {LOSS_TYPES}")
        if self.optim not in ("adamw_torch", "sgd"):
            raise ValueError(f"GRPOConfig.optim={self.optim!r}: expected adamw_torch or sgd")
        if self.num_generations < 2:
            raise ValueError("GRPOConfig.num_generations must be >= 2: advantages are relative within a group")
        if self.questions_per_step < 1:
            raise ValueError(f"GRPOConfig.questions_per_step={self.questions_per_step}: expected at least 1")
        if self.mixed_precision not in (None, "no", "bf16", "fp16"):
            raise ValueError(f"GRPOConfig.mixed_precision={self.mixed_precision!r}: expected no, bf16 or fp16")
        for name in ("max_steps", "num_generations", "num_iterations", "num_mini_batches", "micro_batch_size",
                     "max_completion_length", "logging_steps", "collective_timeout_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"GRPOConfig.{name}={getattr(self, name)}: expected a positive number")
        if self.answer_credit not in ANSWER_CREDITS:
            raise ValueError(f"GRPOConfig.answer_credit={self.answer_credit!r}: expected one of {ANSWER_CREDITS}")
        unknown = [k for k in self.segment_weights if k not in SEGMENT_KINDS]
        if unknown or any(w < 0 for w in self.segment_weights.values()):
            raise ValueError(f"GRPOConfig.segment_weights={self.segment_weights!r}: expected non-negative weights of "
                             f"segment kinds {', '.join(SEGMENT_KINDS)}")
        if self.save_steps < 0:
            raise ValueError(f"GRPOConfig.save_steps={self.save_steps}: expected 0 (no checkpoints) or more")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"GRPOConfig.save_total_limit={self.save_total_limit}: expected None or at least 1")


@dataclass
class TrainingSegment:
    """One generated segment as the outer loop uses it: the rollout it belongs to and a target per token."""

    segment: Segment
    rollout: int  # index of its trajectory in this process's batch
    advantages: list[float] = field(default_factory=list)
    old_logprobs: list[float] | None = None  # the policy's before this step's first update (num_iterations or
    # num_mini_batches > 1); None: the loss's own detached log-probs (ratio 1)


ANSWER_CREDITS = ("episode", "question")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool) -> torch.Tensor:
    """[N] rewards, groups of `group_size` consecutive rollouts -> advantages."""
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(dim=1, keepdim=True) + 1e-4)
    return centred.reshape(-1)


def valid_extraction_reward(trajectories: list[dict], **_) -> list[float]:
    """Fraction of a rollout's extraction attempts that yielded at least one grounded pair (1.0 with none)."""
    out = []
    for traj in trajectories:
        attempts = [a for e in traj["extractions"] for a in e["supervision"]["attempts"]]
        out.append(sum(bool(a["pairs"]) for a in attempts) / len(attempts) if attempts else 1.0)
    return out


class GRPOTrainer(TrainerCheckpoints):
    segment_type: type[TrainingSegment] = TrainingSegment

    def __init__(
        self,
        config: GRPOConfig,
        model,
        tokenizer,
        env: Environment,
        fast_config: FastWeightConfig | None = None,
        episode_config: EpisodeConfig | None = None,
        reward_funcs: dict[str, RewardFunc] | None = None,
        accelerator: Accelerator | None = None,
        run_info: dict | None = None,
        curriculum: Sequence[tuple[int, Environment]] = (),
    ):
        """`run_info` (e.g. {"base_model": name, "recipe": {...}}) is saved with every checkpoint for export.
        `curriculum`: (until_step, environment) stages trained on before `env`, in order (see `env_at`)."""
        self.config = config
        self.run_info = dict(run_info or {})
        self.tokenizer = tokenizer
        self.env = self.final_env = env
        self.curriculum = list(curriculum)
        self.reward_funcs = {"valid_extraction": valid_extraction_reward, **(reward_funcs or {})}
        self.accelerator = accelerator or Accelerator(
            cpu=not torch.cuda.is_available(), mixed_precision=config.mixed_precision,
            log_with=config.report_to or None, project_dir=config.output_dir,
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=config.collective_timeout_s))])
        self.monitor = RankMonitor(config.output_dir, self.accelerator.process_index,
                                   self.accelerator.num_processes, config.collective_timeout_s)
        # Before any collective of the model's set-up (DDP broadcasts its weights): a mismatched launch is named
        # here instead of failing or hanging there.
        preflight(self.accelerator, lambda: {
            "tmem_rl": code_version(), "model": model_fingerprint(model), "tokenizer": tokenizer_fingerprint(tokenizer),
            "recipe": recipe_record_of(self.run_info, config, fast_config or FastWeightConfig(),
                                       episode_config or EpisodeConfig())})
        local_rollouts = self._check_settings()
        set_seed(config.seed)
        model, policy = self._setup_model(model, local_rollouts, fast_config or FastWeightConfig())
        optimizer, scheduler = self._setup_optimizer(policy)
        self._prepare(model, optimizer, scheduler)
        self.runner = self._setup_runner(episode_config or EpisodeConfig())
        self.step = 0
        self.history: list[dict] = []
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)

    def _check_settings(self) -> int:
        """Settings that cannot work together, refused before anything is built; the rollouts per process."""
        config, processes = self.config, self.accelerator.num_processes
        unknown = [k for k in config.reward_weights if k != "outcome" and k not in self.reward_funcs]
        if unknown:
            raise InputError(f"reward_weights names unknown reward functions {unknown}; "
                             f"available: outcome, {', '.join(self.reward_funcs)}")
        if config.questions_per_step % processes:
            raise InputError(f"questions_per_step={config.questions_per_step} does not divide among "
                             f"{processes} processes")
        local_rollouts = config.questions_per_step // processes * config.num_generations
        if config.num_mini_batches > local_rollouts:
            raise InputError(f"num_mini_batches={config.num_mini_batches} but each process has {local_rollouts} "
                             "rollouts per step: a mini-batch holds whole rollouts")
        for stage, stage_env in [*((f"curriculum stage {i} of ", e) for i, (_, e) in enumerate(self.curriculum)),
                                 ("", self.env)]:
            if config.questions_per_step > len(stage_env):
                raise InputError(f"questions_per_step={config.questions_per_step} but {stage}environment "
                                 f"{stage_env.name!r} has {len(stage_env)} tasks: every process must get its share "
                                 "of distinct questions")
        return local_rollouts

    def _setup_model(self, model, local_rollouts: int, fast_config: FastWeightConfig):
        """The slow weights (a LoRA on the model when use_peft), the fast weights of the rollouts and of the
        update's replay, the KL reference and the value head. Returns (model to prepare, unwrapped policy)."""
        config = self.config
        if config.use_peft:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                                                     lora_dropout=config.lora_dropout,
                                                     target_modules=config.lora_target_modules))
        policy = model
        self.fast_config = fast_config
        # Fast weights are built on the model before wrapping, so their SVD sees the initial weights and hooks sit
        # on the modules that every wrapper calls; they follow the model to whatever device `prepare` puts it on.
        self.fast = FastWeights(policy, local_rollouts, fast_config)
        self.replay = FastWeights(policy, max(config.micro_batch_size, 1), fast_config)
        self.reference = None
        if config.beta > 0 and not config.use_peft:
            import copy

            self.reference = copy.deepcopy(policy).eval().requires_grad_(False)
            self.reference_replay = FastWeights(self.reference, max(config.micro_batch_size, 1), fast_config)
        # Layers rows under any fast weights compute alike (None: every segment scored whole).
        self.shared_layers = layers_below_fast_weights(policy, fast_config) if config.shared_prompts else None
        self.reference_shared_layers = None
        if self.reference is not None and config.shared_prompts:
            self.reference_shared_layers = layers_below_fast_weights(self.reference, fast_config)
        self.value_head = self.make_value_head(policy)
        if self.value_head is not None:
            policy.value_head = self.value_head  # a submodule, so that wrappers (DDP) and checkpoints include it
        return model, policy

    def _setup_optimizer(self, policy):
        """The optimizer over the trainable parameters and its schedule, in optimizer steps."""
        config = self.config
        params = [p for p in policy.parameters() if p.requires_grad]
        low_precision = sorted({str(p.dtype) for p in params if p.dtype in (torch.bfloat16, torch.float16)})
        if low_precision and not config.use_peft:
            warnings.warn(
                f"full fine-tuning of {', '.join(low_precision)} weights: optimizer steps of lr "
                f"{config.learning_rate:g} mostly round away in {low_precision[0]}. Load the model in float32 "
                "(model.dtype: float32) and set outer_loop.mixed_precision: bf16 for fp32 master weights with bf16 "
                "compute.", stacklevel=3)
        if config.optim == "sgd":
            optimizer = torch.optim.SGD(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        else:
            optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        updates = self.updates_per_step
        scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=config.warmup_steps * updates,
                                  num_training_steps=config.max_steps * updates)
        return optimizer, scheduler

    def _prepare(self, model, optimizer, scheduler) -> None:
        """Model, optimizer and schedule through Accelerate (DDP, DeepSpeed or one process), checkpoints named as
        the model names its weights, and every fast-weight buffer on the model's device."""
        acc = self.accelerator
        self.model, self.optimizer, self.scheduler = acc.prepare(model, optimizer, scheduler)
        if isinstance(self.scheduler, AcceleratedScheduler):
            # Accelerate assumes per-process batches that grow with the process count, and steps a prepared
            # schedule num_processes times per optimizer step. Here every process holds its share of one global
            # batch: one optimizer step is one schedule step at any scale. (DeepSpeed's engine steps its own.)
            self.scheduler.split_batches = True
        if acc.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.FSDP):
            # Checkpoints name the weights as the model itself does, not as its wrapper (DDP's `module.`): a run
            # then resumes, and exports, at any process count. DeepSpeed and FSDP save their own engine state.
            acc.register_save_state_pre_hook(self._weights_to_save)
            acc.register_load_state_pre_hook(self._load_weights)
        self.policy = acc.unwrap_model(self.model)
        if self.reference is not None:
            self.reference.to(acc.device)
        # Fast weights follow their model on first use anyway; moving them now puts every buffer in place (and
        # any out-of-memory) before the first step rather than in the middle of one.
        for fast in (self.fast, self.replay, getattr(self, "reference_replay", None)):
            if fast is not None:
                fast.follow_model()

    def _setup_runner(self, given: EpisodeConfig) -> EpisodeRunner:
        """The episode runner with the trainer's sampling settings, on a copy: the caller's EpisodeConfig stays as
        it was given."""
        config = self.config
        if given.carry_fast_weights:  # a group's rollouts would start from different histories, never checkpointed
            raise InputError("episode.carry_fast_weights is for evaluation (tmem-rl eval --continual); training "
                             "starts every episode from the base model")
        self.episode_config = given
        episode_config = dataclasses.replace(
            # Old log-probs come from a pass per micro-batch in the update, and only when they are used. The budget
            # is resolved against the environment here, so that the run records (and an export keeps) the one used.
            given, l_max=given.budget(self.env), do_sample=True, record_logprobs=False,
            temperature=config.temperature, top_p=config.top_p,
            top_k=config.top_k, max_answer_tokens=min(given.max_answer_tokens, config.max_completion_length),
            max_extraction_tokens=min(given.max_extraction_tokens, config.max_completion_length),
            max_action_tokens=min(given.max_action_tokens, config.max_completion_length),
            summary_tokens=min(given.summary_tokens, config.max_completion_length),
        )
        return EpisodeRunner(self.policy, self.tokenizer, self.fast, episode_config)

    def make_value_head(self, policy):
        """GRPO needs no critic."""
        return None

    # ---- data ----------------------------------------------------------------------------------------------

    def curriculum_stage(self, step: int) -> int:
        """The curriculum stage of step `step` (0-based): the first whose until_step is above it; len(curriculum)
        for the recipe's own environment."""
        return next((i for i, (until, _) in enumerate(self.curriculum) if step < until), len(self.curriculum))

    def env_at(self, step: int) -> Environment:
        """The environment step `step` (0-based) trains on: a pure function of the step, so a resumed run trains on
        the same stages."""
        stage = self.curriculum_stage(step)
        return self.curriculum[stage][1] if stage < len(self.curriculum) else self.final_env

    def local_questions(self, step: int) -> list[int]:
        """This process's share of the step's questions: a pure function of (seed, step), so resuming needs only
        the step number."""
        rng = random.Random(f"{self.config.seed}:{step}")
        indices = rng.sample(range(len(self.env)), min(self.config.questions_per_step, len(self.env)))
        return indices[self.accelerator.process_index :: self.accelerator.num_processes]

    def generate_rollouts(self, step: int) -> EpisodeBatch:
        self.env = self.env_at(step)
        tasks = [self.env.task(i) for i in self.local_questions(step) for _ in range(self.config.num_generations)]
        self.runner.config.seed = self.config.seed * 100_003 + step * 101 + self.accelerator.process_index
        self.model.eval()
        # Under ZeRO-3 this gathers the full weights once for the whole rollout, so processes can generate,
        # extract and absorb independently (different numbers of forward passes) without collectives.
        with unwrap_model_for_generation(self.model, self.accelerator):
            batch = self.runner.run(self.env, tasks)
        if self.runner.sampler.static_decoder is not None:  # its KV caches are not needed while the policy trains
            self.runner.sampler.static_decoder.release()
        return batch

    def rewards(self, trajectories: list[Trajectory]) -> tuple[torch.Tensor, dict[str, float]]:
        records = [t.to_dict() for t in trajectories]
        total = torch.zeros(len(records))
        parts = {}
        for name, weight in self.config.reward_weights.items():
            if name == "outcome":
                values = [t.reward for t in trajectories]
            else:
                values = self.reward_funcs[name](prompts=[t.question for t in trajectories],
                                                 completions=[t.prediction for t in trajectories],
                                                 trajectories=records)
            total += weight * torch.tensor(values, dtype=torch.float32)
            parts[f"reward/{name}"] = sum(values) / len(values)
        return total, parts

    # ---- the update ------------------------------------------------------------------------------------------

    @property
    def updates_per_step(self) -> int:
        """Optimizer steps taken on each batch of rollouts."""
        return self.config.num_iterations * self.config.num_mini_batches

    def train_step(self, batch: EpisodeBatch) -> dict[str, float]:
        """num_iterations passes over this process's rollouts (groups of num_generations consecutive trajectories),
        each pass num_mini_batches optimizer steps."""
        cfg = self.config
        started = time.perf_counter()
        trajectories = batch.trajectories
        rewards, reward_parts = self.rewards(trajectories)
        segments = [
            self.segment_type(seg, i)
            for i, traj in enumerate(trajectories)
            for seg in traj.segments
            if seg.completion_ids
        ]
        self._score_before_update(segments, batch.snapshots)
        self.assign_advantages(segments, rewards, batch.snapshots, trajectories)

        self.model.train()
        keys = ("loss", "clipped", "clipped_low", "clipped_high", "kl", "entropy", "tokens")
        sums = dict.fromkeys(keys, 0.0)
        grad_norms, per_iteration = [], {}
        for iteration in range(1, cfg.num_iterations + 1):
            passed = {**dict.fromkeys(keys, 0.0), "log_ratio_max": 0.0}
            for rollouts, mini_batch in self._mini_batches(segments, len(trajectories)):
                grad_norms.append(self._update(rollouts, mini_batch, batch.snapshots, passed))
            for key in keys:
                sums[key] += passed[key]
            if cfg.num_iterations > 1:  # how far each pass has moved off the policy that sampled
                per_iteration[f"clip_fraction/iteration_{iteration}"] = passed["clipped"] / max(passed["tokens"], 1.0)
                per_iteration[f"log_ratio_max/iteration_{iteration}"] = passed["log_ratio_max"]

        stats = self._rollout_stats(trajectories)
        tokens = max(sums["tokens"], 1.0)
        groups = rewards.view(-1, cfg.num_generations)
        local = {
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
            "frac_reward_zero_std": (groups.std(dim=1, correction=0) < 1e-6).float().mean().item(),
            **reward_parts,
            **stats,
            "loss": sums["loss"] / self.updates_per_step,
            "clip_fraction": sums["clipped"] / tokens,
            "clip_ratio_low": sums["clipped_low"] / tokens,
            "clip_ratio_high": sums["clipped_high"] / tokens,
            "kl": sums["kl"] / tokens,
            "entropy": sums["entropy"] / tokens,
            "completion_tokens": float(sum(len(s.segment.completion_ids) for s in segments)),
            **per_iteration,
        }
        metrics = {k: self._across_processes(k, v) for k, v in local.items()}
        metrics["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else 0.0
        metrics["learning_rate"] = self.scheduler.get_last_lr()[0]
        metrics["update_seconds"] = time.perf_counter() - started
        return metrics

    def _update(self, rollouts: range, segments: list[TrainingSegment], snapshots, sums: dict) -> float:
        """One optimizer step on `segments`, those of `rollouts`; returns the gradient norm before clipping."""
        cfg, acc = self.config, self.accelerator
        # Every rollout counts, one that generated nothing too: each process then averages over as many rollouts,
        # and DDP's mean over processes is the mean over all of them.
        tokens_of = dict.fromkeys(rollouts, 0)
        for s in segments:
            tokens_of[s.rollout] = tokens_of.get(s.rollout, 0) + len(s.segment.completion_ids)
        local_tokens = sum(tokens_of.values())
        global_tokens = acc.reduce(torch.tensor(float(local_tokens), device=acc.device), reduction="sum").item()
        weight_of = self._token_weights(tokens_of, local_tokens, global_tokens)
        for chunk, real, last in self._collective_chunks(segments):
            # Gradients are reduced once per update: every process's last backward syncs, the others do not.
            piece = self._chunk_loss(chunk, snapshots, weight_of, sums if real else dict.fromkeys(sums, 0.0))
            self._backward(piece if real else piece * 0.0, sync=last)
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm else None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm) if grad_norm is not None else 0.0

    @torch.no_grad()
    def _score_before_update(self, segments: list[TrainingSegment], snapshots) -> None:
        """One pass over the batch, per micro-batch, before its first update: the old log-probs when the batch
        teaches more than once (with one update the loss's own detached log-probs are the old ones), and the
        critic's values where there is one."""
        keep_logprobs = self.updates_per_step > 1
        if not keep_logprobs and self.value_head is None:
            return
        self.model.eval()
        for chunk, real, _ in self._collective_chunks(segments):
            scores = self.score(self._rows(chunk, snapshots), self.value_head)
            if not real:
                continue
            for i, s in enumerate(chunk):
                n = len(s.segment.completion_ids)
                if keep_logprobs:
                    s.old_logprobs = scores.logp[i, :n].tolist()
                if scores.values is not None:
                    s.old_values = scores.values[i, :n].tolist()

    def _across_processes(self, key: str, value: float) -> float:
        """Maxima stay maxima; everything else is averaged over processes."""
        acc = self.accelerator
        tensor = torch.tensor(float(value), device=acc.device)
        if key.endswith("_max") or "_max/" in key:
            return acc.gather(tensor.view(1)).max().item()
        return acc.reduce(tensor, reduction="mean").item()

    def _micro_batches(self, segments: list[TrainingSegment]) -> list[list[TrainingSegment]]:
        size = self.config.micro_batch_size
        if self.config.shared_prompts:
            # Segments of one prompt text side by side (in order of first appearance), so a micro-batch holds as
            # many of them as it can; the loss is a weighted sum over tokens, so the order changes no gradient.
            first_seen: dict[tuple[int, ...], int] = {}
            for s in segments:
                first_seen.setdefault(tuple(s.segment.prompt_ids), len(first_seen))
            segments = sorted(segments, key=lambda s: first_seen[tuple(s.segment.prompt_ids)])
        return [segments[i : i + size] for i in range(0, len(segments), size)]

    def _mini_batches(self, segments: list[TrainingSegment],
                      rollouts: int) -> list[tuple[range, list[TrainingSegment]]]:
        """num_mini_batches contiguous runs of whole rollouts, as equal in size as the rollout count allows:
        (their rollouts, their segments)."""
        parts = self.config.num_mini_batches
        bounds = [rollouts * k // parts for k in range(parts + 1)]
        runs = [range(bounds[k], bounds[k + 1]) for k in range(parts)]
        return [(run, [s for s in segments if s.rollout in run]) for run in runs]

    def _collective_chunks(self, segments: list[TrainingSegment]):
        """Micro-batches of `segments` -> (chunk, real, last). Every forward of a wrapped model is collective (DDP
        syncs buffers, ZeRO-3 gathers parameters): a process with fewer micro-batches repeats its first as padding
        passes (real False), so that all run as many."""
        chunks = self._micro_batches(segments)
        passes = len(chunks)
        if self.accelerator.num_processes > 1:
            acc = self.accelerator
            passes = int(acc.gather(torch.tensor([passes], device=acc.device)).max().item())
        for k in range(passes):
            yield (chunks[k] if k < len(chunks) else chunks[0]), k < len(chunks), k == passes - 1

    def _rows(self, chunk: list[TrainingSegment], snapshots) -> SegmentRows:
        """The chunk's padded batch, with the replay slots holding the fast weights each segment ran under."""
        rows = segment_rows([s.segment for s in chunk], self.tokenizer.pad_token_id, self.accelerator.device)
        load_snapshots(self.replay, rows.snapshot_keys, snapshots)
        return rows

    def assign_advantages(self, segments: list[TrainingSegment], rewards: torch.Tensor, snapshots,
                          trajectories: list[Trajectory]) -> None:
        """GRPO: every generated token of a rollout carries its group-relative advantage (with answer_credit
        "question", an answer's tokens that of its own question's score)."""
        cfg = self.config
        advantages = group_advantages(rewards, cfg.num_generations, cfg.scale_rewards).tolist()
        by_question = self._question_advantages(trajectories) if cfg.answer_credit == "question" else {}
        for s in segments:
            value = by_question.get((s.rollout, s.segment.question), advantages[s.rollout]) \
                if s.segment.kind == "answer" else advantages[s.rollout]
            s.advantages = [value] * len(s.segment.completion_ids)

    def _question_advantages(self, trajectories: list[Trajectory]) -> dict[tuple[int, int], float]:
        """(rollout, question) -> the group-relative advantage of that question's score, for groups whose
        rollouts answered several questions (a group asks each of its task's questions of every rollout)."""
        cfg, out = self.config, {}
        size = cfg.num_generations
        for start in range(0, len(trajectories), size):
            group = trajectories[start : start + size]
            asked = len(group[0].answered)
            if asked < 2 or any(len(t.answered) != asked for t in group):
                continue
            for q in range(asked):
                scores = torch.tensor([t.answered[q].reward for t in group])
                for r, a in enumerate(group_advantages(scores, size, cfg.scale_rewards).tolist()):
                    out[(start + r, q)] = a
        return out

    def _backward(self, loss: torch.Tensor, sync: bool) -> None:
        acc = self.accelerator
        if acc.distributed_type == DistributedType.DEEPSPEED:
            # DeepSpeed reduces gradients and steps only on the boundary micro-batch that accelerate marks.
            acc.gradient_state._set_sync_gradients(sync)
            try:
                acc.backward(loss)
            finally:
                acc.gradient_state._set_sync_gradients(True)
            return
        with nullcontext() if sync else acc.no_sync(self.model):
            acc.backward(loss)

    def _token_weights(self, tokens_of: dict[int, int], local_tokens: int, global_tokens: float) -> dict[int, float]:
        """Per-rollout weight of each of its tokens, so that summing weight * token loss gives the configured
        aggregation over the update's rollouts after DDP averages gradients over processes."""
        cfg, world = self.config, self.accelerator.num_processes
        n = len(tokens_of)
        if cfg.loss_type == "grpo":
            return {r: 1.0 / (t * n) if t else 0.0 for r, t in tokens_of.items()}
        if cfg.loss_type == "bnpo":
            return dict.fromkeys(tokens_of, 1.0 / max(local_tokens, 1))
        if cfg.loss_type == "dapo":
            return dict.fromkeys(tokens_of, world / max(global_tokens, 1.0))
        return dict.fromkeys(tokens_of, 1.0 / (n * cfg.max_completion_length))  # dr_grpo

    def _chunk_loss(self, chunk: list[TrainingSegment], snapshots, weight_of: dict[int, float],
                    sums: dict) -> torch.Tensor:
        cfg = self.config
        rows = self._rows(chunk, snapshots)
        scores = self.forward_chunk(rows)
        logp = scores.logp  # [n, C] at each segment's own sampling temperature
        mask = rows.completion_mask.float()
        old = logp.detach().clone()
        for i, s in enumerate(chunk):
            if s.old_logprobs is not None:
                old[i, : len(s.old_logprobs)] = torch.tensor(s.old_logprobs, device=logp.device)
        advantage = self._per_token([s.advantages for s in chunk], logp)
        weight = torch.tensor([weight_of[s.rollout] for s in chunk], device=logp.device).unsqueeze(1)
        kind_weight = torch.tensor([cfg.segment_weights.get(s.segment.kind, 1.0) for s in chunk],
                                   device=logp.device).unsqueeze(1)
        ratio = torch.exp(logp - old)
        eps_high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
        clipped_ratio = torch.clamp(ratio, 1 - cfg.epsilon, 1 + eps_high)
        per_token = -torch.min(ratio * advantage, clipped_ratio * advantage)
        if cfg.beta > 0:
            ref = self._reference_logprobs(rows, snapshots)
            kl = torch.exp(ref - logp) - (ref - logp) - 1
            per_token = per_token + cfg.beta * kl
            sums["kl"] += (kl * mask).sum().item()
        # The kind weights weigh the policy's terms; a critic learns its values at every token alike.
        per_token = per_token * kind_weight + self.extra_loss(chunk, scores, logp)
        piece = (per_token * mask * weight).sum()
        below, above = ratio < 1 - cfg.epsilon, ratio > 1 + eps_high
        sums["loss"] += piece.item()
        if "log_ratio_max" in sums:
            sums["log_ratio_max"] = max(sums["log_ratio_max"], ((logp - old).abs() * mask).max().item())
        sums["clipped"] += ((below | above).float() * mask).sum().item()
        # TRL's clip ratios: tokens where the clip is what the loss sees (the ratio left the range in the direction
        # that the advantage pushes it).
        sums["clipped_low"] += ((below & (advantage < 0)).float() * mask).sum().item()
        sums["clipped_high"] += ((above & (advantage > 0)).float() * mask).sum().item()
        sums["entropy"] += (scores.entropy * mask).sum().item()
        sums["tokens"] += mask.sum().item()
        return piece

    def forward_chunk(self, rows: SegmentRows) -> TokenScores:
        """The policy's log-probs and entropies of the chunk's tokens, and whatever else the trainer's loss needs
        from the same pass (GRPO: nothing)."""
        return self.score(rows, entropy=True)

    def score(self, rows: SegmentRows, value_head=None, entropy: bool = False, model=None) -> TokenScores:
        """score_completions under the trainer's replay slots, prompts shared as configured: of the (wrapped)
        policy, or of `model` (the policy unwrapped, or the reference)."""
        model = self.model if model is None else model
        reference = model is self.reference
        replay = self.reference_replay if reference else self.replay
        shared = self.reference_shared_layers if reference else self.shared_layers
        # Under ZeRO-3 every forward gathers parameters, of an unwrapped model too: all processes make as many.
        return score_completions(model, replay, rows, value_head, entropy, shared,
                                 collective=self.accelerator.num_processes > 1)

    def extra_loss(self, chunk: list[TrainingSegment], scores: TokenScores, like: torch.Tensor):
        """Per-token loss terms beyond the policy gradient and the KL (GRPO: none)."""
        return 0.0

    @staticmethod
    def _per_token(values: list[list[float]], like: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(like)
        for i, row in enumerate(values):
            out[i, : len(row)] = torch.tensor(row, device=like.device, dtype=like.dtype)
        return out

    @torch.no_grad()
    def _reference_logprobs(self, rows, snapshots) -> torch.Tensor:
        """The initial policy's log-probs, under the same fast weights."""
        if self.config.use_peft:
            with self.policy.disable_adapter():
                return self.score(rows, model=self.policy).logp
        load_snapshots(self.reference_replay, rows.snapshot_keys, snapshots)
        return self.score(rows, model=self.reference).logp

    def _rollout_stats(self, trajectories: list[Trajectory]) -> dict[str, float]:
        extractions = [e for t in trajectories for e in t.extractions]
        updates = [e.inner_update for e in extractions if e.inner_update and e.inner_update.num_pairs]
        kept = [u for u in updates if not u.rolled_back]  # a rolled-back update's losses may be inf / NaN
        mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
        stats = {
            "f1": mean([t.metrics.get("f1", t.reward) for t in trajectories]),
            "questions_per_episode": mean([float(len(t.answered)) for t in trajectories]),
            "extraction_parse_rate": mean([float(bool(e.supervision.pairs)) for e in extractions]),
            "pairs_absorbed": mean([sum(e.inner_update.num_pairs for e in t.extractions if e.inner_update)
                                    for t in trajectories]),
            "inner_loss_before": mean([u.loss_before for u in kept]),
            "inner_loss_after": mean([u.loss_after for u in kept]),
            "inner_rollbacks": mean([float(u.rolled_back) for u in updates]),
        }
        limits = {"extraction": self.runner.config.max_extraction_tokens,
                  "answer": self.runner.config.max_answer_tokens}
        if self.env.tools:
            limits["action"] = self.runner.config.max_action_tokens
            stats.update({
                "turns": mean([float(t.turns) for t in trajectories]),
                "tool_calls": mean([float(t.tool_calls) for t in trajectories]),
                "malformed_actions": mean([float(t.malformed_actions) for t in trajectories]),
                "forced_answers": mean([float(t.forced_answer) for t in trajectories]),
            })
        for kind, limit in limits.items():
            segments = [s for t in trajectories for s in t.segments if s.kind == kind]
            lengths = [len(s.completion_ids) for s in segments]
            # An action ends at its closing tag as well as at an end token.
            closing = closing_tags(self.env.tools) if self.env.tools else []
            ended = [bool(s.completion_ids) and s.completion_ids[-1] in self.runner.sampler.stop_ids
                     or any(tag in s.text for tag in closing) for s in segments]
            stats[f"{kind}_length_mean"] = mean(lengths)
            stats[f"{kind}_length_max"] = float(max(lengths, default=0))
            # Clipped: the generation budget ran out before an end token.
            stats[f"{kind}_clipped"] = mean([float(n >= limit and not end) for n, end in zip(lengths, ended)])
        return stats

    # ---- the loop ------------------------------------------------------------------------------------------

    def train(self, resume: bool | str = False, overwrite: bool = False,
              allow_recipe_change: Iterable[str] = ()) -> list[dict]:
        """Run to `max_steps`. An output folder that holds a run is refused unless `resume` (continue from its
        newest good checkpoint; the metrics log is cut back to that step) or `overwrite` (delete it first). A resume
        refuses a checkpoint trained with other settings unless their dotted recipe keys are in
        `allow_recipe_change` (e.g. "outer_loop.max_steps"); bookkeeping keys (checkpoints.FREE_KEYS) may change.
        `resume="auto"`: resume if the folder holds a run, else start one (what a restarted job runs)."""
        cfg, acc = self.config, self.accelerator
        metrics_path = Path(cfg.output_dir) / METRICS
        if resume == "auto":
            resume = self._run_exists()
        if resume:
            with self.monitor.phase("resume", self.step + 1):
                self.load_checkpoint(allow_recipe_change=allow_recipe_change)
            if acc.is_main_process:
                truncate_metrics(metrics_path, self.step)
                set_aside_newer(cfg.output_dir, self.step)  # the bad ones passed over: kept, never resumed or pruned
        else:
            earlier = existing_run(cfg.output_dir)
            if earlier and not overwrite:
                raise InputError(f"{cfg.output_dir} holds a run ({', '.join(earlier[-3:])}): pass --resume to "
                                 "continue it or --overwrite to replace it, or choose another output_dir")
            if earlier and acc.is_main_process:
                remove_run(cfg.output_dir)
        if acc.is_main_process:
            write_recipe(cfg.output_dir, self.recipe_record())
        acc.wait_for_everyone()
        if cfg.report_to:
            # purge_step hides events a killed run logged after the checkpoint it resumes from.
            init_kwargs = {"tensorboard": {"purge_step": self.step + 1}} if resume and self.step else {}
            acc.init_trackers(TRACKER_RUN, config={k: v for k, v in asdict(cfg).items() if not isinstance(v, (list, dict))},
                              init_kwargs=init_kwargs)
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="grpo", disable=not acc.is_main_process)
        while self.step < cfg.max_steps:
            started = time.perf_counter()
            with self.monitor.phase("rollout", self.step + 1):
                batch = self.generate_rollouts(self.step)
            rollout_seconds = time.perf_counter() - started
            with self.monitor.phase("update", self.step + 1):
                metrics = self.train_step(batch)
            self.step += 1
            metrics["rollout_seconds"] = rollout_seconds
            metrics["step_seconds"] = time.perf_counter() - started
            metrics["tokens_per_s"] = metrics["completion_tokens"] * acc.num_processes / metrics["step_seconds"]
            metrics["step"] = self.step
            if self.curriculum:
                metrics["curriculum_stage"] = self.curriculum_stage(self.step - 1)
            self.history.append(metrics)
            if acc.is_main_process:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
            if cfg.report_to and self.step % cfg.logging_steps == 0:
                acc.log({k: v for k, v in metrics.items() if k != "step"}, step=self.step)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", f1=f"{metrics['f1']:.3f}")
            if cfg.save_steps and self.step % cfg.save_steps == 0:
                with self.monitor.phase("checkpoint", self.step):
                    self.save_checkpoint()
        self.monitor.beat(self.step, "done")
        bar.close()
        if cfg.report_to:
            acc.end_training()
        if acc.is_main_process:
            plot_rewards(metrics_path, Path(cfg.output_dir) / "reward_curve.png")
        return self.history

    def _run_exists(self) -> bool:
        """Whether output_dir holds a run, as the main process sees it: every process takes the same branch."""
        return self.main_process_value(bool(existing_run(self.config.output_dir)))


def plot_rewards(metrics_path: Path, out: Path) -> None:
    if not metrics_path.exists():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r["reward_mean"] for r in rows], marker="o", label="reward mean")
    ax.plot(steps, [r["f1"] for r in rows], marker=".", label="F1")
    ax.set_xlabel("step")
    ax.set_ylim(bottom=min(0.0, min(r["reward_mean"] for r in rows)))
    ax.legend()
    ax.set_title("GRPO reward")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
