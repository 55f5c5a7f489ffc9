"""jvp_norm_modulate_silu / norm_modulate_silu against torch.func.jvp over the eager composite (nn.LayerNorm /
nn.GroupNorm + modulation + SiLU), on the reference, C++ CPU and Triton (interpreter) backends."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import ttfm_kernels.ops.norm.triton as norm_triton
from ttfm_kernels import _ext
from ttfm_kernels.ops.norm import jvp_norm_modulate_silu, norm_modulate_silu
from ttfm_kernels.testing import assert_close_to_ref, assert_nontrivial

needs_cpu = pytest.mark.skipif(not _ext.has_kernel("norm_modulate_jvp", "CPU"), reason="C++ CPU kernel not built")
BACKENDS = ["reference", pytest.param("cpu", marks=needs_cpu), "triton"]

# (num_groups, shape): LayerNorm rows of C not a multiple of any block; GroupNorm groups of several channels,
# groups of 1 channel, H*W = 1, one group per sample, rows of one element. Rows above 16 elements span
# several Triton blocks.
LAYOUTS = [
    pytest.param(None, (2, 3, 37), id="ln-C37"),
    pytest.param(3, (2, 6, 5, 3), id="gn-G3-C6-5x3"),
    pytest.param(4, (2, 4, 3, 3), id="gn-groups-of-1"),
    pytest.param(2, (3, 8, 1, 1), id="gn-HW1"),
    pytest.param(1, (2, 3, 4, 5), id="gn-G1"),
    pytest.param(4, (2, 4, 1, 1), id="gn-rows-of-1"),
]
TANGENTS = ("tx", "tscale", "tshift")


@pytest.fixture(autouse=True)
def _small_triton_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force rows longer than 16 elements into several Triton blocks (the swept path and Chan's update)."""
    monkeypatch.setattr(norm_triton, "MAX_BLOCK", 16)


def make_inputs(num_groups, shape, dtype=torch.float32, affine=True, modulate=True):
    """x with a mean that rises along each row (so later blocks move the running mean), tangents, params."""
    channels = shape[-1] if num_groups is None else shape[1]
    x = torch.randn(shape, dtype=torch.float64)
    ramp = torch.linspace(0, 4, x[0].numel(), dtype=torch.float64).view(x[0].shape)
    x = x + 2 + ramp
    # The tangent has a large mean too (a nearly constant tangent cancels in its centred form).
    t = {"x": x, "tx": torch.randn(shape, dtype=torch.float64) + 3}
    for name in ("scale", "shift", "tscale", "tshift"):
        t[name] = 0.5 * torch.randn(shape[0], channels, dtype=torch.float64) if modulate else None
    t["weight"] = 1 + 0.3 * torch.randn(channels, dtype=torch.float64) if affine else None
    t["bias"] = 0.3 * torch.randn(channels, dtype=torch.float64) if affine else None
    return {k: None if v is None else v.to(dtype) for k, v in t.items()}


def _layer_norm_by_hand(x, w, b):
    """LayerNorm from primitive ops. In torch 2.13 the backward through F.layer_norm's forward-AD tangent is
    wrong (off by O(1) against finite differences; F.group_norm's is right), so gradient oracles use this."""
    centered = x - x.mean(dim=-1, keepdim=True)
    y = centered * torch.rsqrt(centered.square().mean(dim=-1, keepdim=True) + 1e-5)
    return y if w is None else y * w + b


def eager_composite(num_groups, weight, bias, activation="silu", by_hand=False):
    """act(F.layer_norm / F.group_norm(x) * (1 + scale) + shift): torch's own ops, differentiable everywhere."""
    def fn(x, scale, shift):
        w = None if weight is None else weight.to(x.dtype)
        b = None if bias is None else bias.to(x.dtype)
        if num_groups is None:
            norm = _layer_norm_by_hand(x, w, b) if by_hand else F.layer_norm(x, (x.shape[-1],), w, b)
            y = norm * (1 + scale[:, None]) + shift[:, None]
        else:
            y = F.group_norm(x, num_groups, w, b) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        if activation != "silu":
            return y
        return y * torch.sigmoid(y) if by_hand else F.silu(y)  # F.silu has no forward AD of its backward
    return fn


