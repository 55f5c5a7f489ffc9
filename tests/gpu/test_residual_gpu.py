"""The CUDA kernels of ``_C_cuda`` (itvm_residual_loss forward + backward, flow_map_step) against the reference
on the CPU in float64. On a CUDA machine a missing ``_C_cuda`` is a failure here, never a skip."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.ops.test_residual import DTYPES, make_inputs, reference64, terms64, three_term_inputs
from ttfm_kernels import _ext, flow_map_step, itvm_residual_loss
from ttfm_kernels.ops.residual.function import _FLOW_MAP_STEP, _RESIDUAL
from ttfm_kernels.ops.residual.reference import flow_map_step_reference, itvm_residual_loss_reference
from ttfm_kernels.testing import assert_close_to_ref, assert_nontrivial

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _cuda_extension_loaded() -> None:
    status = _ext.status()["_C_cuda"]
    assert status is None, f"ttfm_kernels._C_cuda is not loaded: {status} (run `make gpu-check STAGES=build`)"


def _loss_and_grads(tensors, coef, weight, reduction, device, backend):
    """Loss and the gradients of u_st, u_ss for a fixed random incoming gradient, on ``device``."""
    u_st, u_ss = (x.detach().to(device).requires_grad_() for x in tensors[:2])
    rest = [x.to(device) for x in tensors[2:]]
    fn = itvm_residual_loss_reference if backend is None else itvm_residual_loss
    extra = {} if backend is None else {"backend": backend}
    loss = fn(u_st, u_ss, *rest, coef.to(device), weight=None if weight is None else weight.to(device),
              reduction=reduction, lambda_init=0.7, lambda_term=1.3, **extra)
    gy = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g_st, g_ss = torch.autograd.grad(loss, [u_st, u_ss], gy.to(device, loss.dtype))
    return loss, g_st, g_ss


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "target", "weight", "reduction"), [
    ((4, 37), "jvp", True, "mean"), ((1, 1), "euler", False, "sum"), ((2, 5, 7, 3), "fd", True, "none"),
    ((3, 70001), "jvp", False, "mean"),  # long odd rows: several blocks per sample, the last partial
])
def test_itvm_residual_loss_cuda_matches_reference(dtype, shape, target, weight, reduction):
    tensors, coef, w = make_inputs(shape, dtype, target, weight)
    loss, g_st, g_ss = _loss_and_grads(tensors, coef, w, reduction, "cuda", "cuda")
    ref = _loss_and_grads([x.double() for x in tensors], coef.double(), None if w is None else w.double(),
                          reduction, "cpu", None)
    accumulate = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.is_cuda and loss.dtype == accumulate and g_st.dtype == g_ss.dtype == dtype
    assert_close_to_ref(loss, ref[0], dtype=accumulate, name="loss")
    assert_close_to_ref(g_st, ref[1].to(dtype), dtype=dtype, name="grad u_st")
    assert_close_to_ref(g_ss, ref[2].to(dtype), dtype=dtype, name="grad u_ss")
    assert_nontrivial(g_st, "grad u_st")
    assert_nontrivial(g_ss, "grad u_ss")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 4, 17, 5), (2, 1 << 20)])
def test_flow_map_step_cuda_matches_reference(dtype, shape):
    x, u = (torch.randn(shape, dtype=torch.float64).to(dtype) for _ in range(2))
    s, t = torch.rand(2, shape[0])
    ref = flow_map_step_reference(x.double(), u.double(), s.double(), t.double())
    got = flow_map_step(x.cuda(), u.cuda(), s.cuda(), t.cuda(), backend="cuda")
    assert got.is_cuda and got.dtype == dtype
    assert_close_to_ref(got, ref, dtype=dtype)
    out = torch.empty_like(x, device="cuda")
    assert flow_map_step(x.cuda(), u.cuda(), s.cuda(), t.cuda(), out=out, backend="cuda") is out
    torch.testing.assert_close(out, got, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_auto_picks_the_cuda_kernels(dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert _RESIDUAL.select("auto", torch.device("cuda"), dtype) == "cuda"
        assert _FLOW_MAP_STEP.select("auto", torch.device("cuda"), dtype) == "cuda"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "reduction"), [((4, 37), "mean"), ((2, 5, 7, 3), "none"), ((3, 70001), "mean")])
def test_itvm_residual_loss_cuda_three_term_target_and_terms(dtype, shape, reduction):
    """target_c / coef_c (the "fd" target's u' and 1 / delta) and return_terms on the CUDA kernels against the
    float64 reference on the CPU: loss, both statistics and both gradients."""
    tensors, coef, w, third = three_term_inputs(shape, dtype)
    cuda = {k: v.cuda() for k, v in third.items()}
    u_st, u_ss = (x.cuda().requires_grad_() for x in tensors[:2])
    loss, init, term = itvm_residual_loss(u_st, u_ss, *(x.cuda() for x in tensors[2:]), coef.cuda(),
                                          weight=w.cuda(), reduction=reduction, return_terms=True, backend="cuda",
                                          **cuda)
    g_st, g_ss = torch.autograd.grad(loss.sum(), [u_st, u_ss])
    ref = terms64(tensors, coef, w, reduction, **third)
    accumulate = torch.float64 if dtype == torch.float64 else torch.float32
    for name, a, r in zip(("loss", "init_mean", "term_mean"), (loss, init, term), ref, strict=True):
        assert a.is_cuda and a.dtype == accumulate
        assert_close_to_ref(a.cpu(), r, dtype=accumulate, name=name)
    _, ref_st, ref_ss = reference64(tensors, coef, w, reduction, True, **third)  # unit gradients, as loss.sum()
    assert_close_to_ref(g_st.cpu(), ref_st.to(dtype), dtype=dtype, name="grad u_st")
    assert_close_to_ref(g_ss.cpu(), ref_ss.to(dtype), dtype=dtype, name="grad u_ss")
    assert_nontrivial(g_st.cpu(), "grad u_st")
