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
                      entropy: bool = False) -> TokenScores:
    """Per-token log-probs of the completion tokens at each row's sampling temperature, from one forward pass;
    with `value_head` also its values at the state before each completion token, with `entropy` also the entropy
    of the distribution each token was sampled from (a diagnostic: no gradient).

    `model` may be wrapped (DDP): it is called as a whole, keeping only the logits that predict completion tokens.
    The memory of the pass is that of its rows' logits in the model's dtype: call it per micro-batch.
    """
    width_c = rows.completion_ids.shape[1]
    position_ids = (rows.attention_mask.cumsum(-1) - 1).clamp(min=0)
    use = fast.use(rows.slots) if fast is not None and rows.any_fast else nullcontext()
    with use:
        out = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask, position_ids=position_ids,
                    logits_to_keep=width_c + 1, use_cache=False, output_hidden_states=value_head is not None)
    logits = out.logits[:, :-1]  # position t predicts t+1: [N, C, V]
    logp = token_logprobs(logits, rows.completion_ids, rows.temperatures) * rows.completion_mask
    entropies = token_entropies(logits, rows.temperatures) * rows.completion_mask if entropy else None
    values = None
    if value_head is not None:
        hidden = out.hidden_states[-1][:, -(width_c + 1) : -1]  # [N, C, d], same positions as the logits
        values = value_head(hidden.to(value_head.weight.dtype)).squeeze(-1).float() * rows.completion_mask
    return TokenScores(logp, values, entropies)


def completion_logprobs(model, fast: FastWeights | None, rows: SegmentRows) -> torch.Tensor:
    """Per-token log-probs [N, C] of the completion tokens at each row's sampling temperature."""
    return score_completions(model, fast, rows).logp
