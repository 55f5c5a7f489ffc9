"""Input validation shared by the ops and models: each helper raises a clear error that names the argument."""

from __future__ import annotations

import torch

__all__ = ["FLOAT_DTYPES", "check_float", "check_like", "check_model_input", "check_per_sample", "check_rank"]

#: The floating dtypes the ops accept (a backend may support fewer; its availability check says so).
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def check_float(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...] | None = None) -> None:
    """Raise TypeError unless ``t`` is a floating tensor (and, if given, one of ``dtypes``)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: {', '.join(map(str, dtypes))}")


def check_rank(name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    """Raise ValueError unless ``t.dim() == rank``; ``layout`` names the dims, e.g. "(B, H, N, D)"."""
    if t.dim() != rank:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)}")


def check_like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, *, shape: bool = True) -> None:
    """Raise unless ``t`` matches ``ref`` in dtype, device and (if ``shape``) shape."""
    check_float(name, t)
    if shape and t.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)} like {ref_name}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype}, expected {ref.dtype} like {ref_name}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device}, expected {ref.device} like {ref_name}")


def check_per_sample(name: str, t: torch.Tensor, batch: int, ref_name: str, ref: torch.Tensor) -> None:
    """Raise unless ``t`` is a floating (B,) tensor on ``ref``'s device."""
    check_float(name, t)
    if t.shape != (batch,):
        raise ValueError(f"{name} must have shape (B,) = ({batch},) like {ref_name}'s batch, got {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device}, expected {ref.device} like {ref_name}")


def check_model_input(x: torch.Tensor, shape: tuple[int, ...], **times: object) -> None:
    """Raise ValueError unless ``x`` has shape (B, *shape) and each of ``times`` (by name) is a floating (B,)
    tensor: the check at the top of every model's forward."""
    if x.dim() != 1 + len(shape) or tuple(x.shape[1:]) != shape:
        raise ValueError(f"x must have shape (B, {', '.join(map(str, shape))}), got {tuple(x.shape)}")
    for name, t in times.items():
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point or t.shape != (x.shape[0],):
            raise ValueError(f"{name} must be a floating tensor of shape (B,) = ({x.shape[0]},), "
                             f"got {getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
