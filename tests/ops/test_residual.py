"""The residual ops against their reference (docs/math.md sections 1-2): values, gradients, bad input, opcheck."""

import pytest
import torch
from torch.autograd import forward_ad as fwAD

from ttfm_kernels import BackendUnavailableError, _ext, flow_map_step, itvm_residual_loss
from ttfm_kernels.ops.residual import function
from ttfm_kernels.ops.residual.reference import flow_map_step_reference, itvm_residual_loss_reference
from ttfm_kernels.testing import assert_close_to_ref, assert_nontrivial

needs_cpu_kernel = pytest.mark.skipif(not _ext.has_kernel("itvm_residual_loss_fwd", "CPU"),
                                      reason="the C++ CPU extension is not built")
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
NAMES = ("u_st", "u_ss", "v_s", "target_a", "target_b")


def make_inputs(shape, dtype=torch.float32, target="jvp", weight=True):
    """(u_st, u_ss, v_s, target_a, target_b) of ``shape`` and (coef, weight) for a target of docs/math.md section 2."""
    u_st, u_ss, v_s, a, b = (torch.randn(shape, dtype=torch.float64).to(dtype) for _ in range(5))
    batch = shape[0]
    s = torch.rand(batch, dtype=torch.float64) * 0.5
    t = s + torch.rand(batch, dtype=torch.float64) * 0.5
    delta = 0.25
    coef = {"jvp": -(t - s), "euler": torch.full((batch,), 1 - delta, dtype=torch.float64),
            "fd": torch.full((batch,), 1 / delta, dtype=torch.float64)}[target].to(torch.float32)
    w = torch.rand(batch) + 0.5 if weight else None
    return [u_st, u_ss, v_s, a, b], coef, w


def loss_and_grads(tensors, coef, weight, reduction, backend, unit_grad=False, **kw):
    """Loss and its gradients for a random incoming gradient, or with ``unit_grad`` for ones (loss.backward())."""
    u_st, u_ss = (x.detach().clone().requires_grad_() for x in tensors[:2])
    fn = itvm_residual_loss_reference if backend is None else itvm_residual_loss
    extra = {} if backend is None else {"backend": backend}
    loss = fn(u_st, u_ss, *tensors[2:], coef, weight=weight, reduction=reduction, **kw, **extra)
    if unit_grad:
        gy = torch.ones_like(loss)
    else:
        gy = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1), dtype=loss.dtype)
    g_st, g_ss = torch.autograd.grad(loss, [u_st, u_ss], gy)
    return loss, g_st, g_ss


def reference64(tensors, coef, weight, reduction, unit_grad=False, **kw):
    """Reference loss and gradients from the same (possibly rounded) inputs, evaluated in float64."""
    return loss_and_grads([x.double() for x in tensors], coef.double(),
                          None if weight is None else weight.double(), reduction, None, unit_grad, **kw)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("shape", "target", "weight"), [
    ((4, 37), "jvp", True), ((1, 1), "euler", False), ((3, 3), "fd", True), ((2, 5, 7, 3), "jvp", False),
    ((3, 20000), "euler", True),  # two kernel chunks per sample, the second one partial
])
# A unit incoming gradient takes the gradients the forward pass wrote; any other one recomputes them.
@pytest.mark.parametrize("unit_grad", [True, False], ids=["unit-grad", "random-grad"])
def test_cpu_matches_reference(dtype, reduction, shape, target, weight, unit_grad):
    tensors, coef, w = make_inputs(shape, dtype, target, weight)
    kw = {"lambda_init": 0.7, "lambda_term": 1.3}
    loss, g_st, g_ss = loss_and_grads(tensors, coef, w, reduction, "cpu", unit_grad, **kw)
    ref_loss, ref_st, ref_ss = reference64(tensors, coef, w, reduction, unit_grad, **kw)
    accumulate = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == accumulate and g_st.dtype == g_ss.dtype == dtype
    assert_close_to_ref(loss, ref_loss, dtype=accumulate, name="loss")
    assert_close_to_ref(g_st, ref_st.to(dtype), dtype=dtype, name="grad u_st")
    assert_close_to_ref(g_ss, ref_ss.to(dtype), dtype=dtype, name="grad u_ss")
    assert_nontrivial(g_st, "grad u_st")
    assert_nontrivial(g_ss, "grad u_ss")


