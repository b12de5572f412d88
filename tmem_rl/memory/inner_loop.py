"""The inner update T: format QA pairs, cache the frozen prefix, run SGD epochs on every slot's B at once."""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from tmem_rl.chat import chat_template_kwargs, chat_text
from tmem_rl.memory.layers import CACHE_ARGUMENTS, adapted_layer_indices, decoder_layers, take_rows
from tmem_rl.records import InnerUpdate, QAPair

IGNORE = -100


PromptFn = Callable[[str], list[dict[str, str]]]


def user_turn(instruction: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": instruction}]


def format_pair(tokenizer, pair: QAPair, max_tokens: int, prompt_fn: PromptFn = user_turn,
                template_kwargs: dict | None = None) -> tuple[list[int], list[int]]:
    """Chat-formatted (input_ids, labels) for one pair; labels only on the answer turn.

    `prompt_fn` renders the question as chat messages; the agent passes its answering prompt and its chat-template
    settings so that what is absorbed has the shape of how it is later asked (None: the agent's default settings,
    thinking off where the template has the switch).
    """
    user = prompt_fn(pair.instruction)
    kwargs = chat_template_kwargs(tokenizer) if template_kwargs is None else template_kwargs
    prompt_text = chat_text(tokenizer, user, kwargs, generation_prompt=True)
    full_text = chat_text(tokenizer, user + [{"role": "assistant", "content": pair.output}], kwargs,
                          generation_prompt=False)
    if not full_text.startswith(prompt_text):
        raise ValueError("the chat template renders the prompt differently inside a full conversation")
    # The answer is tokenized after the prompt's own tokens, as generation produces it: tokenizing the whole text
    # at once can merge across the boundary (a prompt ending in "\n\n" before the answer's first word).
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]  # what chat_ids gives the agent
    full = prompt + tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    ids = full[:max_tokens]
    labels = [IGNORE] * min(len(prompt), len(ids)) + ids[len(prompt) :]
    return ids, labels


@dataclass
class PairBatch:
    input_ids: torch.Tensor  # [P, T], right-padded
    attention_mask: torch.Tensor  # [P, T]
    labels: torch.Tensor  # [P, T], IGNORE outside answers
    slots: torch.Tensor  # [P] fast-weight slot of each pair


NO_ANSWER_TOKEN = "no answer token within max_pair_tokens"


def collate_pairs(
    tokenizer, pairs_by_slot: dict[int, list[QAPair]], max_tokens: int, device, prompt_fn: PromptFn = user_turn,
    template_kwargs: dict | None = None,
) -> tuple[PairBatch | None, dict[int, list[int]], dict[int, list[dict]]]:
    """-> (batch of every trainable pair or None, batch rows of each slot, dropped pairs of each slot).

    A pair whose prompt fills `max_tokens` keeps no answer token after truncation: it would train nothing, so it
    is dropped with a reason instead of silently counting as learned."""
    rows, slots, rows_of_slot, dropped = [], [], {}, {}
    for slot, pairs in pairs_by_slot.items():
        rows_of_slot[slot], dropped[slot] = [], []
        for pair in pairs:
            ids, labels = format_pair(tokenizer, pair, max_tokens, prompt_fn, template_kwargs)
            if all(label == IGNORE for label in labels[1:]):
                dropped[slot].append({"item": pair.to_dict(), "reason": NO_ANSWER_TOKEN})
                continue
            rows_of_slot[slot].append(len(rows))
            rows.append((ids, labels))
            slots.append(slot)
    if not rows:
        return None, rows_of_slot, dropped
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    batch = PairBatch(input_ids.to(device), mask.to(device), labels.to(device), torch.tensor(slots, device=device))
    return batch, rows_of_slot, dropped


def minibatch_schedule(num_items: int, batch_size: int, shuffle: bool, generator: torch.Generator) -> list[list[int]]:
    """One epoch's minibatches of item positions."""
    order = torch.randperm(num_items, generator=generator).tolist() if shuffle else list(range(num_items))
    return [order[i : i + batch_size] for i in range(0, num_items, batch_size)]


def slot_generator(seed: int, slot: int, version: int) -> torch.Generator:
    """Shuffling depends only on the slot's own history, so a slot trains the same whatever else is in the batch."""
    return torch.Generator().manual_seed(seed * 1_000_003 + slot * 10_007 + version)


class _PrefixCaptured(Exception):
    pass


