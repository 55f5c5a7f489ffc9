"""Reference (pure PyTorch) JVP of attention: the explicit formula of docs/math.md section 5. The oracle.

Materializes the (Nq, Nk) score matrix, so it costs O(Nq * Nk) memory; it is differentiable in every input
(the fused backends recompute with it in backward) and exact in float64.
"""

from __future__ import annotations

import torch

__all__ = ["jvp_attention_reference"]


def jvp_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: torch.Tensor | None,
                            tk: torch.Tensor | None, tv: torch.Tensor | None, *, causal: bool,
                            scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """O = softmax(scale Q K^T) V and its tangent dO for tangents (tq, tk, tv); absent tangents are zero.

    q, tq: (B, H, Nq, D); k, v, tk, tv: (B, H, Nk, D). Computed in float32 (float64 for float64 inputs).
    Returns (o, t_o) in q's dtype and lse = logsumexp of the scores, (B, H, Nq), in the compute dtype.
    ``causal`` masks key j > query i (top-left aligned, like F.scaled_dot_product_attention).
    Eager equivalent: ``torch.func.jvp`` of math SDPA with the same scale.
    """
    acc = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    s = scale * (qf @ kf.transpose(-2, -1))
    keep = None
    if causal:
        keep = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    o = p @ vf
    t_o = torch.zeros_like(o)
    if tq is not None or tk is not None:
        ds = torch.zeros_like(s)
        if tq is not None:
            ds = ds + tq.to(acc) @ kf.transpose(-2, -1)
        if tk is not None:
            ds = ds + qf @ tk.to(acc).transpose(-2, -1)
        pds = p * (scale * ds)
        t_o = t_o + pds @ vf - pds.sum(dim=-1, keepdim=True) * o
    if tv is not None:
        t_o = t_o + p @ tv.to(acc)
    return o.to(q.dtype), t_o.to(q.dtype), lse
