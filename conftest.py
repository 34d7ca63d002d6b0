"""Shared by the test files: one intra-op thread, and the relative error used for every parity check."""
import pytest
import torch

TOL = 1e-4  # max|a-b| / max|a| in fp32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's spinning threads
    made the tests 10-20x slower; restored after each module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel_err(a, b):
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()
