"""Explicit-tangent building blocks of the models' ``forward_jvp``: (primal, tangent) pairs, tangent None = zero.

Every helper takes primals and their tangents (any tangent may be None, meaning zero: its products are skipped)
and returns ``(y, ty)`` with ``ty`` None when every input tangent is None. No forward-AD (dual) tensors are
made: the tangents are ordinary tensors, so the pass compiles (torch.compile), runs through FSDP2 units and
stays differentiable w.r.t. the parameters (reverse-over-forward, as LFMD needs).

``call`` is the rule that keeps each model written once: without tangents it calls the module itself (its
``__call__``, so hooks such as FSDP2's run, and its ``forward`` stays forward-AD aware for ``torch.func.jvp``);
with a tangent it calls the module's ``forward_jvp``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ttfm_kernels._checks import check_like

__all__ = ["Opt", "TangentModule", "add", "add_mul", "call", "cat", "check", "gelu_tanh", "map_pair", "silu", "sub",
           "unpack"]

Opt = torch.Tensor | None


def call(module: nn.Module, *primals: object, **tangents: Opt) -> tuple[torch.Tensor, Opt]:
    """``(module(*primals), None)`` when every tangent is None, else ``module.forward_jvp(*primals, **tangents)``.

    An ``nn.Identity`` passes its one (primal, tangent) pair through.
    """
    if all(t is None for t in tangents.values()):
        return module(*primals), None
    if isinstance(module, nn.Identity):
        (tangent,) = tangents.values()
        return primals[0], tangent
    return module.forward_jvp(*primals, **tangents)


def map_pair(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tx: Opt) -> tuple[torch.Tensor, Opt]:
    """(fn(x), fn(tx)) for a linear map ``fn`` (reshapes, permutes, nearest upsampling, chunks of one tensor)."""
    return fn(x), None if tx is None else fn(tx)


def add(a: torch.Tensor, ta: Opt, b: torch.Tensor, tb: Opt) -> tuple[torch.Tensor, Opt]:
    """a + b and its tangent."""
    if ta is None:
        return a + b, tb
    return a + b, ta if tb is None else ta + tb


def sub(a: torch.Tensor, ta: Opt, b: torch.Tensor, tb: Opt) -> tuple[torch.Tensor, Opt]:
    """a - b and its tangent."""
    if tb is None:
        return a - b, ta
    return a - b, -tb if ta is None else ta - tb


def cat(pairs: list[tuple[torch.Tensor, Opt]], dim: int) -> tuple[torch.Tensor, Opt]:
    """torch.cat of the primals and of the tangents (zeros stand in for absent ones, if any is present)."""
    y = torch.cat([p for p, _ in pairs], dim=dim)
    if all(t is None for _, t in pairs):
        return y, None
    return y, torch.cat([torch.zeros_like(p) if t is None else t for p, t in pairs], dim=dim)


def silu(x: torch.Tensor, tx: Opt) -> tuple[torch.Tensor, Opt]:
    """SiLU and its tangent: silu'(x) = y + sigmoid(x) (1 - y) with y = silu(x). (torch's silu_backward kernel
    has no derivative of its own: LFMD differentiates this tangent.)"""
    y = F.silu(x)
    return y, None if tx is None else tx * (y + torch.sigmoid(x) * (1 - y))


def gelu_tanh(x: torch.Tensor, tx: Opt) -> tuple[torch.Tensor, Opt]:
    """GELU (tanh approximation, as ``nn.GELU(approximate="tanh")``) and its tangent tx * gelu'(x), one op
    (torch's gelu backward kernel, which is itself differentiable)."""
    y = F.gelu(x, approximate="tanh")
    return y, None if tx is None else torch.ops.aten.gelu_backward(tx, x, approximate="tanh")


def add_mul(x: torch.Tensor, tx: Opt, a: torch.Tensor, ta: Opt, b: torch.Tensor,
            tb: Opt) -> tuple[torch.Tensor, Opt]:
    """x + a * b (broadcasting; a gated residual) and its tangent tx + ta * b + a * tb, in addcmul passes."""
    y = torch.addcmul(x, a, b)
    ty = tx
    for u, v in ((ta, b), (a, tb)):
        if u is not None and v is not None:
            ty = u * v if ty is None else torch.addcmul(ty, u, v)
    return y, ty


def unpack(tangents: Mapping[str, Opt] | None, names: tuple[str, ...]) -> tuple[Opt, ...]:
    """The tangents of a ``forward(..., tangents={...})`` call in the order ``names`` (absent: None)."""
    if tangents is None:
        return (None,) * len(names)
    if not isinstance(tangents, Mapping) or set(tangents) - set(names):
        raise ValueError(f"tangents must be a mapping with keys among {names} (the keyword tangents of "
                         f"forward_jvp), got {tangents if not isinstance(tangents, Mapping) else sorted(tangents)}")
    return tuple(tangents.get(n) for n in names)


def check(primals: Mapping[str, torch.Tensor], tangents: Mapping[str, Opt]) -> None:
    """Raise unless every given tangent matches its primal (shape, dtype, device); keys pair up in order."""
    for (name, primal), (tname, tangent) in zip(primals.items(), tangents.items(), strict=True):
        if tangent is not None:
            check_like(tname, tangent, name, primal)


class TangentModule(nn.Module):
    """A model layer written once, as ``_jvp(*primals, **tangents) -> (y, ty)`` with every tangent defaulting
    to None: ``forward(*primals)`` is its primal, ``forward_jvp(*primals, **tangents)`` the explicit pass."""

    def _jvp(self, *primals: torch.Tensor, **tangents: Opt) -> tuple[torch.Tensor, Opt]:
        raise NotImplementedError

    def forward(self, *primals: torch.Tensor) -> torch.Tensor:
        return self._jvp(*primals)[0]

    def forward_jvp(self, *primals: torch.Tensor, **tangents: Opt) -> tuple[torch.Tensor, Opt]:
        return self._jvp(*primals, **tangents)
