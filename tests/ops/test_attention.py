"""jvp_attention / attention / patch_sdpa: parity with torch.func.jvp over math SDPA, autograd, bad input.

The parity suite runs for every backend; one that cannot run here is skipped with its reason. Shapes are few
and small (the Triton interpreter is slow per program and key block); N > 64 gives the interpreter's Triton
configuration (BLOCK_N = 32) at least 3 key blocks per row, so the online rescaling runs.
"""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ttfm_kernels import BackendUnavailableError, _dispatch, attention, jvp_attention, patch_sdpa
from ttfm_kernels.ops.attention import function
from ttfm_kernels.ops.attention.function import _BACKENDS
from ttfm_kernels.testing import assert_close_to_ref, assert_nontrivial

CPU = torch.device("cpu")
DTYPES = {
    "reference": (torch.float64, torch.float32),
    "cpu": (torch.float32, torch.bfloat16),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
}


def _backend_param(name: str) -> pytest.param:
    reason = _BACKENDS.checks[name](CPU, DTYPES[name][0])
    return pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=f"{name}: {reason}"))


BACKEND_PARAMS = [_backend_param(name) for name in DTYPES]
BACKEND_DTYPE_PARAMS = [pytest.param(name, dtype, marks=p.marks, id=f"{name}-{str(dtype)[6:]}")
                        for name, p in zip(DTYPES, BACKEND_PARAMS, strict=True) for dtype in DTYPES[name]]


@pytest.fixture(autouse=True)
def _small_cpu_tiles(monkeypatch):
    """The C++ CPU kernel runs 32 x 32 tiles here, so N > 64 gives it at least 3 query and key blocks."""
    monkeypatch.setattr(function, "_CPU_TILES", (32, 32))


def _inputs(b, h, n_q, n_k, d, dtype=torch.float64, late_max=False):
    """(q, k, v, tq, tk, tv) in float64 then cast; ``late_max`` puts the largest scores in the last keys."""
    q, tq = torch.randn(2, b, h, n_q, d, dtype=torch.float64)
    k, v, tk, tv = torch.randn(4, b, h, n_k, d, dtype=torch.float64)
    if late_max:  # a shared direction in q and in the last 8 keys: the row max jumps in the last key block
        q = q + 1.0
        k[:, :, -8:] += 2.0
    return tuple(t.to(dtype) for t in (q, k, v, tq, tk, tv))


def _oracle(q, k, v, tq, tk, tv, causal=False, scale=None):
    """(o, t_o, lse) in float64: torch.func.jvp over math SDPA, zeros for absent tangents."""
    prim = [t.double() for t in (q, k, v)]
    tans = [torch.zeros_like(p) if t is None else t.double() for t, p in zip((tq, tk, tv), prim, strict=True)]
    with sdpa_kernel(SDPBackend.MATH):
        o, t_o = torch.func.jvp(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal,
                                                                               scale=scale), tuple(prim), tuple(tans))
    c = scale if scale is not None else q.shape[-1] ** -0.5
    s = c * prim[0] @ prim[1].transpose(-2, -1)
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    return o, t_o, torch.logsumexp(s, dim=-1)


def _check(got, ref, dtype, what=""):
    o, t_o, lse = got
    assert o.dtype == t_o.dtype == dtype and lse.dtype == torch.float32
    assert_close_to_ref(o, ref[0], dtype=dtype, name=f"o{what}")
    # the tangent sums 3 products of O(1) terms: allow 4x the output's tolerance
    assert_close_to_ref(t_o, ref[1], dtype=dtype, name=f"t_o{what}", scale=4.0)
    assert_close_to_ref(lse, ref[2], dtype=torch.float32, name=f"lse{what}")  # lse is stored in float32


SHAPES = [  # (B, H, Nq, Nk, D, causal)
    (1, 2, 1, 1, 16, False),
    (2, 1, 77, 130, 80, True),
    (1, 2, 130, 77, 64, True),
    (1, 1, 400, 400, 128, False),
]


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPE_PARAMS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}Nq{}Nk{}D{}{}".format(*s[:5], "c" * s[5]))
def test_parity_with_func_jvp(backend, dtype, shape):
    *dims, causal = shape
    args = _inputs(*dims, dtype=dtype)
    got = jvp_attention(*args, causal=causal, return_lse=True, backend=backend)
    _check(got, _oracle(*args, causal=causal), dtype)
    assert_nontrivial(got[1], "t_o")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("absent", [(0,), (1,), (2,), (0, 1), (1, 2), (0, 1, 2)], ids=lambda a: f"no-t{a}")
def test_absent_tangents_and_late_max(backend, absent):
    dtype = DTYPES[backend][0]
    q, k, v, *tangents = _inputs(1, 2, 130, 130, 32, dtype=dtype, late_max=True)
    assert (q.double() @ k.double().transpose(-2, -1)).argmax(-1).ge(130 - 8).float().mean() > 0.9
    tangents = [None if i in absent else t for i, t in enumerate(tangents)]
    got = jvp_attention(q, k, v, *tangents, scale=0.3, return_lse=True, backend=backend)
    _check(got, _oracle(q, k, v, *tangents, scale=0.3), dtype, what=f" without tangents {absent}")
    if len(absent) == 3:
        assert got[1].eq(0).all()
    else:
        assert_nontrivial(got[1], "t_o")


