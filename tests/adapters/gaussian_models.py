"""Fake models in diffusers' calling style, ``model(sample, timestep, return_dict=True)``, that return the exact
predictions of their convention for Gaussian data x1 ~ N(m, diag(c^2)) (float64), and diffusers' VP schedules.

For x = a x1 + b eps (eps ~ N(0, I)) the posterior means per dim are closed-form:
    E[x1 | x] = m + a c^2 (x - a m) / (a^2 c^2 + b^2),     E[eps | x] = b (x - a m) / (a^2 c^2 + b^2).
Each convention is one choice of (a, b) and of the predicted combination; nothing here uses the adapter's code.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import nn

DTYPE = torch.float64


def posterior(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: torch.Tensor, c: torch.Tensor):
    """(E[x1 | x], E[eps | x]) for x = a x1 + b eps; a, b: (B,)."""
    a, b = a[:, None], b[:, None]
    z = (x - a * m) / (a**2 * c**2 + b**2)
    return m + a * c**2 * z, b * z


def schedule(name: str, steps: int = 1000) -> torch.Tensor:
    """diffusers' ``alphas_cumprod`` for beta_schedule ``name`` ("linear", "scaled_linear", "squaredcos_cap_v2"),
    written out from diffusers' DDPMScheduler defaults (beta_start 1e-4 / 8.5e-4, beta_end 0.02 / 0.012)."""
    if name == "linear":
        betas = torch.linspace(1e-4, 0.02, steps, dtype=DTYPE)
    elif name == "scaled_linear":
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, steps, dtype=DTYPE) ** 2
    else:
        def f(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.tensor([min(1 - f((i + 1) / steps) / f(i / steps), 0.999) for i in range(steps)], dtype=DTYPE)
    return torch.cumprod(1 - betas, dim=0)


class _Fake(nn.Module):
    """Holds m, c; ``forward`` wraps the prediction like diffusers: ``.sample``, or a 1-tuple when
    ``return_dict=False``."""

    def __init__(self, m: torch.Tensor, c: torch.Tensor) -> None:
        super().__init__()
        self.m, self.c = m, c
        self.timesteps: list[torch.Tensor] = []

    def predict(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, return_dict: bool = True):
        self.timesteps.append(timestep)
        out = self.predict(sample, timestep)
        return SimpleNamespace(sample=out) if return_dict else (out,)


class FakeVelocity(_Fake):
    """This library's v at t = timestep / 1000: x = t x1 + (1 - t) eps, prediction E[x1] - E[eps]."""

    def predict(self, x, timestep):
        t = timestep / 1000
        x1, eps = posterior(x, t, 1 - t, self.m, self.c)
        return x1 - eps


class FakeFlow(_Fake):
    """diffusers flow matching: sigma_d = timestep / 1000, x = (1 - sigma_d) x1 + sigma_d eps, predicts eps - x1."""

    def predict(self, x, timestep):
        sd = timestep / 1000
        x1, eps = posterior(x, 1 - sd, sd, self.m, self.c)
        return eps - x1


class FakeVP(_Fake):
    """A VP model with table ``abar``: x_tau = alpha x1 + sigma_v eps, predicting ``kind`` ("epsilon",
    "v_prediction" = alpha eps - sigma_v x1, or "sample").

    ``on_table=True``: the timestep must be an integer (to 1e-9) and alpha = sqrt(abar[tau]) is read off the
    table. Otherwise the schedule between entries is the stated interpolation: library time t_tau =
    alpha / (alpha + sigma_v) linear in tau, alpha = t / sqrt(t^2 + (1 - t)^2)."""

    def __init__(self, m, c, abar: torch.Tensor, kind: str, on_table: bool) -> None:
        super().__init__(m, c)
        self.abar, self.kind, self.on_table = abar, kind, on_table

    def alpha_sigma(self, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.on_table:
            index = tau.round()
            assert (tau - index).abs().max() < 1e-9, tau
            abar = self.abar[index.long()]
            return abar.sqrt(), (1 - abar).sqrt()
        tt = self.abar.sqrt() / (self.abar.sqrt() + (1 - self.abar).sqrt())
        lo = tau.floor().long().clamp(0, len(tt) - 2)
        t = tt[lo] + (tau - lo) * (tt[lo + 1] - tt[lo])
        norm = (t**2 + (1 - t) ** 2).sqrt()
        return t / norm, (1 - t) / norm

    def predict(self, x, timestep):
        alpha, sigma_v = self.alpha_sigma(timestep)
        x1, eps = posterior(x, alpha, sigma_v, self.m, self.c)
        if self.kind == "epsilon":
            return eps
        if self.kind == "sample":
            return x1
        return alpha[:, None] * eps - sigma_v[:, None] * x1


def gaussian_data(dim: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, c) of one random Gaussian case."""
    g = torch.Generator().manual_seed(7)
    return torch.randn(dim, generator=g, dtype=DTYPE), 0.4 + torch.rand(dim, generator=g, dtype=DTYPE)
