"""Outer-loop trainers: fast-weight-aware GRPO and PPO."""

from tmem_rl.trainers.grpo import GRPOConfig, GRPOTrainer  # noqa: F401
from tmem_rl.trainers.ppo import PPOConfig, PPOTrainer  # noqa: F401
