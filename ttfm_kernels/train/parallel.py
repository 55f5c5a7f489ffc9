"""Many processes under ``torchrun`` (docs/design.md, "Many ranks"): the process group, the student's wrapper, the EMA.

``Parallel`` describes one process of a run: ``kind`` "none" (one process), "ddp" (DistributedDataParallel,
the student replicated) or "fsdp" (FSDP2 ``fully_shard``, the student and its EMA sharded along dim 0 of every
parameter on one mesh of all ranks). NCCL on CUDA devices (``cuda:LOCAL_RANK``), gloo on CPU. The teacher is
never wrapped: it is frozen and replicated on every rank.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ttfm_kernels.flow import EMA

__all__ = ["PARALLEL", "Parallel", "StudentDDP", "init_parallel"]

PARALLEL = ("ddp", "fsdp")


class StudentDDP(nn.parallel.DistributedDataParallel):
    """DDP that lets the losses read the wrapped model's ``sigma`` and ``t_range`` (nothing else is forwarded:
    ``forward_jvp`` must stay hidden so that explicit-tangent calls go through ``forward(..., tangents=)``)."""

    def __getattr__(self, name: str) -> Any:
        if name in ("sigma", "t_range"):
            return getattr(self.module, name)
        return super().__getattr__(name)


@dataclasses.dataclass(frozen=True)
class Parallel:
    """One process of a run: its ``rank`` of ``world_size``, the wrapper ``kind`` and its torch ``device``."""

    kind: str = "none"
    rank: int = 0
    world_size: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        """Rank 0: the process that logs, shows progress and (DDP) writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.kind != "none"

    def local_slice(self, batch_size: int) -> slice:
        """This rank's global sample indices [r B / W, (r + 1) B / W) of a global batch of ``batch_size``."""
        if batch_size % self.world_size:
            raise ValueError(f"--batch-size {batch_size} (the global batch) is not divisible by the world size "
                             f"{self.world_size}: choose a multiple of {self.world_size}")
        per = batch_size // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The student as the trainer calls it: ``model`` itself, ``StudentDDP(model)``, or ``model`` sharded
        in place by ``fully_shard`` (its ``forward_jvp`` registered). ``model`` must already be on ``device``."""
        if self.kind == "ddp":
            ids = [self.device.index] if self.device.type == "cuda" else None
            return StudentDDP(model, device_ids=ids)
        if self.kind == "fsdp":
            _shard(model, self.mesh)
        return model

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    def ema(self, model: nn.Module, decay: float) -> EMA:
        """The EMA of the student ``model`` (unwrapped, before ``wrap``): under DDP a plain copy, identical on
        every rank; under FSDP2 the copy is ``fully_shard``'ed on the student's mesh, so each rank averages its own
        shards (``EMA.update`` works on the local shards)."""
        ema = EMA(model, decay=decay)
        if self.kind == "fsdp":
            _shard(ema.module, self.mesh)
        return ema

    @functools.cached_property
    def mesh(self) -> Any:
        """The one 1-D device mesh of all ranks that the student and its EMA are sharded on (FSDP2)."""
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.device.type, (self.world_size,))

    def all_mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean over ranks of each number (one all-reduce; the identity with one process)."""
        if not self.distributed or not values:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(values, (t / self.world_size).tolist(), strict=True))

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _shard(model: nn.Module, mesh: Any) -> None:
    from torch.distributed.fsdp import fully_shard

    from ttfm_kernels.models import register_fsdp_forward_jvp

    fully_shard(model, mesh=mesh)
    register_fsdp_forward_jvp(model)


def init_parallel(parallel: str | None, device: str) -> Parallel:
    """The process's ``Parallel`` from ``--parallel`` and torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK).

    Under torchrun the default is "ddp"; ``--parallel`` without torchrun is an error. Starts the process group
    (NCCL when ``device`` is CUDA, each rank on ``cuda:LOCAL_RANK``; gloo otherwise).
    """
    if parallel is not None and parallel not in PARALLEL:
        raise ValueError(f"unknown --parallel {parallel!r}; choose one of {', '.join(PARALLEL)}")
    if "WORLD_SIZE" not in os.environ:
        if parallel is not None:
            raise ValueError(f"--parallel {parallel} needs several processes: start the command with torchrun, "
                             f"e.g. `torchrun --standalone --nproc_per_node 2 -m ttfm_kernels ... --parallel "
                             f"{parallel}` (one process trains without --parallel)")
        return Parallel(device=torch.device(device))
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Parallel(kind=parallel or "ddp", rank=rank, world_size=world, device=dev)
