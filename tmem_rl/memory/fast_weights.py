"""Batched per-rollout fast weights.

Every target linear layer y = W x gets a low-rank delta y += B_g (A x) where g is the rollout that owns the batch
row: B is [G, d_out, r] (one slice per rollout slot), A is [r, d_in] shared and frozen (or [G, r, d_in] when A is
trained too). One forward pass serves G rollouts at once, which is what PEFT's mixed-adapter batches cannot do
while training. Fast weights live outside the model's parameters so the outer loop's optimizer never sees them.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tmem_rl.chat import chat_ids, left_padded, stop_token_ids
from tmem_rl.chat import chat_template_kwargs as chat_template_kwargs_of
from tmem_rl.errors import InputError
from tmem_rl.memory.config import FastWeightConfig
from tmem_rl.memory.inner_loop import inner_update, user_turn
from tmem_rl.memory.layers import find_target_modules, layer_stack_name, linear_of
from tmem_rl.metrics.qa import normalize_answer
from tmem_rl.records import InnerUpdate

Snapshot = dict[str, torch.Tensor]  # "B.<module>" / "A.<module>" -> [n, ...] for the n snapshotted slots

# General questions that no stream is about. Answering them with what was just absorbed means the update did not
# store facts but overwrote the model's answering (measured on SmolLM2-135M at lr 1e-3 x 20 epochs: "Gina" to all
# six after three "Gina" pairs; "222222" to five after a pair answering "22").
PROBE_QUESTIONS = (
    "What is the capital of France?",
    "How many days are there in a week?",
    "What colour is the sky on a clear day?",
    "What do bees make?",
    "Which animal says moo?",
    "What is the opposite of hot?",
)
PROBE_TOKENS = 6
INIT_FILE = "fast_weights_init.safetensors"  # the A each adapted module starts from, next to a checkpoint's settings


def leaked(answer: str, absorbed: Iterable[str]) -> bool:
    """Does this answer to an unrelated question start the way an absorbed answer starts? Once normalised, their
    first words share a stem: at least 4 letters, or the whole of the shorter word when it has 3. A collapse is
    rarely the absorbed answer itself: after "Melanie" pairs from a real LoCoMo conversation SmolLM2-135M answered
    the probes "Melanin", "Melanoma", "Mel". A shorter shared start is no leak: "No" is not "Noah", "Mary" not
    "Mark"."""
    first = normalize_answer(answer).split()[:1]
    return bool(first) and any(_same_stem(first[0], a.split()[0]) for a in map(normalize_answer, absorbed) if a)


def damaged(answer: str, absorbed: Iterable[str]) -> bool:
    """A probe answer the update broke: one that `leaked`, or none at all (after "Caroline" pairs from a LoCoMo
    conversation SmolLM2-135M answered five of the six probes with an end token, and every question of the
    conversation with "Caroline")."""
    return not answer.strip() or leaked(answer, absorbed)


def _same_stem(a: str, b: str) -> bool:
    shorter = min(len(a), len(b))
    return shorter >= 3 and len(os.path.commonprefix([a, b])) >= min(4, shorter)


def _full_weight(weight: torch.Tensor) -> torch.Tensor:
    """The whole weight matrix, gathering it first when DeepSpeed ZeRO-3 has partitioned it across ranks."""
    if hasattr(weight, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
            return weight.detach().clone()
    return weight.detach()


def svd_init(weight: torch.Tensor, rank: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A = S_r V_r^T: the top-r right singular directions of W, scaled by their singular values. [r, d_in]

    Only the top r are needed, so this takes the eigendecomposition of the smaller Gram matrix (d x d with
    d = min(d_in, d_out)) instead of a full SVD: one matmul and a small symmetric eigensolve. Squaring W squares
    its condition number, which costs nothing for the largest singular values; float64 keeps the rest exact
    enough. Each row's sign is fixed (largest entry positive) so every process and device gets the same A.
    """
    w = weight.detach().to(dtype)
    d_out, d_in = w.shape
    if d_in <= d_out:
        eigenvalues, eigenvectors = torch.linalg.eigh(w.T @ w)  # ascending; W^T W = V S^2 V^T
        v_top = eigenvectors[:, -rank:].flip(-1).T  # [r, d_in]
        a = eigenvalues[-rank:].flip(-1).clamp(min=0).sqrt()[:, None] * v_top
    else:
        _, eigenvectors = torch.linalg.eigh(w @ w.T)  # W W^T = U S^2 U^T, and U_r^T W = S_r V_r^T
        a = eigenvectors[:, -rank:].flip(-1).T @ w
    largest = a.gather(1, a.abs().argmax(dim=1, keepdim=True))
    a = a * torch.where(largest < 0, -1.0, 1.0).to(a.dtype)
    return a.float().contiguous()


