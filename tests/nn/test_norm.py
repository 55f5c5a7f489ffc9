"""ModulatedLayerNorm / ModulatedGroupNorm against nn.LayerNorm / nn.GroupNorm + modulation + SiLU."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from ttfm_kernels.nn import ModulatedGroupNorm, ModulatedLayerNorm
from ttfm_kernels.testing import assert_close_to_ref, assert_nontrivial

CASES = [
    pytest.param(lambda: ModulatedLayerNorm(24), lambda: nn.LayerNorm(24), (3, 5, 24), id="layer"),
    pytest.param(lambda: ModulatedGroupNorm(4, 8), lambda: nn.GroupNorm(4, 8), (3, 8, 4, 5), id="group"),
]


def _film(ref: nn.Module, x, scale, shift, activation="silu"):
    view = (lambda p: p[:, None]) if isinstance(ref, nn.LayerNorm) else (lambda p: p[:, :, None, None])
    y = ref(x) * (1 + view(scale)) + view(shift)
    return F.silu(y) if activation == "silu" else y


def _randomize(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))


@pytest.mark.parametrize(("make", "make_ref", "shape"), CASES)
def test_matches_torch_modules_forward_and_jvp(make, make_ref, shape):
    m, ref = make(), make_ref()
    _randomize(ref)
    assert set(m.state_dict()) == set(ref.state_dict()) == {"weight", "bias"}
    m.load_state_dict(ref.state_dict())
    x = torch.randn(shape) + 1
    channels = m.weight.shape[0]
    scale, shift = torch.randn(shape[0], channels), torch.randn(shape[0], channels)
    tangents = (torch.randn(shape), torch.randn(shape[0], channels), torch.randn(shape[0], channels))
    y, ty = torch.func.jvp(m, (x, scale, shift), tangents)
    y_ref, ty_ref = torch.func.jvp(lambda *a: _film(ref, *a), (x, scale, shift), tangents)
    assert_close_to_ref(y, y_ref, name="y")
    assert_close_to_ref(ty, ty_ref, name="ty")
    assert_nontrivial(ty)
    y2, ty2 = m.forward_jvp(x, scale, shift, tx=tangents[0], tscale=tangents[1], tshift=tangents[2])
    assert_close_to_ref(y2, y_ref, name="forward_jvp y")
    assert_close_to_ref(ty2, ty_ref, name="forward_jvp ty")
    with fwAD.dual_level():
        out = m(fwAD.make_dual(x, tangents[0]), scale, shift)
        y3, ty3 = fwAD.unpack_dual(out)
    _, ty3_ref = torch.func.jvp(lambda a: _film(ref, a, scale, shift), (x,), (tangents[0],))
    assert_close_to_ref(ty3, ty3_ref, name="forward_ad ty (x tangent only)")
    assert_close_to_ref(y3, y_ref, name="forward_ad y")


@pytest.mark.parametrize(("make", "make_ref", "shape"), CASES)
def test_plain_forward_backward_and_options(make, make_ref, shape):
    m, ref = make(), make_ref()
    _randomize(ref)
    m.load_state_dict(ref.state_dict())
    x = torch.randn(shape, requires_grad=True)
    scale = torch.randn(shape[0], m.weight.shape[0])
    m(x, scale).sum().backward()
    gx, gw = x.grad.clone(), m.weight.grad.clone()
    x.grad = None
    _film(ref, x, scale, torch.zeros_like(scale)).sum().backward()
    assert_close_to_ref(gx, x.grad, name="x.grad")
    assert_close_to_ref(gw, ref.weight.grad, name="weight.grad")
    m.activation = None
    with torch.no_grad():
        assert_close_to_ref(m(x), ref(x), name="no modulation, no activation")


def test_constructor_options_and_errors():
    assert ModulatedLayerNorm(8, elementwise_affine=False).weight is None
    assert ModulatedLayerNorm(8, bias=False).bias is None
    assert ModulatedGroupNorm(2, 8, affine=False, activation=None).weight is None
    assert ModulatedGroupNorm(2, 8, dtype=torch.float64).weight.dtype == torch.float64
    with pytest.raises(ValueError, match="num_groups=3 must divide num_channels=8"):
        ModulatedGroupNorm(3, 8)
    with pytest.raises(ValueError, match="activation must be 'silu' or None"):
        ModulatedLayerNorm(8, activation="relu")


def test_explicit_tangent_api_under_torch_compile():
    """forward_jvp (the compile-safe route) traces with torch.compile and matches eager."""
    m = ModulatedGroupNorm(2, 4)
    x, tx, scale = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.randn(2, 4)
    compiled = torch.compile(lambda a, ta: m.forward_jvp(a, scale, scale, tx=ta), backend="aot_eager")
    (y, ty), (y_ref, ty_ref) = compiled(x, tx), m.forward_jvp(x, scale, scale, tx=tx)
    assert_close_to_ref(y, y_ref, name="compiled y")
    assert_close_to_ref(ty, ty_ref, name="compiled ty")
    assert_nontrivial(ty)
