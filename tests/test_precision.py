"""The precision policy (docs/design.md, "Precision policy"): training steps under autocast bf16 against fp32,
with the compute checked to really be bf16; mixed parameter dtypes; the EMA's fp32 shadow; fp32 times."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
from torch import nn

from ttfm_kernels import EMA, TimeSampler, _dispatch, models, sample
from ttfm_kernels._dispatch import BackendUnavailableError
from ttfm_kernels.losses import emd_loss, itvm_loss, lfmd_loss, progressive_loss
from ttfm_kernels.models import sinusoidal_embedding
from ttfm_kernels.nn import Attention
from ttfm_kernels.ops.attention import function as attention_function
from ttfm_kernels.ops.attention import jvp_attention
from ttfm_kernels.ops.norm import function as norm_function
from ttfm_kernels.ops.residual import flow_map_step, itvm_residual_loss

BF16 = torch.bfloat16
ARCHS = ("MLP", "DiT", "UNet")
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
LOSSES = {
    "itvm-jvp": (itvm_loss, {"target": "jvp"}),
    "itvm-euler": (itvm_loss, {"target": "euler"}),
    # "fd" divides a difference of two bf16 EMA outputs by delta: bf16 rounding (2^-9 relative) is amplified
    # 1/delta times (docs/design.md); delta = 0.25 keeps the MLP's step within 2e-2 of fp32 (0.1 gives 3%).
    "itvm-fd": (itvm_loss, {"target": "fd", "delta": 0.25}),
    "lfmd": (lfmd_loss, {}),
    "emd": (emd_loss, {}),
    "progressive": (progressive_loss, {}),
}


def _perturbed(model: nn.Module, seed: int, std: float = 0.05) -> nn.Module:
    """``model`` with every parameter moved by N(0, std^2) noise: the zero-initialised output layers of the
    image models become live, and teacher and student disagree by O(1) (a residual far above bf16 rounding)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return model


@functools.cache
def _pair(arch: str) -> tuple[nn.Module, nn.Module]:
    std = 0.12 if arch == "MLP" else 0.05  # the MLP's residuals must also stand far above bf16 rounding
    teacher = _perturbed(getattr(models, arch).from_preset("tiny"), 1, std)
    student = _perturbed(getattr(models, "TwoTime" + arch).from_teacher(teacher), 2, std)
    return teacher, student


