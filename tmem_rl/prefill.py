"""Prefill shared by identical prompts: the layers below the first fast-weight layer run once per distinct prompt.

The G rollouts of a GRPO group read the same stream under the same budget, so at an extraction point and at the
answer their prompts are the same token for token; they differ only in the fast weights, which live in the top
layers. Inside `shared_prefill` the next forward over the batch runs each of the lower layers on one row per
distinct prompt and fans its output out to every row that has that prompt; the layers from the first adapted one
up run on every row, under each row's fast weights. Each lower layer's keys and values are written to every row of
the model's own KV cache (dynamic or static), so decoding goes on exactly as after an unshared prefill.

Works at the level of the decoder layers (forward hooks, a cache proxy), so any decoder whose layers take the
hidden states first, batch-shaped tensors in keyword arguments and the cache as `cache` or `past_key_values`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from tmem_rl.memory.layers import CACHE_ARGUMENTS, take_rows


def distinct_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, inverse): the first row of each distinct (ids, mask) row, and for every row the index of its
    distinct row in `first`."""
    rows = torch.cat([input_ids, attention_mask.to(input_ids.dtype)], dim=1)
    _, inverse = torch.unique(rows, dim=0, return_inverse=True)
    order = torch.arange(len(rows), device=rows.device)
    first = torch.full((int(inverse.max()) + 1,), len(rows), dtype=torch.long, device=rows.device)
    first = first.scatter_reduce(0, inverse, order, reduce="amin")
    return first, inverse


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
def shared_prefill(layers: list[nn.Module], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Iterator[bool]:
    """Inside: the next forward of these decoder layers over a batch shaped like `input_ids` (the prefill) runs
    them on one row per distinct prompt. Yields whether any prompt is shared (if none, nothing is changed)."""
    if not layers:
        yield False
        return
    first, inverse = distinct_rows(input_ids, attention_mask)
    rows, width = input_ids.shape
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
            if kwargs.get(name) is not None:
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
