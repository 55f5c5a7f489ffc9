"""MLP teacher v(x, t) and two-time MLP student u(x, s, t) for low-dimensional data (the 2D demo).

Both share one body: ``h = in_proj(x) + cond``, then ``depth`` residual blocks ``h = h + Linear(SiLU(h))``,
then ``out_proj(SiLU(h))``. The teacher's cond is ``TimeEmbedding(t)``; the student's is
``TwoTimeEmbedding(s, t)`` (embeddings of s and of t - s). ``TwoTimeMLP.from_teacher(teacher)`` copies the
teacher so that u(x, s, t) == v(x, s) exactly at the start of distillation.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import nn

from ttfm_kernels._checks import check_model_input
from ttfm_kernels.models.embeddings import TimeEmbedding, TwoTimeEmbedding

__all__ = ["MLP", "TwoTimeMLP"]


class _MLPBody(nn.Module):
    def __init__(self, dim: int, hidden: int, depth: int):
        super().__init__()
        self.in_proj = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out_proj = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.in_proj(x) + cond
        for block in self.blocks:
            h = h + block(nn.functional.silu(h))
        return self.out_proj(nn.functional.silu(h))


class _MLPBase(nn.Module):
    """The constructor, ``config`` and ``from_preset`` shared by both classes; they differ only in ``EMBEDDING``
    (the time conditioning) and ``forward``."""

    EMBEDDING: ClassVar[type[nn.Module]]

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"hidden": 64, "depth": 2, "freq_dim": 16},
        "small": {"hidden": 256, "depth": 3, "freq_dim": 32},
        "base": {"hidden": 512, "depth": 4, "freq_dim": 64},
    }
    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 3, freq_dim: int = 32, *,
                 time_scale: float = 1.0, max_period: float = 1000.0, sigma: float = 1.0):
        super().__init__()
        self.config = {"dim": dim, "hidden": hidden, "depth": depth, "freq_dim": freq_dim,
                       "time_scale": time_scale, "max_period": max_period, "sigma": sigma}
        self.dim, self.sigma = dim, float(sigma)
        self.time_embed = self.EMBEDDING(hidden, freq_dim, scale=time_scale, max_period=max_period)
        self.body = _MLPBody(dim, hidden, depth)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any):
        """Build from a named size ("tiny", "small", "base"); ``overrides`` replace any constructor argument
        (``dim`` defaults to 2)."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(cls.PRESETS)}")
        kwargs = {"dim": 2, **cls.PRESETS[name], **overrides}
        return cls(**kwargs)


class MLP(_MLPBase):
    """Flow-matching teacher v(x, t) for points in R^dim.

    x: (B, dim) floating, t: (B,) floating in [0, 1] -> (B, dim). ``sigma`` is the noise scale of x0 ~ N(0,
    sigma^2 I) it was (or will be) trained with (docs/math.md section 1). ``time_scale`` multiplies t inside the
    sinusoidal embedding (frequencies from time_scale down to time_scale / max_period). The default 1.0 keeps
    d/dt of the embedding small: on the 2D demo, students built with time_scale 10 or 100 made the ITVM "jvp"
    and EMD targets (which contain (t - s) du/dt of a stop-gradient copy) grow without bound within a few
    hundred steps, while time_scale 1 trained stably with the same teacher loss.
    """

    EMBEDDING = TimeEmbedding

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        check_model_input(x, (self.dim,), t=t)
        return self.body(x, self.time_embed(t))


class TwoTimeMLP(_MLPBase):
    """Two-time flow-map student u(x, s, t) (X_{s,t}(x) = x + (t - s) u), same arguments as ``MLP``.

    x: (B, dim), s and t: (B,) floating -> (B, dim). Conditioning embeds s and (t - s).
    """

    EMBEDDING = TwoTimeEmbedding

    def forward(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        check_model_input(x, (self.dim,), s=s, t=t)
        return self.body(x, self.time_embed(s, t))

    @classmethod
    def from_teacher(cls, teacher: MLP) -> TwoTimeMLP:
        """A student with the teacher's architecture, sigma, dtype and device, such that u(x, s, t) == v(x, s)."""
        if not isinstance(teacher, MLP):
            raise TypeError(f"teacher must be a models.MLP, got {type(teacher).__name__}")
        ref = next(teacher.parameters())
        student = cls(**teacher.config).to(device=ref.device, dtype=ref.dtype)
        student.body.load_state_dict(copy.deepcopy(teacher.body.state_dict()))
        student.time_embed.load_from_time_embedding(teacher.time_embed)
        return student
