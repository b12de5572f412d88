"""The CPU kernel path the tests run on follows the environment (tests/conftest.py), so that the second pass of
.ci/run over the `kernel_paths` tests really runs on another path."""

import os

import pytest
import torch

pytestmark = pytest.mark.kernel_paths


def test_the_kernel_path_follows_the_environment():
    threads = os.environ.get("TMEM_RL_TEST_THREADS")
    assert torch.get_num_threads() == (int(threads) if threads else min(2, os.cpu_count() or 1))
    if onednn := os.environ.get("TMEM_RL_TEST_ONEDNN"):
        assert torch.backends.mkldnn.enabled == (onednn == "1")
    if capability := os.environ.get("ATEN_CPU_CAPABILITY"):  # read by torch itself, at import
        assert torch.backends.cpu.get_cpu_capability() == capability.upper()
