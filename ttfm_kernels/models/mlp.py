"""MLP teacher v(x, t) and two-time MLP student u(x, s, t) for low-dimensional data (the 2D demo).

Both share one body: ``h = in_proj(x) + cond``, then ``depth`` residual blocks ``h = h + Linear(SiLU(h))``,
then ``out_proj(SiLU(h))``. The teacher's cond is ``TimeEmbedding(t)``; the student's is
``TwoTimeEmbedding(s, t)`` (embeddings of s and of t - s). ``TwoTimeMLP.from_teacher(teacher)`` copies the
teacher so that u(x, s, t) == v(x, s) exactly at the start of distillation.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from ttfm_kernels._checks import check_model_input
from ttfm_kernels.models import _tangent
from ttfm_kernels.models._tangent import Opt
from ttfm_kernels.models.distributed import check_fsdp_forward_jvp
from ttfm_kernels.models.embeddings import TimeEmbedding, TwoTimeEmbedding
from ttfm_kernels.nn import Linear

__all__ = ["MLP", "TwoTimeMLP"]


class _MLPBody(_tangent.TangentModule):
    def __init__(self, dim: int, hidden: int, depth: int):
        super().__init__()
        self.in_proj = Linear(dim, hidden)
        self.blocks = nn.ModuleList(Linear(hidden, hidden) for _ in range(depth))
        self.out_proj = Linear(hidden, dim)

    def _jvp(self, x: torch.Tensor, cond: torch.Tensor, tx: Opt = None,
             tcond: Opt = None) -> tuple[torch.Tensor, Opt]:
        h, th = _tangent.add(*_tangent.call(self.in_proj, x, tx=tx), cond, tcond)
        for block in self.blocks:
            a, ta = _tangent.silu(h, th)
            h, th = _tangent.add(h, th, *_tangent.call(block, a, tx=ta))
        h, th = _tangent.silu(h, th)
        return _tangent.call(self.out_proj, h, tx=th)


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

    def _jvp(self, x: torch.Tensor, times: tuple[torch.Tensor, ...],
             tangents: tuple[Opt, ...]) -> tuple[torch.Tensor, Opt]:
        """(out, tangent) for times (t,) or (s, t) and tangents (tx, tt) or (tx, ts, tt)."""
        primals = dict(zip(("s", "t")[-len(times):], times, strict=True))
        check_model_input(x, (self.dim,), **primals)
        tx, *ttimes = tangents
        ttimes = {f"t{name}": tan for name, tan in zip(primals, ttimes, strict=True)}
        _tangent.check({"x": x, **primals}, {"tx": tx, **ttimes})
        c, tc = _tangent.call(self.time_embed, *times, **ttimes)
        return _tangent.call(self.body, x, c, tx=tx, tcond=tc)

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

    def forward(self, x: torch.Tensor, t: torch.Tensor, *,
                tangents: Mapping[str, Opt] | None = None) -> torch.Tensor | tuple[torch.Tensor, Opt]:
        """v (B, dim); with ``tangents={"tx": ..., "tt": ...}`` the pair ``forward_jvp`` returns (the DDP route)."""
        v, dv = self._jvp(x, (t,), _tangent.unpack(tangents, ("tx", "tt")))
        return v if tangents is None else (v, dv)

    def forward_jvp(self, x: torch.Tensor, t: torch.Tensor, *, tx: Opt = None,
                    tt: Opt = None) -> tuple[torch.Tensor, Opt]:
        """(v, dv): v and its JVP along the tangents tx (B, dim) and tt (B,) (None: zero, products skipped).

        An explicit tangent pass (no forward-AD tensors), differentiable w.r.t. the parameters. dv is None when
        both tangents are. Eager equivalent: ``torch.func.jvp(lambda x, t: model(x, t), (x, t), (tx, tt))``.
        """
        check_fsdp_forward_jvp(self)
        return self._jvp(x, (t,), (tx, tt))


class TwoTimeMLP(_MLPBase):
    """Two-time flow-map student u(x, s, t) (X_{s,t}(x) = x + (t - s) u), same arguments as ``MLP``.

    x: (B, dim), s and t: (B,) floating -> (B, dim). Conditioning embeds s and (t - s).
    """

    EMBEDDING = TwoTimeEmbedding

    def forward(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, *,
                tangents: Mapping[str, Opt] | None = None) -> torch.Tensor | tuple[torch.Tensor, Opt]:
        """u (B, dim); with ``tangents={"tx": ..., "ts": ..., "tt": ...}`` the pair ``forward_jvp`` returns."""
        u, du = self._jvp(x, (s, t), _tangent.unpack(tangents, ("tx", "ts", "tt")))
        return u if tangents is None else (u, du)

    def forward_jvp(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, *, tx: Opt = None, ts: Opt = None,
                    tt: Opt = None) -> tuple[torch.Tensor, Opt]:
        """(u, du): u and its JVP along tx (B, dim), ts, tt (B,) (None: zero, products skipped); as ``MLP``'s."""
        check_fsdp_forward_jvp(self)
        return self._jvp(x, (s, t), (tx, ts, tt))

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
