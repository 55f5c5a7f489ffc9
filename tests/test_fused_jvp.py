"""fused_jvp: every routed torch function against torch.func.jvp without the mode, counters, fall-through,
gradients through the tangent against an oracle that is right, jvp_t / jvp_sx integration, threads."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import ttfm_kernels.jvp as jvp_module
from ttfm_kernels import _dispatch, fused_jvp, jvp_sx, jvp_t, lfmd_loss
from ttfm_kernels.fused_jvp import active_fused_jvp
from ttfm_kernels.testing import assert_close_to_ref, assert_nontrivial

D64 = torch.float64


def _w(*shape: int, dtype: torch.dtype = D64) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype)


# (routed name, function of x only, input shape). Weights are drawn at collection time (fixed by the seed below).
torch.manual_seed(1)
_LIN_W, _LIN_B = _w(5, 7), _w(5)
_C1, _C2, _C2G, _C3 = _w(4, 3, 3), _w(6, 4, 3, 3), _w(6, 2, 3, 3), _w(2, 3, 2, 2, 2)
_LN_W, _LN_B, _GN_W, _GN_B = _w(3, 4), _w(3, 4), _w(6), _w(6)
CASES = [
    ("linear", lambda x: F.linear(x, _LIN_W, _LIN_B), (2, 3, 7)),
    ("linear", lambda x: F.linear(x, _LIN_W), (7,)),  # unbatched, no bias
    ("linear", lambda x: torch.nn.functional.linear(input=x, weight=_LIN_W, bias=_LIN_B), (4, 7)),  # keywords
    ("conv1d", lambda x: F.conv1d(x, _C1, _LIN_B[:4], stride=2, padding=1), (2, 3, 11)),
    ("conv2d", lambda x: F.conv2d(x, _C2, None, 1, "same", 2), (2, 4, 9, 7)),  # string padding, dilation
    ("conv2d", lambda x: F.conv2d(x, _C2G, _GN_B, stride=(2, 1), padding=(0, 1), groups=2), (3, 4, 8, 6)),
    ("conv2d", lambda x: F.conv2d(x, _C2, _GN_B, padding=1), (4, 5, 6)),  # unbatched (C, H, W)
    ("conv3d", lambda x: F.conv3d(x, _C3, None, padding=1), (2, 3, 4, 3, 5)),
    ("layer_norm", lambda x: F.layer_norm(x, (3, 4), _LN_W, _LN_B, 1e-3), (2, 5, 3, 4)),
    ("layer_norm", lambda x: F.layer_norm(x, (7,)), (3, 7)),
    ("layer_norm", lambda x: torch.layer_norm(x, [4], None, _LN_B[0]), (2, 3, 4)),
    ("group_norm", lambda x: F.group_norm(x, 3, _GN_W, _GN_B), (2, 6, 5, 3)),
    ("group_norm", lambda x: F.group_norm(x, 2, None, None, eps=1e-2), (3, 6, 7)),
    ("group_norm", lambda x: torch.group_norm(x, 2, _GN_W, None), (2, 6)),
    ("mul", lambda x: x * 2.5, (2, 3, 4)),
    ("mul", lambda x: 3 * x, (5,)),  # __rmul__, an int
    ("mul", lambda x: torch.mul(x, -0.5), (2, 7)),
    ("div", lambda x: x / 4.0, (3, 2, 5)),
    ("div", lambda x: x.div(3), (4, 6)),
]


def _tangents(shape: tuple[int, ...], kind: str, dtype: torch.dtype, name: str) -> torch.Tensor:
    """A dense, broadcast-expanded (zero strides, as after ``h + temb[:, :, None]``) or transposed tangent.

    LayerNorm tangents are expanded along dim 0 instead (constant along the normalized dims, their JVP is zero).
    """
    if kind == "expanded" and name == "layer_norm":
        return torch.randn(1, *shape[1:], dtype=dtype).expand(shape)
    if kind == "expanded":
        return torch.randn(*shape[:2], *([1] * (len(shape) - 2)), dtype=dtype).expand(shape)
    if kind == "transposed" and len(shape) >= 2:
        return torch.randn(*shape[:-2], shape[-1], shape[-2], dtype=dtype).transpose(-1, -2)
    return torch.randn(shape, dtype=dtype)


@pytest.mark.parametrize(("name", "fn", "shape"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("kind", ["dense", "expanded", "transposed"])
def test_routed_function_matches_func_jvp_fp64(name, fn, shape, kind):
    x, tx = torch.randn(shape, dtype=D64), _tangents(shape, kind, D64, name)
    ref = torch.func.jvp(fn, (x,), (tx,))
    with fused_jvp(stats=True) as mode:
        got = torch.func.jvp(fn, (x,), (tx,))
    assert dict(mode.stats.routed) == {name: 1} and not mode.stats.passed
    assert_nontrivial(got[1])
    assert_close_to_ref(got[0], ref[0], name=f"{name} primal")
    assert_close_to_ref(got[1], ref[1], name=f"{name} tangent")


def _sdpa_inputs(q_shape, kv_shape, dtype=D64):
    return [torch.randn(s, dtype=dtype) for s in (q_shape, kv_shape, kv_shape, q_shape, kv_shape, kv_shape)]


def test_scale_routes_only_products_and_quotients_by_a_number():
    """x * tensor, x / tensor, c / x, a bool factor and div's rounding_mode are not scalings: torch's own rule runs,
    uncounted; the tangent of each is right, and gradients flow through a routed scaling's tangent."""
    x, tx, w = torch.randn(3, 4, dtype=D64), torch.randn(3, 4, dtype=D64), torch.randn(4, dtype=D64)

    def others(a):
        return a * w + a / w + 2.0 / a + a * True + a.div(2.0, rounding_mode="floor")

    ref = torch.func.jvp(others, (x,), (tx,))
    with fused_jvp(stats=True) as mode:
        got = torch.func.jvp(others, (x,), (tx,))
    assert not mode.stats.routed and not mode.stats.passed
    assert_close_to_ref(got[1], ref[1], name="tangent of the unrouted products")

    def grad_through_tangent() -> torch.Tensor:
        xr = x.clone().requires_grad_()
        _, ty = torch.func.jvp(lambda a: (a * 1.5).sin() / 3.0, (xr,), (tx,))
        return torch.autograd.grad(ty.square().sum(), xr)[0]

    ref_grad = grad_through_tangent()
    with fused_jvp(stats=True) as mode:
        got_grad = grad_through_tangent()
    assert dict(mode.stats.routed) == {"mul": 1, "div": 1}
    assert_nontrivial(got_grad, "grad through the scaled tangent")
    assert_close_to_ref(got_grad, ref_grad, name="grad through the scaled tangent")