def oracle(t, num_groups, activation="silu", drop=()):
    """(y, ty) by torch.func.jvp over the eager composite in float64; dropped tangents are zeros."""
    b, c = t["x"].shape[0], t["x"].shape[-1] if num_groups is None else t["x"].shape[1]
    zeros = torch.zeros(b, c, dtype=torch.float64)
    primals = (t["x"].double(), zeros if t["scale"] is None else t["scale"].double(),
               zeros if t["shift"] is None else t["shift"].double())
    tangents = tuple(torch.zeros_like(p) if name in drop or t[name] is None else t[name].double()
                     for name, p in zip(TANGENTS, primals, strict=True))
    fn = eager_composite(num_groups, t["weight"], t["bias"], activation)
    with torch.no_grad():
        return torch.func.jvp(fn, primals, tangents)


def run(t, num_groups, backend, activation="silu", drop=()):
    tangents = {name: None if name in drop else t[name] for name in TANGENTS}
    return jvp_norm_modulate_silu(t["x"], tangents["tx"], t["scale"], t["shift"], tangents["tscale"],
                                  tangents["tshift"], num_groups=num_groups, weight=t["weight"], bias=t["bias"],
                                  activation=activation, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("num_groups", "shape"), LAYOUTS)
def test_parity_fp32(backend, num_groups, shape):
    t = make_inputs(num_groups, shape)
    y, ty = run(t, num_groups, backend)
    y_ref, ty_ref = oracle(t, num_groups)
    assert_close_to_ref(y, y_ref, name="y")
    assert_close_to_ref(ty, ty_ref, name="ty")
    assert_nontrivial(ty)


@pytest.mark.parametrize(("backend", "dtype"), [
    ("reference", torch.float64), pytest.param("cpu", torch.float64, marks=needs_cpu),
    pytest.param("cpu", torch.bfloat16, marks=needs_cpu), pytest.param("cpu", torch.float16, marks=needs_cpu),
    ("triton", torch.bfloat16), ("triton", torch.float16),
])
@pytest.mark.parametrize(("num_groups", "shape"), [LAYOUTS[0], LAYOUTS[1]])
def test_parity_dtypes(backend, dtype, num_groups, shape):
    t = make_inputs(num_groups, shape, dtype)
    y, ty = run(t, num_groups, backend)
    y_ref, ty_ref = oracle(t, num_groups)
    assert y.dtype == ty.dtype == dtype
    # Low-precision outputs of O(1) values after normalization: tolerance of the dtype, widened for ty (it
    # combines rounded inputs through the 1/sd factor twice).
    scale = 1.0 if dtype == torch.float64 else 2.0
    assert_close_to_ref(y, y_ref, dtype=dtype, name="y", scale=scale)
    assert_close_to_ref(ty, ty_ref, dtype=dtype, name="ty", scale=scale)


def check_missing_tangents(got, ref, drop):
    """(y, ty) of a call without the tangents in ``drop`` against the oracle's: ty is None when all are dropped,
    else right and non-zero."""
    (y, ty), (y_ref, ty_ref) = got, ref
    assert_close_to_ref(y, y_ref, name="y")
    if drop == TANGENTS:
        assert ty is None
    else:
        assert_close_to_ref(ty, ty_ref, name="ty")
        assert_nontrivial(ty)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("drop", [("tx",), ("tscale",), ("tshift",), ("tx", "tscale"), TANGENTS],
                         ids=lambda d: "no-" + "-".join(d))
