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


def test_default_leaves_one_core_and_shares_the_rest_among_local_processes():
    assert cpu.default_threads(2) == 1
    assert cpu.default_threads(1) == 1
    assert cpu.default_threads(16) == 15
    assert cpu.default_threads(16, local_processes=2) == 7
    assert cpu.default_threads(2, local_processes=2) == 1


def test_default_applied_once_per_process(fresh):
    fresh.setattr(cpu, "usable_cores", lambda: 3)
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


def test_bad_thread_count_is_one_line(fresh, capsys):
    fresh.setenv(cpu.THREADS_ENV, "two")
    with pytest.raises(InputError, match="TMEM_RL_THREADS='two': expected a positive integer"):
        cpu.configure_cpu_threads()
    fresh.setattr(cpu, "_configured", False)
    fresh.setenv(cpu.THREADS_ENV, "0")
    assert main(["envs", "list"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "tmem-rl: error: TMEM_RL_THREADS='0': expected a positive integer (torch's CPU thread count)"]