def three_term_inputs(shape, dtype=torch.float32):
    """The inputs of make_inputs plus target_c and coef_c (the "fd" target's u' and 1 / delta)."""
    tensors, coef, w = make_inputs(shape, dtype, "fd")
    return tensors, -coef, w, {"target_c": torch.randn(shape, dtype=torch.float64).to(dtype), "coef_c": coef}


def terms64(tensors, coef, weight, reduction, **kw):
    """The reference (loss, init_mean, term_mean) in float64 from the same inputs."""
    kw = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    return itvm_residual_loss_reference(*(x.double() for x in tensors), coef.double(),
                                        weight=None if weight is None else weight.double(), reduction=reduction,
                                        return_terms=True, **kw)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("shape", [(4, 37), (3, 20000)])  # one kernel chunk per sample; two, the second partial
@pytest.mark.parametrize("unit_grad", [True, False], ids=["unit-grad", "random-grad"])
def test_cpu_three_term_target_and_terms_match_reference(dtype, reduction, shape, unit_grad):
    tensors, coef, w, third = three_term_inputs(shape, dtype)
    kw = {"lambda_init": 0.7, "lambda_term": 1.3, **third}
    loss, g_st, g_ss = loss_and_grads(tensors, coef, w, reduction, "cpu", unit_grad, **kw)
    ref_loss, ref_st, ref_ss = reference64(tensors, coef, w, reduction, unit_grad, **kw)
    accumulate = torch.float64 if dtype == torch.float64 else torch.float32
    assert_close_to_ref(loss, ref_loss, dtype=accumulate, name="loss")
    assert_close_to_ref(g_st, ref_st.to(dtype), dtype=dtype, name="grad u_st")
    assert_close_to_ref(g_ss, ref_ss.to(dtype), dtype=dtype, name="grad u_ss")
    assert_nontrivial(g_st, "grad u_st")
    # Without target_c the loss differs: the third term is really read.
    two_term = itvm_residual_loss(*tensors, coef, weight=w, reduction=reduction, backend="cpu")
    assert not torch.allclose(two_term, loss.detach())
    got = itvm_residual_loss(*tensors, coef, weight=w, reduction=reduction, return_terms=True, backend="cpu", **kw)
    expected = terms64(tensors, coef, w, reduction, **kw)
    for name, a, r in zip(("loss", "init_mean", "term_mean"), got, expected, strict=True):
        assert a.dtype == accumulate and not a.requires_grad
        assert_close_to_ref(a, r, dtype=accumulate, name=name)
    assert got[1].shape == got[2].shape == ()


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu_kernel), "reference"])
def test_return_terms_are_the_unweighted_mean_squared_residuals(backend):
    tensors, coef, w, third = three_term_inputs((3, 2, 5), torch.float64)
    u_st = tensors[0].clone().requires_grad_()
    loss, init, term = itvm_residual_loss(u_st, *tensors[1:], coef, weight=w, lambda_init=0.5, return_terms=True,
                                          backend=backend, **third)
    u_st_, u_ss, v_s, a, b = tensors
    r_t = u_st_ - (a + coef.view(-1, 1, 1) * b + third["coef_c"].view(-1, 1, 1) * third["target_c"])
    torch.testing.assert_close(init, (u_ss - v_s).square().mean())
    torch.testing.assert_close(term, r_t.square().mean())
    assert init.grad_fn is None and term.grad_fn is None and loss.grad_fn is not None
    torch.testing.assert_close(loss, ((0.5 * (u_ss - v_s).square() + r_t.square()).mean((1, 2)) * w).mean())


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu_kernel), "reference"])
def test_fd_target_in_bfloat16_at_small_delta(backend):
    """The "fd" target v - (u - u') / delta at delta = 0.01 from bfloat16 data: its terms given separately, the
    op forms the cancelling difference in float32 and stays within the bfloat16 tolerance of float64 arithmetic
    on the same values; the old formula (v - u / delta rounded to bfloat16 before the op) does not."""
    delta, shape = 0.01, (4, 4096)
    gen = torch.Generator().manual_seed(3)

    def data(x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.bfloat16)

    u_ema = data(torch.randn(shape, generator=gen, dtype=torch.float64))
    u_prime = data(u_ema.double() + delta * torch.randn(shape, generator=gen, dtype=torch.float64))
    v_end, v_s = (data(torch.randn(shape, generator=gen, dtype=torch.float64)) for _ in range(2))
    u_ss = data(v_s.double() + 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64))
    exact_target = v_end.double() - (u_ema.double() - u_prime.double()) / delta
    u_st = data(exact_target + 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64))
    coef, coef_c = torch.full((4,), -1 / delta), torch.full((4,), 1 / delta)

    def grads(target_a, target_b, cf, **kw):
        x = u_st.clone().requires_grad_()
        loss = itvm_residual_loss(x, u_ss, v_s, target_a, target_b, cf, backend=backend, **kw)
        return loss, torch.autograd.grad(loss, [x])[0]

    ref_loss, ref_grad, _ = loss_and_grads([u_st.double(), u_ss.double(), v_s.double(), v_end.double(),
                                         u_ema.double()], coef.double(), None, "mean", None, True,
                                        target_c=u_prime.double(), coef_c=coef_c.double())
    loss, grad = grads(v_end, u_ema, coef, target_c=u_prime, coef_c=coef_c)
    assert_close_to_ref(loss, ref_loss, dtype=torch.bfloat16, name="loss")
    assert_close_to_ref(grad, ref_grad.to(torch.bfloat16), name="grad u_st")
    assert_nontrivial(grad)
    old_loss, old_grad = grads(v_end - u_ema / delta, u_prime, coef_c)
    with pytest.raises(AssertionError):
        assert_close_to_ref(old_grad, ref_grad.to(torch.bfloat16), name="grad u_st (old formula)")
    assert (old_loss - ref_loss).abs() > 3e-2 * ref_loss.abs()


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu_kernel), "reference"])
def test_mixed_input_dtypes_combine_in_float32(backend):
    """A bfloat16 student against float32 targets (autocast): the loss matches float64 arithmetic on the same
    values, and each gradient comes back in its input's dtype."""
    tensors, coef, w, third = three_term_inputs((3, 40))
    dtypes = (torch.bfloat16, torch.float16, torch.float32, torch.bfloat16, torch.float32)
    mixed = [x.to(d) for x, d in zip(tensors, dtypes, strict=True)]
    u_st, u_ss = (x.clone().requires_grad_() for x in mixed[:2])
    loss, init, term = itvm_residual_loss(u_st, u_ss, *mixed[2:], coef, weight=w, return_terms=True,
                                          backend=backend, **third)
    g_st, g_ss = torch.autograd.grad(loss, [u_st, u_ss])
    assert loss.dtype == init.dtype == torch.float32
    assert g_st.dtype == torch.bfloat16 and g_ss.dtype == torch.float16
    ref = terms64(mixed, coef, w, "mean", **third)
    for name, a, r in zip(("loss", "init_mean", "term_mean"), (loss, init, term), ref, strict=True):
        assert_close_to_ref(a, r, dtype=torch.float32, name=name)
    _, ref_st, ref_ss = reference64(mixed, coef, w, "mean", True, **third)
    assert_close_to_ref(g_st, ref_st.to(torch.bfloat16), name="grad u_st")
    assert_close_to_ref(g_ss, ref_ss.to(torch.float16), name="grad u_ss")


