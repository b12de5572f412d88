"""Evaluation: memory methods side by side on a benchmark, result records, reports and charts."""
