"""models.MLP / models.TwoTimeMLP and the time embeddings."""

import math

import pytest
import torch

from ttfm_kernels.models import MLP, TwoTimeMLP, sinusoidal_embedding
from ttfm_kernels.testing import assert_nontrivial


def test_sinusoidal_embedding_values_and_t_derivative():
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    emb = sinusoidal_embedding(t, 6, scale=10.0, max_period=100.0)
    freqs = torch.tensor([1.0, 100.0 ** (-1 / 3), 100.0 ** (-2 / 3)], dtype=torch.float64)
    args = 10.0 * t[:, None] * freqs
    torch.testing.assert_close(emb, torch.cat([args.cos(), args.sin()], dim=1))
    # forward-mode tangent in t: d/dt [cos, sin](w t) = w [-sin, cos](w t)
    _, d = torch.func.jvp(lambda tt: sinusoidal_embedding(tt, 6, scale=10.0, max_period=100.0), (t,),
                          (torch.ones_like(t),))
    w = 10.0 * freqs
    torch.testing.assert_close(d, torch.cat([-w * args.sin(), w * args.cos()], dim=1))
    assert sinusoidal_embedding(t, 7).shape == (3, 7)


@pytest.mark.parametrize("bad, match", [(torch.zeros(2, 2), "shape"), (torch.zeros(2, dtype=torch.long), "floating")])
def test_sinusoidal_embedding_rejects_bad_times(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        sinusoidal_embedding(bad, 8)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_presets_shapes_and_sigma(preset):
    v = MLP.from_preset(preset, sigma=0.5)
    u = TwoTimeMLP.from_preset(preset, dim=3)
    assert v.sigma == 0.5 and u.sigma == 1.0
    assert v(torch.randn(4, 2), torch.rand(4)).shape == (4, 2)
    assert u(torch.randn(4, 3), torch.rand(4), torch.rand(4)).shape == (4, 3)
    with pytest.raises(ValueError, match="unknown preset"):
        MLP.from_preset("huge")


def test_bad_call_shapes_are_named():
    u = TwoTimeMLP.from_preset("tiny")
    with pytest.raises(ValueError, match="x must have shape"):
        u(torch.randn(4, 3), torch.rand(4), torch.rand(4))
    with pytest.raises(ValueError, match=r"t must be a floating tensor of shape \(B,\)"):
        u(torch.randn(4, 2), torch.rand(4), torch.rand(3))


def test_from_teacher_starts_equal_and_learns_a_t_tangent():
    teacher = MLP.from_preset("tiny", sigma=0.7).double()
    student = TwoTimeMLP.from_teacher(teacher)
    assert student.sigma == 0.7 and next(student.parameters()).dtype == torch.float64
    x = torch.randn(8, 2, dtype=torch.float64)
    s, t = torch.rand(8, dtype=torch.float64), torch.rand(8, dtype=torch.float64)
    torch.testing.assert_close(student(x, s, t), teacher(x, s), rtol=0, atol=0)
    # The t-tangent enters only through the (t - s) branch, zeroed at the start; its gradient is not zero, so a
    # loss on du/dt (LFMD) can move it.
    u, du = torch.func.jvp(lambda tt: student(x, s, tt), (t,), (torch.ones_like(t),))
    assert du.abs().max() == 0
    (u.detach() * du).sum().backward()
    last = student.time_embed.d_embed.mlp[-1]
    assert last.weight.grad is not None and last.weight.grad.abs().max() > 0
    with torch.no_grad():
        last.weight.normal_(0, 0.1)
    _, du3 = torch.func.jvp(lambda tt: student(x, s, tt), (t,), (torch.ones_like(t),))
    assert_nontrivial(du3)
    # X_{s,s}(x) = x for any weights: u is finite at t = s and the map is x + 0 * u
    assert math.isfinite(float(student(x, s, s).detach().sum()))
    with pytest.raises(TypeError, match="teacher must be"):
        TwoTimeMLP.from_teacher(student)
