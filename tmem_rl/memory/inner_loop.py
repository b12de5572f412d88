"""The inner update T: format QA pairs, cache the frozen prefix, run SGD epochs on every slot's B at once."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from tmem_rl.chat import chat_template_kwargs, chat_text
from tmem_rl.memory.layers import adapted_layer_indices, decoder_layers, take_rows
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


class AdaptedStack:
    """Runs the model from the first adapted layer to the LM head, from cached inputs to that layer.

    The frozen layers below the first adapted one do not change during an update, so their output is computed
    once (no grad) and reused for every epoch. Each adapted layer's call arguments (masks, rotary embeddings)
    are captured on that pass too, so this works for any decoder whose layers are called in sequence.
    """

    def __init__(self, model: nn.Module, layer_indices: list[int]):
        self.model = model
        all_layers = decoder_layers(model)
        self.layers = [all_layers[i] for i in range(layer_indices[0], len(all_layers))]
        decoder = model.get_decoder()
        self.norm = getattr(decoder, "norm", None) or getattr(decoder, "final_layernorm")
        self.head = model.get_output_embeddings()
        self.hidden: torch.Tensor | None = None  # [P, T, d] input to the first adapted layer
        self.layer_kwargs: list[dict] = []

    @torch.no_grad()
    def capture(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        captured: list[dict] = []

        def pre_hook(module, args, kwargs):
            if not captured:
                self.hidden = args[0] if args else kwargs["hidden_states"]
            captured.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
            if len(captured) == len(self.layers):
                raise _PrefixCaptured  # everything needed is known; skip the rest of the pass

        handles = [layer.register_forward_pre_hook(pre_hook, with_kwargs=True) for layer in self.layers]
        try:
            self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _PrefixCaptured:
            pass
        finally:
            for handle in handles:
                handle.remove()
        self.layer_kwargs = captured

    def hidden_states(self, rows: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states [len(rows), T, d] for these cached rows, with grad through the adapted layers."""
        total = self.hidden.shape[0]
        h = self.hidden[rows]
        for layer, kwargs in zip(self.layers, self.layer_kwargs):
            out = layer(h, **{k: take_rows(v, rows, total) for k, v in kwargs.items()})
            h = out[0] if isinstance(out, tuple) else out
        return self.norm(h)


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
    stack = AdaptedStack(model, adapted_layer_indices(model, cfg))
    if cfg.prefix_cache:
        stack.capture(batch.input_ids, batch.attention_mask)

    def slot_losses(rows: torch.Tensor) -> torch.Tensor:
        row_slots = batch.slots[rows]
        with fast.use(row_slots):
            if cfg.prefix_cache:
                hidden = stack.hidden_states(rows)
            else:
                hidden = model.get_decoder()(
                    input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows], use_cache=False
                ).last_hidden_state
        losses, token_rows = answer_token_losses(stack.head, hidden, batch.labels[rows])
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
