"""The fused O(N)-memory backward of the Triton attention JVP, its strided inputs and its low-precision tangent,
under the interpreter.

The suite of the CPU kernel's backward (``test_attention_cpu_backward.py``: its helpers and oracles) runs on the
"triton" backend, with forced 16 x 16 tiles (``INTERPRETER_BLOCKS``) so every row spans at least 3 key blocks and
every key at least 3 query blocks. The interpreter costs about 0.7 s per forward + backward here: the subsets
are curated (every tangent subset, every output subset, not their product). ``reference_calls`` makes a
passing fused test prove the reference backward was not taken.
"""

from __future__ import annotations

import pytest
import torch

from tests.ops.test_attention_cpu_backward import (
    NAMES,
    OUTPUT_SUBSETS,
    TANGENT_SUBSETS,
    adversarial_inputs,
    check_adversarial,
    check_subset,
    compare,
    grads,
    make_inputs,
    reference_calls,  # noqa: F401 (a fixture)
    reference_parts,
    sdpa_jvp,
    strided_layouts,
    weights,
)
from ttfm_kernels import _dispatch, jvp_attention
from ttfm_kernels.ops.attention import function
from ttfm_kernels.ops.attention import triton as attention_triton
from ttfm_kernels.ops.attention.function import _BACKENDS
from ttfm_kernels.testing import assert_nontrivial