def _batch(arch: str, batch: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    shape = (batch, 2) if arch == "MLP" else (batch, 3, 8, 8)
    s = torch.rand(batch, generator=g) * 0.5
    return {"x1": torch.randn(shape, generator=g), "x0": torch.randn(shape, generator=g), "s": s,
            "t": s + 0.1 + 0.4 * torch.rand(batch, generator=g)}


def _step(arch: str, loss_name: str, autocast: torch.dtype | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One loss + backward on fresh copies of the pair: (loss, gradients by parameter name)."""
    teacher, student = _pair(arch)
    student = _copy(student)
    fn, kwargs = LOSSES[loss_name]
    other = _perturbed(_copy(student), 4) if loss_name == "progressive" else teacher  # a frozen copy, moved
    b = _batch(arch)
    context = torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with context:
        loss, _ = fn(student, other, b.pop("x1"), **b, **kwargs)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in student.named_parameters()}


def _copy(model: nn.Module) -> nn.Module:
    clone = type(model)(**model.config)
    clone.load_state_dict(model.state_dict())
    return clone


class _DtypeRecorder:
    """Forward hooks on the linear, conv and attention layers recording their output dtypes, and wrappers of the
    fused kernels' launchers recording their inputs' dtypes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.layers: list[tuple[str, torch.dtype]] = []
        self.fused: list[tuple[str, torch.dtype]] = []
        run_kernel, fused_forward = norm_function._run_kernel, attention_function._fused_forward

        def norm_kernel(name, x, tx, *args, **kwargs):
            self.fused.append(("norm x", x.dtype))
            if tx is not None:
                self.fused.append(("norm tx", tx.dtype))
            return run_kernel(name, x, tx, *args, **kwargs)

        def attention_kernel(name, q, k, v, tangents, *args):
            self.fused.extend([("attention q", q.dtype), ("attention k", k.dtype), ("attention v", v.dtype)])
            self.fused.extend(("attention tangent", t.dtype) for t in tangents if t is not None)
            return fused_forward(name, q, k, v, tangents, *args)

        monkeypatch.setattr(norm_function, "_run_kernel", norm_kernel)
        monkeypatch.setattr(attention_function, "_fused_forward", attention_kernel)
        self._handle = nn.modules.module.register_module_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple, output: object) -> None:
        if isinstance(module, (nn.Linear, nn.Conv2d, Attention)) and isinstance(output, torch.Tensor):
            self.layers.append((type(module).__name__, output.dtype))

    def close(self) -> None:
        self._handle.remove()


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("arch", ARCHS)
def test_autocast_bf16_step_matches_fp32_and_computes_in_bf16(arch, loss_name, monkeypatch):
    """A full training step under CPU autocast bf16: loss within 2e-2 of the fp32 step, every gradient tensor
    of norm > 1e-6 at cosine >= 0.99; and the students' linear / conv / attention layers output bf16 and the
    fused kernels read bf16 (an implementation that upcast everything to fp32 fails here)."""
    loss32, grads32 = _step(arch, loss_name, None)
    recorder = _DtypeRecorder(monkeypatch)
    try:
        loss16, grads16 = _step(arch, loss_name, BF16)
    finally:
        recorder.close()
    assert loss32.dtype == loss16.dtype == torch.float32
    assert abs(float(loss16) - float(loss32)) <= 2e-2 * abs(float(loss32)), (float(loss16), float(loss32))
    checked = 0
    for name, g32 in grads32.items():
        g16 = grads16[name]
        assert g16.dtype == torch.float32  # fp32 parameters keep fp32 gradients under autocast
        if g32.norm() > 1e-6:
            cos = torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0)
            assert cos >= 0.99, (name, float(cos))
            checked += 1
    assert checked >= 5
    assert recorder.layers and all(d == BF16 for _, d in recorder.layers), set(recorder.layers)
    if arch != "MLP" and loss_name in ("itvm-jvp", "lfmd", "emd"):  # the steps that take a JVP: fused ops run
        kinds = {k.split()[0] for k, _ in recorder.fused}
        assert kinds == {"norm", "attention"} or (arch == "UNet" and "norm" in kinds), kinds
        assert all(d == BF16 for _, d in recorder.fused), set(recorder.fused)


def test_bf16_teacher_beside_fp32_student():
    """A bf16 teacher (a common memory trade) with an fp32 student, without autocast: each model gets x in its
    own dtype, the loss is fp32 and close to the all-fp32 loss, the student's gradients are fp32."""
    teacher, student = _pair("DiT")
    b = _batch("DiT")
    x1 = b.pop("x1")
    ref, _ = itvm_loss(student, teacher, x1, **b)
    half = _copy(teacher).to(BF16)
    loss, stats = itvm_loss(student, half, x1, **b)
    loss.backward()
    assert loss.dtype == torch.float32 and stats["term"].dtype == torch.float32
    assert abs(float(loss) - float(ref)) <= 2e-2 * float(ref)
    assert all(p.grad.dtype == torch.float32 for p in student.parameters())


def test_ema_of_a_bf16_model_tracks_the_fp32_ema():
    """The same bf16 parameter sequence (steady drift, each step far below a bf16 ulp of the average's change
    per update) averaged by a bf16 model's EMA (fp32 shadow) and by an fp32 EMA: they agree to bf16 rounding.
    A bf16 lerp (shadow_dtype=None) loses the small updates and ends far from the fp32 average."""
    model = nn.Linear(64, 64).to(BF16)
    twin = nn.Linear(64, 64)  # fp32, loaded with the bf16 model's values at every step
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(1.0)
    twin.load_state_dict(model.state_dict())
    emas = {"shadow": EMA(model, decay=0.99), "bf16": EMA(model, decay=0.99, shadow_dtype=None),
            "fp32": EMA(twin, decay=0.99)}
    assert emas["shadow"].module.weight.dtype == BF16 and emas["shadow"].shadow.get_buffer("0").dtype == torch.float32
    assert emas["fp32"].module.weight.dtype == torch.float32 and not list(emas["fp32"].shadow.buffers())
    for step in range(1, 301):
        with torch.no_grad():
            model.weight.fill_(1.0 + 0.25 * step / 300)  # bf16 values from 1.0 to 1.25
            model.bias.fill_(1.0 + 0.25 * step / 300)
        twin.load_state_dict(model.state_dict())
        for name in ("shadow", "bf16"):
            emas[name].update(model)
        emas["fp32"].update(twin)
    ref = emas["fp32"].module.weight.float()
    motion = (ref - 1.0).abs().max()
    off_shadow = (emas["shadow"].module.weight.float() - ref).abs().max() / motion
    off_bf16 = (emas["bf16"].module.weight.float() - ref).abs().max() / motion
    assert off_shadow < 0.03, float(off_shadow)  # bf16 rounding of the result only (measured 0.002)
    assert off_bf16 > 0.3, float(off_bf16)  # the bf16 lerp stalls (measured 1.0: it never moves)
    # the state round-trips, shadows included, and forward runs in the model's dtype
    other = EMA(model, decay=0.99)
    other.load_state_dict(emas["shadow"].state_dict())
    torch.testing.assert_close(other.shadow.get_buffer("0"), emas["shadow"].shadow.get_buffer("0"))
    assert other(torch.randn(2, 64, dtype=BF16)).dtype == BF16


