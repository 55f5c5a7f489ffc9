"""The fused O(N)-memory backward of the CPU attention JVP (``ttfm::jvp_attention_bwd``) and strided inputs.

Oracles: the reference backward (autograd through ``jvp_attention_reference`` in float64) and autograd over
``torch.func.jvp`` of math SDPA in float64. The fused kernel runs forced tiles (``function._CPU_TILES``), so the
shapes here give every row at least 3 query and 3 key blocks. A guard makes the reference backward raise, so
a passing fused test proves the fallback was not taken.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ttfm_kernels import _ext, jvp_attention, jvp_t, models
from ttfm_kernels import nn as tnn
from ttfm_kernels.ops.attention import function
from ttfm_kernels.testing import assert_close_to_ref, assert_nontrivial

pytestmark = pytest.mark.skipif(not _ext.has_kernel("jvp_attention_bwd", "CPU"),
                                reason="ttfm_kernels._C_vec (the AVX2 CPU kernels) is not loaded")

NAMES = ("q", "k", "v", "tq", "tk", "tv")
#: which tangents are present (q, k, v) and which outputs the loss reads (o, t_o, lse)
TANGENT_SUBSETS = list(itertools.product((0, 1), repeat=3))
OUTPUT_SUBSETS = [(1, 0, 0), (0, 1, 0), (1, 1, 0), (1, 1, 1), (0, 0, 1)]


@pytest.fixture
def reference_calls(spy):
    """A list that records every call of the reference formula by the autograd function (forward or backward).

    The fused cpu path must leave it empty; the reference backend (the oracle) fills it.
    """
    return spy(function, "jvp_attention_reference")


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    monkeypatch.setattr(function, "_CPU_TILES", (16, 16))


def make_inputs(b, h, n_q, n_k, d, which=(1, 1, 1)):
    """(q, k, v, tq, tk, tv) in float64; the tangents not in ``which`` are None."""
    base = [torch.randn(b, h, n, d, dtype=torch.float64) for n in (n_q, n_k, n_k)]
    return base + [torch.randn_like(x) if w else None for x, w in zip(base, which, strict=True)]


def weights(q, reads):
    """Random cotangents for (o, t_o, lse); None where the loss does not read that output."""
    shapes = (q.shape, q.shape, q.shape[:3])
    return [torch.randn(s, dtype=torch.float64) if r else None for s, r in zip(shapes, reads, strict=True)]


def grads(fn, inputs, w, dtype):
    """d(sum_i <out_i, w_i>)/d(present inputs) with the inputs cast to ``dtype``; zeros where unused."""
    args = [None if t is None else t.to(dtype).requires_grad_() for t in inputs]
    outs = fn(args)
    loss = sum((out.double() * wi).sum() for out, wi in zip(outs, w, strict=True) if wi is not None)
    present = [a for a in args if a is not None]
    found = iter(torch.autograd.grad(loss, present, allow_unused=True, materialize_grads=True))
    return [None if a is None else next(found) for a in args]


def fused(causal, backend="cpu"):
    return lambda a: jvp_attention(*a, causal=causal, backend=backend, return_lse=True)


def reference(causal):
    return lambda a: jvp_attention(*a, causal=causal, backend="reference", return_lse=True)


def sdpa_jvp(causal):
    """(o, t_o, lse) by torch.func.jvp over math SDPA (zeros for absent tangents) and an explicit logsumexp."""
    def run(a):
        q, k, v = a[:3]
        tans = [torch.zeros_like(p) if t is None else t for t, p in zip(a[3:], (q, k, v), strict=True)]
        with sdpa_kernel(SDPBackend.MATH):
            o, t_o = torch.func.jvp(lambda x, y, z: F.scaled_dot_product_attention(x, y, z, is_causal=causal),
                                    (q, k, v), tuple(tans))
        s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        if causal:
            s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
        return o, t_o, torch.logsumexp(s, dim=-1)

    return run


def compare(got, ref, inputs, w, *, dtype=None):
    """Each gradient matches; it is nonzero where the loss depends on that input."""
    reads_o, reads_t = w[0] is not None or w[2] is not None, w[1] is not None
    has_ds = inputs[3] is not None or inputs[4] is not None
    for name, g, r, x in zip(NAMES, got, ref, inputs, strict=True):
        if x is None:
            assert g is None
            continue
        if not r.any():  # exactly zero (one key: the softmax is constant); fp32 leaves rounding of O(1) terms
            assert g.abs().max() < 1e-5, f"grad {name}"
            continue
        assert_close_to_ref(g, r, dtype=dtype, name=f"grad {name}")
        # with one key the softmax is constant (o = v, t_o = tv): nothing depends on q, k, tq, tk
        scores_matter = inputs[1].shape[2] > 1
        depends = {"q": scores_matter and (reads_o or (reads_t and has_ds)),
                   "k": scores_matter and (reads_o or (reads_t and has_ds)),
                   "v": w[0] is not None or (reads_t and has_ds), "tq": scores_matter and reads_t,
                   "tk": scores_matter and reads_t, "tv": reads_t}[name]
        if depends:
            assert_nontrivial(g, f"grad {name}")


def reference_parts(inputs, w, causal):
    """The float64 reference gradients of each output separately (one forward): a subset's gradient is the sum
    of its outputs' parts (the backward is linear in the cotangents)."""
    args = [None if t is None else t.clone().requires_grad_() for t in inputs]
    outs = reference(causal)(args)
    present = [a for a in args if a is not None]
    parts = []
    for out, wi in zip(outs, w, strict=True):
        found = (torch.autograd.grad((out * wi).sum(), present, retain_graph=True, allow_unused=True,
                                     materialize_grads=True) if out.requires_grad else
                 [torch.zeros_like(a) for a in present])
        it = iter(found)
        parts.append([None if a is None else next(it) for a in args])
    return parts


