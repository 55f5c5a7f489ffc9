"""Exponential moving average of a model's weights (the theta^- of ITVM, and the weights to sample with)."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMA"]


class _Shadow(nn.Module):
    """The high-precision copies of an EMA's low-precision parameters, as buffers "0", "1", ... in the order of
    ``named_parameters()`` (so they are saved in ``state_dict`` and move with ``.to(device)``)."""


class EMA(nn.Module):
    """An averaged copy of ``model``: theta^- <- d theta^- + (1 - d) theta after each ``update(model)``.

    The effective decay at update n (1-based) is ``min(decay, (1 + n) / (warmup + n))`` when ``warmup > 0``
    (early updates follow the model closely), else ``decay``. Buffers (e.g. norm statistics) are copied.
    ``forward`` runs the averaged copy with the model's signature, in the model's dtype (or under the caller's
    autocast), without gradients to its weights; ``state_dict()`` holds the copy's weights (under ``module.``),
    the shadow weights (under ``shadow.``) and the update count. ``sigma`` and ``t_range`` are the model's, when
    it has them. The copy is kept in eval mode (``train()`` does not reach it): targets computed with an EMA
    run with dropout off.

    Precision: the average of every parameter narrower than ``shadow_dtype`` (default float32: bf16 and fp16
    parameters) is kept in a ``shadow_dtype`` shadow and rounded into the copy after each update, because a
    low-precision lerp loses every update smaller than half an ulp (a bf16 average at decay 0.99 stalls).
    Memory: 4 bytes per such parameter for the shadow, plus the copy in the model's dtype (2 bytes), and a
    transient float32 view of the model's parameters during ``update``. ``shadow_dtype=None`` averages in the
    parameters' own dtype. The update is one ``torch._foreach_lerp_`` per dtype, without a host sync.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: int = 0, *,
                 shadow_dtype: torch.dtype | None = torch.float32) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay!r}")
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup!r}")
        if shadow_dtype is not None and not shadow_dtype.is_floating_point:
            raise ValueError(f"shadow_dtype must be a floating dtype or None, got {shadow_dtype}")
        self.decay, self.warmup = decay, warmup
        self.module = copy.deepcopy(model).requires_grad_(False).eval()
        self.shadow = _Shadow()
        self._shadowed: list[str] = []  # names of the parameters with a shadow, in buffer order
        for name, p in self.module.named_parameters():
            if shadow_dtype is not None and p.is_floating_point() and p.dtype.itemsize < shadow_dtype.itemsize:
                self.shadow.register_buffer(str(len(self._shadowed)), p.detach().to(shadow_dtype))
                self._shadowed.append(name)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        for name in ("sigma", "t_range"):  # the model's noise scale and time range (sample, losses)
            if hasattr(model, name):
                setattr(self, name, getattr(model, name))

    def train(self, mode: bool = True) -> EMA:
        """Set this wrapper's mode; the averaged copy stays in eval mode (dropout off in targets)."""
        self.training = mode
        return self

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

        One ``torch._foreach_lerp_`` per dtype of the averages (the shadows, or the copy's own parameters),
        the model's parameters cast to it; the shadows are then rounded into the copy. No host sync: with warmup
        the decay stays a device tensor, cast once per dtype (a tensor weight of lerp must have its dtype)."""
        weight = 1.0 - self._decay()  # formed in float32 (a float32 decay like 0.999 is 1.0 in bfloat16)
        params, avg = dict(model.named_parameters()), dict(self.module.named_parameters())
        if params.keys() != avg.keys():
            raise ValueError("model has different parameters than the one this EMA was built from")
        shadows = dict(zip(self._shadowed, self.shadow.buffers(), strict=True))
        groups: dict[torch.dtype, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for name, p in params.items():
            q = shadows.get(name, avg[name])
            ends, targets = groups.setdefault(q.dtype, ([], []))
            ends.append(q)
            targets.append(p.detach().to(q.dtype))
        for dtype, (ends, targets) in groups.items():
            if isinstance(weight, torch.Tensor):
                torch._foreach_lerp_(ends, targets, [weight.to(dtype)] * len(ends))
            else:
                torch._foreach_lerp_(ends, targets, weight)
        if shadows:
            torch._foreach_copy_([avg[name] for name in shadows], list(shadows.values()))
        for b, b_avg in zip(model.buffers(), self.module.buffers(), strict=True):
            b_avg.copy_(b)
        self.num_updates += 1

    def __getattr__(self, name: str) -> object:
        if name == "forward_jvp":  # the copy's explicit tangent pass, when it has one (ttfm_kernels.jvp_t)
            return getattr(self._modules["module"], name)
        return super().__getattr__(name)

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        return self.module(*args, **kwargs)
