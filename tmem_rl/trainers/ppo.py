"""Fast-weight-aware PPO: the GRPO trainer's rollouts, log-probs and clipped loss, with a value head and GAE.

A rollout's generated tokens (extractions, actions and the answer, in order) form one trajectory of actions; the
environment text in between is part of the transitions. The outcome reward arrives on the answer's last token.
A linear value head on the policy's last hidden state estimates the return before each generated token;
advantages come from GAE over that token sequence and are whitened over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tmem_rl.logprobs import SegmentRows, TokenScores, score_completions
from tmem_rl.trainers.grpo import GRPOConfig, GRPOTrainer, TrainingSegment


@dataclass
class PPOConfig(GRPOConfig):
    num_generations: int = 2
    """Rollouts per question (PPO needs no groups; more rollouts per question still reduce variance)."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    cliprange_value: float = 0.2
    """Clip range of the value prediction around the rollout-time value."""
    gamma: float = 1.0
    """Discount per generated token in GAE (1.0: none; the reward arrives on the answer's last token)."""
    lam: float = 0.95
    """GAE lambda: 1.0 gives Monte-Carlo returns minus the value, 0.0 one-step TD errors."""
    whiten_advantages: bool = True
    """Normalise the advantages to mean 0, std 1 over this process's generated tokens before the loss."""

    def __post_init__(self):
        if self.num_generations < 1:
            raise ValueError("PPOConfig.num_generations must be >= 1")
        saved, self.num_generations = self.num_generations, max(self.num_generations, 2)
        super().__post_init__()  # the shared checks; the group-size rule is GRPO's alone
        self.num_generations = saved


def gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> tuple[list[float], list[float]]:
    """Generalised advantage estimation over one token sequence (value after the last token = 0).
    -> (advantages, returns)"""
    advantages = [0.0] * len(rewards)
    running = 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(values) else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
    return advantages, [a + v for a, v in zip(advantages, values)]


@dataclass
class ValuedSegment(TrainingSegment):
    """A training segment with the critic's targets: rollout-time values and GAE returns, per token."""

    old_values: list[float] = field(default_factory=list)
    returns: list[float] = field(default_factory=list)


class PPOTrainer(GRPOTrainer):
    config: PPOConfig
    segment_type = ValuedSegment

    def make_value_head(self, policy):
        hidden = policy.config.get_text_config().hidden_size if hasattr(policy.config, "get_text_config") \
            else policy.config.hidden_size
        head = nn.Linear(hidden, 1)
        nn.init.zeros_(head.weight)  # start from V = bias = 0: no made-up preferences before any return is seen
        nn.init.zeros_(head.bias)
        return head.to(next(policy.parameters()).device)

    @torch.no_grad()
    def assign_advantages(self, segments: list[ValuedSegment], rewards: torch.Tensor, snapshots) -> None:
        cfg = self.config
        # Rollout-time values for every generated token, under each segment's live fast weights. The value pass
        # is collective like the loss passes, so every process runs as many of them.
        chunks = self._micro_batches(segments)
        for k in range(self._passes_on_every_process(len(chunks))):
            chunk = chunks[k] if k < len(chunks) else chunks[0]
            values = score_completions(self.model, self.replay, self._rows(chunk, snapshots), self.value_head).values
            if k < len(chunks):
                for i, s in enumerate(chunk):
                    s.old_values = values[i, : len(s.segment.completion_ids)].tolist()
        by_rollout: dict[int, list[ValuedSegment]] = {}
        for s in segments:
            by_rollout.setdefault(s.rollout, []).append(s)
        for rollout, segs in by_rollout.items():
            values = [v for s in segs for v in s.old_values]
            token_rewards = [0.0] * len(values)
            token_rewards[-1] = rewards[rollout].item()
            advantages, returns = gae(token_rewards, values, cfg.gamma, cfg.lam)
            start = 0
            for s in segs:
                n = len(s.segment.completion_ids)
                s.advantages, s.returns = advantages[start : start + n], returns[start : start + n]
                start += n
        if cfg.whiten_advantages:
            flat = torch.tensor([a for s in segments for a in s.advantages])
            mean, std = flat.mean().item(), flat.std().item() if flat.numel() > 1 else 1.0
            for s in segments:
                s.advantages = [(a - mean) / (std + 1e-8) for a in s.advantages]

    def forward_chunk(self, rows: SegmentRows) -> TokenScores:
        """Log-probs, entropies and the critic's values [n, C] from the same forward pass."""
        return score_completions(self.model, self.replay, rows, self.value_head, entropy=True)

    def extra_loss(self, chunk: list[ValuedSegment], scores: TokenScores, like: torch.Tensor) -> torch.Tensor:
        """Clipped value loss per token (PPO's max of clipped and unclipped squared errors), times vf_coef."""
        cfg = self.config
        values = scores.values
        returns = self._per_token([s.returns for s in chunk], like)
        old = self._per_token([s.old_values for s in chunk], like)
        clipped = old + torch.clamp(values - old, -cfg.cliprange_value, cfg.cliprange_value)
        loss = 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)
        return cfg.vf_coef * loss
