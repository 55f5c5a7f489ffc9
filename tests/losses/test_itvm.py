"""ITVM (docs/math.md section 2): exact on the analytic case, target rates in delta, gradient placement."""

import itertools

import pytest
import torch
from torch import nn

from tests.flow_models import DTYPE, TwoTimeNet, VelocityNet, gaussian_case
from ttfm_kernels import EMA, GuidedTeacher, TimeSampler, _ext, itvm_loss, jvp_t, sample
from ttfm_kernels.testing import assert_close_to_ref

EXACT = 1e-26  # fp64 losses of the exact map: ~1e-32 measured (squares of ~1e-16 rounding errors)


@pytest.mark.parametrize("terminal_init", [False, True])
def test_exact_map_has_zero_loss_and_perturbed_map_does_not(gaussian, terminal_init):
    teacher, exact, perturbed, batch, x1 = gaussian
    loss, stats = itvm_loss(exact, teacher, x1, terminal_init=terminal_init, **batch)
    assert 0 <= float(loss) < EXACT and stats["init"] < EXACT and stats["term"] < EXACT
    loss, stats = itvm_loss(perturbed, teacher, x1, terminal_init=terminal_init, **batch)
    assert float(loss) > 1e-4 and stats["init"] > 1e-4 and stats["term"] > 1e-5
    if terminal_init:
        assert stats["terminal_init"] > 1e-4


@pytest.mark.parametrize(("target", "order"), [("euler", 2), ("fd", 1)])
def test_derivative_free_targets_converge_at_their_rate(gaussian, target, order):
    """On the exact map the "euler" residual is O(delta^2), the "fd" residual O(delta): halving delta divides the
    residual by 2^order. The "euler" term carries the weight 1/delta, so its residual is sqrt(loss * delta)."""
    teacher, exact, _, batch, x1 = gaussian
    residual = []
    for delta in (0.04, 0.02, 0.01):
        loss, _ = itvm_loss(exact, teacher, x1, target=target, delta=delta, lambda_init=0.0, **batch)
        residual.append((float(loss) * (delta if target == "euler" else 1.0)) ** 0.5)
    assert residual[-1] > 1e-6  # not exact: the rate is real
    for coarse, fine in itertools.pairwise(residual):
        assert 2**order * 0.85 < coarse / fine < 2**order * 1.15, residual


def _grads(student, teacher, x1, **kwargs):
    student.zero_grad()
    loss, _ = itvm_loss(student, teacher, x1, **kwargs)
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in student.net.parameters()])


def test_fd_and_euler_converge_to_jvp_with_ema_equal_to_student():
    """ema = student: "fd" loss and gradient -> "jvp", the 1/delta-weighted "euler" gradient too, error O(delta)."""
    student, teacher = TwoTimeNet(3), VelocityNet(3)
    x1 = torch.randn(16, 3, dtype=DTYPE)
    s = torch.rand(16, dtype=DTYPE) * 0.5
    batch = {"x0": torch.randn_like(x1), "s": s, "t": s + 0.5 * torch.rand(16, dtype=DTYPE)}
    loss_jvp, grad_jvp = _grads(student, teacher, x1, **batch)
    for target in ("fd", "euler"):
        errors = []
        for delta in (1e-2, 5e-3):
            loss, grad = _grads(student, teacher, x1, target=target, delta=delta, **batch)
            errors.append(float((grad - grad_jvp).norm() / grad_jvp.norm()))
            if target == "fd":
                assert abs(float(loss - loss_jvp)) < 0.05 * float(loss_jvp)
        assert errors[1] < 0.02 and 1.6 < errors[0] / errors[1] < 2.4, (target, errors)


class _Recorder(nn.Module):
    """Wraps a student and keeps the gradient of its (batched) output."""

    def __init__(self, model):
        super().__init__()
        self.model, self.sigma = model, model.sigma

    def forward(self, x, s, t):
        self.out = self.model(x, s, t)
        self.out.retain_grad()
        return self.out


