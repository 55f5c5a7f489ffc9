"""Per-sample helpers shared by the ops, flow/ and the losses: broadcasting a (B,) tensor against a batch, and
weighting and reducing per-sample losses (docs/math.md, section 1)."""

from __future__ import annotations

import torch

__all__ = ["REDUCTIONS", "per_sample", "reduce_per_sample"]

REDUCTIONS = ("mean", "sum", "none")


def per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """View a (B,) tensor as (B, 1, ..., 1) so it broadcasts against ``like`` (B, ...)."""
    return t.reshape(t.shape[0], *([1] * (like.dim() - 1)))


def reduce_per_sample(l_b: torch.Tensor, weight: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Apply per-sample weights (B,) and ``reduction`` (one of ``REDUCTIONS``) to per-sample losses l_b (B,):
    "mean" and "sum" give a 0-dim tensor, "none" the weighted (B,) losses. Eager equivalent:
    ``(l_b * weight).mean()`` for "mean"."""
    if weight is not None:
        l_b = l_b * weight.to(l_b.dtype)
    if reduction == "mean":
        return l_b.mean()
    if reduction == "sum":
        return l_b.sum()
    return l_b
