"""Prefill shared by identical prompts: the layers below the first fast-weight layer run once per distinct prompt.

The G rollouts of a GRPO group read the same stream under the same budget, so at an extraction point and at the
answer their prompts are the same token for token; they differ only in the fast weights, which live in the top
layers. Inside `shared_prefill` the next forward over the batch runs each of the lower layers on one row per
distinct prompt and fans its output out to every row that has that prompt; the layers from the first adapted one
up run on every row, under each row's fast weights. Each lower layer's keys and values are written to every row of
the model's own KV cache (dynamic or static), so decoding goes on exactly as after an unshared prefill.

Works at the level of the decoder layers (forward hooks, a cache proxy), so any decoder whose layers take the
hidden states first, batch-shaped tensors in keyword arguments and the cache as `cache` or `past_key_values`.

Prompts that only *begin* alike share their beginning: the questions of one conversation, answered after one reading
under its fast weights (instructions and context, then each its own question), and a group's extraction prompts
after its first extraction (the same instructions and window, then each rollout's own earlier pairs).
`prefix_layout` lays each row out as its shared prefix then its own tail, each part padded on its left, and
`prefill_prefixes` runs every distinct (prefix, fast weights) once through all layers (the layers below the fast
weights once per distinct prefix) and hands every row its keys and values in a cache; the tails then prefill after
it, attending to the prefix across the padding between them (the attention mask has the hole, the positions skip
it).
"""

from __future__ import annotations

import os
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from tmem_rl.memory.inner_loop import holds_whole_head
from tmem_rl.memory.layers import (CACHE_ARGUMENTS, decoder_layers, logits_to_keep_argument, model_cache_argument,
                                  take_rows)

# Models whose KV cache cannot hold a whole prompt to put in front of what follows it (sliding-window layers, or
# other layers than plain full attention): found out once, then such prompts run whole.
CACHE_TOO_SHORT: weakref.WeakSet = weakref.WeakSet()

# A prefix layout is used only when it saves at least this share of the prefill's token-rows: it costs a second
# forward call and a copy of the prefixes' keys and values.
MIN_PREFIX_SAVING = 0.25


def distinct_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, inverse): the first row of each distinct (ids, mask) row, and for every row the index of its
    distinct row in `first`."""
    rows = torch.cat([input_ids, attention_mask.to(input_ids.dtype)], dim=1)
    _, inverse = torch.unique(rows, dim=0, return_inverse=True)
    order = torch.arange(len(rows), device=rows.device)
    first = torch.full((int(inverse.max()) + 1,), len(rows), dtype=torch.long, device=rows.device)
    first = first.scatter_reduce(0, inverse, order, reduce="amin")
    return first, inverse


def distinct_rows_under_slots(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                              slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`distinct_rows` of (prompt, fast weights): rows with the same tokens under different slots differ."""
    keyed = torch.cat([input_ids, slots[:, None].to(input_ids.dtype)], 1)
    return distinct_rows(keyed, torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], 1))


class _FanOutCache:
    """The KV cache as the lower layers see it while computing one row per distinct prompt: what they write goes
    to every row of the real cache, and what they read back is their own rows'."""

    def __init__(self, cache, first: torch.Tensor, inverse: torch.Tensor):
        self._cache, self._first, self._inverse = cache, first, inverse

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = self._cache.update(key_states[self._inverse], value_states[self._inverse], *args, **kwargs)
        return keys[self._first], values[self._first]

    def __getattr__(self, name):
        return getattr(self._cache, name)


