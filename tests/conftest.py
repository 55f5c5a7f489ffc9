"""Test-wide settings. Both variables must be set before ttfm_kernels (or any @triton.jit) is imported:
Triton kernels run under the CPU interpreter, and every op output is NaN-filled before kernels write it."""

import os

os.environ["TRITON_INTERPRET"] = "1"
os.environ["TTFM_DEBUG_NAN_FILL"] = "1"

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same RNG state."""
    torch.manual_seed(0)