def test_missing_tangents(backend, drop):
    num_groups, shape = 3, (2, 6, 5, 3)
    t = make_inputs(num_groups, shape)
    check_missing_tangents(run(t, num_groups, backend, drop=drop), oracle(t, num_groups, drop=drop), drop)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("num_groups", "shape"), [LAYOUTS[0], LAYOUTS[1]])
def test_no_affine_no_modulation_no_activation(backend, num_groups, shape):
    t = make_inputs(num_groups, shape, affine=False, modulate=False)
    y, ty = run(t, num_groups, backend, activation=None)
    y_ref, ty_ref = oracle(t, num_groups, activation=None)
    assert_close_to_ref(y, y_ref, name="y")
    assert_close_to_ref(ty, ty_ref, name="ty")
    assert_nontrivial(ty)


def _grads_through_tangent(fn_pair, t):
    """Gradients of sum(y * cos) + sum(ty^2) w.r.t. x, scale, weight: the backward through the tangent."""
    x, scale, weight = (t[k].clone().requires_grad_() for k in ("x", "scale", "weight"))
    y, ty = fn_pair(x, scale, weight)
    (y * y.detach().cos()).sum().add(ty.square().sum()).backward()
    return x.grad, scale.grad, weight.grad


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu), "triton"])
@pytest.mark.parametrize("mode", ["func.jvp", "forward_ad"])
@pytest.mark.parametrize(("num_groups", "shape"), [LAYOUTS[0], LAYOUTS[1]])
def test_forward_ad_tangent_and_gradient_through_it(backend, mode, num_groups, shape):
    t = make_inputs(num_groups, shape)

    def fused(x, scale, weight):
        def f(x_, s_, sh_):
            return norm_modulate_silu(x_, s_, sh_, num_groups=num_groups, weight=weight, bias=t["bias"],
                                      backend=backend)
        if mode == "func.jvp":
            return torch.func.jvp(f, (x, scale, t["shift"]), (t["tx"], t["tscale"], t["tshift"]))
        with fwAD.dual_level():
            out = f(fwAD.make_dual(x, t["tx"]), fwAD.make_dual(scale, t["tscale"]), fwAD.make_dual(t["shift"],
                                                                                                  t["tshift"]))
            y, ty = fwAD.unpack_dual(out)
            return y, ty

    def eager(x, scale, weight):
        fn = eager_composite(num_groups, weight, t["bias"], by_hand=True)
        return torch.func.jvp(fn, (x, scale, t["shift"]), (t["tx"], t["tscale"], t["tshift"]))

    _, ty = fused(t["x"], t["scale"], t["weight"])
    _, ty_ref = eager(t["x"], t["scale"], t["weight"])
    assert_close_to_ref(ty, ty_ref.detach(), name="ty")
    assert_nontrivial(ty)
    grads = zip(_grads_through_tangent(fused, t), _grads_through_tangent(eager, t),
                ("x.grad", "scale.grad", "weight.grad"), strict=True)
    for got, want, name in grads:
        assert_nontrivial(got, name)
        assert_close_to_ref(got, want, name=name, scale=5.0)  # fp32 gradients of a second-order quantity


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu), "reference"])
@pytest.mark.parametrize(("num_groups", "shape"), [pytest.param(None, (2, 2, 5), id="ln"),
                                                   pytest.param(2, (2, 4, 2, 1), id="gn")])