@pytest.mark.parametrize("weighted", [False, True])
def test_gradient_flows_only_through_the_student_forwards(weighted):
    """d loss / d u = 2 lambda w r / (B D) on each half of the batched student call; EMA and teacher get none."""
    n, d, lam_i, lam_t = 6, 3, 0.7, 1.3
    student, ema, teacher = _Recorder(TwoTimeNet(d)), TwoTimeNet(d), VelocityNet(d)
    x1, x0 = torch.randn(n, d, dtype=DTYPE), torch.randn(n, d, dtype=DTYPE)
    s = torch.rand(n, dtype=DTYPE) * 0.5
    t = s + 0.5 * torch.rand(n, dtype=DTYPE)
    w = torch.rand(n, dtype=DTYPE) + 0.5 if weighted else None
    loss, _ = itvm_loss(student, teacher, x1, ema=ema, x0=x0, s=s, t=t, weight=w, lambda_init=lam_i,
                        lambda_term=lam_t)
    loss.backward()
    xs = (1 - s[:, None]) * x0 + s[:, None] * x1
    with torch.no_grad():
        u_ema, du_ema = torch.func.jvp(lambda tt: ema(xs, s, tt), (t,), (torch.ones_like(t),))
        target = teacher(xs + (t - s)[:, None] * u_ema, t) - (t - s)[:, None] * du_ema
        r_t = student.model(xs, s, t) - target
        r_i = student.model(xs, s, s) - teacher(xs, s)
    scale = (w if weighted else torch.ones(n, dtype=DTYPE))[:, None] * 2 / (n * d)
    g_st, g_ss = student.out.grad.chunk(2)
    torch.testing.assert_close(g_st, lam_t * scale * r_t, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(g_ss, lam_i * scale * r_i, rtol=1e-10, atol=1e-14)
    assert all(p.grad is None for p in [*ema.parameters(), *teacher.parameters()])
    assert jvp_t(ema, xs, s, t)[1].abs().sum() > 0


def test_one_batched_student_call_and_one_batched_teacher_call():
    student, ema, teacher = TwoTimeNet(3), TwoTimeNet(3), VelocityNet(3)
    y = torch.tensor([0, 1, 2, 3])
    itvm_loss(student, teacher, torch.randn(4, 3, dtype=DTYPE), ema=ema, cond={"y": y}, target="fd")
    for model in (student, ema, teacher):
        assert len(model.calls) == 1 and torch.equal(model.calls[0], torch.cat([y, y])), model.calls


@pytest.mark.parametrize(("target", "terminal_init"), [("jvp", False), ("euler", True), ("fd", False),
                                                         ("jvp", True)])
def test_reductions_and_weights(gaussian, target, terminal_init):
    teacher, _, perturbed, batch, x1 = gaussian
    kwargs = {"target": target, "terminal_init": terminal_init, **batch}
    per = itvm_loss(perturbed, teacher, x1, reduction="none", **kwargs)[0]
    assert per.shape == (x1.shape[0],) and (per > 0).all()
    mean = itvm_loss(perturbed, teacher, x1, **kwargs)[0]
    total = itvm_loss(perturbed, teacher, x1, reduction="sum", **kwargs)[0]
    torch.testing.assert_close(mean, per.mean())
    torch.testing.assert_close(total, per.sum())
    w = torch.rand(x1.shape[0], dtype=DTYPE)
    weighted = itvm_loss(perturbed, teacher, x1, weight=w, **kwargs)[0]
    torch.testing.assert_close(weighted, (w * per).mean())


def test_terminal_init_adds_the_initial_term_at_the_endpoint(gaussian):
    teacher, _, perturbed, batch, x1 = gaussian
    base = itvm_loss(perturbed, teacher, x1, reduction="none", **batch)[0]
    extra = itvm_loss(perturbed, teacher, x1, reduction="none", terminal_init=True, lambda_init=0.5,
                      **batch)[0] - itvm_loss(perturbed, teacher, x1, reduction="none", lambda_init=0.5,
                                              **batch)[0]
    s, t = batch["s"], batch["t"]
    with torch.no_grad():
        xs = (1 - s[:, None]) * batch["x0"] + s[:, None] * x1
        y = xs + (t - s)[:, None] * perturbed(xs, s, t)
        expected = 0.5 * (perturbed(y, t, t) - teacher(y, t)).square().mean(dim=1)
    torch.testing.assert_close(extra, expected)
    assert (base > 0).all()


def test_public_pieces_compose_with_ema_and_guidance():
    """EMA(student) right after construction is the student; a GuidedTeacher sees the labels; training steps run."""
    student, teacher = TwoTimeNet(3), VelocityNet(3)
    guided = GuidedTeacher(teacher, 2.0, {"y": torch.tensor([0])})
    ema = EMA(student, decay=0.9)
    x1, y = torch.randn(4, 3, dtype=DTYPE), torch.tensor([1, 2, 3, 1])
    s = torch.rand(4, dtype=DTYPE) * 0.5
    batch = {"x0": torch.randn_like(x1), "s": s, "t": s + 0.3, "cond": {"y": y}}
    torch.testing.assert_close(itvm_loss(student, guided, x1, ema=ema, **batch)[0],
                               itvm_loss(student, guided, x1, **batch)[0])
    assert any(seen is not None and seen.eq(0).all() for seen in teacher.calls)  # the null label
    assert any(seen is not None and torch.equal(seen, torch.cat([y, y])) for seen in teacher.calls)
    loss, _ = itvm_loss(student, guided, x1, ema=ema, **batch)
    loss.backward()
    ema.update(student)
    assert sample(ema, torch.randn(4, 3, dtype=DTYPE), steps=2, y=y).shape == (4, 3)


def test_training_on_the_analytic_case_reduces_the_loss():
    """A few Adam steps of ITVM ("jvp", EMA target) on the Gaussian teacher: the loss falls by half at least."""
    teacher, _ = gaussian_case()
    student = TwoTimeNet(3, hidden=32)
    ema = EMA(student, decay=0.9)
    opt = torch.optim.Adam(student.parameters(), lr=2e-2)
    x1 = teacher.sample(256)
    eval_batch = {"x0": torch.randn_like(x1), **dict(zip("st", TimeSampler()(256, dtype=DTYPE), strict=True))}
    start = float(itvm_loss(student, teacher, x1, **eval_batch)[0])
    for _ in range(40):
        loss, _ = itvm_loss(student, teacher, teacher.sample(64), ema=ema)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(student)
    end = float(itvm_loss(student, teacher, x1, **eval_batch)[0])
    assert end < 0.5 * start, (start, end)


@pytest.mark.skipif(not _ext.has_kernel("itvm_residual_loss_fwd", "CPU"), reason="compiled CPU kernel not built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("target", ["jvp", "euler", "fd"])
def test_compiled_residual_backend_matches_the_reference(target, dtype):
    """itvm_loss through the C++ residual kernel (value and student gradient) equals the reference path."""
    student, teacher = TwoTimeNet(3).to(dtype), VelocityNet(3).to(dtype)
    x1 = torch.randn(8, 3, dtype=dtype)
    s = torch.rand(8, dtype=dtype) * 0.5
    batch = {"x0": torch.randn_like(x1), "s": s, "t": s + 0.4, "weight": torch.rand(8, dtype=dtype),
             "target": target, "terminal_init": target == "fd"}
    results = []
    for backend in ("reference", "cpu"):
        student.zero_grad()
        loss, _ = itvm_loss(student, teacher, x1, backend=backend, **batch)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in student.net.parameters()]))
    assert_close_to_ref(results[1][0], results[0][0], name="loss")
    for got, ref in zip(results[1][1], results[0][1], strict=True):
        assert_close_to_ref(got, ref, name="gradient")
