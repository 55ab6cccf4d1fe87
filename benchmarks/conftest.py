"""Shared set-up of the pytest-benchmark suites (benchmarks/test_bench_*.py): the torch thread count.

    python -m pytest benchmarks/test_bench_X.py --benchmark-only [--threads N]
"""
import pytest
import torch

from measure import threads_label


def pytest_addoption(parser):
    parser.addoption("--threads", type=int, default=1,
                     help="torch threads for every benchmark (default 1, the project's benchmark rule)")


def pytest_report_header(config):
    return f"torch {torch.__version__}, {threads_label(config.getoption('--threads'))}"


@pytest.hookimpl(optionalhook=True)   # a pytest-benchmark hook
def pytest_benchmark_update_machine_info(config, machine_info):
    """The thread count goes into the saved benchmark JSON, next to the CPU."""
    machine_info["torch_threads"] = config.getoption("--threads")


@pytest.fixture(scope="module", autouse=True)
def bench_threads(pytestconfig):
    """Every benchmark runs on --threads torch threads (default 1); the old count is restored."""
    old = torch.get_num_threads()
    torch.set_num_threads(pytestconfig.getoption("--threads"))
    yield
    torch.set_num_threads(old)