def check_subset(fn, inputs, w_all, parts, reads, reference_calls):
    """``fn``'s float32 gradients from the outputs in ``reads`` (a fused backward: the reference formula is not
    called) against the sum of those outputs' float64 ``reference_parts``."""
    w = [wi if r else None for wi, r in zip(w_all, reads, strict=True)]
    got = grads(fn, inputs, w, torch.float32)
    assert not reference_calls  # the fused backward ran, not the fallback
    ref = [None if x is None else sum(p[i] for p, r in zip(parts, reads, strict=True) if r)
           for i, x in enumerate(inputs)]
    compare(got, ref, inputs, w, dtype=torch.float32)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_every_subset_matches_the_reference_backward(causal, reference_calls, monkeypatch):
    """Every subset of present tangents x of output gradients (o, t_o, lse); 20 x 24 at 7 x 8 tiles: 3 query
    and 3 key blocks."""
    monkeypatch.setattr(function, "_CPU_TILES", (7, 8))
    for which in TANGENT_SUBSETS:
        inputs = make_inputs(2, 1, 20, 24, 5, which)
        w_all = weights(inputs[0], (1, 1, 1))
        parts = reference_parts(inputs, w_all, causal)
        assert reference_calls  # the oracle ran the reference formula
        reference_calls.clear()
        for reads in OUTPUT_SUBSETS:
            check_subset(fused(causal), inputs, w_all, parts, reads, reference_calls)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("n_q", "n_k", "d"), [(1, 1, 8), (77, 77, 16), (400, 400, 8), (77, 130, 16), (130, 40, 32)])
def test_matches_autograd_over_jvp_of_math_sdpa(n_q, n_k, d, causal, reference_calls):
    inputs = make_inputs(1, 2, n_q, n_k, d)
    w = weights(inputs[0], (1, 1, 0))
    compare(grads(fused(causal), inputs, w, torch.float32), grads(sdpa_jvp(causal), inputs, w, torch.float64),
            inputs, w, dtype=torch.float32)
    assert not reference_calls


def test_double_backward_falls_back_to_the_reference(reference_calls):
    """create_graph=True needs a differentiable backward: the explicit formula (gradgradcheck in float64 holds
    on the reference backend); here the second-order gradient of the cpu backend equals the reference's."""
    inputs = make_inputs(1, 1, 20, 24, 4)

    def second(backend):
        args = [t.float().requires_grad_() for t in inputs]
        o, t_o = jvp_attention(*args, backend=backend)
        g = torch.autograd.grad((o * t_o).sum(), args[:3], create_graph=True)
        return torch.autograd.grad(sum((x ** 2).sum() for x in g), args)

    got = second("cpu")
    assert reference_calls  # the fallback ran
    for name, a, b in zip(NAMES, got, second("reference"), strict=True):
        assert_nontrivial(a, f"grad^2 {name}")
        assert_close_to_ref(a, b, name=f"grad^2 {name}", scale=10)  # fp32 on both sides, second order


