"""Classifier-free guidance of a conditional teacher: v = v(x, t, null) + w (v(x, t, c) - v(x, t, null))."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["GuidedTeacher"]


class GuidedTeacher(nn.Module):
    """Wrap a conditional teacher v(x, t, **cond) as the guided field of docs/math.md section 1.

    ``forward(x, t, **cond) = v(x, t, **null_cond) + scale * (v(x, t, **cond) - v(x, t, **null_cond))``,
    two teacher calls. ``null_cond`` holds the unconditional arguments (e.g. ``{"y": null_label}``); a tensor
    in it with a leading dim of 1 (or no dims) is expanded to the batch, and moved to x's device. ``sigma`` and
    ``t_range`` (when the teacher has one, e.g. an ``adapters.Teacher``) are the teacher's.
    """

    def __init__(self, teacher: nn.Module, scale: float, null_cond: Mapping[str, object]) -> None:
        super().__init__()
        if not isinstance(null_cond, Mapping):
            raise TypeError(f"null_cond must be a mapping of keyword arguments, got {type(null_cond).__name__}")
        self.teacher, self.scale, self.null_cond = teacher, float(scale), dict(null_cond)
        for name in ("sigma", "t_range"):
            if hasattr(teacher, name):
                setattr(self, name, getattr(teacher, name))

    def _null(self, x: torch.Tensor) -> dict[str, object]:
        def expand(value: object) -> object:
            if not isinstance(value, torch.Tensor):
                return value
            value = value.to(x.device)
            if value.dim() == 0 or value.shape[0] == 1:
                return value.expand(x.shape[0], *value.shape[1:]) if value.dim() else value.expand(x.shape[0])
            return value
        return {k: expand(v) for k, v in self.null_cond.items()}

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond: object) -> torch.Tensor:
        v_null = self.teacher(x, t, **self._null(x))
        return v_null + self.scale * (self.teacher(x, t, **cond) - v_null)
