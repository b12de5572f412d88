"""Warm start: supervised fine-tuning of the extraction action on an environment's reference pairs, before RL.

The agent reads each training task as an episode would (a working context that is flushed past L_max). At every
point where it would extract, the target is the reference pairs grounded in that window, the asked fact first,
written as the JSON list the parser reads. Examples are tokenized exactly as the agent's prompts are (chat
settings, the "[" prefill, the stop token), so SFT trains the very tokens GRPO later samples; TRL's `SFTTrainer`
runs the training on the pre-tokenized examples, each kept whole (an example is a window past L_max with its
target at the end, so a cut would train an unterminated JSON list or drop the example), and a LoRA is merged into a
plain model folder that any recipe or `tmem-rl eval --model` can load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tmem_rl.chat import chat_ids, chat_template_kwargs, stop_token_ids
from tmem_rl.envs.base import Environment, Task
from tmem_rl.errors import InputError
from tmem_rl.extraction import EXTRACTION_PREFILL, extraction_messages, reference_supervision
from tmem_rl.records import QAPair
from tmem_rl.episode import EpisodeConfig

IGNORE = -100


@dataclass
class WarmStartConfig:
    output_dir: str = "runs/warm_start"
    """The merged model is written to <output_dir>/model, TRL's logs next to it."""
    num_train_epochs: float = 1.0
    """Passes over the extraction examples (TRL's SFTConfig.num_train_epochs)."""
    learning_rate: float = 5e-4
    """SFT learning rate, held constant."""
    per_device_train_batch_size: int = 8
    """Examples per device per optimizer step, before gradient accumulation."""
    gradient_accumulation_steps: int = 1
    """Batches whose gradients add up to one optimizer step."""
    use_peft: bool = True
    """Train a LoRA and merge it into the saved model; False: fine-tune all weights."""
    lora_r: int = 16
    """Rank of the SFT LoRA (use_peft only)."""
    lora_alpha: int = 32
    """Scale of the SFT LoRA: its delta is multiplied by lora_alpha / lora_r (use_peft only)."""
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj")
    """Linear modules (by name) that get the SFT LoRA (use_peft only)."""
    max_examples: int | None = None
    """Stop collecting examples at this many (None: every extraction window that holds a reference pair)."""
    seed: int = 0
    """TRL's training seed (initialisation of the LoRA, data order)."""


def extraction_windows(tokenizer, task: Task, l_max: int) -> list[str]:
    """The working contexts at which the agent extracts: chunks accumulate until their tokens exceed l_max
    (the episode runner's rule), then the context is flushed."""
    windows, context, used = [], [], 0
    for chunk in task.chunks:
        context.append(chunk)
        used += len(tokenizer(chunk, add_special_tokens=False)["input_ids"])
        if used > l_max:
            windows.append("\n".join(context))
            context, used = [], 0
    return windows


def extraction_sft_examples(env: Environment, tokenizer, model, episode: EpisodeConfig,
                            max_examples: int | None = None) -> list[dict[str, Any]]:
    """Pre-tokenized (input_ids, labels) examples of ideal extractions over the environment's tasks; windows
    holding no reference pair are left out. Raises when the environment has no reference pairs."""
    kwargs = chat_template_kwargs(tokenizer, episode.chat_template_kwargs)
    stop = stop_token_ids(model, tokenizer)[0]
    prefill = EXTRACTION_PREFILL if episode.prefill else ""
    examples: list[dict[str, Any]] = []
    for index in range(len(env)):
        task = env.task(index)
        if not task.reference_pairs:
            raise ValueError(f"environment {env.name!r}: task {task.task_id} has no reference_pairs; a warm start "
                             "needs an environment that knows its gold supervision")
        written: list[QAPair] = []
        for window in extraction_windows(tokenizer, task, episode.budget(env)):
            target = reference_supervision(task.reference_pairs, window, written, episode.max_pairs)
            if target:
                prompt = chat_ids(tokenizer, extraction_messages(task.question, window, written, episode.max_pairs,
                                                                 episode.examples),
                                  kwargs, generation_prompt=True, suffix=prefill)
                text = json.dumps([p.to_dict() for p in target], ensure_ascii=False)[len(prefill):]
                completion = tokenizer(text, add_special_tokens=False)["input_ids"] + [stop]
                examples.append({"input_ids": prompt + completion,
                                 "labels": [IGNORE] * len(prompt) + completion})
                if max_examples is not None and len(examples) >= max_examples:
                    return examples
            written.extend(target)
    return examples