SDPA_CASES = [
    ({}, (2, 3, 9, 8), (2, 3, 11, 8)),
    ({"is_causal": True, "scale": 0.3}, (1, 2, 7, 8), (1, 2, 7, 8)),
    ({"enable_gqa": True}, (2, 4, 5, 8), (2, 2, 6, 8)),
    ({}, (3, 9, 8), (3, 10, 8)),  # 3-D (heads only)
    ({"dropout_p": 0.0, "attn_mask": None}, (2, 1, 2, 5, 8), (2, 1, 2, 6, 8)),  # 5-D
]


@pytest.mark.parametrize(("kwargs", "q_shape", "kv_shape"), SDPA_CASES)
@pytest.mark.parametrize("dtype", [D64, torch.float32])
def test_sdpa_matches_math_sdpa_jvp(kwargs, q_shape, kv_shape, dtype):
    q, k, v, tq, tk, tv = _sdpa_inputs(q_shape, kv_shape, dtype)

    def fn(a, b, c):
        return F.scaled_dot_product_attention(a, b, c, **kwargs)

    with sdpa_kernel(SDPBackend.MATH):
        ref = torch.func.jvp(fn, (q.double(), k.double(), v.double()), (tq.double(), tk.double(), tv.double()))
    with fused_jvp(stats=True) as mode:
        got = torch.func.jvp(fn, (q, k, v), (tq, tk, tv))
    assert dict(mode.stats.routed) == {"sdpa": 1}
    assert_nontrivial(got[1])
    assert_close_to_ref(got[0], ref[0], dtype=dtype, name="sdpa primal")
    assert_close_to_ref(got[1], ref[1], dtype=dtype, name="sdpa tangent", scale=4.0)  # tangent: two products


