import os

import pytest
import torch

from tmem_rl.models import FIXTURE_TOKENIZER, tiny_model

# The CPU kernel path every test runs on, set here at import so that every test sees it. A float computed on one
# path differs from the same float on another (another CPU, thread count or kernel) in its last bits, so a test that
# pins a float or compares floats across code paths is marked `kernel_paths`, and .ci/run runs those again on a
# second path. TMEM_RL_TEST_THREADS: torch's thread count (default min(2, cores)); TMEM_RL_TEST_ONEDNN=0 or 1: oneDNN
# off or on (default: torch's own setting). Two switches torch and MKL read themselves, before this file runs, move
# the floats more than those two (measured: the pinned GRPO run's grad norm): ATEN_CPU_CAPABILITY=default (ATen's
# unvectorised kernels, as on another CPU's instruction set) and MKL_CBWR=COMPATIBLE (MKL's CPU-independent kernels).
_threads = os.environ.get("TMEM_RL_TEST_THREADS", "")
_onednn = os.environ.get("TMEM_RL_TEST_ONEDNN", "")
if not (_threads == "" or _threads.isdigit() and int(_threads) > 0):
    raise pytest.UsageError(f"tests/conftest.py: TMEM_RL_TEST_THREADS={_threads!r}; expected a positive integer")
if _onednn not in ("", "0", "1"):
    raise pytest.UsageError(f"tests/conftest.py: TMEM_RL_TEST_ONEDNN={_onednn!r}; expected 0 or 1")
torch.set_num_threads(int(_threads) if _threads else min(2, os.cpu_count() or 1))
# The library's entry points choose a thread count of their own (tmem_rl.cpu) unless told: tell them this one.
os.environ["TMEM_RL_THREADS"] = str(torch.get_num_threads())
if _onednn:
    torch.backends.mkldnn.enabled = _onednn == "1"


def pytest_report_header(config):
    onednn = "on" if torch.backends.mkldnn.enabled else "off"
    return (f"kernel path: {torch.get_num_threads()} threads, oneDNN {onednn}, "
            f"CPU capability {torch.backends.cpu.get_cpu_capability()}, MKL_CBWR={os.environ.get('MKL_CBWR', '')}")


@pytest.fixture
def tiny():
    """A fresh 4-layer random Llama with the default model's tokenizer."""
    return tiny_model(num_layers=4, tokenizer_path=FIXTURE_TOKENIZER)
