"""``fused_jvp`` on standard layers and stock diffusers models (CPU fp32): the JVP against its forward, the mode
against plain ``torch.func.jvp``, the mode's cost per passed-through call.

- Layers at sizes where fixed Python cost is amortised: Linear / LayerNorm on (8, 1024, 768), Conv2d /
  GroupNorm on (8, 256, 64, 64). Candidates: the forward, ``torch.func.jvp`` (torch's own rules) and
  ``torch.func.jvp`` under ``fused_jvp()``; the tangent is on the input, no graph kept (the ITVM EMA JVP).
- Whole models, the JVP in the time (``jvp_t``'s tangent): the diffusers DiT (6 layers, 6 heads x 64, 32x32x4,
  patch 2, B=4) with ``torch.func.jvp`` under math SDPA as the baseline, and a diffusers UNet2DModel (64/128
  channels, attention, 32x32x3, B=4), on which ``torch.func.jvp`` fails (GroupNorm's rule on a broadcast
  tangent): its baseline is the double-backward trick, ``torch.autograd.functional.jvp``. Peak memory by the
  harness's fresh-process method.
Goals (recorded, printed, not asserted: timings on the shared 2-core machine swing): linear and conv JVP
<= 2.1x their forward; norms <= 3x their forward and >= 6x faster than func.jvp; the DiT JVP <= 2.1x its forward
and >= 1.6x faster than func.jvp; the UNet JVP <= 2.3x its forward. Parity is asserted first.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.harness import peak_rss_mb
from ttfm_kernels import fused_jvp
from ttfm_kernels.testing import assert_close_to_ref, assert_nontrivial

LAYERS = {
    "Linear(768, 768) (8, 1024, 768)": (lambda: nn.Linear(768, 768), (8, 1024, 768), 2.1, None),
    "LayerNorm(768) (8, 1024, 768)": (lambda: nn.LayerNorm(768), (8, 1024, 768), 3.0, 6.0),
    "Conv2d(256, 256, 3, p=1) (8, 256, 64, 64)": (lambda: nn.Conv2d(256, 256, 3, padding=1), (8, 256, 64, 64),
                                                  2.1, None),
    "GroupNorm(32, 256) (8, 256, 64, 64)": (lambda: nn.GroupNorm(32, 256), (8, 256, 64, 64), 3.0, 6.0),
}


def _methods(fn: Callable[..., torch.Tensor], primals: tuple[torch.Tensor, ...],
             tangents: tuple[torch.Tensor, ...]) -> dict[str, Callable[[], Any]]:
    """forward, func_jvp (math SDPA: the CPU flash kernel has no forward-AD rule), mode (fused_jvp), no graph."""

    @torch.no_grad()
    def forward() -> torch.Tensor:
        return fn(*primals)

    @torch.no_grad()
    def func_jvp() -> tuple[torch.Tensor, torch.Tensor]:
        with sdpa_kernel(SDPBackend.MATH):
            return torch.func.jvp(fn, primals, tangents)

    @torch.no_grad()
    def mode() -> tuple[torch.Tensor, torch.Tensor]:
        with fused_jvp():
            return torch.func.jvp(fn, primals, tangents)

    def double_backward() -> tuple[torch.Tensor, torch.Tensor]:
        with sdpa_kernel(SDPBackend.MATH):
            return torch.autograd.functional.jvp(fn, primals, tangents)

    return {"forward": forward, "func_jvp": func_jvp, "mode": mode, "double_backward": double_backward}


def _perturbed(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # away from zero inits (adaLN-Zero), as after training
    return model


def _check(got: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor], scale: float) -> None:
    assert_nontrivial(got[1])
    assert_close_to_ref(got[0], ref[0], name="primal", scale=scale)
    assert_close_to_ref(got[1], ref[1], name="tangent", scale=scale)


def _goals(res: Any, over_forward: float, over_baseline: float | None, baseline: str) -> None:
    ratio = res.median("mode") / res.median("forward")
    res.record("mode_over_forward", ratio)
    res.record("baseline_over_forward", res.median(baseline) / res.median("forward"))
    res.record("goal_mode_over_forward", over_forward)
    res.record("goal_met.mode_over_forward", ratio <= over_forward)
    if over_baseline is not None:
        res.record("goal_mode_speedup", over_baseline)
        res.record("goal_met.mode_speedup", res.speedup("mode") >= over_baseline)


@pytest.mark.parametrize("label", list(LAYERS))
def test_layer_jvp_cpu(compare, label: str) -> None:
    make, shape, over_forward, over_jvp = LAYERS[label]
    torch.manual_seed(0)
    layer = _perturbed(make())
    x, tx = torch.randn(shape), torch.randn(shape)
    fns = _methods(layer, (x,), (tx,))
    fns.pop("double_backward")
    res = compare(case=f"fused_jvp {label} cpu fp32", fns=fns, baseline="func_jvp",
                  check=lambda: _check(fns["mode"](), fns["func_jvp"](), 4.0), rounds=3)
    _goals(res, over_forward, over_jvp, "func_jvp")
    if over_jvp is not None:  # the norms: torch's rules cost 25-60x the forward here, the fused op ~2x
        assert res.speedup("mode") >= 2.0


def test_pass_through_overhead_cpu(compare) -> None:
    """Microseconds the open mode adds to a torch call it does not route, and to a routed one with no tangent."""
    a, w = torch.randn(4, 8), torch.randn(8, 8)
    calls = 2000

    def loop(fn: Callable[[], Any], with_mode: bool) -> Callable[[], None]:
        def run() -> None:
            with fused_jvp() if with_mode else torch.no_grad():
                for _ in range(calls):
                    fn()
        return run

    fns = {"add": loop(lambda: torch.add(a, a), False), "add_mode": loop(lambda: torch.add(a, a), True),
           "linear": loop(lambda: F.linear(a, w), False), "linear_mode": loop(lambda: F.linear(a, w), True)}

    def check() -> None:
        with fused_jvp(stats=True) as mode:
            torch.add(a, a)
            F.linear(a, w)
        assert mode.stats.passed == {("linear", "no tangent"): 1} and not mode.stats.routed

    res = compare(case="fused_jvp pass-through overhead (4, 8) cpu fp32", fns=fns, baseline="add", check=check,
                  rounds=5)
    for name in ("add", "linear"):
        res.record(f"overhead_us.{name}", (res.median(f"{name}_mode") - res.median(name)) / calls * 1e6)


def _dit() -> tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]:
    from diffusers import DiTTransformer2DModel

    model = _perturbed(DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=64, in_channels=4,
                                             out_channels=4, num_layers=6, sample_size=32, patch_size=2,
                                             num_embeds_ada_norm=10).eval())
    labels = torch.arange(4) % 10
    x = torch.randn(4, 4, 32, 32)
    return (lambda t: model(x, t, class_labels=labels).sample), (1000 * torch.rand(4),)


def _unet() -> tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]:
    from diffusers import UNet2DModel

    model = _perturbed(UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                                   block_out_channels=(64, 128), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                   up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=32))
    x = torch.randn(4, 3, 32, 32)
    return (lambda t: model(x, t).sample), (1000 * torch.rand(4),)


MODELS = {"dit": (_dit, "func_jvp", 2.1, 1.6), "unet": (_unet, "double_backward", 2.3, None)}


def make_fn(model: str, method: str) -> Callable[[], Any]:
    """A zero-arg call of one method on a fresh model, warmed up (the ``peak_rss_mb`` entry point)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn, primals = MODELS[model][0]()
    fns = _methods(fn, primals, (torch.ones_like(primals[0]),))
    fns[method]()
    return fns[method]


@pytest.mark.parametrize("model", list(MODELS))
def test_diffusers_model_jvp_cpu(compare, model: str) -> None:
    pytest.importorskip("diffusers")
    make, baseline, over_forward, over_baseline = MODELS[model]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn, primals = make()
    tangents = (torch.ones_like(primals[0]),)  # jvp_t's tangent: the time only
    fns = _methods(fn, primals, tangents)
    fns = {name: fns[name] for name in ("forward", baseline, "mode")}
    res = compare(case=f"fused_jvp diffusers {model} B4 cpu fp32", fns=fns, baseline=baseline,
                  check=lambda: _check(fns["mode"](), fns[baseline](), 20.0), rounds=3)
    _goals(res, over_forward, over_baseline, baseline)
    for method in ("forward", baseline, "mode"):
        res.record(f"peak_rss_mb.{method}", peak_rss_mb("benchmarks.bench_jvp_models:make_fn", model=model,
                                                        method=method))
    if model == "unet":  # why the baseline is the double-backward trick: torch's own rules fail on it
        with pytest.raises(RuntimeError, match="view size is not compatible"), sdpa_kernel(SDPBackend.MATH):
            torch.func.jvp(fn, primals, tangents)
