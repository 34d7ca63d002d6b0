"""Shared by the test files: nothing leaves this machine or touches the user's caches, one intra-op thread, and the
relative error used for every parity check."""
import atexit
import os
import shutil
import tempfile

import pytest
import torch

# Set before anything imports huggingface_hub (it reads them once): no download ever, an empty hub cache, and the
# miniature's teacher cache in a temporary folder too.
_CACHES = tempfile.mkdtemp(prefix="swiftbrush-tests-")
atexit.register(shutil.rmtree, _CACHES, ignore_errors=True)
os.environ.update(HF_HUB_OFFLINE="1", HF_HOME=os.path.join(_CACHES, "hf"),
                  SWIFTBRUSH_CACHE=os.path.join(_CACHES, "swiftbrush"))

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
