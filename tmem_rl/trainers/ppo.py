"""Fast-weight-aware PPO: the GRPO trainer's rollouts, log-probs and clipped loss, with a value head and GAE.

A rollout's generated tokens (extractions, actions and the answer, in order) form one trajectory of actions; the
environment text in between is part of the transitions. The outcome reward arrives on the answer's last token
(an episode of several questions: its answers are parallel last steps, each paid its own question's score).
A linear value head on the policy's last hidden state estimates the return before each generated token;
advantages come from GAE over the rollout's segments (each extraction, action and the answer one step; or over
its tokens) and are whitened over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tmem_rl.logprobs import SegmentRows, TokenScores
from tmem_rl.episode import Trajectory
from tmem_rl.trainers.grpo import GRPOConfig, GRPOTrainer, TrainingSegment

ADVANTAGE_LEVELS = ("segment", "token")


@dataclass
class PPOConfig(GRPOConfig):
    num_generations: int = 2
    """Rollouts per question (PPO needs no groups; more rollouts per question still reduce variance)."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    cliprange_value: float = 0.2
    """Clip range of the value prediction around the rollout-time value."""
    advantage_level: str = "segment"
    """Steps of GAE. "segment": each generated segment (extraction, action, answer) is one step and all its tokens
    share its advantage, so every extraction of a rewarded episode gets the outcome's credit, discounted only by
    the segments after it. "token": every generated token is a step (lam^distance: a 192-token extraction before
    an 8-token answer gets ~0 credit at its first token until the critic has learned)."""
    gamma: float = 1.0
    """Discount per GAE step (1.0: none; the reward arrives on the answer's last token)."""
    lam: float = 0.95
    """GAE lambda: 1.0 gives Monte-Carlo returns minus the value, 0.0 one-step TD errors."""
    whiten_advantages: bool = True
    """Normalise the advantages to mean 0, std 1 over this process's generated tokens before the loss."""

    def __post_init__(self):
        if self.num_generations < 1:
            raise ValueError("PPOConfig.num_generations must be >= 1")
        if self.advantage_level not in ADVANTAGE_LEVELS:
            raise ValueError(f"PPOConfig.advantage_level={self.advantage_level!r}: expected one of {ADVANTAGE_LEVELS}")
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
    def assign_advantages(self, segments: list[ValuedSegment], rewards: torch.Tensor, snapshots,
                          trajectories: list[Trajectory]) -> None:
        """GAE over each rollout's generated segments or tokens, from the rollout-time values (recorded per token
        by the pass before the update), the reward on the last step.

        The answers of an episode that asks several questions are parallel last steps, not a chain: each answer's
        return is the episode's reward moved by how its own question scored against the mean (the outcome's
        part), never the later answers', and the segments before them end in one step valued as their mean, which
        the episode's reward pays."""
        cfg = self.config
        by_rollout: dict[int, list[ValuedSegment]] = {}
        for s in segments:
            by_rollout.setdefault(s.rollout, []).append(s)
        for rollout, segs in by_rollout.items():
            reward = rewards[rollout].item()
            answered = trajectories[rollout].answered
            answers = [s for s in segs if s.segment.kind == "answer"]
            if len(answered) < 2 or not answers:
                self._gae(segs, reward)
                continue
            mean = sum(a.reward for a in answered) / len(answered)
            outcome = cfg.reward_weights.get("outcome", 0.0)
            for s in answers:
                self._gae([s], reward + outcome * (answered[s.segment.question].reward - mean))
            before = [s for s in segs if s.segment.kind != "answer"]
            if before:
                self._gae(before, reward, last_value=sum(s.old_values[0] for s in answers) / len(answers))
        if cfg.whiten_advantages:
            flat = torch.tensor([a for s in segments for a in s.advantages])
            mean, std = flat.mean().item(), flat.std().item() if flat.numel() > 1 else 1.0
            for s in segments:
                s.advantages = [(a - mean) / (std + 1e-8) for a in s.advantages]

    def _gae(self, chain: list[ValuedSegment], reward: float, last_value: float | None = None) -> None:
        """Advantages and returns of `chain`'s tokens: GAE over its segments or tokens (advantage_level), the
        reward on its last step, or with `last_value`, on one more step of that value that follows them."""
        cfg = self.config
        if cfg.advantage_level == "segment":
            # One step per segment, valued at its first token: an extraction hundreds of tokens before the
            # answer is discounted by lam per segment in between, not per token.
            values = [s.old_values[0] for s in chain]
            steps = [len(s.segment.completion_ids) for s in chain]
        else:
            values = [v for s in chain for v in s.old_values]
            steps = [1] * len(values)
        if last_value is not None:
            values.append(last_value)
        step_rewards = [0.0] * len(values)
        step_rewards[-1] = reward
        advantages, returns = gae(step_rewards, values, cfg.gamma, cfg.lam)
        # One entry per token: a segment-level step's repeats over its segment's tokens (a step that follows the
        # chain is no token of it).
        advantages = [a for a, n in zip(advantages, steps) for _ in range(n)]
        returns = [r for r, n in zip(returns, steps) for _ in range(n)]
        start = 0
        for s in chain:
            n = len(s.segment.completion_ids)
            s.advantages, s.returns = advantages[start : start + n], returns[start : start + n]
            start += n

    def forward_chunk(self, rows: SegmentRows) -> TokenScores:
        """Log-probs, entropies and the critic's values [n, C] from the same forward pass."""
        return self.score(rows, self.value_head, entropy=True)

    def extra_loss(self, chunk: list[ValuedSegment], scores: TokenScores, like: torch.Tensor) -> torch.Tensor:
        """Clipped value loss per token (PPO's max of clipped and unclipped squared errors), times vf_coef."""
        cfg = self.config
        values = scores.values
        returns = self._per_token([s.returns for s in chunk], like)
        old = self._per_token([s.old_values for s in chunk], like)
        clipped = old + torch.clamp(values - old, -cfg.cliprange_value, cfg.cliprange_value)
        loss = 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)
        return cfg.vf_coef * loss