def check_adversarial(inputs, dtype, backend):
    """The forward (o, t_o) and all six gradients of ``backend`` on ``inputs`` cast to ``dtype`` match
    torch.func.jvp over math SDPA in float64, causal (the shared-key-direction case of both fused backends)."""
    w = weights(inputs[0], (1, 1, 0))
    o, t_o = jvp_attention(*[t.to(dtype) for t in inputs], causal=True, backend=backend)
    ro, rt, _ = sdpa_jvp(True)(inputs)
    assert_close_to_ref(o, ro, name="o")
    assert_close_to_ref(t_o, rt, name="t_o")
    compare(grads(fused(True, backend), inputs, w, dtype), grads(sdpa_jvp(True), inputs, w, torch.float64), inputs, w)


def adversarial_inputs(n, d, dtype):
    """Keys sharing a large mean direction (a large row-constant score and score tangent), cast to ``dtype``."""
    q, k, v, tq, tk, tv = make_inputs(1, 2, n, n, d)
    u = torch.nn.functional.normalize(torch.randn(d, dtype=torch.float64), dim=0)
    k, tk = k + 8.0 * u, tk + 8.0 * u
    q, tq = q + 3.0 * u, tq + 3.0 * u
    return [t.to(dtype).double() for t in (q, k, v, tq, tk, tv)]  # the exact values the kernel sees


@pytest.mark.parametrize(("dtype", "bf16_gemm"), [(torch.float32, -1), (torch.bfloat16, 0), (torch.bfloat16, 1)],
                         ids=["fp32", "bf16-fp32-gemm", "bf16-bf16-gemm"])
def test_adversarial_shared_key_direction_forward_and_backward(dtype, bf16_gemm, reference_calls, monkeypatch):
    monkeypatch.setattr(function, "_CPU_BF16_GEMM", bf16_gemm)
    inputs = adversarial_inputs(70, 16, dtype)
    q, k, tq, tk = (t[0, 0] for t in (inputs[0], inputs[1], inputs[3], inputs[4]))
    for scores in (q @ k.T, tq @ k.T + q @ tk.T):  # the row-constant part dominates scores and their tangent
        assert scores.mean(dim=1).abs().mean() > 2 * scores.std(dim=1).mean()
    check_adversarial(inputs, dtype, "cpu")
    assert not reference_calls


def test_bf16_backward_matches(reference_calls):
    inputs = [t.bfloat16().double() for t in make_inputs(2, 2, 50, 70, 16)]
    w = weights(inputs[0], (1, 1, 1))
    got = grads(fused(False), inputs, w, torch.bfloat16)
    assert all(g.dtype == torch.bfloat16 for g in got)
    compare(got, grads(sdpa_jvp(False), inputs, w, torch.float64), inputs, w)
    assert not reference_calls


def strided_layouts(b, n, h, d):
    """(name, q, k, v, tq, tk, tv) as nn.Attention (a permuted packed qkv) and diffusers (a transpose) make them."""
    packed = torch.randn(2, b, n, 3, h, d).unbind(0)
    attn = [t for x in packed for t in x.permute(2, 0, 3, 1, 4).unbind(0)]
    diffusers = [torch.randn(b, n, h, d).transpose(1, 2) for _ in range(6)]
    return [("nn.Attention", attn), ("diffusers", diffusers)]