def test_ema_update_uses_foreach_and_keeps_its_copy_in_eval_mode(monkeypatch):
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).to(BF16)
    ema = EMA(model, decay=0.9, warmup=5)
    calls = []
    lerp = torch._foreach_lerp_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda *a: calls.append(len(a[0])) or lerp(*a))
    ema.train()
    ema.update(model)
    assert calls == [2] and not ema.module.training and ema.training
    x = torch.ones(3, 4, dtype=BF16)
    torch.testing.assert_close(ema(x), ema(x))  # dropout off in the average's forward


def _sample(student: nn.Module, grid: list[float]) -> torch.Tensor:
    x0 = torch.randn((4, 3, 8, 8), generator=torch.Generator().manual_seed(5))
    return sample(student, x0, grid=grid)


def test_bf16_student_samples_match_fp32_with_fp32_times():
    """3 jumps of a bf16 student from fp32 noise equal the fp32 student's to bf16 tolerance, because the times
    (and t - s) stay fp32; the same jumps on times rounded to bf16 (what casting the times to the model's dtype
    did) leave that tolerance, so the comparison is sharp enough to see rounded times."""
    _, student = _pair("DiT")
    grid = [0.0, 1 / 3, 2 / 3, 1.0]
    ref = _sample(student, grid)
    half = _copy(student).to(BF16)
    out = _sample(half, grid)
    assert out.dtype == torch.float32  # the state is fp32; the model is called with bf16 inputs

    def rel(a: torch.Tensor) -> float:
        return float((a - ref).norm() / ref.norm())

    tol = 5e-3  # a bf16 ulp is 2^-8 = 3.9e-3 relative; measured here: 2.2e-3 (fp32 times), 8.5e-3 (rounded)
    assert rel(out) <= tol, rel(out)
    rounded = [float(torch.tensor(v).to(BF16)) for v in grid]
    assert rel(_sample(student, rounded)) > tol, rel(_sample(student, rounded))


def test_times_are_fp32_or_wider():
    t = torch.tensor([0.75, 1 / 3])
    assert sinusoidal_embedding(t.to(BF16), 8).dtype == torch.float32
    torch.testing.assert_close(sinusoidal_embedding(t, 8), sinusoidal_embedding(t.double(), 8).float())
    with pytest.raises(ValueError, match="float32 or wider"):
        TimeSampler()(4, dtype=BF16)
    s, t = TimeSampler()(4, dtype=torch.float64)
    assert s.dtype == t.dtype == torch.float64