pytestmark = pytest.mark.skipif(_BACKENDS.checks["triton"](torch.device("cpu"), torch.float32) is not None,
                                reason="Triton on CPU needs TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    monkeypatch.setattr(attention_triton, "INTERPRETER_BLOCKS", (16, 16))


def fused(causal):
    return lambda a: jvp_attention(*a, causal=causal, backend="triton", return_lse=True)


def _subset_cases():
    """(tangents present, outputs read, causal): every tangent subset reading all outputs, every output subset
    with all tangents, and t_o alone for each single tangent; causal alternates."""
    cases = [(which, (1, 1, 1)) for which in TANGENT_SUBSETS]
    cases += [((1, 1, 1), reads) for reads in OUTPUT_SUBSETS if reads != (1, 1, 1)]
    cases += [(which, (0, 1, 0)) for which in ((1, 0, 0), (0, 1, 0), (0, 0, 1))]
    return [(which, reads, i % 2 == 1) for i, (which, reads) in enumerate(cases)]


@pytest.mark.parametrize(("which", "reads", "causal"), _subset_cases(),
                         ids=lambda c: "".join(map(str, c)) if isinstance(c, tuple) else ("causal" if c else "full"))
def test_subsets_match_the_reference_backward(which, reads, causal, reference_calls):  # noqa: F811
    """40 x 48 in float32: 3 query and 3 key blocks; gradients of every present input against float64."""
    inputs = make_inputs(1, 1, 40, 48, 8, which)
    w_all = weights(inputs[0], (1, 1, 1))
    parts = reference_parts(inputs, w_all, causal)
    reference_calls.clear()
    check_subset(fused(causal), inputs, w_all, parts, reads, reference_calls)


@pytest.mark.parametrize(("n_q", "n_k", "d", "causal"), [(1, 1, 8, False), (37, 50, 72, True), (50, 20, 16, True)],
                         ids=["N1", "Nq37-Nk50-D72-causal", "Nq50-Nk20-causal"])
def test_odd_shapes_match_autograd_over_jvp_of_math_sdpa(n_q, n_k, d, causal, reference_calls):  # noqa: F811
    inputs = make_inputs(1, 2, n_q, n_k, d)
    w = weights(inputs[0], (1, 1, 0))
    compare(grads(fused(causal), inputs, w, torch.float32), grads(sdpa_jvp(causal), inputs, w, torch.float64),
            inputs, w, dtype=torch.float32)
    assert not reference_calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_backward_matches(dtype, reference_calls):  # noqa: F811
    inputs = [t.to(dtype).double() for t in make_inputs(1, 2, 40, 48, 16)]
    w = weights(inputs[0], (1, 1, 1))
    got = grads(fused(False), inputs, w, dtype)
    assert all(g.dtype == dtype for g in got)
    compare(got, grads(sdpa_jvp(False), inputs, w, torch.float64), inputs, w)
    assert not reference_calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_adversarial_shared_key_direction_forward_and_backward(dtype, reference_calls):  # noqa: F811
    """Keys sharing a large mean direction: the score tangent's row-constant part cancels in t_o. The forward
    shifts it out before rounding P ds to the GEMM operand and sums mu from that operand, so t_o stays within
    the dtype's tolerance (before: 8e-3 in bf16, 1.1e-3 in fp16)."""
    check_adversarial(adversarial_inputs(48, 16, dtype), dtype, "triton")
    assert not reference_calls


@pytest.mark.parametrize("layout", ["nn.Attention", "diffusers"])
def test_strided_inputs_are_read_without_copies(layout, reference_calls, monkeypatch):  # noqa: F811
    """Results equal those of contiguous copies; no input is copied in the forward or the backward."""
    args = dict(strided_layouts(1, 40, 2, 16))[layout]
    assert not any(t.is_contiguous() for t in args)
    leaves = [t.detach().requires_grad_() for t in args]
    views = [t.view_as(t) for t in leaves]  # strided non-leaf inputs, as a model makes them
    g_o = torch.randn(1, 40, 2, 16).transpose(1, 2)  # a strided output gradient too
    g_t = torch.randn(1, 2, 40, 16)
    copied: list[tuple[int, ...]] = []
    real = function._unit_last

    def spy(t):
        out = real(t)
        if out is not t:
            copied.append(tuple(t.shape))
        return out

    monkeypatch.setattr(function, "_unit_last", spy)
    o, t_o = jvp_attention(*views, causal=True, backend="triton")
    got = torch.autograd.grad((o, t_o), leaves, (g_o, g_t))
    assert not copied and not reference_calls
    dense = [t.detach().contiguous().requires_grad_() for t in args]
    ro, rt = jvp_attention(*dense, causal=True, backend="triton")
    ref = torch.autograd.grad((ro, rt), dense, (g_o.contiguous(), g_t))
    assert torch.equal(o, ro) and torch.equal(t_o, rt)
    for name, a, b in zip(NAMES, got, ref, strict=True):
        assert torch.equal(a, b), f"grad {name}"
        assert_nontrivial(a, f"grad {name}")


def test_non_unit_last_stride_is_copied():
    q, k, v, tq, tk, tv = (t.float() for t in make_inputs(1, 1, 40, 40, 16))
    odd = k.transpose(2, 3).contiguous().transpose(2, 3)
    assert odd.stride(-1) != 1
    o, t_o = jvp_attention(q, odd, v, tq, tk, tv, backend="triton")
    ro, rt = jvp_attention(q, k, v, tq, tk, tv, backend="triton")
    assert torch.equal(o, ro) and torch.equal(t_o, rt)


def test_backward_configurations_and_fallback(monkeypatch):
    """A GPU head dim without a backward configuration (float32 D > 32: every tile tried spills) takes the
    reference backward with one warning (checked on CPU tensors by pretending they are CUDA ones)."""
    cuda = torch.device("cuda")
    for dtype, head_dim in [(torch.float16, 64), (torch.bfloat16, 72), (torch.bfloat16, 256), (torch.float32, 32)]:
        assert attention_triton.backward_unsupported(cuda, dtype, head_dim) is None
    assert attention_triton.backward_unsupported(torch.device("cpu"), torch.float32, 64) is None  # interpreter
    reason = attention_triton.backward_unsupported(cuda, torch.float32, 64)
    assert "float32" in reason and "64" in reason
    monkeypatch.setattr(function, "_backward_unsupported", lambda name, q: reason)
    args = [t.float().requires_grad_() for t in make_inputs(1, 1, 20, 20, 8)]
    _, t_o = jvp_attention(*args, backend="triton")
    monkeypatch.setattr(_dispatch, "_warned", set())
    with pytest.warns(RuntimeWarning, match="fused backward of backend .triton. skipped"):
        got = torch.autograd.grad(t_o.sum(), args)
    assert_nontrivial(got[3], "grad tq")


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
def test_opcheck_kernel_ops(requires_grad):
    """Every opcheck check on the Triton forward kernel op (with inputs requiring grad: its registered autograd,
    which runs the Triton backward op) and on the backward kernel op."""
    q, k, v, tq, _, tv = (None if t is None else t.float() for t in make_inputs(1, 1, 20, 18, 8, (1, 0, 1)))
    args = [None if t is None else t.requires_grad_(requires_grad) for t in (q, k, v, tq, None, tv)]
    torch.library.opcheck(torch.ops.ttfm.jvp_attention_fwd_triton.default, (*args, True, 0.3))
    if not requires_grad:
        o, t_o, lse, mu = torch.ops.ttfm.jvp_attention_fwd_triton(q, k, v, tq, None, tv, True, 0.3)
        torch.library.opcheck(torch.ops.ttfm.jvp_attention_bwd_triton.default,
                              (q, k, v, tq, None, tv, o, t_o, lse, mu, torch.randn_like(q), None, None, True, 0.3))