@pytest.mark.parametrize("layout", ["nn.Attention", "diffusers"])
def test_strided_inputs_are_read_without_copies(layout, reference_calls):
    """The results equal those of contiguous copies, and no copy runs in the forward or the backward."""
    args = dict(strided_layouts(2, 40, 3, 8))[layout]
    assert not any(t.is_contiguous() for t in args)
    leaves = [t.detach().requires_grad_() for t in args]
    views = [t.view_as(t) for t in leaves]  # strided non-leaf inputs, as a model makes them
    g_o, g_t = torch.randn(2, 2, 3, 40, 8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        o, t_o = jvp_attention(*views, causal=True, backend="cpu")
        got = torch.autograd.grad((o, t_o), leaves, (g_o, g_t))
    ops = {e.key for e in prof.key_averages()}
    assert not ops & {"aten::clone", "aten::copy_", "aten::contiguous"}, ops
    assert not reference_calls
    dense = [t.detach().contiguous().requires_grad_() for t in args]
    ro, rt = jvp_attention(*dense, causal=True, backend="cpu")
    ref = torch.autograd.grad((ro, rt), dense, (g_o, g_t))
    assert torch.equal(o, ro) and torch.equal(t_o, rt)
    for name, a, b in zip(NAMES, got, ref, strict=True):
        assert torch.equal(a, b), f"grad {name}"


def test_non_unit_last_stride_is_copied():
    q, k, v, tq, tk, tv = make_inputs(1, 2, 30, 30, 8)
    odd = k.float().transpose(2, 3).contiguous().transpose(2, 3)
    assert odd.stride(-1) != 1
    o, t_o = jvp_attention(q.float(), odd, v.float(), tq.float(), tk.float(), tv.float(), backend="cpu")
    ro, rt = jvp_attention(*(t.float() for t in (q, k, v, tq, tk, tv)), backend="cpu")
    assert torch.equal(o, ro) and torch.equal(t_o, rt)


def test_lfmd_step_gradients_equal_the_reference_backends(reference_calls):
    """Reverse-over-forward through TwoTimeDiT (jvp_t with create_graph=True, the LFMD pattern): the parameter
    gradients of the cpu backend (fused forward and backward) equal those of the reference backend."""
    model = models.TwoTimeDiT.from_preset("tiny", num_classes=0)
    with torch.no_grad():  # leave the zero initialisation (adaLN-zero), so attention affects the output
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    attns = [m for m in model.modules() if isinstance(m, tnn.Attention)]
    assert attns
    x, s, t = torch.randn(2, 3, 8, 8), torch.rand(2) * 0.5, 0.5 + torch.rand(2) * 0.5

    def param_grads(backend):
        for m in attns:
            m.backend = backend
        u, du = jvp_t(model, x, s, t, create_graph=True)
        loss = (u + (t - s)[:, None, None, None] * du).square().mean()
        return torch.autograd.grad(loss, list(model.parameters()), allow_unused=True, materialize_grads=True)

    got = param_grads("cpu")
    assert not reference_calls
    ref = param_grads("reference")
    assert any(g.ne(0).any() for g in got)
    for (name, _), a, b in zip(model.named_parameters(), got, ref, strict=True):
        assert_close_to_ref(a, b, dtype=torch.float32, name=name, scale=5)  # fp32 both sides, through the net


def test_backward_op_rejects_bad_arguments():
    q, k, v = (t.float() for t in make_inputs(1, 2, 8, 8, 4, (0, 0, 0))[:3])
    o, t_o = torch.zeros_like(q), torch.zeros_like(q)
    lse, mu = torch.zeros(1, 2, 8), torch.zeros(1, 2, 8)
    op = torch.ops.ttfm.jvp_attention_bwd
    with pytest.raises(RuntimeError, match="g_o has shape"):
        op(q, k, v, None, None, None, o, t_o, lse, mu, o[:, :1], None, None, False, 0.5)
    with pytest.raises(RuntimeError, match="mu must be a contiguous float32"):
        op(q, k, v, None, None, None, o, t_o, lse, mu.double(), o, None, None, False, 0.5)


def test_backward_opcheck_kernel_op():
    """Every opcheck check on the functional backward kernel op ([dq, dk, dv] and one gradient per tangent)."""
    q, k, v, tq, _, tv = (None if t is None else t.float() for t in make_inputs(1, 2, 12, 10, 8, (1, 0, 1)))
    lse, mu = torch.zeros(1, 2, 12), torch.zeros(1, 2, 12)
    args = (q, k, v, tq, None, tv, torch.randn_like(q), torch.randn_like(q), lse, mu, torch.randn_like(q), None,
            None, True, 0.3, 4, 4)
    torch.library.opcheck(torch.ops.ttfm.jvp_attention_bwd.default, args)
