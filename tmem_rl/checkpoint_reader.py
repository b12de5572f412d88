"""Reading a trained policy back: a `tmem-rl train` checkpoint (LoRA adapter or full weights, single-process, DDP
or DeepSpeed), a PEFT adapter folder or a full model folder. Below `export`, the agent and evaluation, which all
read checkpoints this one way; above `models`, whose loaders it uses."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from tmem_rl.errors import InputError
from tmem_rl.models import DEFAULT_MODEL, adapter_base, check_safetensors, load_policy, load_tokenizer
from tmem_rl.trainers.checkpoints import verified_checkpoint


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

        check_safetensors(folder)
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
    folder = verified_checkpoint(checkpoint)
    run = _run_record(folder)
    adapter = folder / "adapter"
    if (adapter / "adapter_config.json").is_file():
        from peft import PeftModel

        if "DEEPSPEED" in str(run.get("distributed_type", "")):
            raise InputError(f"checkpoint {folder}: a LoRA run under DeepSpeed saved its adapter from partitioned "
                             "parameters; export is not supported for it (train LoRA under DDP)")
        base_name = checkpoint_base(folder, run, base)
        if not base_name:
            raise InputError(f"checkpoint {folder}: its base model is not recorded; pass --base NAME_OR_FOLDER")
        check_safetensors(adapter)
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
    return TrainedCheckpoint(folder, model, load_tokenizer(folder / "hf"), run, checkpoint_base(folder, run, base),
                             is_adapter=False)


def checkpoint_base(folder: Path, run: dict, base: str | None = None) -> str:
    """The base model of a checkpoint: `base` when given, else the one its run recorded, else its adapter's."""
    if base or run.get("base_model"):
        return base or run["base_model"]
    adapter = folder / "adapter"
    return (adapter_base(adapter) if (adapter / "adapter_config.json").is_file() else None) or ""


def load_trained_policy(
    checkpoint: str | Path, base: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, AutoTokenizer]:
    """A trained policy, ready for inference like `load_policy`'s.

    `checkpoint` is a `tmem-rl train` checkpoint folder (its `adapter/` when the slow weights were a LoRA, else
    the full weights Accelerate saved), a PEFT adapter folder, or a full HF model folder. Adapters are merged into
    `base` (or the base their config names when `base` is empty), so generation runs at the base model's speed.
    """
    folder = Path(checkpoint)
    if not folder.is_dir():
        raise InputError(f"checkpoint {folder}: no such folder")
    if (folder / "run.json").is_file():  # a tmem-rl train checkpoint: read it the one way export does
        trained = load_checkpoint(folder, base or None)
        model = trained.model.merge_and_unload() if trained.is_adapter else trained.model
        return model.to(device=device, dtype=dtype).eval(), trained.tokenizer
    adapter = folder / "adapter" if (folder / "adapter" / "adapter_config.json").exists() else folder
    if (adapter / "adapter_config.json").exists():
        from peft import PeftModel

        named = adapter_base(adapter)
        base_name = base or named
        if not base_name:
            raise InputError(f"adapter {adapter / 'adapter_config.json'}: names no base model "
                             f"(base_model_name_or_path is {named!r}); pass one (base=NAME_OR_FOLDER)")
        check_safetensors(adapter)
        try:
            model, tokenizer = load_policy(base_name, dtype=dtype, device=device)
        except InputError as err:
            raise InputError(f"adapter {adapter}: its base cannot be loaded here ({err}); pass another "
                             "(base=NAME_OR_FOLDER)") from err
        try:
            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        except (RuntimeError, ValueError, KeyError) as err:  # shapes of another base
            raise InputError(f"adapter {adapter}: does not fit base {base_name} "
                             f"({' '.join(str(err).split())[:200]})") from None
        model.eval()
        return model, tokenizer
    if (folder / "config.json").exists():
        return load_policy(str(folder), dtype=dtype, device=device)
    check_safetensors(folder)
    weights = [folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).exists()]
    if not weights:
        raise InputError(
            f"checkpoint {folder}: expected adapter/adapter_config.json (LoRA slow weights), model.safetensors "
            "(full weights saved by tmem-rl train), adapter_config.json or config.json; found none"
        )
    model, tokenizer = load_policy(base, dtype=dtype, device=device)
    if weights[0].suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(weights[0]))
    else:
        state = torch.load(weights[0], map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied embeddings are saved once; anything else missing means the checkpoint is of another architecture.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise InputError(f"checkpoint {weights[0]} does not fit {base}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    model.to(device)
    model.eval()
    return model, tokenizer