class FastWeights:
    def __init__(self, model: nn.Module, num_slots: int, config: FastWeightConfig | None = None,
                 init_from: str | Path | None = None):
        """`init_from`: a folder where `save_init` wrote the A tensors (a checkpoint, an export). They are used as
        saved rather than computed from this model's weights, which slow-weight training has moved since; a folder
        without them (written before they were saved) falls back to computing A, with a warning."""
        self.model = model
        self.config = config or FastWeightConfig()
        self.num_slots = num_slots
        self.modules = find_target_modules(model, self.config)
        # Saved A is keyed by the name inside the layer stack ("3.mlp.gate_proj"): a LoRA-wrapped training policy
        # and the merged model it is exported as name their modules differently.
        stack = layer_stack_name(model)
        self._init_keys = {name: name.removeprefix(f"{stack}.") for name in self.modules}
        saved = self._saved_init(init_from) if init_from is not None else None
        r = self.config.rank
        generator = torch.Generator().manual_seed(self.config.seed)
        self.A: dict[str, torch.Tensor] = {}
        self.B: dict[str, torch.Tensor] = {}
        self._a_init: dict[str, torch.Tensor] = {}
        for name, module in self.modules.items():
            linear = linear_of(module)
            d_out, d_in = linear.out_features, linear.in_features
            if r > min(d_in, d_out):
                raise ValueError(f"rank {r} exceeds min(d_in, d_out) = {min(d_in, d_out)} of {name}")
            if saved is not None:
                a = saved[self._init_keys[name]]
            elif self.config.init == "svd":
                a = svd_init(_full_weight(linear.weight), r)
            else:
                a = torch.empty(r, d_in)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # PEFT's lora_A default
            device = linear.weight.device
            a = a.to(device=device, dtype=torch.float32).contiguous()
            self._a_init[name] = a
            # Fast weights are kept in float32 whatever the model's dtype: SGD steps of lr 5e-4 vanish in bf16.
            self.A[name] = a.expand(num_slots, r, d_in).clone() if self.config.train_a else a
            self.B[name] = torch.zeros(num_slots, d_out, r, device=device)  # [G, d_out, r]
        self._slots: torch.Tensor | None = None  # [N] slot per batch row while `use` is active
        self._rows: torch.Tensor | None = None  # [N] slots clamped to valid indices
        self._keep: torch.Tensor | None = None  # [N, 1, 1] False on base-model rows (slot -1), in static blocks
        self._only: torch.Tensor | None = None  # rows with a slot, when others run on the base model
        # N -> static buffers of (_slots, _rows, _keep)
        self._slot_buffers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._static_depth: dict[int, int] = {}  # N -> static `use` blocks open on that buffer
        self._handles = [m.register_forward_hook(self._make_hook(n)) for n, m in self.modules.items()]
        self.versions = [0] * num_slots  # number of absorbs into each slot since its last reset
        # Answers absorbed into each slot since its last reset (rolled-back absorbs not included): a probe answer
        # equal to any of them is a collapse onto memory, whichever absorb put it there.
        self.absorbed_answers: list[list[str]] = [[] for _ in range(num_slots)]

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
            slot_of_row = self._rows
            if self._only is not None:  # rows with a slot beside base-model rows: only they get a delta
                if not self._only.numel():
                    return output
                x3, slot_of_row = x3[self._only], slot_of_row[self._only]
            a = self.A[name]
            if a.dim() == 2:
                xa = x3 @ a.to(x.dtype).T  # [n, T, r]
            else:
                xa = torch.bmm(x3, a[slot_of_row].to(x.dtype).transpose(1, 2))
            b = self.B[name][slot_of_row]  # [n, d_out, r]
            if self._keep is not None:
                # In a static block base-model rows are masked arithmetically rather than by a data-dependent
                # branch: a decode step captured as a graph replays with other slots.
                b = torch.where(self._keep, b, 0.0)
            delta = torch.bmm(xa, b.to(x.dtype).transpose(1, 2))  # [n, T, d_out]
            if self._only is not None:
                return output.reshape(rows, -1, delta.shape[-1]).index_add(0, self._only, delta).reshape(output.shape)
            return output + delta.reshape(output.shape)

        return hook

    @property
    def device(self) -> torch.device:
        """Where the model's adapted weights are now (under ZeRO-3, where their partitions live)."""
        return linear_of(next(iter(self.modules.values()))).weight.device

    def follow_model(self) -> None:
        """Move the fast weights to the model's device if the model moved since they were built (`.to()`,
        `accelerator.prepare`). Every entry point calls this, so construction order never matters."""
        device = self.device
        if next(iter(self.B.values())).device == device:
            return
        for store in (self.A, self.B, self._a_init):
            for name in store:
                store[name] = store[name].to(device)

    @contextmanager
    def use(self, slots: Sequence[int] | torch.Tensor, static: bool = False) -> Iterator[None]:
        """Inside this block batch row i runs with slot slots[i]'s delta (-1: base model only).

        `static`: copy the slots into one buffer per row count, kept for the object's life, instead of fresh
        tensors. A decode step captured as a graph reads them from there, so the next static `use` with as many
        rows steers its replays."""
        self.follow_model()
        requested = torch.as_tensor(slots, dtype=torch.long).reshape(-1)
        mapping = self._row_mapping(requested.to(self.device))
        only = None
        if not static and requested.device.type != "meta":
            # One host check per block, not per adapted linear (a meta tensor has no values to check). Base-model
            # rows beside rows with a slot (the GRPO update scores extractions read without fast weights with
            # answers read under them): the delta is computed for the others only, not computed and masked.
            # Without base-model rows there is nothing to mask (the mask and its backward: 2% of an inner update).
            has_slot = requested >= 0
            if not bool(has_slot.all()):
                only = has_slot.nonzero().squeeze(1).to(self.device)
            mapping = (*mapping[:2], None)
        previous = self._slots, self._rows, self._keep, self._only
        n = mapping[0].numel()
        saved = None
        if static:
            if n not in self._slot_buffers or self._slot_buffers[n][0].device != self.device:
                self._slot_buffers[n] = tuple(torch.empty_like(t) for t in mapping)
            buffers = self._slot_buffers[n]
            # An enclosing static `use` with as many rows reads the same buffers: give it its mapping back after.
            saved = tuple(t.clone() for t in buffers) if self._static_depth.get(n) else None
            self._static_depth[n] = self._static_depth.get(n, 0) + 1
            for buffer, value in zip(buffers, mapping):
                buffer.copy_(value)
            mapping = buffers
        self._slots, self._rows, self._keep = mapping
        self._only = only
        try:
            yield
        finally:
            if static:
                self._static_depth[n] -= 1
                for buffer, value in zip(self._slot_buffers[n], saved or ()):
                    buffer.copy_(value)
            self._slots, self._rows, self._keep, self._only = previous

    @staticmethod
    def _row_mapping(slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the hooks read per row: the slot, the slot clamped to a valid index, and whether it is a slot."""
        return slots, slots.clamp(min=0), (slots >= 0).view(-1, 1, 1)

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
        self.follow_model()
        slots = list(range(self.num_slots)) if slots is None else list(slots)
        with torch.no_grad():
            for name in self.modules:
                self.B[name][slots] = 0
                if self.config.train_a:
                    self.A[name][slots] = self._a_init[name]
        for s in slots:
            self.versions[s] = 0
            self.absorbed_answers[s] = []

    def snapshot(self, slots: Sequence[int] | None = None) -> Snapshot:
        """A detached copy of these slots' fast weights, e.g. to recompute log-probs under them later."""
        slots = list(range(self.num_slots)) if slots is None else list(slots)
        return {key: t[slots].detach().clone() for key, t in self.trainable().items()}

    def restore(self, snapshot: Snapshot, slots: Sequence[int] | None = None) -> None:
        """Load a snapshot (of len(slots) rows) into these slots."""
        self.follow_model()
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
        meta = {"config": self.config.to_dict(), "num_slots": self.num_slots, "versions": self.versions,
                "absorbed_answers": self.absorbed_answers}
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
        fast.absorbed_answers = [list(a) for a in meta.get("absorbed_answers", [[]] * fast.num_slots)]
        return fast

    def _saved_init(self, folder: str | Path) -> dict[str, torch.Tensor] | None:
        """The A tensors `save_init` wrote to `folder`, checked against this model and rank; None, with a warning,
        when the folder has none."""
        path = Path(folder) / INIT_FILE
        if not path.is_file():
            if self.config.init == "svd":  # a random A is seeded: the same whatever the weights
                warnings.warn(f"{path}: not found (saved before A was kept); fast weights take A from the SVD of "
                              "these weights, which differs from training's once the slow weights were trained",
                              stacklevel=3)
            return None
        tensors = load_file(str(path))
        expected = {key: (self.config.rank, linear_of(self.modules[name]).in_features)
                    for name, key in self._init_keys.items()}
        found = {key: tuple(t.shape) for key, t in tensors.items()}
        wrong = sorted(key for key in expected.keys() | found.keys() if expected.get(key) != found.get(key))
        if wrong:
            key = wrong[0]
            raise InputError(f"fast-weight init {path}: made for another model or settings: expected {len(expected)} "
                             f"tensors [rank, d_in] named like {next(iter(expected))!r}; {key!r} is "
                             f"{found.get(key, 'missing')}, expected {expected.get(key, 'none')}")
        return tensors

    def init_tensors(self) -> dict[str, torch.Tensor]:
        """The A each adapted module starts from (with `train_a`: before any absorb), by its name inside the layer
        stack ("3.mlp.gate_proj"). [r, d_in] each"""
        return {key: self._a_init[name] for name, key in self._init_keys.items()}

    def save_init(self, folder: str | Path) -> Path:
        """Write `init_tensors` to folder/INIT_FILE, for `FastWeights(..., init_from=folder)`. Returns its path."""
        path = Path(folder) / INIT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({key: a.cpu().contiguous() for key, a in self.init_tensors().items()}, str(path))
        return path

    # ---- the inner update ------------------------------------------------------------------------------------

    def absorb(self, tokenizer, pairs_by_slot: dict[int, list], prompt_fn=None,
               chat_template_kwargs: dict | None = None) -> dict[int, InnerUpdate]:
        """Train each slot's fast weights on its own QA pairs, all slots in the same batched passes.

        `prompt_fn(question) -> chat messages` renders each pair's question (default: a bare user turn);
        `chat_template_kwargs` go to the chat template, as when the agent generates (default: the agent's default,
        thinking off where the template has the switch).
        Returns an `InnerUpdate` per slot; a slot whose pairs all had to be dropped is reported but not updated (its
        version stays). With the collapse guard on (`config.max_probe_leak`), each has `probe_leak` too; a
        rolled-back slot is back where it was before this absorb and its version and absorbed answers stay.
        """
        self.follow_model()
        prompt_fn = prompt_fn or user_turn
        trained = [s for s, pairs in pairs_by_slot.items() if pairs]
        before = self.snapshot(trained) if trained else None
        stats = inner_update(self, tokenizer, pairs_by_slot, prompt_fn, chat_template_kwargs)
        if before is not None:
            self._roll_back_failed(stats, trained, before)
            if self.config.max_probe_leak:
                self._guard(tokenizer, stats, pairs_by_slot, trained, before, prompt_fn, chat_template_kwargs)
        for slot, record in stats.items():
            if record.absorbed:
                self.versions[slot] += 1
                self.absorbed_answers[slot] += [p.output for p in pairs_by_slot[slot]]
        return stats

    @torch.no_grad()
    def _roll_back_failed(self, stats: dict[int, InnerUpdate], slots: list[int], before: Snapshot) -> None:
        """Undo the updates that blew up: non-finite weights or losses, or a loss on the slot's own pairs that
        grew past `config.divergence_ratio` times where it started. Recorded as rolled_back + rollback_reason."""
        updated = [s for s in slots if stats[s].num_pairs]
        if not updated:
            return
        finite = torch.stack([t[updated].isfinite().flatten(1).all(1) for t in self.trainable().values()]).all(0)
        ratio = self.config.divergence_ratio
        for s, ok in zip(updated, finite.tolist()):
            record = stats[s]
            before_loss, after_loss = record.loss_before, record.loss_after
            reason = None
            if not ok or not math.isfinite(after_loss):
                reason = "non-finite"
            elif ratio is not None and math.isfinite(before_loss) and after_loss > ratio * max(before_loss, 1.0):
                # The floor of 1 nat: a loss already near 0 may wobble (0.01 -> 0.03) without diverging.
                reason = "diverged"
            if reason is not None:
                self._roll_back(record, s, slots, before, reason)

    @torch.no_grad()
    def _guard(self, tokenizer, stats, pairs_by_slot, slots, before: Snapshot, prompt_fn,
               chat_template_kwargs) -> None:
        """Greedy answers to PROBE_QUESTIONS under each updated slot; roll back the slots where more than
        max_probe_leak of them are `damaged` (empty, or starting as an answer the slot absorbed in this absorb or
        an earlier one since its reset starts) where the base model's answer was not."""
        updated = [s for s in slots if stats[s].absorbed]
        if not updated:
            return
        kwargs = chat_template_kwargs if chat_template_kwargs is not None else chat_template_kwargs_of(tokenizer)
        prompts = [chat_ids(tokenizer, prompt_fn(q), kwargs, generation_prompt=True) for q in PROBE_QUESTIONS]
        row_slots = [s for s in (-1, *updated) for _ in prompts]
        pad = tokenizer.pad_token_id
        input_ids, mask = left_padded(prompts * (len(updated) + 1), pad)
        width = input_ids.shape[1]
        stop = stop_token_ids(self.model, tokenizer)
        with self.use(row_slots):
            out = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                                      max_new_tokens=PROBE_TOKENS, do_sample=False, pad_token_id=pad,
                                      eos_token_id=stop, temperature=None, top_p=None, top_k=None)
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        n = len(prompts)
        base = texts[:n]
        for k, s in enumerate(updated):
            absorbed = [*self.absorbed_answers[s], *(p.output for p in pairs_by_slot[s])]
            answers = texts[(k + 1) * n : (k + 2) * n]
            leak = sum(damaged(a, absorbed) and not damaged(b, absorbed) for a, b in zip(answers, base)) / n
            stats[s].probe_leak, stats[s].probe_answers = leak, answers
            if leak > self.config.max_probe_leak:
                self._roll_back(stats[s], s, slots, before, "probe_leak")

    def _roll_back(self, record: InnerUpdate, slot: int, slots: list[int], before: Snapshot, reason: str) -> None:
        """Put `slot` back where this absorb found it (`before` holds `slots` in order) and record why."""
        i = slots.index(slot)
        self.restore({key: t[i : i + 1] for key, t in before.items()}, [slot])
        record.rolled_back, record.rollback_reason = True, reason
