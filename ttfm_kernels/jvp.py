"""Forward-mode derivatives of a two-time model u(x, s, t): ``jvp_t`` (tangent (0, 0, 1)) and ``jvp_sx``
(tangent (v, 1, 0)), docs/math.md sections 1-3.

A model that defines ``forward_jvp(x, s, t, *, tx=None, ts=None, tt=None, **cond) -> (u, du)`` (an explicit
tangent pass through fused ops) is used as is; any other model goes through ``torch.func.jvp`` over its
``forward`` inside ``ttfm_kernels.fused_jvp()`` (its F.linear, F.conv*d, norm and SDPA calls take the fused
tangents), entered only around that call, or inside the caller's own ``fused_jvp(...)`` mode when one is open.
Conditioning is passed unchanged and carries no tangent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from ttfm_kernels._checks import check_float, check_like, check_per_sample
from ttfm_kernels.fused_jvp import active_fused_jvp, fused_jvp

__all__ = ["jvp_sx", "jvp_t"]

_AD_ADVICE = (
    "a forward-mode derivative is missing for an op this model calls ({err}). jvp_t/jvp_sx already route "
    "F.linear, F.conv*d, layer/group norms and F.scaled_dot_product_attention through ttfm_kernels.fused_jvp(); "
    "for another op, give the model a `forward_jvp(x, s, t, *, tx=None, ts=None, tt=None, **cond)` method "
    "built on ttfm_kernels ops."
)


def _forward_ad_context() -> contextlib.AbstractContextManager:
    """The context every ``torch.func.jvp`` over a user model runs in: the caller's open ``fused_jvp`` mode, else
    a fresh ``fused_jvp()`` routing every op family."""
    return contextlib.nullcontext() if active_fused_jvp() else fused_jvp()


def _func_jvp(fn: Callable[..., torch.Tensor], primals: tuple[torch.Tensor, ...],
              tangents: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        with _forward_ad_context():
            return torch.func.jvp(fn, primals, tangents)
    except NotImplementedError as err:
        raise NotImplementedError(_AD_ADVICE.format(err=str(err).splitlines()[0] if str(err) else "")) from err


def _check(x: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> None:
    check_float("x", x)
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"x must have shape (B, ...) with B >= 1, got {tuple(x.shape)}")
    check_per_sample("s", s, x.shape[0], "x", x)
    check_per_sample("t", t, x.shape[0], "x", x)


def _run(model: nn.Module, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, tx: torch.Tensor | None,
         ts: torch.Tensor | None, tt: torch.Tensor | None, create_graph: bool,
         cond: dict[str, object]) -> tuple[torch.Tensor, torch.Tensor]:
    with contextlib.nullcontext() if create_graph else torch.no_grad():
        forward_jvp = getattr(model, "forward_jvp", None)
        if forward_jvp is not None:
            u, du = forward_jvp(x, s, t, tx=tx, ts=ts, tt=tt, **cond)
        else:
            primals = {"x": x, "s": s, "t": t}
            tangents = {n: tan for n, tan in (("x", tx), ("s", ts), ("t", tt)) if tan is not None}

            def fn(*diff: torch.Tensor) -> torch.Tensor:
                inputs = {**primals, **dict(zip(tangents, diff, strict=True))}
                return model(inputs["x"], inputs["s"], inputs["t"], **cond)

            u, du = _func_jvp(fn, tuple(primals[n] for n in tangents), tuple(tangents.values()))
    return (u, du) if create_graph else (u.detach(), du.detach())


def jvp_t(model: nn.Module, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, *, create_graph: bool = False,
          **cond: object) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, du/dt) of u = model(x, s, t, **cond): the JVP with tangent (0, 0, 1), in one pass.

    x: (B, ...); s, t: (B,) floating. Returns two (B, ...) tensors. With ``create_graph=False`` no graph is kept
    (both results are detached); with ``create_graph=True`` both are differentiable w.r.t. the model's
    parameters (reverse-over-forward, as LFMD needs). Eager equivalent:
    ``torch.func.jvp(lambda t: model(x, s, t, **cond), (t,), (torch.ones_like(t),))``.
    """
    _check(x, s, t)
    return _run(model, x, s, t, None, None, torch.ones_like(t), create_graph, cond)


def jvp_sx(model: nn.Module, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, v: torch.Tensor, *,
           create_graph: bool = False, **cond: object) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, d/ds u + (grad_x u) v) of u = model(x, s, t, **cond): the JVP with tangent (v, 1, 0).

    x, v: (B, ...); s, t: (B,). This is the Eulerian derivative EMD needs. ``create_graph`` as in ``jvp_t``.
    Eager equivalent: ``torch.func.jvp(lambda x, s: model(x, s, t, **cond), (x, s), (v, torch.ones_like(s)))``.
    """
    _check(x, s, t)
    check_like("v", v, "x", x)
    return _run(model, x, s, t, v, torch.ones_like(s), None, create_graph, cond)
