"""Backend selection: precedence, "auto" rules, one warning per fallback reason, explicit requests raise."""

import warnings

import pytest
import torch

from ttfm_kernels import _dispatch
from ttfm_kernels._dispatch import BackendUnavailableError, OpBackends, always, triton_kernel, use_backend

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


def _unavailable(device: torch.device, dtype: torch.dtype) -> str:
    return "not here"


def _only(device_type: str):
    return lambda device, dtype: None if device.type == device_type else f"needs {device_type}"


OP = OpBackends("demo_op", {"reference": always, "cpu": _only("cpu"), "triton": _only("cuda"),
                            "cuda": _only("cuda")})


def test_auto_prefers_cpu_kernel_and_gpu_order():
    assert OP.select("auto", CPU, torch.float32) == "cpu"
    assert OP.select("auto", CUDA, torch.float32) == "triton"
    assert OpBackends("o", OP.checks, gpu_order=("cuda", "triton")).select("auto", CUDA, torch.float32) == "cuda"


def test_auto_never_picks_triton_for_cpu_tensors(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    op = OpBackends("triton_only_op", {"reference": always, "triton": triton_kernel()})
    assert op.select("auto", CPU, torch.float32) == "reference"
    assert op.select("triton", CPU, torch.float32) == "triton"


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    op = OpBackends("triton_op2", {"reference": always, "triton": triton_kernel()})
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        op.select("triton", CPU, torch.float32)


def test_precedence_explicit_then_context_then_env(monkeypatch):
    monkeypatch.setenv("TTFM_BACKEND", "reference")
    assert OP.select("auto", CPU, torch.float32) == "reference"
    with use_backend("cpu"):
        assert OP.select("auto", CPU, torch.float32) == "cpu"
        with use_backend("reference"):
            assert OP.select("auto", CPU, torch.float32) == "reference"
        assert OP.select("reference", CPU, torch.float32) == "reference"
    monkeypatch.setenv("TTFM_BACKEND", "bogus")
    with pytest.raises(ValueError, match="TTFM_BACKEND"):
        OP.select("auto", CPU, torch.float32)


def test_unknown_backend_names_the_argument():
    with pytest.raises(ValueError, match="backend must be one of"):
        OP.select("fast", CPU, torch.float32)
    with pytest.raises(ValueError, match="use_backend"), use_backend("gpu"):
        pass


def test_explicit_unavailable_raises_with_reason():
    op = OpBackends("broken_op", {"reference": always, "cpu": _unavailable})
    with pytest.raises(BackendUnavailableError, match="not here"):
        op.select("cpu", CPU, torch.float32)
    with pytest.raises(BackendUnavailableError, match="no 'cuda' backend"):
        op.select("cuda", CPU, torch.float32)


def test_auto_fallback_warns_once_per_reason():
    _dispatch._warned.clear()
    op = OpBackends("fallback_op", {"reference": always, "cpu": _unavailable})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert op.select("auto", CPU, torch.float32) == "reference"
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "fallback_op" in messages[0] and "not here" in messages[0]
