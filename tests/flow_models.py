"""Small models for the loss, flow and JVP tests (float64 throughout).

The analytic case: data N(mu, diag(sd^2)) from the base N(0, sigma^2 I) under x_t = (1 - t) x0 + t x1. Per dim
the marginal is N(t mu, a_t^2) with a_t^2 = (1 - t)^2 sigma^2 + t^2 sd^2, and the probability-flow ODE is the
monotone affine transport between these Gaussians:
    X_{s,t}(x) = t mu + (a_t / a_s) (x - s mu),   v(x, t) = mu + (a_t' / a_t) (x - t mu),
    a_t' a_t = t sd^2 - (1 - t) sigma^2.
(At t = 0: v(x, 0) = mu - x = E[x1 - x0 | x0 = x], as flow matching requires.) The average velocity
u = (X_{s,t}(x) - x) / (t - s) = mu + (g(s, t) / a_s) (x - s mu) with
    g(s, t) = (a_t - a_s) / (t - s) = (a_t^2 - a_s^2) / ((t - s)(a_t + a_s))
            = [sigma^2 (t + s - 2) + sd^2 (t + s)] / (a_t + a_s),
smooth through t = s, where g = a_s' (so u(x, s, s) = v(x, s)).
"""

from __future__ import annotations

import torch
from torch import nn

DTYPE = torch.float64


def _col(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *[1] * (x.dim() - 1))


class Gaussian(nn.Module):
    """Holds mu, sd (per dim) and sigma; ``a(t)`` is the marginal's standard deviation."""

    def __init__(self, mu: torch.Tensor, sd: torch.Tensor, sigma: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("mu", mu.to(DTYPE))
        self.register_buffer("sd", sd.to(DTYPE))
        self.sigma = sigma

    def a(self, t: torch.Tensor) -> torch.Tensor:
        return ((1 - t) ** 2 * self.sigma**2 + t**2 * self.sd**2).sqrt()

    def sample(self, n: int) -> torch.Tensor:
        return self.mu + self.sd * torch.randn(n, self.mu.numel(), dtype=DTYPE)


class GaussianTeacher(Gaussian):
    """The exact velocity v(x, t) of the analytic case."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = _col(t, x)
        k = (t * self.sd**2 - (1 - t) * self.sigma**2) / self.a(t) ** 2
        return self.mu + k * (x - t * self.mu)


class GaussianFlowMap(Gaussian):
    """The exact average velocity u(x, s, t) of the analytic case, plus ``alpha * (0.5 + t - s) * tanh(x)``
    (a learnable per-dim perturbation, zero by default)."""

    def __init__(self, mu: torch.Tensor, sd: torch.Tensor, sigma: float = 1.0, perturb: float = 0.0) -> None:
        super().__init__(mu, sd, sigma)
        self.alpha = nn.Parameter(torch.full_like(self.mu, perturb))

    def forward(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s, t = _col(s, x), _col(t, x)
        a_s = self.a(s)
        g = (self.sigma**2 * (t + s - 2) + self.sd**2 * (t + s)) / (self.a(t) + a_s)
        return self.mu + g / a_s * (x - s * self.mu) + self.alpha * (0.5 + t - s) * torch.tanh(x)


def gaussian_case(dim: int = 3, sigma: float = 1.0, perturb: float = 0.0):
    """(teacher, exact or perturbed flow map) of one random analytic case."""
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(dim, generator=g, dtype=DTYPE)
    sd = 0.5 + torch.rand(dim, generator=g, dtype=DTYPE)
    return GaussianTeacher(mu, sd, sigma), GaussianFlowMap(mu, sd, sigma, perturb)


class TwoTimeNet(nn.Module):
    """A small nonlinear u(x, s, t, y=None): an MLP of (x, s, t - s), plus a class embedding when ``y`` is given.

    Records the conditioning of every call in ``calls``."""

    def __init__(self, dim: int = 3, hidden: int = 16, classes: int = 4, sigma: float = 1.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 2, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, dim)).to(DTYPE)
        self.embed = nn.Embedding(classes, hidden).to(DTYPE)
        self.sigma = sigma
        self.calls: list[object] = []

    def forward(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        self.calls.append(y)
        h = self.net[0](torch.cat([x, s[:, None].to(x.dtype), (t - s)[:, None].to(x.dtype)], dim=1))
        if y is not None:
            h = h + self.embed(y)
        return self.net[1:](h)


class VelocityNet(nn.Module):
    """A small nonlinear v(x, t, y=None), recording its conditioning like ``TwoTimeNet``."""

    def __init__(self, dim: int = 3, hidden: int = 16, classes: int = 4, sigma: float = 1.0) -> None:
        super().__init__()
        self.inner = TwoTimeNet(dim, hidden, classes, sigma)
        self.sigma = sigma
        self.calls = self.inner.calls

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner(x, t, t, y)
