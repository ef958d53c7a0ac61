"""Test-wide set-up: Triton kernels run under the interpreter on machines without CUDA.

TRITON_INTERPRET must be set before any module decorates a kernel with ``triton.jit``, so it
is set here, before pytest imports any test module.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread, and much faster on a shared, busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