def test_flow_map_step_keeps_the_step_in_fp32():
    """u in another dtype is accepted (cast to the state's dtype); for a bf16 state the step t - s = 1e-3
    is not rounded to bf16 first (bf16(1e-3) is 0.2% off): one rounding of the fp32 result."""
    x = torch.randn(3, 5).to(BF16)
    u = torch.randn(3, 5)
    s = torch.full((3,), 0.5)
    t = s + 1e-3
    want = (x.float() + (t - s)[:, None] * u.to(BF16).float()).to(BF16)
    for backend in ("reference", "cpu"):
        got = flow_map_step(x, u, s, t, backend=backend)
        assert got.dtype == BF16
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    x32 = torch.randn(3, 5)
    got = flow_map_step(x32, u.to(BF16), s, t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, x32 + (t - s)[:, None] * u.to(BF16).float())


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_residual_loss_takes_mixed_dtypes(backend):
    """bf16 student outputs beside fp32 targets: the op upcasts at its boundary (exact) and equals the fp32 loss;
    the gradients come back in the students' dtype."""
    g = torch.Generator().manual_seed(0)
    u_st, u_ss = (torch.randn(4, 6, generator=g).to(BF16).requires_grad_() for _ in range(2))
    v_s, a, b = (torch.randn(4, 6, generator=g) for _ in range(3))
    coef = torch.rand(4, generator=g)
    loss = itvm_residual_loss(u_st, u_ss, v_s, a, b, coef, backend=backend)
    ref = itvm_residual_loss(u_st.float(), u_ss.float(), v_s, a, b, coef, backend="reference")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert u_st.grad.dtype == BF16 and u_st.grad.abs().sum() > 0


def test_attention_follows_autocast_and_the_dispatch_rule(monkeypatch):
    """Under autocast the fused attention computes in the autocast dtype like SDPA; a dtype the CPU kernel
    cannot run (fp16) warns once under "auto" (reference path) and raises when "cpu" is asked for."""
    g = torch.Generator().manual_seed(0)
    q, k, v, tq = (torch.randn(1, 2, 8, 16, generator=g) for _ in range(4))
    with torch.autocast("cpu", dtype=BF16):
        o, t_o = jvp_attention(q, k, v, tq)
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert o.dtype == t_o.dtype == sdpa.dtype == BF16
    torch.testing.assert_close(o, sdpa, rtol=2e-2, atol=2e-2)
    assert t_o.float().abs().sum() > 0
    monkeypatch.setattr(_dispatch, "_warned", set())  # the warning is once per process: start afresh
    with torch.autocast("cpu", dtype=torch.float16):
        with pytest.warns(RuntimeWarning, match="does not support torch.float16"):
            o16, _ = jvp_attention(q, k, v, tq)
        with pytest.raises(BackendUnavailableError, match="float16"):
            jvp_attention(q, k, v, tq, backend="cpu")
    assert o16.dtype == torch.float16


def test_fused_jvp_itvm_on_a_diffusers_dit_under_autocast(monkeypatch):
    """The fused JVP mode (entered by jvp_t around torch.func.jvp) on a stock diffusers DiT under CPU autocast
    bf16: the routed linear returns bf16, the norm op takes bf16 x beside the fp32 LayerNorm weight, the
    fused attention reads bf16; the ITVM loss is within 2e-2 of fp32 and the gradients agree."""
    pytest.importorskip("diffusers")
    from tests.test_fused_jvp_diffusers import Stock, TwoTime

    torch.manual_seed(0)
    teacher = _perturbed(Stock("dit", torch.float32), 6, 0.02)
    student = _perturbed(TwoTime(_perturbed(Stock("dit", torch.float32), 6, 0.02)), 7, 0.02)
    g = torch.Generator().manual_seed(8)
    x1, x0 = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    times = {"x0": x0, "s": torch.tensor([0.1, 0.4]), "t": torch.tensor([0.6, 0.9])}

    def step(autocast: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.autocast("cpu", dtype=BF16, enabled=autocast):
            loss, _ = itvm_loss(student, teacher, x1, **times)
        params = [p for p in student.parameters() if p.requires_grad]
        return loss, torch.autograd.grad(loss, params, allow_unused=True)

    loss32, grads32 = step(False)
    recorder = _DtypeRecorder(monkeypatch)
    try:
        loss16, grads16 = step(True)
    finally:
        recorder.close()
    assert abs(float(loss16) - float(loss32)) <= 2e-2 * float(loss32), (float(loss16), float(loss32))
    for g32, g16 in zip(grads32, grads16, strict=True):
        if g32 is not None and g32.norm() > 1e-6:
            assert torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0) >= 0.99
    kinds = {k.split()[0] for k, _ in recorder.fused}
    assert kinds == {"norm", "attention"}, kinds
    assert all(d == BF16 for _, d in recorder.fused), set(recorder.fused)
    assert recorder.layers and all(d == BF16 for _, d in recorder.layers), set(recorder.layers)
