"""Test-wide settings. Both variables must be set before ttfm_kernels (or any @triton.jit) is imported:
Triton kernels run under the CPU interpreter where no CUDA device exists (on a GPU they are compiled), and
every op output is NaN-filled before kernels write it.

``TTFM_TEST_TRITON_INTERPRET=1`` / ``0`` overrides the interpreter decision (``make gpu-check`` sets 0, so
a GPU run can never silently fall into the interpreter). Tests marked ``@pytest.mark.gpu`` are skipped where
CUDA is unavailable (``tests/gpu/``).
"""

import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch  # importing torch defines no @triton.jit kernel, so the decision below may ask it about CUDA

INTERPRET_OVERRIDE = "TTFM_TEST_TRITON_INTERPRET"


def use_triton_interpreter(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether tests run Triton under the CPU interpreter: ``TTFM_TEST_TRITON_INTERPRET`` ("1"/"0") if set,
    else exactly when ``torch.cuda.is_available()`` is False."""
    explicit = environ.get(INTERPRET_OVERRIDE, "")
    if explicit not in ("", "0", "1"):
        raise ValueError(f"{INTERPRET_OVERRIDE} must be 0 or 1, got {explicit!r}")
    return explicit == "1" if explicit else not torch.cuda.is_available()


os.environ["TRITON_INTERPRET"] = "1" if use_triton_interpreter() else "0"
os.environ["TTFM_DEBUG_NAN_FILL"] = "1"

import pytest  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every ``gpu`` test when no CUDA device is present (``make gpu-check`` fails on such skips)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="GPU test: no CUDA device here")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not item.keywords: it holds the folder name gpu
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same RNG state."""
    torch.manual_seed(0)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for the test: tiny convolutions spin for seconds on two threads of a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Callable[[Any, str], list[int]]:
    """``spy(owner, name)``: replace ``owner.name`` for the test by a wrapper that records each call (a list
    that grows by one per call) and passes it through, so a test can assert which path ran."""

    def install(owner: Any, name: str) -> list[int]:
        calls: list[int] = []
        real = getattr(owner, name)

        def recorded(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, recorded)
        return calls

    return install