def _sdpa(q, k, v, is_causal=False):
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_tangent_under_func_jvp_and_forward_ad(backend, causal):
    q, k, v, tq, tk, tv = _inputs(2, 2, 33, 47, 16, dtype=DTYPES[backend][0])
    ref = _oracle(q, k, v, tq, tk, tv, causal=causal)
    o, t_o = torch.func.jvp(lambda a, b, c: attention(a, b, c, is_causal=causal, backend=backend), (q, k, v),
                            (tq, tk, tv))
    assert_nontrivial(t_o)
    assert_close_to_ref(o, ref[0], name="o (func.jvp)")
    assert_close_to_ref(t_o, ref[1], name="t_o (func.jvp)", scale=4.0)
    with fwAD.dual_level():
        out = attention(fwAD.make_dual(q, tq), fwAD.make_dual(k, tk), fwAD.make_dual(v, tv), is_causal=causal,
                        backend=backend)
        o, t_o = fwAD.unpack_dual(out)
    assert_nontrivial(t_o)
    assert_close_to_ref(o, ref[0], name="o (forward_ad)")
    assert_close_to_ref(t_o, ref[1], name="t_o (forward_ad)", scale=4.0)


def test_attention_without_tangent_is_sdpa():
    q, k, v, *_ = _inputs(1, 2, 9, 11, 16, dtype=torch.float32)
    q.requires_grad_()
    o = attention(q, k, v)
    torch.testing.assert_close(o, F.scaled_dot_product_attention(q, k, v), rtol=0, atol=0)
    assert "Function" not in type(o.grad_fn).__name__  # torch's own backward, not the recomputing one


def test_gradients_through_o_and_t_o_match_func_jvp():
    """Reverse-over-forward (what LFMD needs): d/d(inputs) of a loss on o and t_o."""
    args = [t.requires_grad_() for t in _inputs(1, 2, 19, 23, 16)]
    w_o, w_t = torch.randn(2, 1, 2, 19, 16, dtype=torch.float64)

    def loss(fn):
        o, t_o = torch.func.jvp(lambda a, b, c: fn(a, b, c, is_causal=True), tuple(args[:3]), tuple(args[3:]))
        return (o * w_o).sum() + (t_o * w_t).sum()

    got = torch.autograd.grad(loss(attention), args)
    with sdpa_kernel(SDPBackend.MATH):
        ref = torch.autograd.grad(loss(_sdpa), args)
    for name, g, r in zip(("q", "k", "v", "tq", "tk", "tv"), got, ref, strict=True):
        assert_nontrivial(g, f"grad {name}")
        assert_close_to_ref(g, r, name=f"grad {name}")


def test_gradcheck_explicit_api():
    args = [t.requires_grad_() for t in _inputs(1, 1, 5, 6, 4)]
    assert torch.autograd.gradcheck(lambda *a: jvp_attention(*a, causal=True, backend="reference"), args,
                                    fast_mode=True)
    assert torch.autograd.gradgradcheck(lambda *a: jvp_attention(*a, backend="reference"), args, fast_mode=True)


def test_no_graph_under_no_grad():
    args = [t.requires_grad_() for t in _inputs(1, 1, 7, 7, 16)]
    with torch.no_grad():
        o, t_o = jvp_attention(*args)
        assert not o.requires_grad and not t_o.requires_grad
        o, t_o = torch.func.jvp(attention, tuple(args[:3]), tuple(args[3:]))
        assert not o.requires_grad and not t_o.requires_grad
        assert_nontrivial(t_o)


def test_attn_mask_runs_math_sdpa_with_tangent(monkeypatch):
    q, k, v, tq, tk, tv = _inputs(1, 2, 6, 8, 16)
    mask = torch.rand(6, 8) > 0.3
    mask[:, 0] = True
    monkeypatch.setattr(_dispatch, "_warned", set())  # warn-once state of earlier tests
    with pytest.warns(RuntimeWarning, match="attn_mask: this JVP runs torch's math SDPA"):
        _, t_o = torch.func.jvp(lambda a, b, c: attention(a, b, c, attn_mask=mask), (q, k, v), (tq, tk, tv))
    with sdpa_kernel(SDPBackend.MATH):
        ref = torch.func.jvp(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask), (q, k, v),
                             (tq, tk, tv))
    assert_close_to_ref(t_o, ref[1], name="t_o with attn_mask")


