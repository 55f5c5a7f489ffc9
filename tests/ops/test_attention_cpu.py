"""The C++ CPU kernel of the attention JVP (``ttfm::jvp_attention_fwd``, csrc/cpu/vec/attention.cpp), called
directly with forced tile sizes so small shapes run several query and key blocks (the online rescaling), and
the gradients through both outputs of the public API on this backend.

The oracle (tests/ops/test_attention.py) is ``torch.func.jvp`` over math SDPA in float64 (absent tangents are
zeros) and the logsumexp of the scaled, masked scores. The parity suite there runs this backend too.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tests.ops.test_attention import _oracle
from ttfm_kernels import _ext, attention, jvp_attention
from ttfm_kernels.testing import assert_close_to_ref, assert_nontrivial

pytestmark = pytest.mark.skipif(not _ext.has_kernel("jvp_attention_fwd", "CPU"),
                                reason="ttfm_kernels._C_vec (the AVX2 CPU kernels) is not loaded")

TANGENTS = {"all": (1, 1, 1), "q": (1, 0, 0), "k": (0, 1, 0), "v": (0, 0, 1), "qk": (1, 1, 0), "kv": (0, 1, 1),
            "none": (0, 0, 0)}


def run_kernel(q, k, v, tq, tk, tv, *, causal, scale, block_q=0, block_k=0, bf16_gemm=-1):
    """The raw kernel op; its outputs are NaN-filled (TTFM_DEBUG_NAN_FILL=1 in tests), so every unwritten value
    fails."""
    o, t_o, lse, _ = torch.ops.ttfm.jvp_attention_fwd(q, k, v, tq, tk, tv, causal, scale, block_q, block_k,
                                                      bf16_gemm)
    return o, t_o, lse


def make_inputs(shape_q, n_k, dtype, which=(1, 1, 1), rising=False):
    """q (B, H, Nq, D), k/v (B, H, Nk, D) and the tangents selected by ``which`` (None where 0).

    ``rising``: scores grow along the keys, so the running max rises in every later key block.
    """
    b, h, n_q, d = shape_q
    q = torch.randn(b, h, n_q, d, dtype=torch.float64)
    k = torch.randn(b, h, n_k, d, dtype=torch.float64)
    if rising:
        q = q.abs() + 0.5
        k = k + torch.linspace(0, 3, n_k, dtype=torch.float64)[:, None]
    v = torch.randn(b, h, n_k, d, dtype=torch.float64)
    tangents = [torch.randn_like(x) if w else None for x, w in zip((q, k, v), which, strict=True)]
    return [None if t is None else t.to(dtype) for t in (q, k, v, *tangents)]


def check(inputs, *, causal, scale, block_q=0, block_k=0, bf16_gemm=-1):
    """The kernel's (o, t_o, lse) match the oracle; t_o is nonzero unless every tangent is absent."""
    dtype = inputs[0].dtype
    o, t_o, lse = run_kernel(*inputs, causal=causal, scale=scale, block_q=block_q, block_k=block_k,
                             bf16_gemm=bf16_gemm)
    ro, rt, rlse = _oracle(*inputs, causal=causal, scale=scale)
    assert o.dtype == dtype and t_o.dtype == dtype and lse.dtype == torch.float32
    assert_close_to_ref(o, ro, name="o")
    assert_close_to_ref(t_o, rt, name="t_o")
    assert_close_to_ref(lse, rlse, name="lse")  # fp32 from the exact (upcast) inputs, whatever their dtype
    if all(t is None for t in inputs[3:]):
        assert t_o.eq(0).all()
    else:
        assert_nontrivial(t_o, "t_o")


