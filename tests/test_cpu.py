import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tmem_rl import cpu
from tmem_rl.cli import main
from tmem_rl.errors import InputError


@pytest.fixture
def fresh(monkeypatch):
    """configure_cpu_threads as in a new process; torch's thread count restored afterwards."""
    before = torch.get_num_threads()
    monkeypatch.setattr(cpu, "_configured", False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(cpu.THREADS_ENV, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    yield monkeypatch
    torch.set_num_threads(before)


def test_default_takes_the_free_cores_and_shares_them_among_local_processes():
    assert cpu.default_threads(2) == 2
    assert cpu.default_threads(2, busy_elsewhere=1.0) == 1
    assert cpu.default_threads(2, busy_elsewhere=0.3) == 2  # a core busy a third of the time is still free
    assert cpu.default_threads(2, busy_elsewhere=5.0) == 1
    assert cpu.default_threads(16, local_processes=2, busy_elsewhere=1.0) == 7


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="reads Linux's /proc/stat")
def test_a_busy_core_elsewhere_is_measured():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)  # past the interpreter's start
        assert cpu.cores_busy_elsewhere() >= 0.6
    finally:
        spinner.kill()
        spinner.wait()


def test_default_applied_once_per_process(fresh):
    fresh.setattr(cpu, "usable_cores", lambda: 3)
    fresh.setattr(cpu, "cores_busy_elsewhere", lambda: 1.0)
    assert cpu.configure_cpu_threads() == 2
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)  # a later entry point keeps what the process has by then
    assert cpu.configure_cpu_threads() is None
    assert torch.get_num_threads() == 1


def test_user_choice_wins(fresh):
    fresh.setenv(cpu.THREADS_ENV, "3")
    assert cpu.configure_cpu_threads() == 3
    assert torch.get_num_threads() == 3
    fresh.setattr(cpu, "_configured", False)
    fresh.setenv("OMP_NUM_THREADS", "1")  # torch read it at start: left alone, whatever TMEM_RL_THREADS says
    torch.set_num_threads(2)
    assert cpu.configure_cpu_threads() is None
    assert torch.get_num_threads() == 2


def test_bad_thread_count_is_one_line(fresh, capsys, tmp_path):
    fresh.setenv(cpu.THREADS_ENV, "two")
    with pytest.raises(InputError, match="TMEM_RL_THREADS='two': expected a positive integer"):
        cpu.configure_cpu_threads()
    fresh.setattr(cpu, "_configured", False)
    fresh.setenv(cpu.THREADS_ENV, "0")
    # The entry point sets the threads before any work (a tiny demo, should it not).
    assert main(["demo", "--model", "tiny", "--episodes", "1", "--out", str(tmp_path / "demo")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "tmem-rl: error: TMEM_RL_THREADS='0': expected a positive integer (torch's CPU thread count)"]
