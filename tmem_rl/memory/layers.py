"""Where fast weights attach: a decoder's layer stack and the linear modules adapted in it."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from tmem_rl.memory.config import FastWeightConfig

CACHE_ARGUMENTS = ("cache", "past_key_values")  # what a decoder layer calls its KV cache, across versions


def _forward_arguments(model: nn.Module):
    """The keyword arguments the model's forward takes. `model` may be wrapped (DDP, DeepSpeed, PEFT): they are its
    base model's."""
    while hasattr(model, "module"):
        model = model.module
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inspect.signature(base.forward).parameters


def model_cache_argument(model: nn.Module) -> str:
    """The name the model's forward takes its KV cache by: `cache` in newer transformers, `past_key_values` before."""
    return "cache" if "cache" in _forward_arguments(model) else "past_key_values"


def logits_to_keep_argument(model: nn.Module, count: int) -> dict:
    """{"logits_to_keep": count} for a model whose forward can compute the logits of its last `count` positions
    only (a prompt's logits at every position can cost more than its whole prefill), else {}."""
    return {"logits_to_keep": count} if "logits_to_keep" in _forward_arguments(model) else {}


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers (HF causal LMs keep it at get_decoder().layers)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def layers_below_fast_weights(model: nn.Module, config: FastWeightConfig | None) -> list[nn.Module]:
    """The decoder layers below the first fast-weight layer (all of them without fast weights): rows under
    different fast weights compute the same there, so rows with the same tokens can share them."""
    layers = decoder_layers(model)
    return list(layers[: adapted_layer_indices(model, config)[0] if config is not None else len(layers)])


def adapted_layer_indices(model: nn.Module, config: FastWeightConfig) -> list[int]:
    n = len(decoder_layers(model))
    if config.layers is None:
        if config.num_layers > n:
            raise ValueError(f"FastWeightConfig.num_layers={config.num_layers} but the model has {n} layers")
        return list(range(n - config.num_layers, n))
    indices = sorted({i % n for i in config.layers if -n <= i < n})
    if len(indices) != len(set(config.layers)):
        raise ValueError(f"FastWeightConfig.layers={config.layers}: the model has layers 0..{n - 1}")
    return indices


def linear_of(module: nn.Module) -> nn.Module:
    """The plain linear layer itself, or the one a PEFT LoRA wrapper holds as `base_layer`."""
    base = getattr(module, "base_layer", None)
    return base if isinstance(base, nn.Linear) else module


def layer_stack_name(model: nn.Module) -> str:
    """The qualified name of the decoder layer stack: "model.layers", "base_model.model.model.layers" under PEFT."""
    layers = decoder_layers(model)
    return {id(m): name for name, m in model.named_modules()}[id(layers)]


def find_target_modules(model: nn.Module, config: FastWeightConfig) -> dict[str, nn.Module]:
    """Qualified name -> linear module, for every target name in every adapted layer."""
    layers = decoder_layers(model)
    prefix = layer_stack_name(model)
    found: dict[str, nn.Module] = {}
    for index in adapted_layer_indices(model, config):
        # A PEFT LoRA on the slow weights wraps the linear (its `base_layer`); hooking the wrapper puts the fast
        # delta on top of the slow adapter's output.
        linears = {
            name: m
            for name, m in layers[index].named_modules()
            if isinstance(linear_of(m), nn.Linear) and not name.endswith("base_layer")
        }
        by_leaf = {name.rsplit(".", 1)[-1]: name for name in linears if "lora_" not in name}
        for target in config.target_modules:
            if target not in by_leaf:
                raise ValueError(
                    f"target module {target!r} not found in decoder layer {index}; "
                    f"available: {', '.join(sorted(by_leaf))}"
                )
            found[f"{prefix}.{index}.{by_leaf[target]}"] = linears[by_leaf[target]]
    return found


def take_rows(value, rows: torch.Tensor, total: int):
    """A decoder layer's keyword argument for these of its `total` batch rows: batch-shaped tensors (masks,
    per-row rotary tables) follow the rows; broadcast ones ([1, ...]) and 1-D ones (cache positions) stay as they
    are."""
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == total and total > 1:
        return value[rows]
    if isinstance(value, tuple):
        return tuple(take_rows(v, rows, total) for v in value)
    return value
