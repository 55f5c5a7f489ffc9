"""Conv2d / Linear: same arguments and state_dict as torch's, tangent from the bias-free op on tx, differentiable."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

import ttfm_kernels.nn.linear as linear_mod
from ttfm_kernels.nn import Conv2d, Linear
from ttfm_kernels.testing import assert_close_to_ref, assert_nontrivial

# (our class, torch's class, constructor args, constructor kwargs, input shape)
CASES = [
    pytest.param(Conv2d, nn.Conv2d, (3, 5, 3), {"padding": 1}, (2, 3, 6, 7), id="conv-pad1"),
    pytest.param(Conv2d, nn.Conv2d, (3, 4, (3, 2)), {"stride": 2, "bias": False, "padding": 1,
                                                      "padding_mode": "reflect"}, (2, 3, 7, 5), id="conv-reflect"),
    pytest.param(Conv2d, nn.Conv2d, (3, 4, 3), {}, (3, 6, 6), id="conv-unbatched"),
    pytest.param(Linear, nn.Linear, (6, 5), {}, (2, 4, 6), id="linear-3d"),
    pytest.param(Linear, nn.Linear, (6, 5), {"bias": False}, (6,), id="linear-1d-nobias"),
]


def _pair(ours, theirs, args, kwargs):
    m, ref = ours(*args, **kwargs), theirs(*args, **kwargs)
    assert list(m.state_dict()) == list(ref.state_dict())
    m.load_state_dict(ref.state_dict())
    return m, ref


@pytest.fixture
def fused_calls(spy) -> list[int]:
    """Counts the fused tangent calls (so a test fails if the tangent silently took torch's own rule)."""
    return spy(linear_mod, "linear_tangent")


@pytest.mark.parametrize(("ours", "theirs", "args", "kwargs", "shape"), CASES)
def test_matches_torch_under_func_jvp_and_forward_ad(ours, theirs, args, kwargs, shape, fused_calls):
    m, ref = _pair(ours, theirs, args, kwargs)
    x, tx = torch.randn(shape), torch.randn(shape)
    y_ref, ty_ref = torch.func.jvp(ref, (x,), (tx,))
    y, ty = torch.func.jvp(m, (x,), (tx,))
    assert len(fused_calls) == 1
    assert_close_to_ref(y, y_ref, name="y")
    assert_close_to_ref(ty, ty_ref, name="ty")
    assert_nontrivial(ty)
    with fwAD.dual_level():
        y2, ty2 = fwAD.unpack_dual(m(fwAD.make_dual(x, tx)))
    assert len(fused_calls) == 2
    assert_close_to_ref(y2, y_ref, name="forward_ad y")
    assert_close_to_ref(ty2, ty_ref, name="forward_ad ty")
    y3, ty3 = m.forward_jvp(x, tx)
    assert_close_to_ref(y3, y_ref, name="forward_jvp y")
    assert_close_to_ref(ty3, ty_ref, name="forward_jvp ty")
    assert m.forward_jvp(x, None)[1] is None
    assert_close_to_ref(m(x), ref(x), name="plain forward")


@pytest.mark.parametrize(("ours", "theirs", "args", "kwargs", "shape"), [CASES[0], CASES[3]])
def test_gradients_through_the_tangent(ours, theirs, args, kwargs, shape):
    m, ref = _pair(ours, theirs, args, kwargs)
    x, tx = torch.randn(shape), torch.randn(shape)
    grads = []
    for module in (m, ref):
        xr, txr = x.clone().requires_grad_(), tx.clone().requires_grad_()
        y, ty = torch.func.jvp(module, (xr,), (txr,))
        (ty.square().sum() + y.sum()).backward()
        grads.append((xr.grad, txr.grad, module.weight.grad))
    for got, want, name in zip(*grads, ("x.grad", "tx.grad", "weight.grad"), strict=True):
        assert_nontrivial(got, name)
        assert_close_to_ref(got, want, name=name)


def test_weight_tangent_falls_back_to_torch(fused_calls):
    """A JVP with respect to the weights (not the fused case) is still right: torch's own rule runs."""
    m, ref = _pair(Linear, nn.Linear, (6, 5), {})
    x = torch.randn(3, 6)
    params = dict(m.named_parameters())
    tangents = {k: torch.randn_like(v) for k, v in params.items()}

    def run(module):
        return torch.func.jvp(lambda p, xx: torch.func.functional_call(module, p, (xx,)), (params, x),
                              (tangents, torch.ones_like(x)))

    _, ty = run(m)
    _, ty_ref = run(ref)
    assert not fused_calls
    assert_close_to_ref(ty, ty_ref, name="ty with weight tangents")