# (B, H, Nq, D), Nk, block_q, block_k: forced tiles give >= 3 key blocks and partial last blocks.
CASES = [
    ((2, 3, 37, 5), 53, 8, 16),
    ((1, 2, 64, 64), 64, 16, 16),
    ((2, 1, 130, 16), 70, 32, 24),
    ((1, 1, 20, 8), 130, 7, 11),
    ((1, 1, 1, 3), 1, 0, 0),
    ((1, 2, 1, 8), 200, 0, 64),
    ((1, 1, 48, 256), 40, 16, 8),
    ((2, 2, 96, 32), 96, 0, 0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("shape_q", "n_k", "block_q", "block_k"), CASES,
                         ids=[f"q{s}-nk{n}-bq{bq}-bk{bk}" for s, n, bq, bk in CASES])
def test_matches_jvp_of_sdpa(shape_q, n_k, block_q, block_k, causal, dtype):
    inputs = make_inputs(shape_q, n_k, dtype)
    check(inputs, causal=causal, scale=1 / math.sqrt(shape_q[-1]), block_q=block_q, block_k=block_k)


@pytest.mark.parametrize("bf16_gemm", [0, 1], ids=["fp32-gemm", "bf16-gemm"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bf16_gemm_paths(causal, bf16_gemm):
    """bf16 inputs through both GEMM paths (-1, the default, picks bf16 GEMMs where the CPU has avx512_bf16)."""
    for which in ((1, 1, 1), (0, 1, 0), (0, 0, 1)):
        inputs = make_inputs((2, 2, 70, 32), 90, torch.bfloat16, which, rising=True)
        check(inputs, causal=causal, scale=0.3, block_q=16, block_k=32, bf16_gemm=bf16_gemm)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("which", list(TANGENTS.values()), ids=list(TANGENTS))
def test_absent_tangents_are_zero(which, causal):
    inputs = make_inputs((2, 2, 45, 12), 50, torch.float32, which)
    check(inputs, causal=causal, scale=0.4, block_q=16, block_k=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_running_max_rises_in_later_key_blocks(causal, dtype):
    inputs = make_inputs((1, 2, 40, 16), 96, dtype, rising=True)
    scores = inputs[0][0, 0].double() @ inputs[1][0, 0].double().T
    assert scores[:, 64:].max(dim=1).values.gt(scores[:, :32].max(dim=1).values).all()  # the case is real
    check(inputs, causal=causal, scale=0.5, block_q=16, block_k=32)


def test_large_scores_do_not_overflow():
    q, k, v, tq, tk, tv = make_inputs((1, 1, 33, 8), 70, torch.float32)
    check([q * 30, k * 30, v, tq, tk, tv], causal=False, scale=1.0, block_q=8, block_k=16)


def test_result_does_not_depend_on_thread_count():
    inputs = make_inputs((2, 2, 100, 16), 100, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_kernel(*inputs, causal=True, scale=0.25, block_q=16, block_k=32)
        torch.set_num_threads(max(2, threads))
        many = run_kernel(*inputs, causal=True, scale=0.25, block_q=16, block_k=32)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many, strict=True):
        assert torch.equal(a, b)


def test_rejects_bad_arguments():
    q, k, v, tq, tk, tv = make_inputs((1, 2, 8, 4), 8, torch.float32)
    op = torch.ops.ttfm.jvp_attention_fwd
    with pytest.raises(RuntimeError, match="tk has shape"):
        op(q, k, v, tq, tk[:, :, :4], tv, False, 0.5)
    with pytest.raises(RuntimeError, match="tv has dtype"):
        op(q, k, v, tq, tk, tv.double(), False, 0.5)
    with pytest.raises(RuntimeError, match="k must have a unit last stride"):
        op(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, tq, tk, tv, False, 0.5)
    with pytest.raises(RuntimeError, match="float32 and bfloat16"):
        op(*(t.half() for t in (q, k, v, tq, tk, tv)), False, 0.5)
    with pytest.raises(RuntimeError, match="bf16_gemm must be"):
        op(q, k, v, tq, tk, tv, False, 0.5, 0, 0, 2)
    with pytest.raises(RuntimeError, match="block sizes"):
        op(q, k, v, tq, tk, tv, False, 0.5, -1, 0)
    with pytest.raises(RuntimeError, match="no keys"):
        op(q, k[:, :, :0], v[:, :, :0], tq, None, None, False, 0.5)
    with pytest.raises(RuntimeError, match="head dim"):
        op(*(t[..., :0] for t in (q, k, v, tq, tk, tv)), False, 0.5)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
def test_opcheck_kernel_op(requires_grad):
    """Every opcheck check on the functional kernel op; with inputs requiring grad, its registered autograd."""
    inputs = make_inputs((1, 2, 12, 8), 10, torch.float32, (1, 0, 1))
    args = [None if t is None else t.requires_grad_(requires_grad) for t in inputs]
    torch.library.opcheck(torch.ops.ttfm.jvp_attention_fwd.default, (*args, True, 0.3, 4, 4))


@pytest.mark.parametrize("api", ["jvp_attention", "attention-under-func.jvp"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gradients_through_o_and_t_o(causal, api):
    """Reverse-over-forward through the autograd wrapper: the forward and the fused backward run this kernel
    (fp32); compared with the float64 gradients of torch.func.jvp over math SDPA."""
    inputs = make_inputs((1, 2, 70, 16), 50, torch.float64)
    w_o, w_t = torch.randn(2, 1, 2, 70, 16, dtype=torch.float64)

    def loss(args, fn):
        o, t_o = fn(args)
        return (o * w_o).sum() + (t_o * w_t).sum()

    def fused(args):
        if api == "jvp_attention":
            return jvp_attention(*args, causal=causal, backend="cpu")
        return torch.func.jvp(lambda q, k, v: attention(q, k, v, is_causal=causal, backend="cpu"), args[:3], args[3:])

    def eager(args):
        with sdpa_kernel(SDPBackend.MATH):
            return torch.func.jvp(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                                  args[:3], args[3:])

    got_args = tuple(t.float().requires_grad_() for t in inputs)
    ref_args = tuple(t.requires_grad_() for t in inputs)
    got = torch.autograd.grad(loss(got_args, fused), got_args)
    ref = torch.autograd.grad(loss(ref_args, eager), ref_args)
    for name, g, r in zip(("q", "k", "v", "tq", "tk", "tv"), got, ref, strict=True):
        assert_nontrivial(g, f"grad {name}")
        assert_close_to_ref(g, r, name=f"grad {name}")