def test_gradcheck(backend, num_groups, shape):
    t = make_inputs(num_groups, shape, torch.float64)
    names = ("x", "tx", "scale", "shift", "tscale", "tshift", "weight", "bias")
    inputs = tuple(t[k].clone().requires_grad_() for k in names)

    def fn(x, tx, scale, shift, tscale, tshift, weight, bias):
        return jvp_norm_modulate_silu(x, tx, scale, shift, tscale, tshift, num_groups=num_groups, weight=weight,
                                      bias=bias, backend=backend)

    assert torch.autograd.gradcheck(fn, inputs)
    # The no-tangent path is an ordinary differentiable op.
    assert torch.autograd.gradcheck(lambda x, s, w: fn(x, None, s, None, None, None, w, None)[0],
                                    (inputs[0], inputs[2], inputs[6]))


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu), "triton"])
def test_no_graph_under_no_grad_and_plain_forward(backend):
    num_groups, shape = 3, (2, 6, 5, 3)
    t = make_inputs(num_groups, shape)
    x = t["x"].clone().requires_grad_()
    with torch.no_grad():
        y, ty = jvp_norm_modulate_silu(x, t["tx"], t["scale"], t["shift"], num_groups=num_groups,
                                       weight=t["weight"], bias=t["bias"], backend=backend)
        y0 = norm_modulate_silu(x, t["scale"], t["shift"], num_groups=num_groups, weight=t["weight"],
                                bias=t["bias"], backend=backend)
    assert not y.requires_grad and not ty.requires_grad and not y0.requires_grad
    y_ref, _ = oracle(t, num_groups)
    assert_close_to_ref(y0, y_ref, name="y without tangents (kernel path)")


def test_explicit_api_under_nested_forward_ad():
    """Forward AD through the explicit API (tangents of tangents) is carried by the reference formula."""
    num_groups, shape = None, (2, 3, 37)
    t = make_inputs(num_groups, shape, torch.float64)
    direction = torch.randn_like(t["x"])

    def ty_of(x):
        return jvp_norm_modulate_silu(x, t["tx"], t["scale"], t["shift"], num_groups=num_groups,
                                      weight=t["weight"], bias=t["bias"])[1]

    _, dty = torch.func.jvp(ty_of, (t["x"],), (direction,))
    composite = eager_composite(num_groups, t["weight"], t["bias"], by_hand=True)
    zero = torch.zeros_like(t["scale"])

    def ty_ref_of(x):
        return torch.func.jvp(composite, (x, t["scale"], t["shift"]), (t["tx"], zero, zero))[1]

    _, dty_ref = torch.func.jvp(ty_ref_of, (t["x"],), (direction,))
    assert_close_to_ref(dty, dty_ref, name="second-order tangent", scale=5.0)
    assert_nontrivial(dty)


@pytest.mark.parametrize("backend", BACKENDS[1:])
@pytest.mark.parametrize(("num_groups", "shape"), [LAYOUTS[0], LAYOUTS[1]])
def test_opcheck_kernel_op(backend, num_groups, shape):
    """Every check of opcheck on the functional kernel op of each backend, its registered autograd included."""
    t = make_inputs(num_groups, shape)
    params = [t[k].contiguous() for k in ("weight", "bias", "scale", "shift", "tscale", "tshift")]
    op = torch.ops.ttfm.norm_modulate_jvp if backend == "cpu" else torch.ops.ttfm.norm_modulate_jvp_triton
    for tx, with_ty, requires_grad in ((t["tx"], True, True), (t["tx"], True, False), (None, True, False),
                                       (None, False, True)):
        args = [a.detach().clone().requires_grad_(requires_grad) for a in (t["x"], *params)]
        tx_arg = None if tx is None else tx.detach().clone().requires_grad_(requires_grad)
        torch.library.opcheck(op.default, (args[0], tx_arg, *args[1:], num_groups or 0, 1e-5, True, with_ty))


