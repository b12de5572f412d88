"""Benchmark metrics, kept apart from environments so that offline result files can be rescored without one."""