LOW = [CASES[0], CASES[5], CASES[8], CASES[11]]  # linear, grouped conv2d, layer_norm, group_norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("name", "fn", "shape"), LOW)
def test_low_precision_within_the_tolerance_table(name, fn, shape, dtype):
    _check_moved(name, fn, shape, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("name", "fn", "shape"), LOW)
def test_routed_on_cuda(name, fn, shape, dtype):
    _check_moved(name, fn, shape, dtype=dtype, device="cuda")


def _check_moved(name, fn, shape, **to):
    """fn's JVP with its inputs and the module-level weights it closes over moved ``to`` (dtype, device), under
    the mode, against the CPU fp64 JVP without it."""
    x, tx = torch.randn(shape, dtype=D64), torch.randn(shape, dtype=D64)
    ref = torch.func.jvp(fn, (x,), (tx,))
    names = ("_LIN_W", "_LIN_B", "_C1", "_C2", "_C2G", "_C3", "_LN_W", "_LN_B", "_GN_W", "_GN_B")
    saved = {n: globals()[n] for n in names}
    globals().update({n: t.to(**to) for n, t in saved.items()})
    try:
        with fused_jvp(stats=True) as mode:
            got = torch.func.jvp(fn, (x.to(**to),), (tx.to(**to),))
    finally:
        globals().update(saved)
    assert mode.stats.routed[name] == 1
    assert got[1].dtype == to["dtype"]
    assert_close_to_ref(got[1], ref[1], dtype=to["dtype"], name=f"{name} tangent ({to})", scale=4.0)


def test_no_tangent_and_parameter_tangents_fall_through():
    x, tx = torch.randn(3, 7, dtype=D64), torch.randn(3, 7, dtype=D64)
    with fused_jvp(stats=True) as mode:
        plain = F.linear(x, _LIN_W, _LIN_B)
        param = torch.func.jvp(lambda w: F.linear(x, w, _LIN_B), (_LIN_W,), (torch.ones_like(_LIN_W),))
        both = torch.func.jvp(lambda z, b: F.layer_norm(z, (7,), None, b), (x, _w(7)), (tx, _w(7)))
    assert not mode.stats.routed
    assert mode.stats.passed == {("linear", "no tangent"): 1, ("linear", "parameter tangent"): 1,
                                 ("layer_norm", "parameter tangent"): 1}
    torch.testing.assert_close(plain, F.linear(x, _LIN_W, _LIN_B), rtol=0, atol=0)
    torch.testing.assert_close(param[1], F.linear(x, torch.ones_like(_LIN_W)), rtol=0, atol=0)
    assert_nontrivial(both[1])


def test_vmap_of_jvp_falls_through_and_is_right():
    x, tx = torch.randn(4, 3, 7, dtype=D64), torch.randn(4, 3, 7, dtype=D64)

    def jvp(a, ta):
        return torch.func.jvp(lambda z: F.layer_norm(F.linear(z, _LIN_W, _LIN_B), (5,)), (a,), (ta,))

    ref = torch.func.vmap(jvp)(x, tx)
    with fused_jvp(stats=True) as mode:
        got = torch.func.vmap(jvp)(x, tx)
        outer = torch.func.jvp(torch.func.vmap(lambda z: F.linear(z, _LIN_W)), (x,), (tx,))
    assert not mode.stats.routed
    assert mode.stats.passed == {("linear", "vmap"): 2, ("layer_norm", "vmap"): 1}
    assert_close_to_ref(got[1], ref[1], name="vmap(jvp) tangent")
    assert_close_to_ref(outer[1], F.linear(tx, _LIN_W), name="jvp(vmap) tangent")


class _Tagged(torch.Tensor):
    """A tensor subclass with torch's default __torch_function__ (as DTensor or a quantized weight would be)."""


