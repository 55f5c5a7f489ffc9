"""torch.compile(fullgraph=True) of the explicit-tangent route: the dispatcher, forward_jvp, the losses.

Compiled with ``backend="aot_eager"`` (an inductor compile costs tens of seconds per graph on 2 cores) on the
tiny presets cut to one block (a compile's cost grows with the layers it traces). The backward runs outside
the compiled region, through AOTAutograd's compiled backward.
"""

from __future__ import annotations

import pytest
import torch

from ttfm_kernels import EMA, emd_loss, itvm_loss, lfmd_loss, models, use_backend
from ttfm_kernels._dispatch import current_backend
from ttfm_kernels.ops.norm import jvp_norm_modulate_silu
from ttfm_kernels.testing import assert_close_to_ref, assert_nontrivial

# Cases and the compile backends they run on: CPU with aot_eager here, CUDA (gpu-check) with aot_eager too.
DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
               not torch.cuda.is_available(), reason="needs a CUDA device")])]


def _compile(fn):
    torch.compiler.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def _trained(model: torch.nn.Module, std: float) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn_like(p))
    return model


def test_backend_selection_is_a_constant_of_the_graph():
    """current_backend (a ContextVar) and an op's backend choice (the extension registry) trace with fullgraph."""
    x = torch.randn(2, 5, 8)
    scale, shift = torch.randn(2, 8), torch.randn(2, 8)
    tx = torch.randn_like(x)

    def fn(x, tx, scale, shift):
        y, ty = jvp_norm_modulate_silu(x, tx, scale, shift)
        return y, ty, current_backend() == "reference"

    compiled = _compile(fn)
    y_ref, ty_ref = jvp_norm_modulate_silu(x, tx, scale, shift, backend="reference")
    with use_backend("reference"):
        y, ty, is_ref = compiled(x, tx, scale, shift)
    assert is_ref
    assert_close_to_ref(y, y_ref, name="y")
    assert_close_to_ref(ty, ty_ref, name="ty")


def test_unet_forward_jvp_compiles_with_fullgraph():
    """The DiT's forward_jvp compiles inside the ITVM loss below; the U-Net's (one level) here."""
    model = _trained(models.TwoTimeUNet.from_preset("tiny", num_classes=3, channel_mult=(1,)), 0.1)
    x, s = torch.randn(2, 3, 8, 8), torch.rand(2)
    t, y = s + 0.3, torch.tensor([0, 2])

    def fn(x, s, t, y):
        return model.forward_jvp(x, s, t, tt=torch.ones_like(t), y=y)

    with torch.no_grad():
        u, du = _compile(fn)(x, s, t, y)
        u_ref, du_ref = fn(x, s, t, y)
    assert_nontrivial(du, "du/dt")
    assert_close_to_ref(u, u_ref, name="u")
    assert_close_to_ref(du, du_ref, name="du/dt")


def _setup(device: str):
    torch.manual_seed(0)
    teacher = _trained(models.DiT.from_preset("tiny", depth=1), 0.1).to(device)
    student = _trained(models.TwoTimeDiT.from_teacher(teacher), 0.05)
    x1 = torch.randn(2, 3, 8, 8, device=device)
    return teacher, student, EMA(student), x1, torch.randn_like(x1)


def _check_step(fn, student: torch.nn.Module, x1: torch.Tensor, x0: torch.Tensor) -> None:
    """The compiled loss computation and eager agree on loss, stats and student gradients (same drawn times)."""
    results = []
    for f in (_compile(fn), fn):
        student.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the loss draws its times: the same draws in both runs
        loss, stats = f(x1, x0)
        loss.backward()
        results.append((loss.detach(), stats, {n: p.grad for n, p in student.named_parameters()
                                               if p.grad is not None}))
    (loss, stats, grads), (loss_ref, stats_ref, grads_ref) = results
    assert_close_to_ref(loss, loss_ref, name="loss", scale=10.0)
    assert stats.keys() == stats_ref.keys() and all(v.dim() == 0 for v in stats.values())
    for name, v in stats.items():
        assert_close_to_ref(v, stats_ref[name], name=f"stats[{name!r}]", scale=10.0)
    assert grads.keys() == grads_ref.keys() and len(grads) > 10
    assert_nontrivial(grads["cond.time_embed.d_embed.mlp.2.weight"], "(t - s) branch gradient")
    for name, g in grads.items():
        assert_close_to_ref(g, grads_ref[name], name=f"gradient of {name}", scale=10.0)


@pytest.mark.parametrize(("device", "target"), [("cpu", "jvp"), *(pytest.param(*p.values, target, id=f"cuda-{target}",
                                                                                marks=p.marks)
                                                                   for p in DEVICES[1:] for target in ("jvp", "fd"))])
def test_itvm_loss_compiles_with_fullgraph(device, target):
    """EMA forward_jvp (or two EMA forwards), teacher forward, batched student forward, fused loss: one graph."""
    teacher, student, ema, x1, x0 = _setup(device)
    _check_step(lambda x1, x0: itvm_loss(student, teacher, x1, ema=ema, x0=x0, target=target), student, x1, x0)


@pytest.mark.parametrize("device", DEVICES)
def test_emd_and_lfmd_losses_compile_with_fullgraph(device):
    """EMD as is; LFMD needs Dynamo to trace the torch.autograd.grad inside the fused ops' backward (its JVP keeps
    a graph), which ``torch._dynamo.config.trace_autograd_ops = True`` allows."""
    teacher, student, ema, x1, x0 = _setup(device)
    _check_step(lambda x1, x0: emd_loss(student, teacher, x1, ema=ema, x0=x0), student, x1, x0)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        _check_step(lambda x1, x0: lfmd_loss(student, teacher, x1, x0=x0), student, x1, x0)


def test_extension_registry_query_is_a_constant_of_the_graph():
    from ttfm_kernels import _ext

    def fn(x):
        return x + 1 if _ext.has_kernel("norm_modulate_jvp", "CPU") else x - 1

    x = torch.zeros(3)
    assert torch.equal(_compile(fn)(x), fn(x))