def _model_positions(model) -> tuple[str, int] | None:
    """The longest sequence the model declares it can read, as (config field, value); None when it declares none."""
    config = model.config.get_text_config()
    for field in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, field, None)
        if isinstance(value, int):
            return field, value
    return None


def _lengths(examples: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """(prompt + target tokens, target tokens) of each example."""
    return [(len(e["input_ids"]), sum(label != IGNORE for label in e["labels"])) for e in examples]


def _spread(values: list[int]) -> dict[str, float]:
    return {"min": min(values), "mean": sum(values) / len(values), "max": max(values)}


def warm_start(model, tokenizer, env: Environment, episode: EpisodeConfig, config: WarmStartConfig) -> dict:
    """SFT the extraction action on `env`'s reference pairs, every example whole; the merged model and tokenizer go
    to <output_dir>/model. Returns (and writes to <output_dir>/warm_start.json) {"model": path, "examples": n,
    "tokens" / "target_tokens": {min, mean, max}, "max_length", "examples_cut": 0, "loss_first", "loss_last",
    "steps", "seconds"}. Raises InputError when an example is longer than the model's positions."""
    import time
    from collections import Counter

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    examples = extraction_sft_examples(env, tokenizer, model, episode, config.max_examples)
    if not examples:
        raise ValueError(f"environment {env.name!r}: no extraction window holds a reference pair at l_max "
                         f"{episode.budget(env)}; nothing to warm-start on")
    lengths = _lengths(examples)
    longest = max(total for total, _ in lengths)
    positions = _model_positions(model)
    if positions is not None and longest > positions[1]:
        field, limit = positions
        shorter = (", or set episode.examples false (the worked example lengthens every prompt)"
                   if episode.examples else "")
        raise InputError(f"warm start on {env.name!r}: the longest extraction example (a window past episode l_max "
                         f"{episode.budget(env)}, prompt and target) is {longest} tokens, more than the model's "
                         f"{limit} positions (config.{field}); lower episode.l_max by at least "
                         f"{longest - limit}{shorter}, or use a model with more positions")
    out = Path(config.output_dir)
    # TRL keeps the first max_length tokens (default 1024) and drops examples left without a target token: the
    # longest example's length keeps every one whole.
    args = SFTConfig(
        output_dir=str(out), num_train_epochs=config.num_train_epochs, learning_rate=config.learning_rate,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps, logging_steps=1, save_strategy="no",
        report_to=[], seed=config.seed, bf16=False, fp16=False, lr_scheduler_type="constant", max_length=longest,
    )
    peft_config = None
    if config.use_peft:
        from peft import LoraConfig

        peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, task_type="CAUSAL_LM",
                                 target_modules=list(config.lora_target_modules))
    padding_side = tokenizer.padding_side
    started = time.perf_counter()
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(examples),
                         processing_class=tokenizer, peft_config=peft_config)
    # Checked on what TRL will train on, so that a cut or dropped example fails here rather than trains.
    cut = sum((Counter(lengths) - Counter(_lengths(list(trainer.train_dataset)))).values())
    if cut:
        raise RuntimeError(f"warm start: TRL's prepared dataset cut or dropped {cut} of {len(examples)} examples "
                           f"despite max_length {longest}")
    trainer.train()
    seconds = time.perf_counter() - started
    trained = trainer.model.merge_and_unload() if config.use_peft else trainer.model
    tokenizer.padding_side = padding_side  # generation pads on the left
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    target = out / "model"
    trained.save_pretrained(target)
    tokenizer.save_pretrained(target)
    summary = {"model": str(target), "examples": len(examples),
               "tokens": _spread([total for total, _ in lengths]),
               "target_tokens": _spread([target_tokens for _, target_tokens in lengths]),
               "max_length": longest, "examples_cut": cut, "loss_first": losses[0] if losses else None,
               "loss_last": losses[-1] if losses else None, "steps": len(losses), "seconds": seconds}
    (out / "warm_start.json").write_text(json.dumps(summary, indent=2))
    return summary
