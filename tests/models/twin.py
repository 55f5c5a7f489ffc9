"""The eager twin of a model: the same module tree and weights with every fused layer replaced by plain torch ops.

It is the oracle of the model tests and the baseline of benchmarks/bench_step.py: ``torch.func.jvp`` over the
twin is what a user without ttfm_kernels would run (math SDPA, nn.LayerNorm / GroupNorm + modulation + SiLU,
torch's own Linear / Conv2d forward-AD rules).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ttfm_kernels import nn as fused

__all__ = ["eager_twin"]


class _EagerModulatedNorm(fused.ModulatedLayerNorm):
    """F.layer_norm / F.group_norm, then * (1 + scale) + shift, then optional SiLU."""

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None,
                shift: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_groups is None:
            y, view = F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps), (lambda p: p[:, None])
        else:
            y, view = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps), (lambda p: p[..., None, None])
        if scale is not None:
            y = y * (1 + view(scale))
        if shift is not None:
            y = y + view(shift)
        return F.silu(y) if self.activation == "silu" else y


class _EagerAttention(fused.Attention):
    """The same projections around torch's math SDPA (which has forward-AD rules)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.qkv(x))
        q, k = (t if norm is None else norm(t.flatten(0, 1)).view_as(t) for norm, t in ((self.q_norm, q),
                                                                                         (self.k_norm, k)))
        with sdpa_kernel(SDPBackend.MATH):
            return self.proj(self._merge(F.scaled_dot_product_attention(q, k, v)))


_SWAPS: dict[type, type] = {
    fused.Linear: nn.Linear,
    fused.Conv2d: nn.Conv2d,
    fused.ModulatedLayerNorm: _EagerModulatedNorm,
    fused.ModulatedGroupNorm: _EagerModulatedNorm,
    fused.Attention: _EagerAttention,
}


def eager_twin(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose fused layers run plain torch ops (same parameters, same state_dict)."""
    twin = copy.deepcopy(model)
    for module in twin.modules():
        eager = _SWAPS.get(type(module))
        if eager is not None:
            module.__class__ = eager
        elif type(module).__module__.startswith("ttfm_kernels.nn"):
            raise TypeError(f"eager_twin has no plain-torch counterpart for {type(module).__name__}")
    return twin
