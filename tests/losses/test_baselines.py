"""LFMD, EMD, flow matching and PFMM (docs/math.md section 3) on the analytic case; LFMD's gradient through the JVP."""

import pytest
import torch

from tests.flow_models import DTYPE, TwoTimeNet
from ttfm_kernels import emd_loss, flow_matching_loss, jvp_t, lfmd_loss, progressive_loss

EXACT = 1e-26  # as in test_itvm: fp64 losses of exact models measure ~1e-32


def test_lfmd_and_emd_vanish_on_the_exact_map(gaussian):
    teacher, exact, perturbed, batch, x1 = gaussian
    for loss_fn in (lfmd_loss, emd_loss):
        assert float(loss_fn(exact, teacher, x1, **batch)[0]) < EXACT
        assert float(loss_fn(perturbed, teacher, x1, **batch)[0]) > 1e-4
    assert float(emd_loss(perturbed, teacher, x1, ema=exact, **batch)[0]) > 1e-4  # the student is still off
    assert float(emd_loss(exact, teacher, x1, ema=exact, **batch)[0]) < EXACT


def test_progressive_vanishes_on_the_exact_map(gaussian):
    _, exact, perturbed, batch, x1 = gaussian
    assert float(progressive_loss(exact, exact, x1, **batch)[0]) < EXACT
    assert float(progressive_loss(perturbed, perturbed, x1, **batch)[0]) > 1e-6


def test_flow_matching_is_minimised_by_the_exact_teacher(gaussian):
    """E |v(x_t, t) - (x1 - x0)|^2 is smallest at the exact v: a perturbed field scores strictly higher."""
    teacher, *_ = gaussian
    x1 = teacher.sample(4000)
    loss, _ = flow_matching_loss(teacher, x1)
    shifted = VelocityShift(teacher, 0.1)
    assert float(flow_matching_loss(shifted, x1)[0]) > float(loss) + 0.005  # + 0.1^2 in expectation
    x0, t = torch.randn_like(x1), torch.rand(4000, dtype=DTYPE)
    xt = (1 - t[:, None]) * x0 + t[:, None] * x1
    torch.testing.assert_close(flow_matching_loss(teacher, x1, x0=x0, t=t)[0],
                               (teacher(xt, t) - (x1 - x0)).square().mean())


class VelocityShift(torch.nn.Module):
    def __init__(self, teacher, shift):
        super().__init__()
        self.teacher, self.shift, self.sigma = teacher, shift, teacher.sigma

    def forward(self, x, t):
        return self.teacher(x, t) + self.shift


def _lfmd(student, teacher, x1, batch):
    return lfmd_loss(student, teacher, x1, **batch)[0]


def test_lfmd_create_graph_gradient_matches_finite_differences():
    """With a teacher independent of x, sg() changes nothing, so the LFMD gradient is the full derivative."""
    student = TwoTimeNet(3, hidden=8)
    teacher = TimeOnly()
    x1 = torch.randn(8, 3, dtype=DTYPE)
    s = torch.rand(8, dtype=DTYPE) * 0.5
    batch = {"x0": torch.randn_like(x1), "s": s, "t": s + 0.5 * torch.rand(8, dtype=DTYPE)}
    _lfmd(student, teacher, x1, batch).backward()
    params = list(student.net.parameters())
    direction = [torch.randn_like(p) for p in params]
    analytic = sum(float((p.grad * d).sum()) for p, d in zip(params, direction, strict=True))
    h, values = 1e-6, []
    with torch.no_grad():
        for sign in (1, -1):
            for p, d in zip(params, direction, strict=True):
                p.add_(sign * h * d)
            values.append(float(_lfmd(student, teacher, x1, batch)))
            for p, d in zip(params, direction, strict=True):
                p.sub_(sign * h * d)
    assert abs((values[0] - values[1]) / (2 * h) - analytic) < 1e-6 * max(1.0, abs(analytic))
    # the tangent path matters: dropping it (du detached) changes the gradient
    student.zero_grad()
    u, du = jvp_t(student, (1 - s[:, None]) * batch["x0"] + s[:, None] * x1, s, batch["t"], create_graph=True)
    r = u + (batch["t"] - s)[:, None] * du.detach() - teacher(u, batch["t"])
    r.square().mean().backward()
    detached = sum(float((p.grad * d).sum()) for p, d in zip(params, direction, strict=True))
    assert abs(detached - analytic) > 1e-3 * abs(analytic)


class TimeOnly(torch.nn.Module):
    """v(x, t) = (1 + t) * c, independent of x."""

    sigma = 1.0

    def forward(self, x, t):
        return (1 + t)[:, None] * torch.linspace(-1, 1, x.shape[1], dtype=x.dtype)


@pytest.mark.parametrize("loss_fn", [lfmd_loss, emd_loss, progressive_loss])
def test_reductions(gaussian, loss_fn):
    teacher, _, perturbed, batch, x1 = gaussian
    other = teacher if loss_fn is not progressive_loss else perturbed
    per = loss_fn(perturbed, other, x1, reduction="none", **batch)[0]
    assert per.shape == (x1.shape[0],)
    torch.testing.assert_close(loss_fn(perturbed, other, x1, **batch)[0], per.mean())
    w = torch.rand(x1.shape[0], dtype=DTYPE)
    torch.testing.assert_close(loss_fn(perturbed, other, x1, reduction="sum", weight=w, **batch)[0], (w * per).sum())


def test_emd_gradient_does_not_go_through_the_jvp():
    """With ema=None the target uses the student's own JVP, detached: the gradient is that of |u - const|^2."""
    student, teacher = TwoTimeNet(3, hidden=8), TimeOnly()
    x1, x0 = torch.randn(6, 3, dtype=DTYPE), torch.randn(6, 3, dtype=DTYPE)
    s = torch.rand(6, dtype=DTYPE) * 0.5
    t = s + 0.5 * torch.rand(6, dtype=DTYPE)
    emd_loss(student, teacher, x1, x0=x0, s=s, t=t)[0].backward()
    got = [p.grad.clone() for p in student.net.parameters()]
    student.zero_grad()
    xs = (1 - s[:, None]) * x0 + s[:, None] * x1
    v = teacher(xs, s)
    _, du = torch.func.jvp(lambda x, s_: student(x, s_, t), (xs, s), (v, torch.ones_like(s)))
    target = (v + (t - s)[:, None] * du).detach()
    (student(xs, s, t) - target).square().mean().backward()
    for g, p in zip(got, student.net.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)
