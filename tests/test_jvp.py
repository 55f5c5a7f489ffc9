"""jvp_t / jvp_sx: central finite differences in float64, the forward_jvp route, graphs, fused SDPA, the advice."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from tests.flow_models import DTYPE, TwoTimeNet
from ttfm_kernels import jvp_sx, jvp_t
from ttfm_kernels.testing import assert_close_to_ref, assert_nontrivial

B, D, H = 5, 3, 1e-5


def _inputs():
    x = torch.randn(B, D, dtype=DTYPE)
    s = torch.rand(B, dtype=DTYPE) * 0.5
    return x, s, s + torch.rand(B, dtype=DTYPE) * 0.5


def test_jvp_t_matches_central_differences():
    model, (x, s, t) = TwoTimeNet(D), _inputs()
    y = torch.randint(0, 4, (B,))
    u, du = jvp_t(model, x, s, t, y=y)
    fd = (model(x, s, t + H, y=y) - model(x, s, t - H, y=y)) / (2 * H)
    assert_close_to_ref(u, model(x, s, t, y=y), name="u")
    assert_nontrivial(du, "du/dt")
    torch.testing.assert_close(du, fd, rtol=1e-7, atol=1e-8)  # central differences: O(H^2) = 1e-10 error


def test_jvp_sx_matches_central_differences():
    model, (x, s, t) = TwoTimeNet(D), _inputs()
    v = torch.randn(B, D, dtype=DTYPE)
    u, du = jvp_sx(model, x, s, t, v)
    fd = (model(x + H * v, s + H, t) - model(x - H * v, s - H, t)) / (2 * H)
    assert_close_to_ref(u, model(x, s, t), name="u")
    assert_nontrivial(du, "du")
    torch.testing.assert_close(du, fd, rtol=1e-7, atol=1e-8)


def test_create_graph_controls_the_graph():
    model, (x, s, t) = TwoTimeNet(D), _inputs()
    u, du = jvp_t(model, x, s, t)
    assert not u.requires_grad and not du.requires_grad
    u, du = jvp_t(model, x, s, t, create_graph=True)
    assert u.requires_grad and du.requires_grad
    grads = torch.autograd.grad(du.square().sum(), [model.net[0].weight])
    assert_nontrivial(grads[0], "gradient through the tangent")


class _ExplicitTangent(nn.Module):
    """u = x * t + s with an explicit tangent pass that records the tangents it was given."""

    def forward(self, x, s, t):
        return x * t[:, None] + s[:, None]

    def forward_jvp(self, x, s, t, *, tx=None, ts=None, tt=None):
        self.seen = (tx, ts, tt)
        du = torch.zeros_like(x)
        if tx is not None:
            du = du + tx * t[:, None]
        if ts is not None:
            du = du + ts[:, None]
        if tt is not None:
            du = du + x * tt[:, None]
        return self(x, s, t), du


def test_forward_jvp_is_used_with_the_right_tangents():
    model, (x, s, t) = _ExplicitTangent(), _inputs()
    _, du = jvp_t(model, x, s, t)
    tx, ts, tt = model.seen
    assert tx is None and ts is None and torch.equal(tt, torch.ones_like(t))
    torch.testing.assert_close(du, x)
    v = torch.randn_like(x)
    _, du = jvp_sx(model, x, s, t, v)
    tx, ts, tt = model.seen
    assert tx is v and torch.equal(ts, torch.ones_like(s)) and tt is None
    torch.testing.assert_close(du, v * t[:, None] + 1)


class _SdpaModel(nn.Module):
    def forward(self, x, s, t):
        q = (x * t[:, None]).view(x.shape[0], 1, 1, -1)
        return F.scaled_dot_product_attention(q, q, q).view_as(x)


def test_sdpa_model_takes_the_fused_attention_jvp(spy):
    import ttfm_kernels.ops.attention.function as attention_fn

    calls = spy(attention_fn, "_fused_forward")
    x, s, t = _inputs()
    model = _SdpaModel()
    u, du = jvp_t(model, x, s, t)
    with sdpa_kernel(SDPBackend.MATH):
        ref = torch.func.jvp(lambda t: model(x, s, t), (t,), (torch.ones_like(t),))
    assert calls, "jvp_t did not reach the fused attention JVP"
    torch.testing.assert_close(u, ref[0])
    torch.testing.assert_close(du, ref[1])
    assert du.ne(0).any()


class _NoForwardAD(nn.Module):
    def forward(self, x, s, t):
        raise NotImplementedError("Trying to use forward AD with some_op that does not support it")


def test_missing_forward_ad_gets_advice():
    x, s, t = _inputs()
    with pytest.raises(NotImplementedError, match="forward_jvp"):
        jvp_t(_NoForwardAD(), x, s, t)


def test_bad_times_are_named():
    model, (x, s, t) = TwoTimeNet(D), _inputs()
    with pytest.raises(ValueError, match="s must have shape"):
        jvp_t(model, x, s[:-1], t)
    with pytest.raises(ValueError, match="v has shape"):
        jvp_sx(model, x, s, t, x[:-1])
