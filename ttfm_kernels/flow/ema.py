"""Exponential moving average of a model's weights (the theta^- of ITVM, and the weights to sample with)."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMA"]


class EMA(nn.Module):
    """An averaged copy of ``model``: theta^- <- d theta^- + (1 - d) theta after each ``update(model)``.

    The effective decay at update n (1-based) is ``min(decay, (1 + n) / (warmup + n))`` when ``warmup > 0``
    (early updates follow the model closely), else ``decay``. Buffers (e.g. norm statistics) are copied.
    ``forward`` runs the averaged copy with the model's signature, without gradients to its weights;
    ``state_dict()`` holds the copy's weights (under ``module.``) and the update count. ``sigma`` and
    ``t_range`` are the model's, when it has them.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: int = 0) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay!r}")
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup!r}")
        self.decay, self.warmup = decay, warmup
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        for name in ("sigma", "t_range"):  # the model's noise scale and time range (sample, losses)
            if hasattr(model, name):
                setattr(self, name, getattr(model, name))

    def _decay(self) -> float | torch.Tensor:
        """The decay the next ``update`` uses: ``decay`` without warmup, else a 0-dim float32 tensor on the
        counter's device, computed from the count without reading it on the host."""
        if self.warmup == 0:
            return self.decay
        n = self.num_updates + 1
        return torch.clamp((1 + n) / (self.warmup + n), max=self.decay)

    def current_decay(self) -> float:
        """The decay the next ``update`` uses, as a Python number (this reads the update count: a host sync on a
        GPU; ``update`` never does)."""
        return float(self._decay())

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average toward ``model``'s current weights (same architecture as at construction).

        Under FSDP2 (model and copy ``fully_shard``'ed alike) each rank averages its local shards. No host sync:
        with warmup the decay stays a device tensor, cast once per parameter dtype (a tensor
        weight of ``torch.Tensor.lerp_`` must have the parameter's dtype)."""
        weight = 1.0 - self._decay()  # formed in float32 (a float32 decay like 0.999 is 1.0 in bfloat16)
        params, avg = dict(model.named_parameters()), dict(self.module.named_parameters())
        if params.keys() != avg.keys():
            raise ValueError("model has different parameters than the one this EMA was built from")
        weights: dict[torch.dtype, float | torch.Tensor] = {}
        for name, p in params.items():
            q = avg[name]
            if q.dtype not in weights:
                weights[q.dtype] = weight.to(q.dtype) if isinstance(weight, torch.Tensor) else weight
            _local(q).lerp_(_local(p.detach()).to(q.dtype), weights[q.dtype])
        for b, b_avg in zip(model.buffers(), self.module.buffers(), strict=True):
            b_avg.copy_(b)
        self.num_updates += 1

    def __getattr__(self, name: str) -> object:
        if name == "forward_jvp":  # the copy's explicit tangent pass, when it has one (ttfm_kernels.jvp_t)
            return getattr(self._modules["module"], name)
        return super().__getattr__(name)

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        return self.module(*args, **kwargs)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2 parameters), else ``t``: the average is elementwise, so each rank updates
    its own shards with no communication."""
    return t.to_local() if hasattr(t, "to_local") else t
