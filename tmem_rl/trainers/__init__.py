"""Outer-loop trainers: fast-weight-aware GRPO."""

from tmem_rl.trainers.grpo import GRPOConfig, GRPOTrainer  # noqa: F401
