"""Decoding with a static KV cache: the prompt is prefilled once, then every step has the same shapes.

Fixed shapes are what lets a decode step be captured and replayed as a graph on a GPU; on a CPU the same loop runs
eagerly. Each row keeps its own fast-weight slot through the `FastWeights.use` context around the call, which
changes the weights a step reads, never its shapes. Stop tokens are checked on the host only every
`stop_check_every` steps, so a step never waits for the previous one to finish.
"""

from __future__ import annotations

import inspect

import torch
from transformers import LogitsProcessorList, StaticCache


@torch.no_grad()
def static_decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                  stop_ids: list[int], pad_id: int, processors: LogitsProcessorList | None = None,
                  stop_check_every: int = 8) -> torch.Tensor:
    """Tokens generated after left-padded `input_ids` ([rows, new]): argmax of the processed scores (processors may
    add sampling noise), rows padded with `pad_id` after their first stop token. Same contract as
    `model.generate(..., do_sample=False, logits_processor=processors)[:, width:]`."""
    rows, width = input_ids.shape
    device = input_ids.device
    cache = StaticCache(config=model.config, max_cache_len=width + max_new_tokens)
    # Newer transformers name the cache argument `cache`; older ones only know `past_key_values`.
    parameters = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in parameters else "past_key_values"
    # The prompt's logits are needed at its last position only: the full [rows, width, vocab] would cost more than
    # the whole prefill.
    last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                   cache_position=torch.arange(width, device=device), use_cache=True, **{cache_arg: cache},
                   **last_logits_only).logits
    stops = torch.tensor(stop_ids, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    mask = attention_mask
    position = positions[:, -1:]
    generated = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    sequence = input_ids
    for step in range(max_new_tokens):
        scores = logits[:, -1, :].float()
        if processors:
            scores = processors(sequence, scores)
        token = torch.where(finished, torch.full_like(finished, pad_id, dtype=torch.long), scores.argmax(-1))
        generated[:, step] = token
        finished |= torch.isin(token, stops)
        if step + 1 == max_new_tokens or ((step + 1) % stop_check_every == 0 and bool(finished.all())):
            return generated[:, : step + 1]
        if processors:  # only they read the tokens so far
            sequence = torch.cat([sequence, token[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
        position = position + 1
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=position,
                       cache_position=torch.tensor([width + step], device=device), use_cache=True,
                       **{cache_arg: cache}).logits
    return generated[:, :0]