class _DiTBlock(torch.nn.Module):
    """A DiT-style block written with plain F.scaled_dot_product_attention (as timm / DiT code does)."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.norm = torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(y.transpose(1, 2).reshape(b, n, c))


def test_patch_sdpa_is_the_deprecated_sdpa_mode(spy):
    block = _DiTBlock().double()
    x, tx = torch.randn(2, 2, 13, 32, dtype=torch.float64)
    with sdpa_kernel(SDPBackend.MATH):
        ref = torch.func.jvp(block, (x,), (tx,))
    import ttfm_kernels.ops.attention.function as fn

    calls = spy(fn, "jvp_attention_reference")
    original = F.scaled_dot_product_attention
    with pytest.warns(DeprecationWarning, match="fused_jvp"), patch_sdpa() as mode:
        assert F.scaled_dot_product_attention is original  # no process-wide reassignment any more
        y, ty = torch.func.jvp(block, (x,), (tx,))
        torch.testing.assert_close(block(x), ref[0], rtol=0, atol=1e-12)  # no tangent: plain SDPA
    assert mode.stats is None
    assert len(calls) == 1  # the fused op ran once (reference backend here), for the JVP only
    assert_nontrivial(ty)
    assert_close_to_ref(y, ref[0], name="block output")
    assert_close_to_ref(ty, ref[1], name="block tangent")


@pytest.mark.parametrize("change,error,match", [
    (lambda a: a.update(q=a["q"][0]), ValueError, "q must have shape"),
    (lambda a: a.update(k=a["k"][:, :1]), ValueError, "k has shape"),
    (lambda a: a.update(v=a["v"][..., :8]), ValueError, "v has shape"),
    (lambda a: a.update(k=a["k"].float()), TypeError, "k has dtype"),
    (lambda a: a.update(q=a["q"].long()), TypeError, "q must be a floating-point"),
    (lambda a: a.update(tq=a["tq"][:, :, :3]), ValueError, "tq has shape"),
    (lambda a: a.update(tk=a["tk"].float()), TypeError, "tk has dtype"),
    (lambda a: a.update(tv=a["tv"].to("meta")), ValueError, "tv is on meta"),
    (lambda a: a.update(q=a["q"][:, :, :0], tq=None), ValueError, "Nq, Nk, D >= 1"),
])
def test_bad_input_names_the_argument(change, error, match):
    args = dict(zip(("q", "k", "v", "tq", "tk", "tv"), _inputs(1, 2, 5, 6, 16), strict=True))
    change(args)
    with pytest.raises(error, match=match):
        jvp_attention(**args)
    # The same dtype checks guard attention() once a tangent is present; shapes SDPA broadcasts take its math path.
    if error is TypeError and match.startswith(("q", "k", "v")):
        with pytest.raises(error, match=match), fwAD.dual_level():
            attention(args["q"], args["k"], fwAD.make_dual(args["v"], torch.ones_like(args["v"])))


def test_unavailable_backend_is_a_clear_error():
    q, k, v, *_ = _inputs(1, 1, 4, 4, 16, dtype=torch.float16)
    with pytest.raises(BackendUnavailableError, match="cpu"):
        jvp_attention(q, k, v, tv=v, backend="cpu")


def test_triton_gpu_configurations_are_registered_defaults():
    """The GPU launcher picks only configurations the compile gate checks (default=True, same launch params)."""
    kernel = pytest.importorskip("ttfm_kernels.ops.attention.triton")
    from ttfm_kernels._gpu_configs import GPU_CONFIGS

    registered = {c.name: c for c in GPU_CONFIGS}
    cuda = torch.device("cuda")
    for dtype, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        for head_dim in (16, 24, 64, 72, 80, 96, 128, 200, 256):
            config = kernel.gpu_config(dtype, head_dim)
            if config is None:
                assert dtype == torch.float32 and head_dim > 128
                assert "no spill-free GPU configuration" in kernel.unsupported(cuda, dtype, head_dim)
                continue
            block_m, block_n, warps, stages = config
            block_d = max(16, 1 << (head_dim - 1).bit_length())
            # one launch per tangent: each tangent alone, and none, is a registered configuration
            split = ("fp32" if dtype == torch.float32 else "16bit", block_d) in kernel._ONE_TANGENT_PER_LAUNCH
            for suffix in ("", "/causal"):
                for launch in ("/tq", "/tk", "/tv", "/none") if split else ("",):
                    entry = registered[f"jvp_attention_fwd/{name}/D{block_d}/BM{block_m}/BN{block_n}{suffix}{launch}"]
                    assert entry.default and (entry.num_warps, entry.num_stages) == (warps, stages)
            assert kernel.unsupported(cuda, dtype, head_dim) is None
    assert "up to 256" in kernel.unsupported(CPU, torch.float16, 257)


def test_triton_head_dim_limit_is_a_clear_error():
    if _BACKENDS.checks["triton"](CPU, torch.float32) is not None:
        pytest.skip("Triton interpreter unavailable")
    q = torch.randn(1, 1, 4, 264)
    with pytest.raises(BackendUnavailableError, match="head dims up to 256"):
        jvp_attention(q, q, q, tv=q, backend="triton")
