"""The one op pattern (docs/design.md, "How to add an op") across the public ops: forward-AD tangents through the
kernel ops (nonzero and right: a kernel op alone would return a zero tangent silently) and
``torch.compile(fullgraph=True)`` of each explicit-tangent API. The per-op suites test values, gradients and
opcheck; this file the parts every op shares.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from ttfm_kernels import _ext, flow_map_step, itvm_residual_loss, jvp_attention
from ttfm_kernels.ops.attention.reference import jvp_attention_reference
from ttfm_kernels.ops.norm import group_norm_jvp, jvp_norm_modulate_silu, layer_norm_jvp
from ttfm_kernels.ops.residual.reference import flow_map_step_reference
from ttfm_kernels.testing import assert_close_to_ref, assert_nontrivial


def _needs(op: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not _ext.has_kernel(op, "CPU"), reason=f"no C++ CPU kernel for ttfm::{op}")


def _step_inputs(dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    primals = [torch.randn(3, 4, 5, generator=gen, dtype=dtype), torch.randn(3, 4, 5, generator=gen, dtype=dtype),
               torch.rand(3, generator=gen, dtype=dtype), torch.rand(3, generator=gen, dtype=dtype) + 0.5]
    return primals, [torch.randn(p.shape, generator=gen, dtype=dtype) for p in primals]


@_needs("flow_map_step")
@pytest.mark.parametrize("api", ["func.jvp", "forward_ad"])
def test_flow_map_step_tangent_and_gradient_through_it(api):
    """Tangents of x, u, s and t through the kernel op, and gradients through that tangent (reverse-over-forward),
    against torch.func.jvp over the reference formula in float64."""
    primals, tangents = _step_inputs(torch.float64)
    leaves = [p.clone().requires_grad_() for p in primals]
    if api == "func.jvp":
        _, got = torch.func.jvp(lambda *a: flow_map_step(*a, backend="cpu"), tuple(leaves), tuple(tangents))
    else:
        with fwAD.dual_level():
            dual = flow_map_step(*(fwAD.make_dual(p, t) for p, t in zip(leaves, tangents, strict=True)),
                                 backend="cpu")
            got = fwAD.unpack_dual(dual).tangent
    _, expected = torch.func.jvp(flow_map_step_reference, tuple(leaves), tuple(tangents))
    assert_nontrivial(got)
    assert_close_to_ref(got, expected, name="tangent")
    weight = torch.randn_like(got)
    grads = torch.autograd.grad((got * weight).sum(), leaves[1:], allow_unused=True)
    ref = torch.autograd.grad((expected * weight).sum(), leaves[1:], allow_unused=True)
    for name, a, b in zip("ust", grads, ref, strict=True):
        assert_nontrivial(a, f"gradient of {name} through the tangent")
        assert_close_to_ref(a, b, name=f"gradient of {name} through the tangent")


@_needs("jvp_attention_fwd")
def test_jvp_attention_explicit_api_under_nested_forward_ad():
    """A forward-AD tangent on an input of the explicit API reaches both outputs (the reference route), not a
    kernel op's silent zero."""
    gen = torch.Generator().manual_seed(1)
    q, k, v, tq, dq = (torch.randn(1, 2, 6, 4, generator=gen, dtype=torch.float64) for _ in range(5))

    def outputs(q):
        return jvp_attention(q, k, v, tq, backend="auto")

    _, (do, dt_o) = torch.func.jvp(outputs, (q,), (dq,))
    _, (eo, et_o, _) = torch.func.jvp(lambda q: jvp_attention_reference(q, k, v, tq, None, None, causal=False,
                                                                         scale=0.5), (q,), (dq,))
    for name, got, expected in (("o", do, eo), ("t_o", dt_o, et_o)):
        assert_nontrivial(got, f"tangent of {name}")
        assert_close_to_ref(got, expected, name=f"tangent of {name}")


def _attention_case():
    gen = torch.Generator().manual_seed(2)
    args = [torch.randn(1, 2, 40, 16, generator=gen) for _ in range(6)]
    return (lambda backend: lambda *a: jvp_attention(*a, causal=True, backend=backend)), args, "jvp_attention_fwd"


def _norm_case():
    gen = torch.Generator().manual_seed(3)
    x, tx = torch.randn(2, 5, 8, generator=gen), torch.randn(2, 5, 8, generator=gen)
    mods = [torch.randn(2, 8, generator=gen) for _ in range(4)]
    return (lambda backend: lambda *a: jvp_norm_modulate_silu(*a, backend=backend)), [x, tx, *mods], \
        "norm_modulate_jvp"


def _layer_norm_case():
    gen = torch.Generator().manual_seed(4)
    x, tx, w = torch.randn(3, 7, generator=gen), torch.randn(3, 7, generator=gen), torch.randn(7, generator=gen)
    return (lambda backend: lambda x, tx, w: layer_norm_jvp(x, tx, (7,), w, backend=backend)), [x, tx, w], \
        "norm_modulate_jvp"


def _group_norm_case():
    gen = torch.Generator().manual_seed(5)
    x, tx = torch.randn(2, 6, 3, 3, generator=gen), torch.randn(2, 6, 3, 3, generator=gen)
    return (lambda backend: lambda x, tx: group_norm_jvp(x, tx, 3, backend=backend)), [x, tx], "norm_modulate_jvp"


def _step_case():
    primals, _ = _step_inputs(torch.float32)
    return (lambda backend: lambda *a: flow_map_step(*a, backend=backend)), primals, "flow_map_step"


def _residual_case():
    gen = torch.Generator().manual_seed(6)
    tensors = [torch.randn(3, 10, generator=gen) for _ in range(5)]
    coef = -torch.rand(3, generator=gen)
    return (lambda backend: lambda *a: itvm_residual_loss(*a, coef, reduction="none", backend=backend)), tensors, \
        "itvm_residual_loss_fwd"


#: public op -> (backend -> the call, its inputs, the kernel op it needs)
CASES = {"jvp_attention": _attention_case, "jvp_norm_modulate_silu": _norm_case, "layer_norm_jvp": _layer_norm_case,
         "group_norm_jvp": _group_norm_case, "flow_map_step": _step_case, "itvm_residual_loss": _residual_case}


@pytest.mark.parametrize("case", list(CASES))
def test_explicit_tangent_api_compiles_with_fullgraph(case):
    """Each public op's explicit-tangent call on its C++ kernel (backend selection, validation, the kernel op and
    its fake kernel) traces into one graph and matches the reference backend in eager: outputs, and the gradient
    of the first input through them."""
    call, args, op = CASES[case]()
    if not _ext.has_kernel(op, "CPU"):
        pytest.skip(f"no C++ CPU kernel for ttfm::{op}")
    torch.compiler.reset()
    compiled = torch.compile(call("cpu"), fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, call("reference")):
        leaves = [a.clone().requires_grad_(i == 0) for i, a in enumerate(args)]
        out = fn(*leaves)
        out = out if isinstance(out, tuple) else (out,)
        weights = [torch.linspace(-1, 1, o.numel()).view(o.shape) for o in out]
        results.append((out, torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, weights, strict=True)),
                                                 leaves[:1])[0]))
    (got, grad), (expected, ref_grad) = results
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert_nontrivial(a, f"output {i}")
        assert_close_to_ref(a, b.detach(), name=f"output {i}")
    assert_nontrivial(grad, "gradient of the first input")
    assert_close_to_ref(grad, ref_grad, name="gradient of the first input", scale=2.0)
