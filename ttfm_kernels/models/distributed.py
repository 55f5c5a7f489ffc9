"""The models' explicit-tangent pass under DDP and FSDP2.

DDP: DistributedDataParallel synchronises gradients through its ``forward``, so an explicit-tangent call must
go through it: every model's ``forward`` takes ``tangents={...}`` (the keyword tangents of its ``forward_jvp``)
and then returns ``(u, du)``; ``ttfm_kernels.jvp_t`` / ``jvp_sx`` do that for a DDP-wrapped model.

FSDP2: ``fully_shard`` gathers a unit's parameters in hooks around ``__call__`` only. A ``forward_jvp`` called
on a sharded unit would see DTensor shards ("aten.mm.default got mixed torch.Tensor and DTensor") unless the
unit registered it with ``torch.distributed.fsdp.register_fsdp_forward_method``. After the ``fully_shard``
calls, run ``register_fsdp_forward_jvp(model)`` once::

    for block in model.body.blocks:
        fully_shard(block)
    fully_shard(model)
    register_fsdp_forward_jvp(model)

The models' ``forward_jvp`` checks this (``check_fsdp_forward_jvp``) and raises a clear error otherwise.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

__all__ = ["check_fsdp_forward_jvp", "register_fsdp_forward_jvp"]


def _fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 units under ``model`` (itself included) that have a ``forward_jvp``."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None:  # never imported: nothing can be sharded
        return []
    return [m for m in model.modules() if isinstance(m, fsdp.FSDPModule) and hasattr(type(m), "forward_jvp")]


def register_fsdp_forward_jvp(model: nn.Module) -> int:
    """Register ``forward_jvp`` as an FSDP2 forward method on every ``fully_shard`` unit of ``model`` that has one.

    Call it after ``fully_shard``; calling it again is harmless. Returns the number of units registered now.
    """
    from torch.distributed.fsdp import register_fsdp_forward_method

    count = 0
    for unit in _fsdp_units(model):
        if "forward_jvp" not in vars(unit):  # registration sets an instance attribute
            register_fsdp_forward_method(unit, "forward_jvp")
            count += 1
    return count


def check_fsdp_forward_jvp(model: nn.Module) -> None:
    """Raise unless every FSDP2 unit under ``model`` with a ``forward_jvp`` has it registered (no-op without FSDP)."""
    if torch.compiler.is_compiling():
        return
    missing = [type(m).__name__ for m in _fsdp_units(model) if "forward_jvp" not in vars(m)]
    if missing:
        raise RuntimeError(
            f"forward_jvp called on a model with FSDP2 units whose forward_jvp is not registered ({len(missing)}: "
            f"{', '.join(sorted(set(missing)))}): call ttfm_kernels.models.register_fsdp_forward_jvp(model) "
            "after fully_shard")
