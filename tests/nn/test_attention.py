"""ttfm_kernels.nn.Attention: timm/DiT state_dict layout, forward equal to the eager block, fused JVP."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ttfm_kernels.nn import Attention
from ttfm_kernels.testing import assert_close_to_ref, assert_nontrivial


def _eager(module: Attention, x: torch.Tensor) -> torch.Tensor:
    """The timm Attention forward written out with plain torch ops and the module's own parameters."""
    b, n, c = x.shape
    q, k, v = module.qkv(x).reshape(b, n, 3, module.num_heads, c // module.num_heads).permute(2, 0, 3, 1, 4)
    if module.q_norm is not None:
        q = F.layer_norm(q, q.shape[-1:], module.q_norm.weight, module.q_norm.bias)
        k = F.layer_norm(k, k.shape[-1:], module.k_norm.weight, module.k_norm.bias)
    y = F.scaled_dot_product_attention(q, k, v)
    return module.proj(y.transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("qkv_bias,qk_norm", [(True, False), (False, True)])
def test_state_dict_keys_match_timm(qkv_bias, qk_norm):
    keys = set(Attention(32, 4, qkv_bias=qkv_bias, qk_norm=qk_norm).state_dict())
    expected = {"qkv.weight", "proj.weight", "proj.bias"} | ({"qkv.bias"} if qkv_bias else set())
    if qk_norm:
        expected |= {"q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias"}
    assert keys == expected


def test_bad_head_count():
    with pytest.raises(ValueError, match="num_heads"):
        Attention(30, 4)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_forward_and_jvp_match_the_eager_block(qk_norm):
    module = Attention(32, 4, qk_norm=qk_norm).double()
    if qk_norm:  # non-trivial norm parameters, so a dropped q_norm/k_norm would show
        torch.nn.init.normal_(module.q_norm.weight)
        torch.nn.init.normal_(module.k_norm.bias)
    x, tx = torch.randn(2, 2, 19, 32, dtype=torch.float64)
    torch.testing.assert_close(module(x), _eager(module, x))
    y, ty = torch.func.jvp(module, (x,), (tx,))
    with sdpa_kernel(SDPBackend.MATH):
        ref = torch.func.jvp(lambda z: _eager(module, z), (x,), (tx,))
    assert_nontrivial(ty)
    assert_close_to_ref(y, ref[0], name="y")
    assert_close_to_ref(ty, ref[1], name="ty")
    y, ty = module.forward_jvp(x, tx)  # the explicit-tangent route
    assert_close_to_ref(y, ref[0], name="y (forward_jvp)")
    assert_close_to_ref(ty, ref[1], name="ty (forward_jvp)")
    assert module.forward_jvp(x, None)[1] is None


def test_gradient_through_the_tangent_reaches_parameters():
    module = Attention(16, 2).double()
    x, tx = torch.randn(2, 1, 7, 16, dtype=torch.float64)
    with sdpa_kernel(SDPBackend.MATH):
        _, ty_ref = torch.func.jvp(lambda z: _eager(module, z), (x,), (tx,))
        ref = torch.autograd.grad(ty_ref.square().sum(), module.qkv.weight)[0]
    routes = {"func.jvp": torch.func.jvp(module, (x,), (tx,))[1], "forward_jvp": module.forward_jvp(x, tx)[1]}
    for route, ty in routes.items():
        got = torch.autograd.grad(ty.square().sum(), module.qkv.weight)[0]
        assert_nontrivial(got)
        assert_close_to_ref(got, ref, name=f"d|ty|^2/d qkv.weight ({route})")
