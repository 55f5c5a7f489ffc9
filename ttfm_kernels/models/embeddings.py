"""Time conditioning shared by every model: sinusoidal embeddings of float times, and two-time conditioning.

Times are differentiable floats in [0, 1] (never rounded to integer steps), so forward-mode tangents in t
(and in s) flow through the embedding: d/dt cos(w t) = -w sin(w t).

A teacher v(x, t) embeds t with ``TimeEmbedding``. A student u(x, s, t) embeds s and (t - s) with
``TwoTimeEmbedding``: the sum of an s-embedding and a (t - s)-embedding. With the (t - s) branch's output
layer zeroed, the student's conditioning equals the teacher's conditioning at time s, which is how
``from_teacher`` makes u(x, s, t) start equal to v(x, s). The t-tangent then enters only through the (t - s)
branch (docs/math.md section 1).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ttfm_kernels._precision import accumulator
from ttfm_kernels.models import _tangent
from ttfm_kernels.models._tangent import Opt
from ttfm_kernels.nn import Linear

__all__ = ["TimeEmbedding", "TwoTimeEmbedding", "sinusoidal_embedding", "sinusoidal_embedding_jvp"]


def sinusoidal_embedding(t: torch.Tensor, dim: int, *, scale: float = 1000.0,
                         max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of float times.

    t: (B,) floating; returns (B, dim) in float32 (float64 for float64 t: times are never computed in half
    precision, where 1000 t at t = 0.75 rounds to 752): ``[cos(scale * t * f_k), sin(scale * t * f_k)]`` with
    frequencies f_k = max_period ** (-k / (dim // 2)), k = 0 .. dim // 2 - 1 (a zero column pads odd dims).
    ``scale=1000, max_period=10000`` is the DiT/ADM convention for t in [0, 1]; low-dimensional models use a
    smaller ``scale`` so that d/dt of the embedding stays moderate. Differentiable (also under forward AD) in t.
    """
    return sinusoidal_embedding_jvp(t, None, dim, scale=scale, max_period=max_period)[0]


def sinusoidal_embedding_jvp(t: torch.Tensor, tt: Opt, dim: int, *, scale: float = 1000.0,
                             max_period: float = 10000.0) -> tuple[torch.Tensor, Opt]:
    """``sinusoidal_embedding(t, dim, ...)`` and its tangent along tt (B,) (None: no tangent, None returned).

    d/dt [cos(a), sin(a)] = [-sin(a), cos(a)] * scale * f_k with a = scale * t * f_k.
    """
    if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
        raise TypeError(f"t must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if t.dim() != 1:
        raise ValueError(f"t must have shape (B,), got {tuple(t.shape)}")
    if dim < 2:
        raise ValueError(f"dim must be at least 2, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    t, tt = (None if v is None else v.to(accumulator(t.dtype)) for v in (t, tt))
    freqs = freqs.to(t.dtype)[None, :]
    args = (scale * t)[:, None] * freqs
    cos, sin = torch.cos(args), torch.sin(args)
    pairs = [(torch.cat([cos, sin], dim=-1), None)]
    if tt is not None:
        targs = (scale * tt)[:, None] * freqs
        pairs = [(pairs[0][0], torch.cat([-sin * targs, cos * targs], dim=-1))]
    if dim % 2:
        pairs.append((torch.zeros_like(cos[:, :1]), None))
    return _tangent.cat(pairs, dim=-1)


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t followed by Linear -> SiLU -> Linear: (B,) -> (B, out_dim).

    Eager equivalent: ``mlp(sinusoidal_embedding(t, freq_dim, scale=scale, max_period=max_period))``.
    """

    def __init__(self, out_dim: int, freq_dim: int = 64, *, scale: float = 1000.0, max_period: float = 10000.0):
        super().__init__()
        self.freq_dim, self.scale, self.max_period = freq_dim, scale, max_period
        self.mlp = nn.Sequential(Linear(freq_dim, out_dim), nn.SiLU(), Linear(out_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.forward_jvp(t)[0]

    def forward_jvp(self, t: torch.Tensor, tt: Opt = None) -> tuple[torch.Tensor, Opt]:
        """(embedding (B, out_dim), its tangent along tt (B,)); no tangent without tt."""
        emb, temb = sinusoidal_embedding_jvp(t, tt, self.freq_dim, scale=self.scale, max_period=self.max_period)
        dtype = self.mlp[0].weight.dtype
        emb, temb = _tangent.map_pair(lambda e: e.to(dtype), emb, temb)
        h, th = _tangent.call(self.mlp[0], emb, tx=temb)
        h, th = _tangent.silu(h, th)
        return _tangent.call(self.mlp[2], h, tx=th)


class TwoTimeEmbedding(nn.Module):
    """Two-time conditioning: ``s_embed(s) + d_embed(t - s)``, each a ``TimeEmbedding``: (B,), (B,) -> (B, out_dim).

    ``scale`` multiplies s (the teacher's ``time_scale``), ``gap_scale`` (None: ``scale``) multiplies t - s.
    The image students give the gap its own, small, scale (1.0) because ITVM's "jvp" target and EMD hold
    (t - s) du/dt of a stop-gradient copy: with frequencies up to ``gap_scale``, du/dt is up to ``gap_scale``
    times larger (docs/math.md sections 1 and 10).

    ``load_from_time_embedding(emb)`` copies a teacher's ``TimeEmbedding`` into ``s_embed`` and zeroes
    ``d_embed``'s output layer, so the result equals ``emb(s)`` for every t while its gradients (and the
    gradients of the t-tangent) with respect to ``d_embed`` stay non-zero.
    """

    def __init__(self, out_dim: int, freq_dim: int = 64, *, scale: float = 1000.0, gap_scale: float | None = None,
                 max_period: float = 10000.0):
        super().__init__()
        self.s_embed = TimeEmbedding(out_dim, freq_dim, scale=scale, max_period=max_period)
        self.d_embed = TimeEmbedding(out_dim, freq_dim, scale=scale if gap_scale is None else gap_scale,
                                     max_period=max_period)

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.forward_jvp(s, t)[0]

    def forward_jvp(self, s: torch.Tensor, t: torch.Tensor, ts: Opt = None,
                    tt: Opt = None) -> tuple[torch.Tensor, Opt]:
        """(conditioning (B, out_dim), its tangent along (ts, tt)); a None tangent is zero (its branch skipped)."""
        gap, tgap = _tangent.sub(t, tt, s, ts)
        return _tangent.add(*_tangent.call(self.s_embed, s, tt=ts), *_tangent.call(self.d_embed, gap, tt=tgap))

    @torch.no_grad()
    def load_from_time_embedding(self, emb: TimeEmbedding) -> None:
        self.s_embed.load_state_dict(emb.state_dict())
        last = self.d_embed.mlp[-1]
        last.weight.zero_()
        last.bias.zero_()
