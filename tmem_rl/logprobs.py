"""Log-probs of generated segments, each under the fast weights that were live when it was generated and at the
temperature it was sampled at.

The inner update is a stop-gradient: a segment's fast weights are restored from its snapshot as constants, and
the gradient flows only into the slow weights (through the base layers and the fast-weight hooks' inputs).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from tmem_rl.memory.fast_weights import FastWeights, Snapshot
from tmem_rl.memory.inner_loop import holds_whole_head
from tmem_rl.memory.layers import model_cache_argument
from tmem_rl.prefill import CACHE_TOO_SHORT, distinct_rows_under_slots, shared_prefill


@dataclass
class SegmentRows:
    input_ids: torch.Tensor  # [N, T] left-padded so every sequence ends at the last column
    attention_mask: torch.Tensor  # [N, T]
    completion_mask: torch.Tensor  # [N, C] 1 on real completion tokens (right-padded within the last C columns)
    completion_ids: torch.Tensor  # [N, C]
    temperatures: torch.Tensor  # [N] the temperature each row's completion was sampled at
    slots: torch.Tensor  # [N] fast-weight slot per row, -1 = base model
    snapshot_keys: list[str]  # replay slot i holds snapshot_keys[i] (segment_rows only)
    any_fast: bool  # some row runs under fast weights (known on the host, so checking it costs no sync)


def build_rows(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
               temperatures: Sequence[float], slots: Sequence[int], pad_id: int, device,
               snapshot_keys: list[str] | None = None) -> SegmentRows:
    """Prompts and completions -> one padded batch; row i runs under fast-weight slot slots[i]."""
    width_c = max(len(c) for c in completions)
    total = max(len(p) + width_c for p in prompts)
    n = len(prompts)
    input_ids = torch.full((n, total), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, total), dtype=torch.long)
    completion_ids = torch.full((n, width_c), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((n, width_c), dtype=torch.long)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        # prompt then completion right-padded to width_c, the whole thing left-padded to `total`: completion
        # tokens then sit in the last width_c columns of every row.
        seq = list(prompt) + list(completion)
        start = total - width_c - len(prompt)
        input_ids[i, start : start + len(seq)] = torch.tensor(seq)
        attention_mask[i, start : start + len(seq)] = 1
        completion_ids[i, : len(completion)] = torch.tensor(list(completion))
        completion_mask[i, : len(completion)] = 1
    return SegmentRows(input_ids.to(device), attention_mask.to(device), completion_mask.to(device),
                       completion_ids.to(device), torch.tensor(list(temperatures), dtype=torch.float32).to(device),
                       torch.tensor(list(slots)).to(device), snapshot_keys or [], any(s >= 0 for s in slots))


def segment_rows(segments: Sequence, pad_id: int, device) -> SegmentRows:
    """Recorded segments (`prompt_ids`, `completion_ids`, `snapshot`, `temperature`) -> one batch; rows sharing a
    snapshot share a replay slot (see `load_snapshots`)."""
    keys = sorted({s.snapshot for s in segments if s.snapshot is not None})
    slot_of = {k: i for i, k in enumerate(keys)}
    return build_rows([s.prompt_ids for s in segments], [s.completion_ids for s in segments],
                      [s.temperature for s in segments],
                      [slot_of[s.snapshot] if s.snapshot is not None else -1 for s in segments], pad_id, device, keys)


def load_snapshots(replay: FastWeights, keys: list[str], snapshots: dict[str, Snapshot]) -> None:
    if len(keys) > replay.num_slots:
        raise ValueError(f"{len(keys)} distinct fast-weight snapshots in one batch; the replay has {replay.num_slots} slots")
    for slot, key in enumerate(keys):
        replay.restore(snapshots[key], [slot])


class TokenScores(NamedTuple):
    logp: torch.Tensor  # [N, C] log-prob of each completion token (0 where completion_mask is 0)
    values: torch.Tensor | None  # [N, C] value estimate before each completion token, with a value head
    entropy: torch.Tensor | None  # [N, C] entropy of the sampling distribution at each token (no grad), on request


class _TokenLogProbs(torch.autograd.Function):
    """log softmax(logits / T)[token] at every position: the chosen token's scaled logit minus the logsumexp.

    A full log-softmax would keep a float32 [N, C, V] copy (two, with the division by T) for the backward. Here
    only the logits themselves (in the model's dtype) are kept, and forward and backward each make one row's
    float32 [C, V] temporary at a time.
    """

    @staticmethod
    def forward(ctx, logits, tokens, temperatures):  # [N, C, V], [N, C], [N]
        logp = torch.empty(tokens.shape, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(logp)
        for i in range(logits.shape[0]):
            row = logits[i].float() / temperatures[i]  # [C, V]
            lse[i] = torch.logsumexp(row, -1)
            logp[i] = row.gather(-1, tokens[i, :, None]).squeeze(-1) - lse[i]
        ctx.save_for_backward(logits, tokens, temperatures, lse)
        return logp

    @staticmethod
    def backward(ctx, grad):  # grad [N, C]
        logits, tokens, temperatures, lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for i in range(logits.shape[0]):
            # d/dx_j (x_k / T - logsumexp(x / T)) = (onehot_k - softmax(x / T))_j / T
            row = -torch.exp(logits[i].float() / temperatures[i] - lse[i, :, None]) * grad[i, :, None]
            row.scatter_add_(-1, tokens[i, :, None], grad[i, :, None].float())
            grad_logits[i] = row / temperatures[i]
        return grad_logits, None, None


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """[N, C] log-probs of `tokens` under softmax(logits / T), one temperature per row; differentiable."""
    return _TokenLogProbs.apply(logits, tokens, temperatures.to(logits.device, torch.float32))


@torch.no_grad()
def token_entropies(logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """[N, C] entropy of softmax(logits / T) at every position (a diagnostic: no gradient), row by row."""
    out = torch.empty(logits.shape[:2], dtype=torch.float32, device=logits.device)
    for i in range(logits.shape[0]):
        log_probs = torch.log_softmax(logits[i].float() / temperatures[i], -1)  # [C, V]
        out[i] = -(log_probs.exp() * log_probs).sum(-1)
    return out


def score_completions(model, fast: FastWeights | None, rows: SegmentRows, value_head=None,
                      entropy: bool = False, shared: list | None = None, collective: bool = False) -> TokenScores:
    """Per-token log-probs of the completion tokens at each row's sampling temperature, from one forward pass;
    with `value_head` also its values at the state before each completion token, with `entropy` also the entropy
    of the distribution each token was sampled from (a diagnostic: no gradient).

    With `shared` (a list of decoder layers, possibly empty), rows with the same prompt under the same fast weights
    run it once: the prompt's pass writes its keys and values into the model's KV cache, every completion attends
    to its prompt's, and the gradient of all of them flows back into the one pass; the `shared` layers (those
    below the first fast-weight layer) run once per prompt text whatever the fast weights. The same log-probs and
    gradients up to float rounding; it falls back to one pass where no prompt repeats, where the cache cannot hold
    a whole prompt (sliding-window layers) and under gradient checkpointing (which drops the cache). With
    `collective` (a wrapped model under several processes, whose every forward is a collective) it makes the two
    passes whether prompts repeat or not, so that every process makes as many.

    `model` may be wrapped (DDP): it is called as a whole, keeping only the logits that predict completion tokens.
    The memory of the pass is that of its rows' logits in the model's dtype (with shared prompts, also every layer's
    keys and values of the prompts until the completions are scored, which a pass with a gradient keeps anyway):
    call it per micro-batch. Rows that share a prompt share its dropout mask too, where there is dropout.
    """
    width_c = rows.completion_ids.shape[1]
    position_ids = (rows.attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = None
    parts = _shared_prompt_pass(model, fast, rows, position_ids, value_head is not None, shared, collective) \
        if shared is not None else None
    if parts is None:
        with _live(fast, rows.slots, rows.any_fast):
            out = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask, position_ids=position_ids,
                        logits_to_keep=width_c + 1, use_cache=False, output_hidden_states=value_head is not None)
        parts = [(out.logits[:, :-1], rows.completion_ids, rows.temperatures)]  # position t predicts t+1
        if value_head is not None:
            hidden = out.hidden_states[-1][:, -(width_c + 1) : -1]  # [N, C, d], same positions as the logits
    else:
        parts, hidden = parts
    logp = torch.cat([token_logprobs(*part) for part in parts], 1) * rows.completion_mask
    entropies = torch.cat([token_entropies(logits, t) for logits, _, t in parts], 1) * rows.completion_mask \
        if entropy else None
    values = None
    if value_head is not None:
        values = value_head(hidden.to(value_head.weight.dtype)).squeeze(-1).float() * rows.completion_mask
    return TokenScores(logp, values, entropies)


def _live(fast: FastWeights | None, slots: torch.Tensor, any_fast: bool):
    return fast.use(slots) if fast is not None and any_fast else nullcontext()


def _checkpointed(model) -> bool:
    """Whether the model's layers recompute in backward (gradient checkpointing): they then drop the KV cache (in
    train mode; some transformers versions without a gradient too)."""
    return model.training and any(getattr(m, "gradient_checkpointing", False) for m in model.modules()
                                  if m is not model)


def _shared_prompt_pass(model, fast: FastWeights | None, rows: SegmentRows, position_ids: torch.Tensor,
                        want_hidden: bool, shared: list, collective: bool):
    """score_completions' two passes over a batch where prompts repeat: -> ([(logits, tokens, temperatures)] for
    the first completion token and the rest, hidden states [N, C, d] or None), or None to score in one pass."""
    width_c = rows.completion_ids.shape[1]
    prompt_width = rows.input_ids.shape[1] - width_c
    if prompt_width < 1 or model in CACHE_TOO_SHORT or _checkpointed(model):  # the same on every process
        return None
    prompt_ids, prompt_mask = rows.input_ids[:, :prompt_width], rows.attention_mask[:, :prompt_width]
    first, inverse = distinct_rows_under_slots(prompt_ids, prompt_mask, rows.slots)
    if len(first) == len(inverse) and not collective:
        return None
    lead = int(prompt_mask[first].any(0).long().argmax())  # padding columns no distinct prompt uses
    ids, mask = prompt_ids[first, lead:], prompt_mask[first, lead:]
    with _live(fast, rows.slots[first], rows.any_fast), shared_prefill(shared, ids, mask):
        head = model(input_ids=ids, attention_mask=mask, position_ids=position_ids[first, lead:prompt_width],
                     logits_to_keep=1, use_cache=True, output_hidden_states=want_hidden)
    name = model_cache_argument(model)
    cache = getattr(head, name, None)
    if not holds_whole_head(cache, prompt_width - lead):
        CACHE_TOO_SHORT.add(model)  # a property of the model: not worth a wasted pass per micro-batch
        return None
    if width_c == 1 and not collective:  # the prompt's last position predicts the only completion token
        hidden = head.hidden_states[-1][inverse, -1:] if want_hidden else None
        return [(head.logits[inverse], rows.completion_ids, rows.temperatures)], hidden
    cache.batch_select_indices(inverse)  # every row's prompt keys and values, their gradient summed back
    with _live(fast, rows.slots, rows.any_fast):
        out = model(input_ids=rows.input_ids[:, prompt_width:], attention_mask=rows.attention_mask[:, lead:],
                    position_ids=position_ids[:, prompt_width:], use_cache=True, logits_to_keep=width_c,
                    output_hidden_states=want_hidden, **{name: cache})
    # The prompt's last position predicts the first completion token; completion position t predicts t + 1.
    parts = [(head.logits[inverse], rows.completion_ids[:, :1], rows.temperatures)]
    if width_c > 1:
        parts.append((out.logits[:, :-1], rows.completion_ids[:, 1:], rows.temperatures))
    hidden = None
    if want_hidden:
        hidden = torch.cat([head.hidden_states[-1][inverse, -1:], out.hidden_states[-1][:, :-1]], 1)
    return parts, hidden


def completion_logprobs(model, fast: FastWeights | None, rows: SegmentRows) -> torch.Tensor:
    """Per-token log-probs [N, C] of the completion tokens at each row's sampling temperature."""
    return score_completions(model, fast, rows).logp