def test_tensor_subclass_falls_through():
    x, tx = torch.randn(3, 7, dtype=D64), torch.randn(3, 7, dtype=D64)
    weight = _LIN_W.as_subclass(_Tagged)
    with fused_jvp(stats=True) as mode, fwAD.dual_level():
        y = F.linear(fwAD.make_dual(x, tx), weight)
        ty = fwAD.unpack_dual(y).tangent
    assert mode.stats.passed == {("linear", "tensor subclass"): 1} and not mode.stats.routed
    assert_close_to_ref(ty.as_subclass(torch.Tensor), F.linear(tx, _LIN_W), name="subclass tangent")


def test_forward_ad_dual_level_is_routed_too():
    x, tx = torch.randn(2, 6, 4, 4, dtype=D64), torch.randn(2, 6, 4, 4, dtype=D64)
    ref = torch.func.jvp(lambda z: F.group_norm(z, 3), (x,), (tx,))[1]
    with fused_jvp(ops=("norm",), stats=True) as mode, fwAD.dual_level():
        ty = fwAD.unpack_dual(F.group_norm(fwAD.make_dual(x, tx), 3)).tangent
    assert mode.stats.routed == {"group_norm": 1}
    assert_close_to_ref(ty, ref, name="group_norm tangent (forward_ad)")


def test_ops_subset_and_bad_arguments():
    x, tx = torch.randn(3, 7, dtype=D64), torch.randn(3, 7, dtype=D64)
    with fused_jvp(ops=("sdpa",), stats=True) as mode:
        torch.func.jvp(lambda z: F.linear(z, _LIN_W), (x,), (tx,))
    assert not mode.stats.routed and not mode.stats.passed  # linear is not even looked at
    with pytest.raises(ValueError, match=r"unknown op\(s\) \['lin'\]; valid ones are \('linear', 'conv'"):
        fused_jvp(ops=("lin",))
    with pytest.raises(ValueError, match=r"fused_jvp\(backend=\.\.\.\) must be one of"):
        fused_jvp(backend="gpu")