@needs_cpu_kernel
def test_cpu_large_odd_feature_size():
    tensors, coef, w = make_inputs((1, 1000003), torch.float32, "fd")
    loss, g_st, g_ss = loss_and_grads(tensors, coef, w, "sum", "cpu")
    ref_loss, ref_st, ref_ss = reference64(tensors, coef, w, "sum")
    assert_close_to_ref(loss, ref_loss, name="loss")
    assert_close_to_ref(g_st, ref_st.float(), name="grad u_st")
    assert_close_to_ref(g_ss, ref_ss.float(), name="grad u_ss")


@needs_cpu_kernel
@pytest.mark.parametrize("weight", [True, False])
def test_cpu_gradcheck(weight):
    tensors, coef, w = make_inputs((3, 2, 4), torch.float64, "jvp", weight)
    u_st, u_ss = (x.requires_grad_() for x in tensors[:2])

    def fn(u_st, u_ss):
        return itvm_residual_loss(u_st, u_ss, *tensors[2:], coef, weight=w, lambda_init=0.5, reduction="none",
                                  backend="cpu")

    assert torch.autograd.gradcheck(fn, (u_st, u_ss))


@needs_cpu_kernel
def test_cpu_only_one_gradient_requested():
    tensors, coef, w = make_inputs((2, 9))
    u_ss = tensors[1].requires_grad_()
    loss = itvm_residual_loss(*tensors, coef, weight=w, backend="cpu")
    (grad,) = torch.autograd.grad(loss, [u_ss])
    ref = itvm_residual_loss_reference(*tensors, coef, weight=w)
    assert_close_to_ref(grad, torch.autograd.grad(ref, [u_ss])[0], name="grad u_ss")


