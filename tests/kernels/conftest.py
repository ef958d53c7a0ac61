"""Kernel tests run the Triton path on CUDA when there is a GPU, otherwise on CPU through the
Triton interpreter.  The interpreter is chosen when ``triton.jit`` decorates the kernels, i.e. at
the first import of a kernel module, so the variable is set here, before the tests import them."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _triton_runnable() -> bool:
    try:
        from sail.kernels import _triton_rows
    except ImportError:  # triton not installed
        return False
    if torch.cuda.is_available():
        return True
    # Kernels decorated before this file ran (imported by an earlier test directory) are compiled
    # kernels that cannot take CPU tensors.
    return "Interpreted" in type(_triton_rows._stable_diff_partials_kernel).__name__


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Device of the Triton-path tests; skips them when no Triton runtime can take tensors."""
    if not _triton_runnable():
        pytest.skip("no CUDA and the Triton interpreter was not enabled before the kernels were imported")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