@contextmanager
def shared_prefill(layers: list[nn.Module], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   width: int | None = None, fan_out: bool = True) -> Iterator[bool]:
    """Inside: the next forward of these decoder layers over a batch shaped like `input_ids` (the prefill) runs
    them on one row per distinct prompt. Yields whether any prompt is shared (if none, nothing is changed).
    `width`: the forward runs only the last `width` columns (those after a cached prefix); rows are still told
    apart by all of theirs. `fan_out=False`: these layers keep one row per distinct prompt in the cache too."""
    if not layers:
        yield False
        return
    first, inverse = distinct_rows(input_ids, attention_mask)
    rows = input_ids.shape[0]
    width = input_ids.shape[1] if width is None else width
    if len(first) == rows:
        yield False
        return
    narrowed: set[int] = set()
    widened: set[int] = set()

    def narrow(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        # Once per layer, and only on the prefill's shape: a decode step's rows differ.
        if id(module) in narrowed or hidden.shape[:2] != (rows, width):
            return None
        narrowed.add(id(module))
        kwargs = {k: take_rows(v, first, rows) for k, v in kwargs.items() if k != "hidden_states"}
        for name in CACHE_ARGUMENTS:
            if kwargs.get(name) is not None and fan_out:
                kwargs[name] = _FanOutCache(kwargs[name], first, inverse)
        return (hidden[first], *args[1:]), kwargs

    def widen(module, args, kwargs, output):
        if id(module) not in narrowed or id(module) in widened:
            return None
        widened.add(id(module))
        if isinstance(output, tuple):
            return (output[0][inverse], *output[1:])
        return output[inverse]

    handles = []
    for layer in layers:
        handles.append(layer.register_forward_pre_hook(narrow, with_kwargs=True))
        handles.append(layer.register_forward_hook(widen, with_kwargs=True))
    try:
        yield True
    finally:
        for handle in handles:
            handle.remove()


def full_attention_only(model) -> bool:
    """Whether every layer attends to every earlier position (no sliding window, no recurrent or linear-attention
    layers): only then may padding sit between a prompt's prefix and its tail without changing what a row sees."""
    if model in CACHE_TOO_SHORT:
        return False
    config = getattr(model, "config", None)
    kinds = getattr(config, "layer_types", None)
    if kinds is not None:
        return all(kind == "full_attention" for kind in kinds)
    return getattr(config, "sliding_window", None) is None or getattr(config, "use_sliding_window", True) is False


@dataclass
class PrefixLayout:
    """Prompts laid out as [shared prefix | own tail], each part padded on its left: row r's first
    `prefix_width` columns end in its prefix (none for a row that shares nothing), the rest in its own tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prefix_width: int

    @property
    def positions(self) -> torch.Tensor:
        return layout_positions(self.attention_mask)


def layout_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each column's position in its row's prompt: padding (at the left or between prefix and tail) takes none."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _common_length(a: list[int], b: list[int]) -> int:
    return len(os.path.commonprefix([a, b]))


class _Plan:
    """Which rows of a batch share which beginning, chosen by the work a prefill computes: token-rows per layer,
    where rows with the same tokens share the `lower` share of the layers (below the fast weights) whatever their
    slots (`shared_prefill`), and rows with the same tokens and slot share all of them."""

    def __init__(self, prompts: list[list[int]], slots: list[int], lower: float):
        self.prompts, self.slots, self.lower = prompts, slots, lower
        kinds: dict[tuple[int, ...], int] = {}
        self.kind = [kinds.setdefault(tuple(p), len(kinds)) for p in prompts]  # equal for equal prompts
        self._heads: dict[tuple[int, int], int] = {}

    def runs(self, across_slots: bool) -> list[tuple[list[int], int]]:
        """Rows that begin alike, as (rows, tokens they share): rows sorted so that rows that begin alike are
        neighbours (under the same slot only, unless `across_slots`), cut into the runs that save the most work. A
        run of m rows under k slots and of d distinct prompts, sharing n tokens, saves n x (m - k) token-rows in the
        layers with fast weights and n x (d - 1) in the others (identical prompts share those already). Every row
        keeps at least its last token out of the shared part."""
        prompts, slots, rows = self.prompts, self.slots, len(self.prompts)
        order = sorted(range(rows), key=(lambda r: (prompts[r], slots[r])) if across_slots
                       else (lambda r: (slots[r], prompts[r])))
        common = [min(_common_length(prompts[a], prompts[b]), len(prompts[a]) - 1, len(prompts[b]) - 1)
                  if across_slots or slots[a] == slots[b] else 0 for a, b in zip(order, order[1:])]
        # best[i]: the most work saved by cutting the first i sorted rows into runs; start[i]: its last run's start.
        best, start = [0.0] * (rows + 1), [0] * (rows + 1)
        for i in range(1, rows + 1):
            best[i], start[i] = best[i - 1], i - 1
            shared, under, kinds = None, {slots[order[i - 1]]}, {self.kind[order[i - 1]]}
            for j in range(i - 2, -1, -1):  # the run order[j:i]
                shared = common[j] if shared is None else min(shared, common[j])
                if shared <= 0:
                    break
                under.add(slots[order[j]])
                kinds.add(self.kind[order[j]])
                saved = shared * ((1 - self.lower) * (i - j - len(under)) + self.lower * (len(kinds) - 1))
                if best[j] + saved > best[i]:
                    best[i], start[i] = best[j] + saved, j
        runs, i = [], rows
        while i > 0:
            j = start[i]
            if i - j > 1:
                runs.append((order[j:i], min(common[j : i - 1])))
            i = j
        return runs

    def split(self, runs: list[tuple[list[int], int]]) -> list[int]:
        """Tokens of each row in the prefix part: its run's shared beginning. A row in no run fits in the tail if it
        is short enough; a longer one runs its beginning with the prefixes (as its own) rather than widen every
        tail. No runs: no prefixes."""
        prefix = [0] * len(self.prompts)
        for members, shared in runs:
            for row in members:
                prefix[row] = shared
        if not runs:
            return prefix
        tail_width = max(len(p) - n for p, n in zip(self.prompts, prefix) if n)
        return [n or max(len(p) - tail_width, 0) for p, n in zip(self.prompts, prefix)]

    def cost(self, runs: list[tuple[list[int], int]]) -> float:
        """Token-rows per layer of the prefill with these runs (none: every prompt whole)."""
        prefix = self.split(runs)
        tail_width = max(len(p) - n for p, n in zip(self.prompts, prefix))
        tails = self._rows({(self.kind[r], n) for r, n in enumerate(prefix)}, len(prefix))
        heads = [(self._head(r, n), self.slots[r]) for r, n in enumerate(prefix) if n]
        if not heads:
            return tails * tail_width
        return self._rows({h for h, _ in heads}, len(set(heads))) * max(prefix) + tails * tail_width

    def trimmed(self, runs: list[tuple[list[int], int]]) -> tuple[float, list[tuple[list[int], int]]]:
        """(cost, runs) after dropping, one at a time, the run whose absence saves the most while any does: every
        tail is as wide as the widest and every prefix row as wide as the widest prefix, so a run that shares
        little of long prompts, or short prompts beside long prefixes, can cost more than it saves."""
        cost = self.cost(runs)
        while runs:
            fewer, k = min((self.cost(runs[:k] + runs[k + 1 :]), k) for k in range(len(runs)))
            if fewer >= cost:
                break
            cost, runs = fewer, runs[:k] + runs[k + 1 :]
        return cost, runs

    def _rows(self, distinct: set, keyed: int) -> float:
        return self.lower * len(distinct) + (1 - self.lower) * keyed

    def _head(self, row: int, length: int) -> int:
        key = (row, length)
        if key not in self._heads:
            self._heads[key] = hash(tuple(self.prompts[row][:length]))
        return self._heads[key]


def prefix_layout(prompts: list[list[int]], slots: list[int], pad_id: int, lower: float = 0.0) -> PrefixLayout | None:
    """A layout in which rows that begin alike share their common beginning (through every layer under the same
    slot, through the `lower` share of the layers under any), or None when it would save less than
    MIN_PREFIX_SAVING of a left-padded prefill's work. `lower`: the share of the decoder layers that rows with the
    same tokens share whatever their slots (`shared_prefill`), in both prefills."""
    if len(prompts) < 2:
        return None
    plan = _Plan(prompts, slots, lower)
    # Runs across slots save in the lower layers, runs under one slot in all: the cheaper of the two, each trimmed.
    cost, runs = min((plan.trimmed(plan.runs(across)) for across in (True, False)), key=lambda option: option[0])
    if not runs or cost > (1 - MIN_PREFIX_SAVING) * plan.cost([]):
        return None
    prefix = plan.split(runs)
    prefix_width = max(prefix)
    tail_width = max(len(p) - n for p, n in zip(prompts, prefix))
    input_ids = torch.full((len(prompts), prefix_width + tail_width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for r, (p, n) in enumerate(zip(prompts, prefix)):
        for begin, end, tokens in ((prefix_width - n, prefix_width, p[:n]),
                                   (prefix_width + tail_width - (len(p) - n), None, p[n:])):
            input_ids[r, begin:end] = torch.tensor(tokens, dtype=torch.long)
            attention_mask[r, begin:end] = 1
    return PrefixLayout(input_ids, attention_mask, prefix_width)


@dataclass
class Prefixes:
    """The KV cache of a layout's prefixes: per layer, one row per distinct prefix below the fast weights and one per
    distinct (prefix, slot) from them up, and for each layer the row in it of each row of the layout."""

    cache: object
    rows: list[torch.Tensor]
    width: int

    def fanned_out(self):
        """The cache with every row's own prefix keys and values (for `generate`)."""
        for layer, rows in zip(self.cache.layers, self.rows):
            layer.keys, layer.values = layer.keys[rows], layer.values[rows]
        return self.cache

    def write_into(self, cache, extra: int = 0) -> None:
        """Writes each row's prefix keys and values into `cache` (a static cache, reset), one layer at a time, so
        that only one layer's worth exists twice. `extra` rows past the layout's (padding up to a graph's row count)
        take row 0's prefix."""
        written = {"cache_position": torch.arange(self.width, device=self.rows[0].device)}
        for index, (layer, rows) in enumerate(zip(self.cache.layers, self.rows)):
            rows = torch.cat([rows, rows[:1].expand(extra)])
            cache.update(layer.keys[rows], layer.values[rows], index, written)
            layer.keys = layer.values = None  # this layer's copy is in `cache` now


def prefill_prefixes(model, fast, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix_width: int,
                     slots: torch.Tensor, shared: list[nn.Module] | tuple = ()) -> Prefixes | None:
    """Runs each distinct (prefix, slot) of a `PrefixLayout` once through the model (the layers in `shared`, those
    below the fast weights, once per distinct prefix, which is all their cache keeps), or returns None when the
    model's cache cannot hold a whole prefix (then run the layout in one pass: `full_attention_only` models see the
    same either way)."""
    if model in CACHE_TOO_SHORT:
        return None
    ids, mask = input_ids[:, :prefix_width], attention_mask[:, :prefix_width]
    with_prefix = mask.any(1).nonzero().squeeze(1)
    first, inverse_with = distinct_rows_under_slots(ids[with_prefix], mask[with_prefix], slots[with_prefix])
    run = with_prefix[first]
    # A row without a prefix reads the first prefix's keys and values, all behind its mask.
    inverse = torch.zeros(len(ids), dtype=torch.long, device=ids.device)
    inverse[with_prefix] = inverse_with
    # Under an enclosing `use` over every row, the hooks must still see this pass's rows.
    live = fast.use(slots[run]) if fast is not None else nullcontext()
    with live, shared_prefill(list(shared), ids[run], mask[run], fan_out=False) as narrowed:
        out = model(input_ids=ids[run], attention_mask=mask[run], position_ids=layout_positions(mask[run]),
                    use_cache=True, **logits_to_keep_argument(model, 1))
    cache = getattr(out, model_cache_argument(model), None)
    if not holds_whole_head(cache, prefix_width):
        CACHE_TOO_SHORT.add(model)  # a property of the model: not worth a wasted pass per call
        return None
    rows = [inverse] * len(cache.layers)
    if narrowed:  # the shared layers' caches hold one row per distinct prefix
        _, below = distinct_rows(ids[run], mask[run])
        lower = {id(layer) for layer in shared}
        rows = [below[inverse] if id(layer) in lower else inverse for layer in decoder_layers(model)]
    return Prefixes(cache, rows, prefix_width)