@needs_cpu_kernel
def test_cpu_non_contiguous_inputs_are_handled():
    base, _, w = make_inputs((6, 5, 8))
    strided = [x.transpose(1, 2) for x in base]            # (6, 8, 5) non-contiguous views
    sliced_coef = torch.randn(12)[::2]
    assert not strided[0].is_contiguous() and not sliced_coef.is_contiguous()
    got = loss_and_grads(strided, sliced_coef, w, "mean", "cpu")
    ref = reference64(strided, sliced_coef, w, "mean")
    for name, a, r in zip(("loss", "grad u_st", "grad u_ss"), got, ref, strict=True):
        assert_close_to_ref(a, r.float(), name=name)


@needs_cpu_kernel
def test_cpu_deterministic_across_thread_counts():
    tensors, coef, w = make_inputs((3, 70001))
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(itvm_residual_loss(*tensors, coef, weight=w, reduction="none", backend="cpu"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


@needs_cpu_kernel
def test_auto_picks_cpu_kernel_and_cuda_is_explicit_only(monkeypatch):
    def no_reference(*args, **kwargs):
        raise AssertionError("the reference formula ran under auto")

    monkeypatch.setattr(function, "itvm_residual_loss_reference", no_reference)
    tensors, coef, _ = make_inputs((2, 3))
    loss = itvm_residual_loss(*tensors, coef)
    assert loss.grad_fn is None and loss.shape == ()
    with pytest.raises(BackendUnavailableError, match="cuda"):
        itvm_residual_loss(*tensors, coef, backend="cuda")


@needs_cpu_kernel
def test_cpu_graph_is_kept_only_when_gradients_are_needed():
    tensors, coef, w = make_inputs((2, 5))
    u_st = tensors[0].clone().requires_grad_()
    assert itvm_residual_loss(u_st, *tensors[1:], coef, weight=w).grad_fn is not None
    with torch.no_grad():
        assert itvm_residual_loss(u_st, *tensors[1:], coef, weight=w).grad_fn is None


@needs_cpu_kernel
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cpu_backward_twice_with_retain_graph(reduction):
    """The gradients the forward pass saved are not consumed or modified by a first backward."""
    tensors, coef, w = make_inputs((3, 11))
    u_st, u_ss = (x.clone().requires_grad_() for x in tensors[:2])
    loss = itvm_residual_loss(u_st, u_ss, *tensors[2:], coef, weight=w, reduction=reduction, backend="cpu").sum()
    first = torch.autograd.grad(loss, [u_st, u_ss], retain_graph=True)
    second = torch.autograd.grad(loss, [u_st, u_ss], 2 * torch.ones_like(loss), retain_graph=True)
    third = torch.autograd.grad(loss, [u_st, u_ss])
    for a, b, c in zip(first, second, third, strict=True):
        assert_nontrivial(a)
        torch.testing.assert_close(b, 2 * a)
        assert torch.equal(c, a)


@needs_cpu_kernel
def test_cpu_double_backward_is_a_clear_error():
    tensors, coef, _ = make_inputs((2, 4), torch.float64)
    u_st = tensors[0].clone().requires_grad_()
    loss = itvm_residual_loss(u_st, *tensors[1:], coef, backend="cpu")
    with pytest.raises(RuntimeError, match=r"create_graph.*reference"):
        torch.autograd.grad(loss, [u_st], create_graph=True)


@needs_cpu_kernel
@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_torch_func_transforms_use_the_reference(transform):
    tensors, coef, w = make_inputs((3, 6), torch.float64)

    def loss(fn, u_st, u_ss):
        return fn(u_st, u_ss, *tensors[2:], coef, weight=w)

    if transform == "grad":
        got = torch.func.grad(lambda a, b: loss(itvm_residual_loss, a, b), argnums=(0, 1))(*tensors[:2])
        expected = torch.func.grad(lambda a, b: loss(itvm_residual_loss_reference, a, b), argnums=(0, 1))(
            *tensors[:2])
    else:
        u_st, u_ss = (torch.stack([x, 2 * x]) for x in tensors[:2])
        got = [torch.func.vmap(lambda a, b: loss(itvm_residual_loss, a, b))(u_st, u_ss)]
        expected = [torch.stack([loss(itvm_residual_loss_reference, u_st[i], u_ss[i]) for i in range(2)])]
    for a, b in zip(got, expected, strict=True):
        assert_nontrivial(a)
        assert_close_to_ref(a, b)


@needs_cpu_kernel
@pytest.mark.parametrize("api", ["forward_ad", "func.jvp"])
@pytest.mark.parametrize("which", [0, 3])  # a tangent on u_st, or on target_a (forward AD through a target)
def test_forward_ad_tangent_is_carried(api, which):
    tensors, coef, w = make_inputs((2, 6), torch.float64)
    tangent = torch.randn_like(tensors[which])

    def call(fn, x, **kw):
        args = [*tensors[:which], x, *tensors[which + 1:]]
        return fn(*args, coef, weight=w, **kw)

    _, expected = torch.func.jvp(lambda x: call(itvm_residual_loss_reference, x), (tensors[which],), (tangent,))
    if api == "func.jvp":
        _, got = torch.func.jvp(lambda x: call(itvm_residual_loss, x, backend="cpu"), (tensors[which],), (tangent,))
    else:
        with fwAD.dual_level():
            dual = fwAD.make_dual(tensors[which], tangent)
            got = fwAD.unpack_dual(call(itvm_residual_loss, dual, backend="cpu")).tangent
    assert_nontrivial(got)
    assert_close_to_ref(got, expected, name="loss tangent")


@needs_cpu_kernel
def test_opcheck_public_and_kernel_ops():
    """Every check of opcheck (schema, fake kernel, autograd registration, aot_dispatch_dynamic) on the public
    loss op (inputs requiring grad) and the functional kernel ops (flow_map_step: its Python autograd too)."""
    tensors, coef, w = make_inputs((3, 4, 5))
    grad_inputs = [x.clone().requires_grad_() for x in tensors[:2]] + tensors[2:]
    for weight, third in ((w, (tensors[3].clone(), coef * 2)), (None, (None, None))):
        for reduction in ("mean", "none"):
            torch.library.opcheck(torch.ops.ttfm.itvm_residual_loss.default,
                                  (*grad_inputs, coef, *third, weight, 0.5, 2.0, reduction))
        for grad_losses in (None, torch.randn(3)):
            torch.library.opcheck(torch.ops.ttfm.itvm_residual_loss_fwd.default,
                                  (*tensors, coef, *third, weight, 0.5, 2.0, grad_losses))
    for requires_grad in (False, True):
        args = [x.clone().requires_grad_(requires_grad) for x in (tensors[0], tensors[1], coef, coef * 2)]
        torch.library.opcheck(torch.ops.ttfm.flow_map_step.default, tuple(args))


def _bad_calls():
    """(description, kwargs changes, expected error type, message fragment). Mixed floating dtypes are accepted
    (promoted at the op boundary: tests/test_precision.py), so no dtype case."""
    t, c, w = make_inputs((3, 4))
    cases = []
    for i, name in enumerate(NAMES):
        cases.append((f"{name} shape", i, torch.randn(3, 5), ValueError, name))
        cases.append((f"{name} integer", i, torch.ones(3, 4, dtype=torch.int64), TypeError, name))
        cases.append((f"{name} device", i, torch.randn(3, 4, device="meta"), ValueError, name))
    cases.append(("coef shape", "coef", torch.randn(3, 1), ValueError, "coef"))
    cases.append(("coef batch", "coef", torch.randn(4), ValueError, "coef"))
    cases.append(("coef integer", "coef", torch.ones(3, dtype=torch.int32), TypeError, "coef"))
    cases.append(("coef_c shape", "coef_c", torch.randn(2), ValueError, "coef_c"))
    cases.append(("target_c shape", "target_c", torch.randn(3, 5), ValueError, "target_c"))
    cases.append(("target_c integer", "target_c", torch.ones(3, 4, dtype=torch.int64), TypeError, "target_c"))
    cases.append(("weight shape", "weight", torch.rand(2), ValueError, "weight"))
    cases.append(("weight device", "weight", torch.rand(3, device="meta"), ValueError, "weight"))
    for i in range(2, 5):
        cases.append((f"{NAMES[i]} requires grad", i, t[i].clone().requires_grad_(), ValueError, NAMES[i]))
    cases.append(("coef requires grad", "coef", c.clone().requires_grad_(), ValueError, "coef"))
    cases.append(("target_c requires grad", "target_c", t[4].clone().requires_grad_(), ValueError, "target_c"))
    cases.append(("coef_c requires grad", "coef_c", c.clone().requires_grad_(), ValueError, "coef_c"))
    cases.append(("weight requires grad", "weight", w.clone().requires_grad_(), ValueError, "weight"))
    return cases


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda case: case[0])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_bad_input_names_the_argument(case, backend):
    _, where, value, error, fragment = case
    tensors, coef, w = make_inputs((3, 4))
    args = {"coef": coef, "weight": w, "target_c": tensors[4].clone(), "coef_c": coef.clone()}
    if isinstance(where, int):
        tensors[where] = value
    else:
        args[where] = value
    with pytest.raises(error, match=fragment):
        itvm_residual_loss(*tensors, args.pop("coef"), **args, backend=backend)


@pytest.mark.parametrize("given", ["target_c", "coef_c"])
def test_target_c_and_coef_c_come_together(given):
    tensors, coef, _ = make_inputs((3, 4))
    with pytest.raises(ValueError, match="target_c and coef_c"):
        itvm_residual_loss(*tensors, coef, **{given: tensors[4] if given == "target_c" else coef})


def test_empty_batch_and_bad_reduction_are_rejected():
    tensors, coef, _ = make_inputs((1, 4))
    empty = [x[:0] for x in tensors]
    with pytest.raises(ValueError, match="B >= 1"):
        itvm_residual_loss(*empty, coef[:0])
    with pytest.raises(ValueError, match="reduction"):
        itvm_residual_loss(*tensors, coef, reduction="avg")


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (2, 3, 5)])
def test_flow_map_step_cpu_matches_reference(dtype, shape):
    x, u = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    s, t = torch.rand(shape[0]), torch.rand(shape[0]) + 0.5
    out = torch.full(shape, float("nan"), dtype=dtype)
    y = flow_map_step(x, u, s, t, out=out, backend="cpu")
    assert y is out
    assert_close_to_ref(y, flow_map_step_reference(x.double(), u.double(), s.double(), t.double()).to(dtype),
                        dtype=dtype)


