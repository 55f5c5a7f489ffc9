"""fused_jvp on stock diffusers models built from tiny configs (nothing downloads): tangent values against the
double-backward JVP (no forward AD at all), every Linear / conv / norm / SDPA call routed, an ITVM step equal to
the all-reference path, and an LFMD step on a DiT equal to an eager twin whose LayerNorm is written out."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ttfm_kernels import fused_jvp, itvm_loss, lfmd_loss, use_backend
from ttfm_kernels.testing import assert_close_to_ref, assert_nontrivial

diffusers = pytest.importorskip("diffusers")

B = 2


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convolutions on 2 threads spin under CPU contention (90 ms instead of 0.05 ms per call here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _unet() -> torch.nn.Module:
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                 attention_head_dim=8)


def _cond_unet() -> torch.nn.Module:
    return diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                          block_out_channels=(8, 16), cross_attention_dim=12, norm_num_groups=4,
                                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8)


def _dit() -> torch.nn.Module:
    return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                           out_channels=4, num_layers=2, sample_size=8, patch_size=2,
                                           num_embeds_ada_norm=10).eval()  # eval: no random label dropout


class Stock(torch.nn.Module):
    """v(x, t) = model(x, 1000 t, ...).sample of a stock diffusers model (the teacher's calling convention);
    ``encoder_hidden_states`` for the cross-attention UNet, fixed class labels for the DiT."""

    def __init__(self, kind: str, dtype: torch.dtype) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # diffusers' "keep modules in float32" note on .to(dtype)
            self.model = {"unet": _unet, "cond": _cond_unet, "dit": _dit}[kind]().to(dtype)
        self.kind, self.sigma = kind, 1.0

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        extra = {"encoder_hidden_states": context} if self.kind == "cond" else {}
        if self.kind == "dit":
            extra = {"class_labels": torch.arange(x.shape[0]) % 10}
        return self.model(x, 1000 * t, **extra).sample


class TwoTime(torch.nn.Module):
    """u(x, s, t) = (1 + (t - s)) v(x, (s + t) / 2): a two-time student made of a stock model (enough for the
    losses; the point is the JVP through the stock layers)."""

    def __init__(self, stock: Stock) -> None:
        super().__init__()
        self.stock, self.sigma = stock, 1.0

    def forward(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, **cond: object) -> torch.Tensor:
        return (1 + (t - s))[:, None, None, None] * self.stock(x, (s + t) / 2, **cond)


def _inputs(kind: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    x = torch.randn(B, 3 if kind == "unet" else 4, 8, 8, dtype=dtype)
    t = torch.rand(B, dtype=dtype) * 0.9
    return (x, t, torch.randn(B, 5, 12, dtype=dtype)) if kind == "cond" else (x, t)


@pytest.mark.parametrize("kind", ["unet", "cond", "dit"])
def test_tangent_matches_double_backward_jvp_and_every_layer_is_routed(kind):
    model = Stock(kind, torch.float64)
    primals = _inputs(kind, torch.float64)
    tangents = tuple(torch.randn_like(p) for p in primals)
    with sdpa_kernel(SDPBackend.MATH):
        ref = torch.autograd.functional.jvp(model, primals, tangents)
    with fused_jvp(stats=True) as plain:
        model(*primals)
    with fused_jvp(stats=True) as mode:
        got = torch.func.jvp(model, primals, tangents)
    calls = {name: n for (name, _), n in plain.stats.passed.items()}
    expected = {"unet": {"linear", "conv2d", "group_norm", "sdpa", "mul", "div"},
                "cond": {"linear", "conv2d", "group_norm", "layer_norm", "sdpa", "mul", "div"},
                "dit": {"linear", "conv2d", "layer_norm", "sdpa", "mul", "div"}}[kind]
    assert set(calls) == expected
    routed, passed = mode.stats.routed, mode.stats.passed
    layers = {name: n for name, n in calls.items() if name not in ("mul", "div")}
    assert {name: routed[name] for name in layers} == layers  # every layer call (all carry a tangent), routed
    # scalings: the time embedding's constant frequencies carry none; every other one is routed
    assert {name for name, _ in passed} <= {"mul", "div"} and {r for _, r in passed} <= {"no tangent"}
    for name in expected - set(layers):
        assert routed[name] >= 1 and routed[name] + passed[(name, "no tangent")] == calls[name], name
    assert_nontrivial(got[1])
    assert_close_to_ref(got[0], ref[0], name=f"{kind} output")
    assert_close_to_ref(got[1], ref[1], name=f"{kind} tangent", scale=10.0)  # fp64, deep: summation order


def test_stock_unet_jvp_fails_without_the_mode():
    """torch's own GroupNorm rule raises on the broadcast-expanded tangent after ``h + temb[:, :, None, None]``."""
    model = Stock("unet", torch.float32)
    x, t = _inputs("unet", torch.float32)
    with pytest.raises(RuntimeError, match="view size is not compatible"), sdpa_kernel(SDPBackend.MATH):
        torch.func.jvp(lambda tt: model(x, tt), (t,), (torch.ones_like(t),))


@pytest.mark.parametrize("kind", ["unet", "cond", "dit"])
def test_itvm_step_equals_the_all_reference_path(kind):
    torch.manual_seed(0)
    teacher = Stock(kind, torch.float32)
    student = TwoTime(copy.deepcopy(teacher))
    x, _, *context = _inputs(kind, torch.float32)
    cond = {"context": context[0]} if context else None
    times = {"s": torch.tensor([0.1, 0.4]), "t": torch.tensor([0.6, 0.9]), "x0": torch.randn_like(x)}

    def step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        loss, _ = itvm_loss(student, teacher, x, cond=cond, **times)
        params = [p for p in student.parameters() if p.requires_grad]
        return loss, torch.autograd.grad(loss, params, allow_unused=True)

    loss, grads = step()  # jvp_t inside enters fused_jvp(): the fused kernels
    with use_backend("reference"):
        ref_loss, ref_grads = step()
    assert_close_to_ref(loss, ref_loss, name="ITVM loss", scale=10.0)
    assert_close_to_ref(*_flat(grads, ref_grads), name="ITVM gradients", scale=50.0)  # fp32, whole model


def _flat(got: list[torch.Tensor | None], ref: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Both gradient lists as one vector each (the tolerance is relative to the largest entry of all of them;
    parameters right before a norm have gradients near zero), with the same parameters absent in both."""
    assert [g is None for g in got] == [r is None for r in ref]
    pairs = [(g.flatten(), r.flatten()) for g, r in zip(got, ref, strict=True) if r is not None]
    assert len(pairs) > 10
    flat_got, flat_ref = (torch.cat(t) for t in zip(*pairs, strict=True))
    assert_nontrivial(flat_got, "gradients")
    return flat_got, flat_ref


class WrittenOutLayerNorm(torch.nn.Module):
    """nn.LayerNorm in mean/var ops: the oracle's LayerNorm (torch 2.13's own forward-AD rule has wrong
    gradients through the tangent)."""

    def __init__(self, norm: torch.nn.LayerNorm) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(-len(self.norm.normalized_shape), 0))
        mean = x.mean(dims, keepdim=True)
        y = (x - mean) / torch.sqrt((x - mean).pow(2).mean(dims, keepdim=True) + self.norm.eps)
        if self.norm.weight is not None:
            y = y * self.norm.weight
        return y if self.norm.bias is None else y + self.norm.bias


def _written_out(model: torch.nn.Module) -> torch.nn.Module:
    twin = copy.deepcopy(model)
    norms = [(name, m) for name, m in twin.named_modules() if isinstance(m, torch.nn.LayerNorm)]
    for name, norm in norms:
        parent, _, attr = name.rpartition(".")
        setattr(twin.get_submodule(parent), attr, WrittenOutLayerNorm(norm))
    assert norms
    return twin


def test_lfmd_step_on_a_dit_equals_the_written_out_twin():
    torch.manual_seed(0)
    teacher = Stock("dit", torch.float64)
    student = TwoTime(copy.deepcopy(teacher))
    with torch.no_grad():  # adaLN-Zero starts at zero: make every block contribute
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    twin = _written_out(student)
    x, _ = _inputs("dit", torch.float64)
    times = {"s": torch.tensor([0.1, 0.4], dtype=torch.float64), "t": torch.tensor([0.6, 0.9], dtype=torch.float64),
             "x0": torch.randn_like(x)}

    def step(m: torch.nn.Module) -> list[torch.Tensor | None]:
        loss, _ = lfmd_loss(m, teacher, x, **times)
        return list(torch.autograd.grad(loss, list(m.parameters()), allow_unused=True))

    got = step(student)  # jvp_t: fused_jvp() routes F.layer_norm to the norm op
    assert_close_to_ref(*_flat(got, step(twin)), name="LFMD gradients", scale=100.0)  # fp64, 2-layer DiT
