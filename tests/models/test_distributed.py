"""forward_jvp under DDP and FSDP2 on one rank (gloo, world size 1, in-process): the routes and the registration.

Two ranks are the distributed tests' business; one rank checks that the tangent pass goes through DDP's
``forward`` and through per-block ``fully_shard`` units (their parameters are DTensors even on one rank).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist

from ttfm_kernels import jvp_t, models
from ttfm_kernels.testing import assert_close_to_ref, assert_nontrivial

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    store = dist.FileStore(os.fspath(tmp_path_factory.mktemp("store") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    from torch.distributed.device_mesh import init_device_mesh

    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def _student() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    model = models.TwoTimeDiT.from_preset("tiny", num_classes=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    s = 0.5 * torch.rand(2)
    return model, (torch.randn(2, 3, 8, 8), s, s + 0.3)


def _jvp_and_grads(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], y: torch.Tensor):
    """jvp_t with a graph, then the gradients of <w, du> (the LFMD pattern)."""
    u, du = jvp_t(model, *inputs, create_graph=True, y=y)
    (du * torch.linspace(-1, 1, du.numel()).view_as(du)).sum().backward()
    grads = {n.removeprefix("module."): p.grad for n, p in model.named_parameters() if p.grad is not None}
    return u.detach(), du.detach(), {n: g.full_tensor() if hasattr(g, "full_tensor") else g for n, g in grads.items()}


def test_ddp_runs_the_tangent_pass_through_forward(one_rank, monkeypatch):
    from torch.nn.parallel import DistributedDataParallel

    model, inputs = _student()
    y = torch.tensor([0, 2])
    ref = _jvp_and_grads(copy.deepcopy(model), inputs, y)
    ddp = DistributedDataParallel(model)
    seen = []
    original = models.TwoTimeDiT.forward

    def forward(self, *args, **kwargs):
        seen.append(sorted(k for k, v in (kwargs.get("tangents") or {}).items() if v is not None))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(models.TwoTimeDiT, "forward", forward)
    got = _jvp_and_grads(ddp, inputs, y)
    assert seen == [["tt"]]  # one call, through DDP's forward, with the t tangent
    assert_nontrivial(got[1], "du/dt under DDP")
    for name, a, b in (("u", got[0], ref[0]), ("du/dt", got[1], ref[1])):
        assert_close_to_ref(a, b, name=name)
    assert got[2].keys() == ref[2].keys()
    for name, g in got[2].items():
        assert_close_to_ref(g, ref[2][name], name=name)


def test_fsdp2_per_block_needs_the_registration_helper(one_rank):
    from torch.distributed.fsdp import fully_shard

    model, inputs = _student()
    y = torch.tensor([1, 3])
    ref = _jvp_and_grads(copy.deepcopy(model), inputs, y)
    for block in model.body.blocks:
        fully_shard(block, mesh=one_rank)
    fully_shard(model, mesh=one_rank)
    with pytest.raises(RuntimeError, match=r"register_fsdp_forward_jvp\(model\)"):
        jvp_t(model, *inputs, y=y)
    assert models.register_fsdp_forward_jvp(model) == 3  # the root and the two blocks
    assert models.register_fsdp_forward_jvp(model) == 0
    got = _jvp_and_grads(model, inputs, y)
    assert_nontrivial(got[1], "du/dt under FSDP2")
    assert_close_to_ref(got[0], ref[0], name="u")
    assert_close_to_ref(got[1], ref[1], name="du/dt")
    assert got[2].keys() == ref[2].keys()
    for name, g in got[2].items():  # reduce-scatter sums in another order: a few fp32 ulps of the largest
        assert_close_to_ref(g, ref[2][name], name=name, scale=10.0)
    with torch.no_grad():
        assert_close_to_ref(model(*inputs, y=y), ref[0], name="plain forward after registration")
