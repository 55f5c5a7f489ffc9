"""jvp_norm_modulate_silu's Triton kernel compiled for the GPU, against torch.func.jvp over the eager composite
on the CPU (float64). Curated: 8 kernel specialisations (dtype x one-block / swept rows x tangent set), at the
launcher's own block sizes (rows up to 4096 elements in one block, longer rows swept).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.ops.test_norm import (
    TANGENTS,
    _grads_through_tangent,
    check_missing_tangents,
    eager_composite,
    make_inputs,
    oracle,
    run,
)
from ttfm_kernels.ops.norm import norm_modulate_silu
from ttfm_kernels.ops.norm.function import _BACKENDS
from ttfm_kernels.testing import assert_close_to_ref, assert_nontrivial

pytestmark = pytest.mark.gpu
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32

#: (num_groups, shape, dtype): DiT-XL-like LayerNorm rows (C = 1152), GroupNorm rows in one block, and
#: GroupNorm rows of 51,200 elements (swept in blocks of 4096).
LAYOUTS = [
    pytest.param(None, (2, 77, 1152), F32, id="ln-C1152-fp32"),
    pytest.param(None, (2, 77, 1152), BF16, id="ln-C1152-bf16"),
    pytest.param(None, (2, 77, 1152), F16, id="ln-C1152-fp16"),
    pytest.param(32, (2, 64, 9, 7), F32, id="gn-G32-C64-9x7-fp32"),
    pytest.param(4, (2, 32, 80, 80), F16, id="gn-G4-C32-80x80-swept-fp16"),
]


def _cuda(t: dict) -> dict:
    return {k: None if v is None else v.cuda() for k, v in t.items()}


@pytest.mark.parametrize(("num_groups", "shape", "dtype"), LAYOUTS)
def test_triton_matches_func_jvp(num_groups, shape, dtype):
    t = make_inputs(num_groups, shape, dtype)
    y, ty = run(_cuda(t), num_groups, "triton")
    y_ref, ty_ref = oracle(t, num_groups)
    assert y.is_cuda and y.dtype == ty.dtype == dtype
    scale = 1.0 if dtype == F32 else 2.0  # as in the CPU suite: ty combines rounded inputs through 1/sd twice
    assert_close_to_ref(y, y_ref, dtype=dtype, name="y", scale=scale)
    assert_close_to_ref(ty, ty_ref, dtype=dtype, name="ty", scale=scale)
    assert_nontrivial(ty)


@pytest.mark.parametrize("drop", [("tx",), ("tscale", "tshift"), TANGENTS], ids=lambda d: "no-" + "-".join(d))
def test_missing_tangents(drop):
    t = make_inputs(None, (2, 77, 1152))
    check_missing_tangents(run(_cuda(t), None, "triton", drop=drop), oracle(t, None, drop=drop), drop)


def test_gradients_through_the_tangent():
    """Backward through ty under torch.func.jvp on CUDA ("auto"), against the eager composite with LayerNorm
    written out (torch's own F.layer_norm forward-AD backward is wrong in torch 2.13)."""
    t = make_inputs(None, (2, 77, 1152))
    cuda, t64 = _cuda(t), {k: None if v is None else v.double() for k, v in t.items()}

    def fused(x, scale, weight):
        return torch.func.jvp(lambda x_, s_, sh_: norm_modulate_silu(x_, s_, sh_, weight=weight, bias=cuda["bias"]),
                              (x, scale, cuda["shift"]), (cuda["tx"], cuda["tscale"], cuda["tshift"]))

    def eager(x, scale, weight):
        return torch.func.jvp(eager_composite(None, weight, t64["bias"], by_hand=True), (x, scale, t64["shift"]),
                              (t64["tx"], t64["tscale"], t64["tshift"]))

    got, want = _grads_through_tangent(fused, cuda), _grads_through_tangent(eager, t64)
    for g, w, name in zip(got, want, ("x.grad", "scale.grad", "weight.grad"), strict=True):
        assert g.is_cuda
        assert_nontrivial(g, name)
        assert_close_to_ref(g, w, dtype=F32, name=name, scale=5.0)  # fp32 gradients of a second-order quantity


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_auto_picks_triton_for_cuda_tensors(dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert _BACKENDS.select("auto", torch.device("cuda"), dtype) == "triton"
