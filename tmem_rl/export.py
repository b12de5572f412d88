"""`tmem-rl export`: a training checkpoint -> a model anyone can load.

    merged   a Hugging Face model folder: the trained weights (a LoRA run merged into its base at the adapter's
             own scale, lora_alpha / r), loadable with `AutoModelForCausalLM.from_pretrained`;
    adapter  a PEFT adapter folder (LoRA runs only), loadable with `PeftModel.from_pretrained(base, folder)`.

Either way the folder also holds the tokenizer (with its chat template), a generation config whose end tokens
close a chat turn, `fast_weights.json` (the inner-loop and episode settings `TMEMAgent.from_pretrained` runs
with, chat-template settings included), the fast weights' A as training built it and a model card. Checkpoints of
single-process, DDP and DeepSpeed runs (ZeRO-3 shards consolidated with DeepSpeed's own converter) all export the
same way. `verify` reloads the export with plain transformers / PEFT and compares logits with the checkpoint's
model, and the A an agent loads from the export with the checkpoint's.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from tmem_rl.errors import InputError

FORMATS = ("merged", "adapter")
VERIFY_TOLERANCE = 1e-4
# Text the logits are compared on: a chat turn and plain prose, so both the template tokens and words are covered.
VERIFY_MESSAGES = [
    [{"role": "user", "content": "Where does Maya live, and since when?"}],
    [{"role": "user", "content": "Summarise: the meeting moved to Tuesday because the room was booked."}],
]


@dataclass
class TrainedCheckpoint:
    """A checkpoint's trained policy (unmerged under LoRA), its tokenizer and the settings it was trained with."""

    folder: Path
    model: torch.nn.Module
    tokenizer: object
    run: dict
    base_model: str
    is_adapter: bool


def _run_record(folder: Path) -> dict:
    path = folder / "run.json"
    if not path.is_file():
        raise InputError(f"checkpoint {folder}: no run.json (the settings the run was trained with); export "
                         "needs a checkpoint written by tmem-rl train")
    try:
        record = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as err:
        raise InputError(f"checkpoint {path}: not readable JSON ({err})") from None
    if not isinstance(record, dict):
        raise InputError(f"checkpoint {path}: expected a JSON object")
    return record


def consolidated_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The full model's weights of a checkpoint, whichever way the run saved them."""
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(folder / "model.safetensors"))
    elif (folder / "pytorch_model.bin").is_file():
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    elif (folder / "pytorch_model").is_dir():  # DeepSpeed: every rank's ZeRO shard, gathered into fp32 tensors
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag="pytorch_model")
    else:
        raise InputError(f"checkpoint {folder}: no weights (expected model.safetensors, pytorch_model.bin or a "
                         "DeepSpeed pytorch_model/ folder)")
    # DDP-wrapped names carry "module."; the PPO value head is not part of the language model.
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith("value_head.")}


def load_checkpoint(checkpoint: str | Path, base: str | None = None) -> TrainedCheckpoint:
    """The trained policy of a `tmem-rl train` checkpoint, in float32 on the CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tmem_rl.models import load_policy, load_tokenizer
    from tmem_rl.trainers.checkpoints import verified_checkpoint

    folder = verified_checkpoint(checkpoint)
    run = _run_record(folder)
    adapter = folder / "adapter"
    if (adapter / "adapter_config.json").is_file():
        from peft import PeftModel

        named = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if "DEEPSPEED" in str(run.get("distributed_type", "")):
            raise InputError(f"checkpoint {folder}: a LoRA run under DeepSpeed saved its adapter from partitioned "
                             "parameters; export is not supported for it (train LoRA under DDP)")
        base_name = base or run.get("base_model") or named
        if not base_name:
            raise InputError(f"checkpoint {folder}: its base model is not recorded; pass --base NAME_OR_FOLDER")
        model, tokenizer = load_policy(base_name, dtype=torch.float32)
        try:
            model = PeftModel.from_pretrained(model, str(adapter))
        except (RuntimeError, ValueError, KeyError) as err:  # shapes of another base
            raise InputError(f"checkpoint {folder}: its adapter does not fit base {base_name} "
                             f"({' '.join(str(err).split())[:200]})") from None
        model.eval()
        return TrainedCheckpoint(folder, model, tokenizer, run, base_name, is_adapter=True)
    if not (folder / "hf" / "config.json").is_file():
        raise InputError(f"checkpoint {folder}: no hf/config.json (the model's architecture)")
    config = AutoConfig.from_pretrained(str(folder / "hf"))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = consolidated_state_dict(folder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise InputError(f"checkpoint {folder}: its weights do not fit hf/config.json (missing "
                         f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
    model.tie_weights()
    model.eval()
    return TrainedCheckpoint(folder, model, load_tokenizer(folder / "hf"), run, run.get("base_model", ""),
                             is_adapter=False)


@torch.no_grad()
def sample_logits(model, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the verification texts [n, T, V] and their attention mask."""
    from tmem_rl.chat import chat_ids, chat_template_kwargs, left_padded

    kwargs = chat_template_kwargs(tokenizer)
    prompts = [chat_ids(tokenizer, m, kwargs, generation_prompt=True) for m in VERIFY_MESSAGES]
    input_ids, mask = left_padded(prompts, tokenizer.pad_token_id)
    return model(input_ids=input_ids, attention_mask=mask).logits.float(), mask