def test_bad_inputs():
    x = torch.randn(2, 6, 3, 3)
    with pytest.raises(ValueError, match="num_groups=4 must divide the channels C=6"):
        jvp_norm_modulate_silu(x, num_groups=4)
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, C\)"):
        jvp_norm_modulate_silu(x)
    with pytest.raises(ValueError, match=r"tx has shape"):
        jvp_norm_modulate_silu(x, torch.randn(2, 6, 3, 2), num_groups=3)
    y, ty = jvp_norm_modulate_silu(x, x.double(), num_groups=3)  # tx is cast to x's dtype (docs/design.md)
    assert y.dtype == ty.dtype == x.dtype
    with pytest.raises(ValueError, match=r"scale must have shape \(B, C\) = \(2, 6\)"):
        jvp_norm_modulate_silu(x, scale=torch.randn(2, 3), num_groups=3)
    with pytest.raises(ValueError, match=r"shift is on meta"):
        jvp_norm_modulate_silu(x, shift=torch.randn(2, 6, device="meta"), num_groups=3)
    with pytest.raises(ValueError, match=r"weight must have shape \(C,\)"):
        jvp_norm_modulate_silu(x, weight=torch.randn(5), num_groups=3)
    with pytest.raises(ValueError, match="activation must be one of"):
        jvp_norm_modulate_silu(x, num_groups=3, activation="gelu")
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        jvp_norm_modulate_silu(torch.ones(2, 3, 4, dtype=torch.long))
    with fwAD.dual_level():
        weight = fwAD.make_dual(torch.ones(6), torch.ones(6))
        with pytest.raises(ValueError, match="weight carries a forward-AD tangent"):
            norm_modulate_silu(fwAD.make_dual(x, torch.ones_like(x)), num_groups=3, weight=weight)


def _jvp_fn(num_groups, backend):
    def fn(x, tx, scale, shift, tscale, tshift, weight, bias):
        return jvp_norm_modulate_silu(x, tx, scale, shift, tscale, tshift, num_groups=num_groups, weight=weight,
                                      bias=bias, backend=backend)
    return fn


NORM_ARGS = ("x", "tx", "scale", "shift", "tscale", "tshift", "weight", "bias")


@needs_cpu
@pytest.mark.parametrize(("num_groups", "shape"), [pytest.param(None, (1, 2, 4), id="ln"),
                                                   pytest.param(2, (1, 4, 2, 1), id="gn")])
def test_double_backward_matches_gradgradcheck(num_groups, shape):
    """The kernel's backward differentiated again (create_graph=True) against finite differences."""
    t = make_inputs(num_groups, shape, torch.float64)
    inputs = tuple(t[k].clone().requires_grad_() for k in NORM_ARGS)
    assert torch.autograd.gradgradcheck(_jvp_fn(num_groups, "cpu"), inputs)


@needs_cpu
def test_first_order_backward_builds_no_graph():
    """Without create_graph the gradients carry no graph (no second-order memory in every training step)."""
    t = make_inputs(3, (2, 6, 5, 3))
    inputs = [t[k].clone().requires_grad_() for k in NORM_ARGS]
    y, ty = _jvp_fn(3, "cpu")(*inputs)
    grads = torch.autograd.grad((y * ty).sum(), inputs)
    for name, g in zip(NORM_ARGS, grads, strict=True):
        assert_nontrivial(g, name)
        assert not g.requires_grad and g.grad_fn is None, name
    y, ty = _jvp_fn(3, "cpu")(*inputs)
    (gx,) = torch.autograd.grad(ty.sum(), inputs[:1], create_graph=True)
    assert gx.requires_grad


@needs_cpu
@pytest.mark.parametrize("offset", [0.0, 300.0])
def test_cpu_groupnorm_rows_of_64k_elements(offset):
    """GroupNorm rows of 2 channels x 32768 positions with a large common offset: the float32 statistics of
    the CPU kernel stay within the float32 tolerance of float64 (the oracle: torch.func.jvp over F.group_norm)."""
    num_groups, shape = 2, (2, 4, 128, 256)
    t = make_inputs(num_groups, shape, torch.float64)
    t["x"] = t["x"] + offset
    t = {k: None if v is None else v.float() for k, v in t.items()}
    y, ty = run(t, num_groups, "cpu")
    y_ref, ty_ref = oracle(t, num_groups)
    assert_close_to_ref(y, y_ref, name="y")
    assert_close_to_ref(ty, ty_ref, name="ty")