def test_flow_map_step_bad_out_is_rejected_before_writing():
    x = torch.randn(2, 3)
    out = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="out"):
        flow_map_step(x, x, torch.zeros(2), torch.ones(2), out=out)
    assert out.eq(0).all()


@needs_cpu_kernel
def test_cpu_kernel_under_torch_compile():
    tensors, coef, w = make_inputs((2, 3, 4))

    def step(loss_fn, u_st, u_ss, **kw):
        loss = loss_fn(u_st, u_ss, *tensors[2:], coef, weight=w, **kw)
        return (loss, *torch.autograd.grad(loss, [u_st, u_ss]))

    compiled = torch.compile(step, backend="aot_eager")
    got = compiled(itvm_residual_loss, *(x.clone().requires_grad_() for x in tensors[:2]), backend="cpu")
    ref = step(itvm_residual_loss_reference, *(x.clone().requires_grad_() for x in tensors[:2]))
    for name, a, r in zip(("loss", "grad u_st", "grad u_ss"), got, ref, strict=True):
        assert_close_to_ref(a, r.float(), name=name)


@needs_cpu_kernel
@pytest.mark.parametrize(("scale", "kernel_calls"), [(1.0, 0), (2.0, 1)])
def test_cpu_unit_gradient_reuses_the_forward_pass(scale, kernel_calls):
    """loss.backward() takes the gradients the forward pass wrote; another incoming gradient recomputes them."""
    tensors, coef, w = make_inputs((2, 7))
    u_st = tensors[0].clone().requires_grad_()
    loss = itvm_residual_loss(u_st, *tensors[1:], coef, weight=w, backend="cpu")
    with torch.profiler.profile() as prof:
        loss.backward(torch.tensor(scale))
    calls = [e for e in prof.events() if e.name == "ttfm::itvm_residual_loss_fwd"]
    assert len(calls) == kernel_calls
    expected = torch.autograd.grad(itvm_residual_loss_reference(u_st, *tensors[1:], coef, weight=w) * scale, [u_st])
    assert_close_to_ref(u_st.grad, expected[0])
