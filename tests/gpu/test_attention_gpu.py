"""jvp_attention's Triton kernel compiled for the GPU, against torch.func.jvp over math SDPA on the CPU (float64).

Curated: about 25 kernel specialisations (dtype x padded head dim x causal x tangent set x Nq/Nk shape class;
float32 at D in (64, 128] compiles one per tangent). The
inputs, oracle and tolerances are those of the interpreter suite (``tests/ops/test_attention.py``).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tests.ops.test_attention import _check, _inputs, _oracle
from ttfm_kernels import attention, jvp_attention
from ttfm_kernels.ops.attention.function import _select
from ttfm_kernels.ops.attention.triton import gpu_config
from ttfm_kernels.testing import assert_close_to_ref, assert_nontrivial

pytestmark = pytest.mark.gpu
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32

#: (B, H, Nq, Nk, D, causal, dtype): every dtype, N in {1, 77, 400}, Nq != Nk, D in {16, 64, 72, 80, 128, 256}.
CASES = [
    (1, 2, 77, 130, 64, False, F16),
    (1, 2, 77, 130, 64, False, BF16),
    (1, 2, 77, 130, 64, False, F32),
    (2, 3, 400, 400, 16, False, F16),
    (1, 2, 130, 77, 80, True, F16),
    (1, 1, 400, 400, 128, False, BF16),
    (2, 2, 77, 77, 128, True, F16),
    (1, 2, 1, 1, 64, False, F16),
    (1, 2, 1, 77, 16, False, F32),
    (1, 2, 130, 77, 64, True, BF16),
    (1, 2, 77, 130, 16, True, F32),
    (1, 1, 77, 77, 256, False, BF16),
    (1, 2, 77, 130, 72, False, F32),  # float32 D in (64, 128]: one launch per tangent (DiT-XL/2 has 72)
    (1, 1, 400, 400, 128, True, F32),
]


def _cuda(args):
    return tuple(None if t is None else t.cuda() for t in args)


@pytest.mark.parametrize("shape", CASES, ids=lambda c: "B{}H{}Nq{}Nk{}D{}{}-{}".format(*c[:5], "c" * c[5],
                                                                                       str(c[6])[6:]))
def test_triton_matches_func_jvp(shape):
    *dims, causal, dtype = shape
    args = _inputs(*dims, dtype=dtype)
    got = jvp_attention(*_cuda(args), causal=causal, return_lse=True, backend="triton")
    assert all(t.is_cuda for t in got)
    _check(got, _oracle(*args, causal=causal), dtype)
    assert_nontrivial(got[1], "t_o")


@pytest.mark.parametrize("absent", [(0,), (1,), (2,), (0, 1, 2)], ids=lambda a: f"no-t{a}")
def test_absent_tangents_and_late_max(absent):
    q, k, v, *tangents = _inputs(1, 2, 130, 130, 64, dtype=F16, late_max=True)
    tangents = [None if i in absent else t for i, t in enumerate(tangents)]
    got = jvp_attention(*_cuda((q, k, v, *tangents)), scale=0.3, return_lse=True, backend="triton")
    _check(got, _oracle(q, k, v, *tangents, scale=0.3), F16, what=f" without tangents {absent}")
    if len(absent) == 3:
        assert got[1].eq(0).all()
    else:
        assert_nontrivial(got[1], "t_o")


def test_gradients_through_the_tangent():
    """Reverse-over-forward through ``attention`` under torch.func.jvp (LFMD's path), fp32 on CUDA, "auto"."""
    args = [t.requires_grad_() for t in _inputs(1, 2, 77, 77, 64, dtype=F32)]
    w_o, w_t = torch.randn(2, 1, 2, 77, 64, dtype=torch.float64)

    def loss(fn, tensors, weights):
        o, t_o = torch.func.jvp(lambda a, b, c: fn(a, b, c, is_causal=True), tuple(tensors[:3]), tuple(tensors[3:]))
        return (o * weights[0]).sum() + (t_o * weights[1]).sum()

    cuda_args = [t.detach().cuda().requires_grad_() for t in args]
    got = torch.autograd.grad(loss(attention, cuda_args, (w_o.cuda().float(), w_t.cuda().float())), cuda_args)
    with sdpa_kernel(SDPBackend.MATH):
        ref = torch.autograd.grad(loss(F.scaled_dot_product_attention, [t.double() for t in args], (w_o, w_t)),
                                  args)
    for name, g, r in zip(("q", "k", "v", "tq", "tk", "tv"), got, ref, strict=True):
        assert g.is_cuda
        assert_nontrivial(g, f"grad {name}")
        assert_close_to_ref(g, r, dtype=F32, name=f"grad {name}", scale=4.0)  # fp32 sums over 77 keys


@pytest.mark.parametrize(("dtype", "head_dim"), [(F16, 64), (BF16, 128), (F32, 64), (F32, 72), (F16, 256)])
def test_auto_picks_triton_for_cuda_tensors(dtype, head_dim):
    """"auto" takes the Triton kernel whenever a GPU configuration is registered (else the reference), and
    gives the same result as asking for it."""
    args = _cuda(_inputs(1, 2, 77, 77, head_dim, dtype=dtype))
    expected = "triton" if gpu_config(dtype, head_dim) is not None else "reference"
    with warnings.catch_warnings():  # the fallback warns once per process (maybe in another test)
        warnings.simplefilter("ignore", RuntimeWarning)
        assert _select("auto", args[0]) == expected
    if expected == "triton":
        auto = jvp_attention(*args, backend="auto")
        explicit = jvp_attention(*args, backend="triton")
        for a, e in zip(auto, explicit, strict=True):
            torch.testing.assert_close(a, e, rtol=0, atol=0)