def max_logit_diff(expected: tuple[torch.Tensor, torch.Tensor], model, tokenizer) -> float:
    logits, mask = expected
    got, _ = sample_logits(model, tokenizer)
    keep = mask.bool()
    return (got[keep] - logits[keep]).abs().max().item()


def max_init_diff(expected: dict[str, torch.Tensor], model, fast_config, folder: Path) -> float:
    """Max abs difference between `expected` (the checkpoint's fast-weight A) and the A fast weights on `model`
    load from `folder`, as the agent builds them."""
    from tmem_rl.memory import FastWeights

    fast = FastWeights(model, 1, fast_config, init_from=folder)
    fast.remove()
    return max((a - expected[key]).abs().max().item() for key, a in fast.init_tensors().items())


def _model_card(trained: TrainedCheckpoint, fmt: str, eval_summary: dict | None) -> str:
    run = trained.run
    history = json.loads((trained.folder / "trainer_state.json").read_text()).get("history") or [{}]
    last = {k: v for k, v in history[-1].items() if isinstance(v, (int, float)) and not k.endswith("seconds")}
    keys = [k for k in ("reward_mean", "f1", "extraction_parse_rate", "pairs_absorbed", "inner_loss_after")
            if k in last]
    library = "peft" if fmt == "adapter" else "transformers"
    lines = [
        "---",
        f"base_model: {trained.base_model or 'unknown'}",
        f"library_name: {library}",
        "tags: [tmem_rl, parametric-memory, fast-weights]",
        "---",
        "",
        f"# {trained.folder.parent.name}/{trained.folder.name}",
        "",
        f"An extractor policy trained with tmem_rl ({run.get('algorithm', 'GRPO')}, {run.get('step', '?')} steps, "
        f"{'LoRA on the slow weights' if trained.is_adapter else 'all weights'}), exported as "
        f"{'a PEFT adapter' if fmt == 'adapter' else 'a merged model'}. Base model: "
        f"`{trained.base_model or 'unknown'}`.",
        "",
        "Run it as an agent with parametric memory (the settings in `fast_weights.json`):",
        "",
        "```python",
        "from tmem_rl import TMEMAgent",
        "agent = TMEMAgent.from_pretrained(\"path/to/this/folder\")",
        "agent.read(long_text)",
        "print(agent.answer(\"...\"))",
        "```",
        "",
    ]
    if keys:
        lines += ["## Training metrics (last step)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {last[k]:.4g} |" for k in keys] + [""]
    if eval_summary:
        from tmem_rl.evaluation.harness import markdown_table

        lines += ["## Evaluation", "", markdown_table(eval_summary), ""]
    if run.get("recipe"):
        lines += ["## Recipe", "", "```yaml", yaml.safe_dump(run["recipe"], sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def _settings(trained: TrainedCheckpoint):
    from tmem_rl.memory import FastWeightConfig
    from tmem_rl.rollout import EpisodeConfig

    run = trained.run
    try:
        fast = FastWeightConfig(**run.get("fast_weights", {}))
        episode = EpisodeConfig(**run.get("episode", {}))
    except (TypeError, ValueError) as err:
        raise InputError(f"checkpoint {trained.folder / 'run.json'}: unreadable settings ({err})") from None
    return fast, episode


def export_checkpoint(checkpoint: str | Path, out: str | Path, fmt: str = "merged", verify: bool = False,
                      base: str | None = None, eval_summary: str | Path | None = None,
                      overwrite: bool = False, tolerance: float = VERIFY_TOLERANCE) -> dict:
    """Export a checkpoint; returns {"out", "format", "base_model", "step", and with verify "max_logit_diff",
    "max_init_diff" (of the fast weights' A), "verified"}."""
    from tmem_rl.agent import write_agent_settings
    from tmem_rl.chat import stop_token_ids
    from tmem_rl.memory import FastWeights
    from tmem_rl.memory.fast_weights import INIT_FILE

    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    out = Path(out)
    source = Path(checkpoint).resolve()
    if out.resolve() == source or out.resolve() in source.parents:
        raise InputError(f"--out {out}: holds the checkpoint being exported; choose a folder outside it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise InputError(f"--out {out}: already exists and is not empty; choose another folder or pass --overwrite")
    summary = None
    if eval_summary is not None:
        try:
            summary = json.loads(Path(eval_summary).read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise InputError(f"--eval {eval_summary}: not a readable summary.json ({err})") from None
    from tmem_rl.trainers.checkpoints import verified_checkpoint

    folder = verified_checkpoint(checkpoint)  # before loading anything: a bad checkpoint fails in a second
    if fmt == "adapter" and not (folder / "adapter" / "adapter_config.json").is_file():
        raise InputError(f"checkpoint {folder}: the run trained all weights (no LoRA adapter); use --format merged")
    trained = load_checkpoint(folder, base)
    fast_config, episode_config = _settings(trained)
    tokenizer = trained.tokenizer
    expected = sample_logits(trained.model, tokenizer) if verify else None
    # The fast weights' A as training built it (checked against the model; recomputed, with a warning, from a
    # checkpoint written before it was saved): an agent recomputing it from the trained weights would get another.
    fast = FastWeights(trained.model, 1, fast_config, init_from=folder)
    fast.remove()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model = trained.model
        if fmt == "merged" and trained.is_adapter:
            # W + (lora_alpha / r) * B A by PEFT's own merge, summed in float64 so that each merged weight is the
            # float32 nearest the exact sum (merged in float32, the default model's logits moved 1.2e-4 instead of
            # 0.99e-4; float32 arithmetic alone differs from float64 by 0.86e-4 on it).
            model = merged_in_float64(model)
        generation = model.generation_config
        generation.eos_token_id = stop_token_ids(model, tokenizer)
        generation.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(str(staging))
        if fmt == "adapter":
            _point_adapter_at_base(staging, trained.base_model)
            generation.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        write_agent_settings(staging, fast_config, episode_config, base_model=trained.base_model,
                             step=trained.run.get("step"), export_format=fmt)
        if (folder / INIT_FILE).is_file():
            fast.save_init(staging)
        (staging / "README.md").write_text(_model_card(trained, fmt, summary))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result = {"out": str(out), "format": fmt, "base_model": trained.base_model, "step": trained.run.get("step")}
    if verify:
        reloaded = reload_export(out, fmt, trained.base_model)
        result["max_logit_diff"] = max_logit_diff(expected, reloaded, tokenizer)
        result["max_init_diff"] = max_init_diff(fast.init_tensors(), reloaded, fast_config, out)
        result["verified"] = max(result["max_logit_diff"], result["max_init_diff"]) <= tolerance
    return result


def merged_in_float64(peft_model):
    """PEFT's merge, one adapted layer at a time in float64 (a whole-model float64 copy would double memory)."""
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            module.to(torch.float64)
            module.merge()
            module.to(torch.float32)
    return peft_model.unload()  # the merged base layers, the LoRA modules removed


def _point_adapter_at_base(folder: Path, base_model: str) -> None:
    """Name the base in adapter_config.json as plain PEFT can load it: a known short name becomes its folder."""
    from tmem_rl.models import KNOWN_MODELS, resolve_model_path

    if base_model in KNOWN_MODELS:
        path = folder / "adapter_config.json"
        config = json.loads(path.read_text())
        config["base_model_name_or_path"] = resolve_model_path(base_model)
        path.write_text(json.dumps(config, indent=2))


def reload_export(out: Path, fmt: str, base_model: str):
    """The export as a user loads it: plain transformers for a merged model, base + PEFT for an adapter."""
    from transformers import AutoModelForCausalLM

    if fmt == "merged":
        model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    else:
        from peft import PeftModel

        from tmem_rl.models import load_policy

        model = PeftModel.from_pretrained(load_policy(base_model, dtype=torch.float32)[0], str(out))
    return model.eval()
