"""Shared set-up of the pytest-benchmark suites (benchmarks/test_bench_*.py)."""
import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every benchmark runs on one torch thread (the project's benchmark rule); the old count is restored."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
