"""Batched per-rollout fast weights.

Every target linear layer y = W x gets a low-rank delta y += B_g (A x) where g is the rollout that owns the batch
row: B is [G, d_out, r] (one slice per rollout slot), A is [r, d_in] shared and frozen (or [G, r, d_in] when A is
trained too). One forward pass serves G rollouts at once, which is what PEFT's mixed-adapter batches cannot do
while training. Fast weights live outside the model's parameters so the outer loop's optimizer never sees them.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tmem_rl.memory.config import FastWeightConfig

Snapshot = dict[str, torch.Tensor]  # "B.<module>" / "A.<module>" -> [n, ...] for the n snapshotted slots


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


def find_target_modules(model: nn.Module, config: FastWeightConfig) -> dict[str, nn.Linear]:
    """Qualified name -> linear module, for every target name in every adapted layer."""
    layers = decoder_layers(model)
    prefix = {id(m): name for name, m in model.named_modules()}[id(layers)]
    found: dict[str, nn.Linear] = {}
    for index in adapted_layer_indices(model, config):
        # A PEFT LoRA on the slow weights wraps the linear (its `base_layer`); hooking the wrapper puts the fast
        # delta on top of the slow adapter's output.
        linears = {
            name: m
            for name, m in layers[index].named_modules()
            if isinstance(_linear_of(m), nn.Linear) and not name.endswith("base_layer")
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


def _linear_of(module: nn.Module) -> nn.Module:
    """The plain linear layer itself, or the one a PEFT LoRA wrapper holds as `base_layer`."""
    base = getattr(module, "base_layer", None)
    return base if isinstance(base, nn.Linear) else module


def _full_weight(weight: torch.Tensor) -> torch.Tensor:
    """The whole weight matrix, gathering it first when DeepSpeed ZeRO-3 has partitioned it across ranks."""
    if hasattr(weight, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
            return weight.detach().clone()
    return weight.detach()


def svd_init(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """A = S_r V_r^T: the top-r right singular directions of W, scaled by their singular values. [r, d_in]"""
    _, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    return s[:rank, None] * vh[:rank]


class FastWeights:
    def __init__(self, model: nn.Module, num_slots: int, config: FastWeightConfig | None = None):
        self.model = model
        self.config = config or FastWeightConfig()
        self.num_slots = num_slots
        self.modules = find_target_modules(model, self.config)
        r = self.config.rank
        generator = torch.Generator().manual_seed(self.config.seed)
        self.A: dict[str, torch.Tensor] = {}
        self.B: dict[str, torch.Tensor] = {}
        self._a_init: dict[str, torch.Tensor] = {}
        for name, module in self.modules.items():
            linear = _linear_of(module)
            d_out, d_in = linear.out_features, linear.in_features
            if r > min(d_in, d_out):
                raise ValueError(f"rank {r} exceeds min(d_in, d_out) = {min(d_in, d_out)} of {name}")
            weight = _full_weight(linear.weight)
            if self.config.init == "svd":
                a = svd_init(weight, r)
            else:
                a = torch.empty(r, d_in)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # PEFT's lora_A default
            a = a.to(device=weight.device, dtype=torch.float32)
            self._a_init[name] = a
            # Fast weights are kept in float32 whatever the model's dtype: SGD steps of lr 5e-4 vanish in bf16.
            self.A[name] = a.expand(num_slots, r, d_in).clone() if self.config.train_a else a
            self.B[name] = torch.zeros(num_slots, d_out, r, device=weight.device)  # [G, d_out, r]
        self._slots: torch.Tensor | None = None
        self._handles = [m.register_forward_hook(self._make_hook(n)) for n, m in self.modules.items()]
        self.versions = [0] * num_slots  # number of absorbs into each slot since its last reset

    # ---- applying the delta -------------------------------------------------------------------------------

    def _make_hook(self, name: str):
        def hook(module, args, output):
            slots = self._slots
            if slots is None:
                return output
            x = args[0]
            rows = x.shape[0]
            if slots.numel() != rows:
                raise RuntimeError(f"fast weights: {slots.numel()} slots set for a batch of {rows} rows")
            x3 = x.reshape(rows, -1, x.shape[-1])  # [N, T, d_in]
            idx = slots.clamp(min=0)
            a = self.A[name]
            if a.dim() == 2:
                xa = x3 @ a.to(x.dtype).T  # [N, T, r]
            else:
                xa = torch.bmm(x3, a[idx].to(x.dtype).transpose(1, 2))
            b = self.B[name][idx]  # [N, d_out, r]
            if bool((slots < 0).any()):
                b = b * (slots >= 0).to(b.dtype).view(-1, 1, 1)
            delta = torch.bmm(xa, b.to(x.dtype).transpose(1, 2))  # [N, T, d_out]
            return output + delta.reshape(output.shape)

        return hook

    @contextmanager
    def use(self, slots: Sequence[int] | torch.Tensor) -> Iterator[None]:
        """Inside this block batch row i runs with slot slots[i]'s delta (-1: base model only)."""
        previous = self._slots
        device = next(iter(self.B.values())).device
        self._slots = torch.as_tensor(slots, dtype=torch.long, device=device).reshape(-1)
        try:
            yield
        finally:
            self._slots = previous

    def remove(self) -> None:
        """Detach the hooks: the model becomes the plain base model again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ---- state ----------------------------------------------------------------------------------------------

    def trainable(self) -> dict[str, torch.Tensor]:
        """The tensors the inner loop updates, by state key."""
        tensors = {f"B.{n}": b for n, b in self.B.items()}
        if self.config.train_a:
            tensors.update({f"A.{n}": a for n, a in self.A.items()})
        return tensors

    def reset(self, slots: Sequence[int] | None = None) -> None:
        """Forget everything absorbed into these slots (all by default)."""
        slots = list(range(self.num_slots)) if slots is None else list(slots)
        with torch.no_grad():
            for name in self.modules:
                self.B[name][slots] = 0
                if self.config.train_a:
                    self.A[name][slots] = self._a_init[name]
        for s in slots:
            self.versions[s] = 0

    def snapshot(self, slots: Sequence[int] | None = None) -> Snapshot:
        """A detached copy of these slots' fast weights, e.g. to recompute log-probs under them later."""
        slots = list(range(self.num_slots)) if slots is None else list(slots)
        return {key: t[slots].detach().clone() for key, t in self.trainable().items()}

    def restore(self, snapshot: Snapshot, slots: Sequence[int] | None = None) -> None:
        """Load a snapshot (of len(slots) rows) into these slots."""
        slots = list(range(self.num_slots)) if slots is None else list(slots)
        with torch.no_grad():
            for key, t in self.trainable().items():
                if key not in snapshot:
                    raise KeyError(f"snapshot has no {key!r}; it was taken with other fast-weight settings")
                t[slots] = snapshot[key].to(t.device, t.dtype)

    def save(self, path: str | Path) -> None:
        """Fast weights of every slot plus the settings, in one folder (safetensors + JSON)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {f"A.{n}": a.contiguous() for n, a in self.A.items()}
        tensors.update({f"B.{n}": b.contiguous() for n, b in self.B.items()})
        save_file(tensors, str(path / "fast_weights.safetensors"))
        meta = {"config": self.config.to_dict(), "num_slots": self.num_slots, "versions": self.versions}
        (path / "fast_weights.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, model: nn.Module, path: str | Path) -> "FastWeights":
        path = Path(path)
        meta = json.loads((path / "fast_weights.json").read_text())
        fast = cls(model, meta["num_slots"], FastWeightConfig(**meta["config"]))
        tensors = load_file(str(path / "fast_weights.safetensors"))
        with torch.no_grad():
            for name in fast.modules:
                fast.A[name] = tensors[f"A.{name}"].to(fast.B[name].device)
                fast.B[name].copy_(tensors[f"B.{name}"])
        fast.versions = list(meta["versions"])
        return fast

    # ---- the inner update ------------------------------------------------------------------------------------

    def absorb(self, tokenizer, pairs_by_slot: dict[int, list], prompt_fn=None) -> dict[int, dict]:
        """Train each slot's fast weights on its own QA pairs, all slots in the same batched passes.

        `prompt_fn(question) -> chat messages` renders each pair's question (default: a bare user turn).
        Returns per slot {"loss_before", "loss_after", "epoch_losses", "num_pairs", "seconds"}.
        """
        from tmem_rl.memory.inner_loop import inner_update, user_turn

        stats = inner_update(self, tokenizer, pairs_by_slot, prompt_fn or user_turn)
        for slot in stats:
            self.versions[slot] += 1
        return stats