# Gradients through the tangent (reverse-over-forward, as LFMD needs): oracle = an eager twin whose LayerNorm is
# written out in mean/var ops (torch 2.13's own F.layer_norm forward-AD rule gives wrong gradients here).
def _ln_written_out(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


class _LnMlp(torch.nn.Module):
    """Linear-LayerNorm-Tanh-Linear; ``written_out=True`` is its eager twin with LayerNorm in mean/var ops."""

    def __init__(self, dim: int = 6, written_out: bool = False) -> None:
        super().__init__()
        self.fc1, self.norm, self.fc2 = torch.nn.Linear(dim, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, dim)
        self.written_out = written_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = _ln_written_out(h, self.norm.weight, self.norm.bias) if self.written_out else self.norm(h)
        return self.fc2(torch.tanh(h))


def test_gradients_through_the_tangent_match_the_written_out_twin():
    model = _LnMlp().double()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.normal_()
    twin = _LnMlp(written_out=True).double()
    twin.load_state_dict(model.state_dict())
    x, tx, g = torch.randn(3, 4, 6, dtype=D64), torch.randn(3, 4, 6, dtype=D64), torch.randn(3, 4, 6, dtype=D64)

    def grads(m: torch.nn.Module) -> list[torch.Tensor | None]:
        _, ty = torch.func.jvp(m, (x,), (tx,))
        return torch.autograd.grad((ty * g).sum(), list(m.parameters()), allow_unused=True)

    ref = grads(twin)
    with fused_jvp(stats=True) as mode:
        got = grads(model)
    assert mode.stats.routed == {"linear": 2, "layer_norm": 1}
    assert got[-1] is None and ref[-1] is None  # fc2.bias never reaches the tangent
    for (name, _), a, r in zip(list(model.named_parameters())[:-1], got, ref, strict=False):
        assert_nontrivial(a, f"grad {name}")
        assert_close_to_ref(a, r, name=f"grad {name}")


class _TwoTimeLn(torch.nn.Module):
    """u(x, s, t): a tiny two-time model with a LayerNorm (the case torch 2.13's own rule gets wrong)."""

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.body = _LnMlp(dim + 2)
        self.sigma = 1.0

    def forward(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.body(torch.cat([x, s[:, None], t[:, None]], 1))[:, : x.shape[1]]


class _Teacher(torch.nn.Module):
    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(dim + 1, dim)
        self.sigma = 1.0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([x, t[:, None]], 1))


def test_lfmd_under_the_mode_equals_the_written_out_twin_and_warns_outside_it(monkeypatch):
    student, teacher = _TwoTimeLn().double(), _Teacher().double()
    twin = _TwoTimeLn().double()
    twin.body.written_out = True
    twin.load_state_dict(student.state_dict())
    x1 = torch.randn(5, 6, dtype=D64)
    times = {"x0": torch.randn(5, 6, dtype=D64), "s": torch.rand(5, dtype=D64) * 0.5,
             "t": 0.5 + torch.rand(5, dtype=D64) * 0.5}

    def grads(m: torch.nn.Module) -> list[torch.Tensor]:
        loss, _ = lfmd_loss(m, teacher, x1, **times)
        return torch.autograd.grad(loss, list(m.parameters()))

    got, ref = grads(student), grads(twin)  # jvp_t enters fused_jvp() itself
    for (name, _), a, r in zip(student.named_parameters(), got, ref, strict=True):
        assert_nontrivial(a, f"grad {name}")
        assert_close_to_ref(a, r, name=f"LFMD grad {name}")
    monkeypatch.setattr(_dispatch, "_warned", set())
    with fused_jvp(ops=("linear",)), pytest.warns(RuntimeWarning, match="gradients through its tangent are wrong"):
        grads(student)


def test_jvp_t_runs_inside_an_open_mode_and_only_around_the_jvp():
    model = _TwoTimeLn().double()
    x, s, t = torch.randn(4, 6, dtype=D64), torch.rand(4, dtype=D64), torch.rand(4, dtype=D64)
    ref = torch.func.jvp(lambda tt: model(x, s, tt), (t,), (torch.ones_like(t),))
    with fused_jvp(stats=True) as mode:
        u, du = jvp_t(model, x, s, t)
    assert mode.stats.routed == {"linear": 2, "layer_norm": 1}
    assert_close_to_ref(u, ref[0], name="u")
    assert_close_to_ref(du, ref[1], name="du/dt")
    with fused_jvp(stats=True) as mode:
        model(x, s, t)  # a plain forward: seen by the mode, nothing routed
    assert not mode.stats.routed and sum(mode.stats.passed.values()) == 3
    v = torch.randn_like(x)
    ref_sx = torch.func.jvp(lambda xx, ss: model(xx, ss, t), (x, s), (v, torch.ones_like(s)))
    with fused_jvp(stats=True) as mode:
        _, du_sx = jvp_sx(model, x, s, t, v)
    assert mode.stats.routed == {"linear": 2, "layer_norm": 1}
    assert_close_to_ref(du_sx, ref_sx[1], name="jvp_sx tangent")


def test_jvp_t_opens_its_own_mode_only_around_the_jvp(monkeypatch):
    entered: list[bool] = []
    real = jvp_module.fused_jvp

    def spy(*args, **kwargs):
        entered.append(active_fused_jvp())
        return real(*args, **kwargs)

    monkeypatch.setattr(jvp_module, "fused_jvp", spy)
    model = _TwoTimeLn().double()
    x, s, t = torch.randn(4, 6, dtype=D64), torch.rand(4, dtype=D64), torch.rand(4, dtype=D64)
    jvp_t(model, x, s, t)
    assert entered == [False] and not active_fused_jvp()  # one mode, closed again
    with fused_jvp():
        jvp_t(model, x, s, t)
    assert entered == [False]  # an open mode is used as it is


def test_a_plain_thread_beside_a_jvp_thread_sees_no_routing():
    """Forward AD is process-global in torch (concurrent JVPs are unsupported), but the mode is per thread."""
    model = _TwoTimeLn()
    x, s, t = torch.randn(4, 6), torch.rand(4), torch.rand(4)
    ref_u, ref_du = torch.func.jvp(lambda tt: model(x, s, tt), (t,), (torch.ones_like(t),))
    ref_y = model(x, s, t)
    ref_g = torch.autograd.grad(ref_y.sum(), list(model.parameters()))
    results: dict[str, object] = {}
    start = threading.Barrier(2)

    def jvp_thread() -> None:
        start.wait()
        with fused_jvp(stats=True) as mode:
            for _ in range(5):
                results["jvp"] = jvp_t(model, x, s, t)
        results["stats"] = mode.stats

    def plain_thread() -> None:
        start.wait()
        for _ in range(5):
            y = model(x, s, t)
            results["plain"] = (y, torch.autograd.grad(y.sum(), list(model.parameters())))

    threads = [threading.Thread(target=jvp_thread), threading.Thread(target=plain_thread)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert results["stats"].routed == {"linear": 10, "layer_norm": 5} and not results["stats"].passed
    u, du = results["jvp"]
    assert_close_to_ref(u, ref_u, name="u (thread)")
    assert_close_to_ref(du, ref_du, name="du (thread)")
    y, g = results["plain"]
    torch.testing.assert_close(y, ref_y, rtol=0, atol=0)
    for a, r in zip(g, ref_g, strict=True):
        torch.testing.assert_close(a, r, rtol=0, atol=0)


def test_itvm_style_no_grad_jvp_through_non_reentrant_checkpoint():
    """A no-grad JVP through torch.utils.checkpoint (use_reentrant=False) works under the mode; reverse-over-forward
    through checkpointing fails in torch 2.13 whatever the mode does (docs/support.md)."""
    block = _LnMlp().double()
    x, tx = torch.randn(3, 6, dtype=D64), torch.randn(3, 6, dtype=D64)

    def fn(z):
        return torch.utils.checkpoint.checkpoint(block, z, use_reentrant=False)

    ref = torch.func.jvp(block, (x,), (tx,))
    with torch.no_grad(), fused_jvp(stats=True) as mode:
        got = torch.func.jvp(fn, (x,), (tx,))
    assert mode.stats.routed["layer_norm"] == 1
    assert_close_to_ref(got[1], ref[1], name="checkpointed tangent")


def test_torch_compile_with_the_mode_open_gives_its_tangents():
    """The documented torch.compile behaviour (docs/support.md): the mode's handler runs on every call."""
    lin = torch.nn.Linear(8, 8)

    def f(x, tx):
        return torch.func.jvp(lambda z: F.layer_norm(lin(z), (8,)), (x,), (tx,))

    x, tx = torch.randn(4, 8), torch.randn(4, 8)
    ref = f(x, tx)
    compiled = torch.compile(f, backend="aot_eager")
    with fused_jvp(stats=True) as mode:
        compiled(x, tx)
        got = compiled(x, tx)
    assert mode.stats.routed == {"linear": 2, "layer_norm": 2}
    assert_close_to_ref(got[1], ref[1], name="compiled tangent")


class _SmallBlock(torch.nn.Module):
    """LayerNorm -> Linear -> SDPA -> Linear in plain torch: every op the mode routes in a transformer block."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm, self.qkv = torch.nn.LayerNorm(dim), torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


def test_torch_compile_fullgraph_of_a_jvp_under_the_mode_routes_to_the_fused_kernels():
    """fullgraph=True traces torch.func.jvp under the mode (its vmap check is a trace-time constant): the graph
    holds the library's kernels (norm JVP, attention JVP) and plain linears for the linear tangents, and equals
    eager, tangent non-zero."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    torch.manual_seed(0)
    block = _SmallBlock()
    x, tx = torch.randn(2, 5, 16), torch.randn(2, 5, 16)

    def f(x, tx):
        with fused_jvp():
            return torch.func.jvp(block, (x,), (tx,))

    with sdpa_kernel(SDPBackend.MATH):  # the CPU flash kernel has no forward-AD rule
        ref = torch.func.jvp(block, (x,), (tx,))
    torch.compiler.reset()
    recorder = EagerAndRecordGraphs()
    got = torch.compile(f, fullgraph=True, backend=recorder)(x, tx)
    targets = [str(n.target) for g in recorder.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert len(recorder.graphs) == 1
    assert sum("ttfm." in t for t in targets) >= 2, targets  # the norm and attention JVP kernels
    assert sum("linear" in t for t in targets) == 4, targets  # qkv and out: primal and tangent each
    assert_close_to_ref(got[0], ref[0], name="compiled value")
    assert_close_to_ref(got[1], ref[1], name="compiled tangent")
    assert_nontrivial(got[1], "compiled tangent")
    torch.compiler.reset()