def shared_head_length(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> int:
    """How many leading tokens every row has in common and no loss reads: the chat template's head (system prompt,
    the answering prompt's first words) that every formatted pair starts with."""
    if input_ids.shape[0] < 2:
        return 0
    same = ((input_ids == input_ids[:1]) & (attention_mask == 1)).all(dim=0)
    common = int(same.long().cumprod(0).sum())
    # Position i predicts token i + 1: a head ends at the first position whose next token is an answer's.
    predicting = (labels[:, 1:] != IGNORE).any(dim=0).nonzero()
    return min(common, int(predicting[0])) if len(predicting) else 0


def holds_whole_head(cache, head: int) -> bool:
    """Whether the model's cache after the head's pass is one this module can put in front of the tails: a
    `DynamicCache` of full-attention layers only. A sliding-window layer keeps only its window of the head, and
    other layer kinds (recurrent, shared keys) need more of the cache interface than `_HeadCache` has."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    layers = getattr(cache, "layers", None)
    return (isinstance(cache, DynamicCache) and bool(layers) and all(type(layer) is DynamicLayer for layer in layers)
            and cache.get_seq_length() == head)


class _HeadCache:
    """The KV cache an adapted layer sees: on the head pass it keeps each layer's keys and values (with their
    gradient); once `serve_tails` is called it puts them in front of the tail's, each row taking its slot's head."""

    def __init__(self):
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.rows_head: torch.Tensor | None = None  # on the tail pass: the head row of each tail row

    def serve_tails(self, rows_head: torch.Tensor) -> None:
        self.rows_head = rows_head

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.rows_head is None:
            self.kv[layer_idx] = key_states, value_states
            return key_states, value_states
        keys, values = self.kv[layer_idx]
        return (torch.cat([keys[self.rows_head], key_states], dim=-2),
                torch.cat([values[self.rows_head], value_states], dim=-2))


class AdaptedStack:
    """Runs the model from the first adapted layer to the LM head, from cached inputs to that layer.

    The frozen layers below the first adapted one do not change during an update, so their output is computed
    once (no grad) and reused for every epoch. Each adapted layer's call arguments (masks, rotary embeddings)
    are captured on that pass too, so this works for any decoder whose layers are called in sequence.

    With `share_head`, the leading tokens every pair has in common (the chat template's head) run through the
    adapted layers once per slot in a step, not once per pair, and each pair's own tokens attend to its slot's
    head through the layers' KV cache: in `grpo_step.py`'s update (8 slots x 8 pairs of 47 columns, 31 of them the
    head) that is 2.4x fewer tokens through the adapted layers (1272 against 3008), with the same losses and
    gradients.
    """

    def __init__(self, model: nn.Module, layer_indices: list[int], share_head: bool = True):
        self.model = model
        all_layers = decoder_layers(model)
        self.layers = [all_layers[i] for i in range(layer_indices[0], len(all_layers))]
        # The head's keys and values come from the model's own cache below the adapted layers: none below, none.
        self.share_head = share_head and layer_indices[0] > 0
        decoder = model.get_decoder()
        self.norm = getattr(decoder, "norm", None) or getattr(decoder, "final_layernorm")
        self.head = model.get_output_embeddings()
        self.head_length = 0
        self.hidden: torch.Tensor | None = None  # [P, T - head_length, d] input to the first adapted layer
        self.layer_kwargs: list[dict] = []
        self.head_hidden: torch.Tensor | None = None  # [1, head_length, d]
        self.head_kwargs: list[dict] = []
        self._cache_name = CACHE_ARGUMENTS[0]

    @torch.no_grad()
    def capture(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> None:
        head = shared_head_length(input_ids, attention_mask, labels) if self.share_head else 0
        if head:
            # The head once, through the frozen layers, into the model's own cache; then every row's tail after it,
            # so that the model builds the tail's masks and positions itself.
            self.head_hidden, self.head_kwargs, cache = self._run_to_adapted(
                input_ids=input_ids[:1, :head], attention_mask=attention_mask[:1, :head], use_cache=True)
            if holds_whole_head(cache, head):
                cache.batch_repeat_interleave(input_ids.shape[0])
                self.hidden, self.layer_kwargs, _ = self._run_to_adapted(
                    input_ids=input_ids[:, head:], attention_mask=attention_mask, use_cache=True,
                    **{self._cache_name: cache})
                self.head_length = head
                return
        self.head_length = 0
        self.hidden, self.layer_kwargs, _ = self._run_to_adapted(input_ids=input_ids, attention_mask=attention_mask,
                                                                 use_cache=False)

    def _run_to_adapted(self, **inputs) -> tuple[torch.Tensor, list[dict], object]:
        """The decoder's pass, stopped before the top layer once every adapted layer's call arguments are known:
        (the first adapted layer's input, each adapted layer's other arguments with the cache left out, the cache).
        The adapted layers it runs write the base model's keys and values into the cache too: unused."""
        captured: list[dict] = []
        found = {}

        def pre_hook(module, args, kwargs):
            if not captured:
                found["hidden"] = args[0] if args else kwargs["hidden_states"]
            for name in CACHE_ARGUMENTS:
                if kwargs.get(name) is not None:
                    found["cache"], self._cache_name = kwargs[name], name
            captured.append({k: v for k, v in kwargs.items() if k != "hidden_states" and k not in CACHE_ARGUMENTS})
            if len(captured) == len(self.layers):
                raise _PrefixCaptured  # everything needed is known; skip the rest of the pass

        handles = [layer.register_forward_pre_hook(pre_hook, with_kwargs=True) for layer in self.layers]
        try:
            self.model.get_decoder()(**inputs)
        except _PrefixCaptured:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return found["hidden"], captured, found.get("cache")

    def _run_layers(self, h: torch.Tensor, layer_kwargs: list[dict], rows: torch.Tensor, total: int,
                    cache: _HeadCache | None, read: tuple[int, int]) -> torch.Tensor:
        """The adapted layers on `h`; the last one's MLP only on the positions `read` (first, last) that anything
        reads after it: its output elsewhere is left as the residual stream alone."""
        for i, (layer, kwargs) in enumerate(zip(self.layers, layer_kwargs)):
            kwargs = {k: take_rows(v, rows, total) for k, v in kwargs.items()}
            if cache is not None:
                kwargs[self._cache_name] = cache
            with self._mlp_only_on(layer, read) if i == len(self.layers) - 1 else nullcontext():
                out = layer(h, **kwargs)
            h = out[0] if isinstance(out, tuple) else out
        return h

    @staticmethod
    @contextmanager
    def _mlp_only_on(layer: nn.Module, read: tuple[int, int]) -> Iterator[None]:
        """Inside: the layer's position-wise MLP runs on positions read[0]..read[1] only, zeros elsewhere. Only the
        answer positions' logits are read, so the top layer's MLP elsewhere was wasted: 8.6% of the work of
        `grpo_step.py`'s update after a shared head (counted)."""
        mlp = getattr(layer, "mlp", None)
        if not isinstance(mlp, nn.Module):
            yield
            return
        first, last = read
        width = {}

        def narrow(module, args):
            # Only an MLP called on [rows, positions, d]: a flattened or keyword call is left alone.
            if not args or args[0].dim() != 3:
                width.pop("full", None)
                return None
            width["full"] = args[0].shape[1]
            return (args[0][:, first : last + 1], *args[1:])

        def widen(module, args, output):
            if "full" not in width:
                return None
            pad = (0, 0, first, width["full"] - last - 1)
            if isinstance(output, tuple):  # a mixture of experts' (hidden states, router logits)
                return (nn.functional.pad(output[0], pad), *output[1:])
            return nn.functional.pad(output, pad)

        handles = [mlp.register_forward_pre_hook(narrow), mlp.register_forward_hook(widen)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def hidden_states(self, rows: torch.Tensor, row_slots: torch.Tensor, fast, labels: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states [len(rows), T - head_length, d] for these cached rows under their slots' fast
        weights, with grad through the adapted layers. Position t of the result is position head_length + t of
        the row. `labels` [len(rows), T - head_length] (aligned the same way): only the positions that predict
        one are exact."""
        total = self.hidden.shape[0]
        predicting = (labels[:, 1:] != IGNORE).any(dim=0).nonzero()
        read = (int(predicting[0]), int(predicting[-1])) if len(predicting) else (0, 0)
        if not self.head_length:
            with fast.use(row_slots):
                return self.norm(self._run_layers(self.hidden[rows], self.layer_kwargs, rows, total, None, read))
        slots, rows_head = torch.unique(row_slots, return_inverse=True)
        cache = _HeadCache()
        with fast.use(slots):
            head = self.head_hidden.expand(len(slots), -1, -1)
            # The head's output is never read, only the keys and values each layer takes from its input.
            self._run_layers(head, self.head_kwargs, torch.zeros_like(slots), 1, cache, (0, 0))
        cache.serve_tails(rows_head)
        with fast.use(row_slots):
            return self.norm(self._run_layers(self.hidden[rows], self.layer_kwargs, rows, total, cache, read))


def answer_token_losses(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy at answer positions only (the LM head never sees the rest). -> ([K], row index [K])"""
    targets = labels[:, 1:]
    mask = targets != IGNORE
    logits = head(hidden[:, :-1][mask]).float()  # [K, V]
    losses = nn.functional.cross_entropy(logits, targets[mask], reduction="none")
    row_of_token = mask.nonzero()[:, 0]
    return losses, row_of_token


def per_slot_mean(losses: torch.Tensor, row_slots: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean token loss per slot [num_slots] and token counts; each slot's mean matches a standalone adapter's loss."""
    sums = torch.zeros(num_slots, device=losses.device, dtype=losses.dtype).index_add(0, row_slots, losses)
    counts = torch.zeros(num_slots, device=losses.device, dtype=losses.dtype).index_add(
        0, row_slots, torch.ones_like(losses)
    )
    return sums / counts.clamp(min=1), counts


def inner_update(fast, tokenizer, pairs_by_slot: dict[int, list[QAPair]], prompt_fn: PromptFn = user_turn,
                 template_kwargs: dict | None = None) -> dict[int, InnerUpdate]:
    """SGD epochs on the fast weights `fast` (a FastWeights), every slot on its own pairs in the same passes."""
    start = time.perf_counter()
    cfg = fast.config
    pairs_by_slot = {s: list(p) for s, p in pairs_by_slot.items() if p}
    if not pairs_by_slot:
        return {}
    for slot in pairs_by_slot:
        if not 0 <= slot < fast.num_slots:
            raise IndexError(f"fast-weight slot {slot} out of range 0..{fast.num_slots - 1}")
    model = fast.model
    device = fast.device
    batch, rows_of_slot, dropped = collate_pairs(tokenizer, pairs_by_slot, cfg.max_pair_tokens, device, prompt_fn,
                                                 template_kwargs)
    trained = [s for s in pairs_by_slot if rows_of_slot[s]]
    stats = {s: InnerUpdate(dropped=dropped[s]) for s in pairs_by_slot}
    if batch is None:
        return stats
    stack = AdaptedStack(model, adapted_layer_indices(model, cfg), share_head=cfg.shared_head)
    if cfg.prefix_cache:
        stack.capture(batch.input_ids, batch.attention_mask, batch.labels)

    def slot_losses(rows: torch.Tensor) -> torch.Tensor:
        row_slots = batch.slots[rows]
        labels = batch.labels[rows][:, stack.head_length :]  # the hidden states start after a shared head
        if cfg.prefix_cache:
            hidden = stack.hidden_states(rows, row_slots, fast, labels)
        else:
            with fast.use(row_slots):
                hidden = model.get_decoder()(
                    input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows], use_cache=False
                ).last_hidden_state
        losses, token_rows = answer_token_losses(stack.head, hidden, labels)
        return per_slot_mean(losses, row_slots[token_rows], fast.num_slots)[0]

    every_row = torch.arange(batch.input_ids.shape[0], device=device)
    # When every slot's pairs fit one minibatch, the first step scores every pair under the weights as they are:
    # its losses are the losses before the update, and a pass of their own would repeat it (1 of 7 passes at the
    # default 5 epochs).
    first_step_is_before = cfg.epochs > 0 and all(len(rows_of_slot[s]) <= cfg.batch_size for s in trained)
    before = None
    if not first_step_is_before:
        with torch.no_grad():
            before = slot_losses(every_row).tolist()
    params = fast.trainable()
    for t in params.values():
        t.requires_grad_(True)
    epoch_losses: dict[int, list[float]] = {s: [] for s in trained}
    try:
        generators = {s: slot_generator(cfg.seed, s, fast.versions[s]) for s in trained}
        for _ in range(cfg.epochs):
            schedules = {
                s: minibatch_schedule(len(rows_of_slot[s]), cfg.batch_size, cfg.shuffle, generators[s])
                for s in trained
            }
            sums = {s: 0.0 for s in trained}
            for step in range(max(len(sched) for sched in schedules.values())):
                # Step k takes each slot's k-th minibatch; slots with fewer pairs sit out (zero gradient).
                rows = [rows_of_slot[s][i] for s, sched in schedules.items() if step < len(sched) for i in sched[step]]
                rows_t = torch.tensor(rows, device=device)
                with torch.enable_grad():
                    per_slot = slot_losses(rows_t)
                    # Slots share no parameters, so the sum's gradient is each slot's own gradient.
                    grads = torch.autograd.grad(per_slot.sum(), list(params.values()), allow_unused=True)
                with torch.no_grad():
                    for t, g in zip(params.values(), grads):
                        if g is not None:
                            t.sub_(cfg.lr * g)
                losses_now = per_slot.detach().tolist()  # one device sync per step, not one per slot
                if before is None:
                    before = losses_now
                for s, sched in schedules.items():
                    if step < len(sched):
                        sums[s] += losses_now[s] * len(sched[step])
            for s in trained:
                epoch_losses[s].append(sums[s] / len(rows_of_slot[s]))
    finally:
        for t in params.values():
            t.requires_grad_(False)
            t.grad = None
    with torch.no_grad():
        after = slot_losses(every_row).tolist()
    seconds = time.perf_counter() - start
    for s in trained:
        stats[s] = InnerUpdate(num_pairs=len(rows_of_slot[s]), dropped=dropped[s], loss_before=before[s],
                               loss_after=after[s], epoch_losses=epoch_losses[s], seconds=seconds)
    return stats
