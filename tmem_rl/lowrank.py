"""A fine-tuned model as a LoRA adapter of another base: each linear layer's weight difference, cut to a rank by
truncated SVD.

`tmem-rl export --adapter-of NAME` writes one when a run started from a local fine-tune that no other machine can
load (a warm start, say): the warm start's merged LoRA and the run's own LoRA together differ from the public base
by a matrix of rank at most the sum of their ranks, so a LoRA of that rank on the public base carries both, up to
float rounding; a smaller rank keeps the largest singular directions and reports what it drops.
"""

from __future__ import annotations

import torch
from torch import nn

from tmem_rl.errors import InputError

FIT_TOLERANCE = 1e-3
"""Largest relative residual (Frobenius) of any layer's difference that the default rank leaves out."""


def linear_deltas(model: nn.Module, base: nn.Module, name: str = "the model") -> dict[str, torch.Tensor]:
    """`model`'s weights minus `base`'s, in float64, for every linear layer where they differ. Any other weight
    that differs (embeddings, norms, biases) is refused: a LoRA cannot carry it."""
    base_params = dict(base.named_parameters())
    linear = {module_name for module_name, module in model.named_modules() if isinstance(module, nn.Linear)}
    deltas = {}
    for key, param in model.named_parameters():
        reference = base_params.get(key)
        if reference is None or reference.shape != param.shape:
            raise InputError(f"{name}: weight {key} has no counterpart of shape {tuple(param.shape)} in the base; "
                             "is it a fine-tune of another model?")
        diff = param.detach().double() - reference.detach().double()
        if not diff.any():
            continue
        module_name, _, leaf = key.rpartition(".")
        if module_name not in linear or leaf != "weight":
            raise InputError(f"{name}: {key} differs from the base's, and only linear layers' weights fit in a "
                             "LoRA adapter; export --format merged (the whole model) instead")
        deltas[module_name] = diff
    if not deltas:
        raise InputError(f"{name}: no weight differs from the base's; nothing to put in an adapter")
    return deltas


def _residuals(singular: torch.Tensor) -> torch.Tensor:
    """Relative residual (Frobenius) of keeping the first k singular values, for k = 0 .. len(singular)."""
    energy = singular.pow(2)
    tail = energy.flip(0).cumsum(0).flip(0)
    return torch.cat([tail, energy.new_zeros(1)]).div(energy.sum().clamp_min(1e-300)).sqrt()


def fit_lora(base: nn.Module, deltas: dict[str, torch.Tensor], rank: int | None = None,
             dtype: torch.dtype = torch.float32):
    """A PEFT LoRA model on `base` whose B A (scale 1) is each delta's best rank-`rank` approximation; `rank` None
    takes the smallest that leaves at most FIT_TOLERANCE of every delta out. Returns (model, report) with the rank
    and the largest and mean relative residual over the layers. The adapter's weights are stored in `dtype`."""
    from peft import LoraConfig, get_peft_model

    factors, residuals = {}, {}
    for module_name, delta in deltas.items():
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        factors[module_name] = (u, s, vh)
        residuals[module_name] = _residuals(s)
    if rank is None:
        rank = max(int((r > FIT_TOLERANCE).sum().item()) for r in residuals.values())
    if rank < 1:
        raise InputError(f"adapter rank {rank}: expected at least 1")
    leaves = {name.rpartition(".")[2] for name in deltas}
    every = {name for name, module in base.named_modules() if isinstance(module, nn.Linear)
             and name.rpartition(".")[2] in leaves}
    # Module kinds ("q_proj") when the deltas cover every layer of those kinds: a readable adapter_config.json.
    targets = sorted(leaves) if every == set(deltas) else sorted(deltas)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets))
    report = {}
    for module_name, (u, s, vh) in factors.items():
        k = min(rank, s.numel())
        root = s[:k].sqrt()
        layer = model.base_model.model.get_submodule(module_name)
        b = torch.zeros_like(layer.lora_B["default"].weight, dtype=torch.float64)
        a = torch.zeros_like(layer.lora_A["default"].weight, dtype=torch.float64)
        b[:, :k], a[:k] = u[:, :k] * root, root[:, None] * vh[:k]
        layer.lora_B["default"].weight.data = b.to(dtype)
        layer.lora_A["default"].weight.data = a.to(dtype)
        report[module_name] = residuals[module_name][k].item()
    return model, {"rank": rank, "max_residual": max(report.values()),
                   "mean_residual": sum(report.values()) / len(report), "layers": len(report)}
