"""The contract every loss follows: one signature, stats as detached 0-dim tensors, no host sync on values the
loss drew itself, conditioning batched recursively, and teacher-only conditioning."""

import inspect
from typing import NamedTuple

import pytest
import torch
from torch import nn

from tests.flow_models import DTYPE, TwoTimeNet, VelocityNet
from ttfm_kernels import EMA, TimeSampler, losses
from ttfm_kernels.losses import emd_loss, flow_matching_loss, itvm_loss, lfmd_loss, progressive_loss

N, D = 4, 3
COMMON = {"ema": None, "cond": None, "teacher_cond": None, "x0": None, "s": None, "t": None, "sigma": None,
          "weight": None, "reduction": "mean", "time_sampler": None, "backend": "auto", "extrapolate": False}
FLOW_MATCHING = {"cond": None, "x0": None, "t": None, "sigma": None, "weight": None, "reduction": "mean",
                 "time_sampler": None, "extrapolate": False}
SECOND = {itvm_loss: "teacher", emd_loss: "teacher", lfmd_loss: "teacher", progressive_loss: "frozen"}

# (loss, its keywords, whether the second model is the teacher v(x, t) or a two-time map u(x, s, t))
CASES = {
    "itvm-jvp": (itvm_loss, {}),
    "itvm-jvp-terminal": (itvm_loss, {"terminal_init": True}),
    "itvm-euler": (itvm_loss, {"target": "euler", "terminal_init": True}),
    "itvm-fd": (itvm_loss, {"target": "fd"}),
    "lfmd": (lfmd_loss, {}),
    "emd": (emd_loss, {}),
    "progressive": (progressive_loss, {}),
}
STATS = {itvm_loss: {"loss", "init", "term", "gap"}, lfmd_loss: {"loss", "residual", "gap"},
         emd_loss: {"loss", "residual", "gap"}, progressive_loss: {"loss", "residual", "gap"}}


def _keyword_only(fn):
    params = list(inspect.signature(fn).parameters.values())
    positional = [p for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    keywords = [p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert len(positional) + len(keywords) == len(params), fn.__name__  # no *args, **kwargs
    return [p.name for p in positional], {p.name: p.default for p in keywords}


def test_every_loss_has_the_contract_signature():
    """Distillation losses: (student, teacher | frozen, x1, *, <COMMON in this order>, <own keywords>)."""
    assert set(losses.__all__) == {fn.__name__ for fn in SECOND} | {"flow_matching_loss"}
    for fn, second in SECOND.items():
        positional, keywords = _keyword_only(fn)
        assert positional == ["student", second, "x1"], fn.__name__
        assert list(keywords)[:len(COMMON)] == list(COMMON), fn.__name__
        assert {k: keywords[k] for k in COMMON} == COMMON, fn.__name__
    positional, keywords = _keyword_only(flow_matching_loss)
    assert positional == ["model", "x1"]
    assert list(keywords)[:len(FLOW_MATCHING)] == list(FLOW_MATCHING)
    assert {k: keywords[k] for k in FLOW_MATCHING} == FLOW_MATCHING


def _second(fn):
    return TwoTimeNet(D) if fn is progressive_loss else VelocityNet(D)


@pytest.mark.parametrize("name", CASES)
def test_stats_are_detached_scalar_tensors_with_the_shared_keys(name):
    fn, kwargs = CASES[name]
    s = torch.rand(N, dtype=DTYPE) * 0.5
    loss, stats = fn(TwoTimeNet(D), _second(fn), torch.randn(N, D, dtype=DTYPE), s=s, t=s + 0.25,
                     reduction="none", **kwargs)
    assert set(stats) == STATS[fn] | ({"terminal_init"} if kwargs.get("terminal_init") else set())
    for key, value in stats.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad, key
        assert torch.isfinite(value), key
    assert stats["loss"] == loss.detach().mean()
    torch.testing.assert_close(stats["gap"], torch.tensor(0.25, dtype=DTYPE))
    _, stats = flow_matching_loss(VelocityNet(D), torch.randn(N, D, dtype=DTYPE))
    assert set(stats) == {"loss", "residual"} and all(v.dim() == 0 and not v.requires_grad for v in stats.values())
    torch.testing.assert_close(stats["loss"], stats["residual"])  # unweighted, so the same quantity


_HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__complex__")


@pytest.fixture
def host_reads(monkeypatch):
    """Record every Python-level read of a tensor's value on the host (what synchronises with a GPU)."""
    seen = []
    for method in _HOST_READS:
        original = getattr(torch.Tensor, method)

        def record(self, *args, _original=original, _method=method, **kwargs):
            seen.append(_method)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, record)
    return seen


def test_host_read_recorder_sees_conversions(host_reads):
    x = torch.ones(2)
    _ = float(x[0]), int(x[1]), bool(x.all()), x.sum().item()
    assert host_reads == ["__float__", "__int__", "__bool__", "item"]


@pytest.mark.parametrize("sampler", [TimeSampler(diagonal=0.25), TimeSampler(marginal="lognormal", min_gap=0.1)],
                         ids=["uniform-diagonal", "lognormal-gap"])
@pytest.mark.parametrize("name", CASES)
def test_no_host_sync_on_drawn_values(name, sampler, host_reads):
    """Drawn noise and times are never read back: a loss, its stats and EMA.update (with warmup) make no
    host read; only user-given times are validated that way."""
    fn, kwargs = CASES[name]
    student, second = TwoTimeNet(D), _second(fn)
    ema = EMA(student, decay=0.99, warmup=10)
    y, w = torch.tensor([0, 1, 2, 3]), torch.rand(N, dtype=DTYPE)
    x1 = torch.randn(N, D, dtype=DTYPE)
    if fn in (itvm_loss, emd_loss):
        kwargs = {**kwargs, "ema": ema}
    for reduction in ("mean", "none"):
        fn(student, second, x1, cond={"y": y}, weight=w, reduction=reduction, time_sampler=sampler, **kwargs)
    flow_matching_loss(VelocityNet(D), x1, cond={"y": y}, time_sampler=sampler)
    ema.update(student)
    assert host_reads == [], host_reads
    s = torch.rand(N, dtype=DTYPE) * 0.5
    fn(student, second, x1, s=s, t=s + 0.1)
    assert host_reads, "user-given times are validated on the host (finite, s <= t)"


class Pair(NamedTuple):
    offset: torch.Tensor
    table: torch.Tensor


class _NestedCond(nn.Module):
    """Wraps a TwoTimeNet (two-time) or VelocityNet (one time) taking diffusers-style nested conditioning:
    ``y`` (B,), ``added_cond_kwargs={"text_embeds": (B, E), "time_ids": [(B, 2), (B,)]}``,
    ``pair=Pair((B, 1), (5, E))`` (a named tuple holding a table of another size, shared by the whole batch) and
    ``flag``. Uses every batched tensor, so a wrong batch size cannot broadcast; records each call's conditioning.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.sigma = inner, inner.sigma
        self.seen: list[dict[str, object]] = []

    def forward(self, x, *times, y, added_cond_kwargs, pair, flag, **extra):
        self.seen.append({"batch": x.shape[0], "y": y, "added_cond_kwargs": added_cond_kwargs, "pair": pair,
                          "flag": flag, **extra})
        ids, level = added_cond_kwargs["time_ids"]
        h = added_cond_kwargs["text_embeds"].sum(1, keepdim=True) + ids.sum(1, keepdim=True) + level[:, None]
        return self.inner(x, *times, y=y) + 1e-3 * (h + pair[0] + pair[1].sum() + extra.get("scale", 0.0))


def _nested(batch: int) -> dict[str, object]:
    g = torch.Generator().manual_seed(batch)
    return {"y": torch.arange(batch) % 4,
            "added_cond_kwargs": {"text_embeds": torch.randn(batch, 6, dtype=DTYPE, generator=g),
                                  "time_ids": [torch.randn(batch, 2, dtype=DTYPE, generator=g),
                                               torch.randn(batch, dtype=DTYPE, generator=g)]},
            "pair": Pair(torch.randn(batch, 1, dtype=DTYPE, generator=g), torch.randn(5, 6, dtype=DTYPE, generator=g)),
            "flag": True}


def _assert_repeated(seen: dict[str, object], cond: dict[str, object]) -> None:
    """Every tensor of ``cond`` with the batch as leading dim arrives repeated to the call's batch; the shared
    table and the flag arrive as given; containers keep their kind."""
    reps = seen["batch"] // N
    assert seen["batch"] == reps * N and reps in (1, 2, 3)
    assert torch.equal(seen["y"], cond["y"].repeat(reps))
    got, want = seen["added_cond_kwargs"], cond["added_cond_kwargs"]
    assert isinstance(got, dict) and isinstance(got["time_ids"], list) and isinstance(seen["pair"], Pair)
    assert torch.equal(got["text_embeds"], want["text_embeds"].repeat(reps, 1))
    assert torch.equal(got["time_ids"][0], want["time_ids"][0].repeat(reps, 1))
    assert torch.equal(got["time_ids"][1], want["time_ids"][1].repeat(reps))
    assert torch.equal(seen["pair"][0], cond["pair"][0].repeat(reps, 1))
    assert seen["pair"][1] is cond["pair"][1] and seen["flag"] is True


# How many calls each loss batches into one call of each model (the batch sizes its calls must see).
BATCHING = {
    "itvm-jvp": {"student": {2 * N}, "ema": {N}, "teacher": {2 * N}},
    "itvm-jvp-terminal": {"student": {3 * N}, "ema": {N}, "teacher": {2 * N}},
    "itvm-euler": {"student": {3 * N}, "ema": {N}, "teacher": {2 * N}},
    "itvm-fd": {"student": {2 * N}, "ema": {2 * N}, "teacher": {2 * N}},
    "lfmd": {"student": {N}, "teacher": {N}},
    "emd": {"student": {N}, "ema": {N}, "teacher": {N}},
    "progressive": {"student": {N}, "teacher": {N}},
}


@pytest.mark.parametrize("name", CASES)
def test_nested_conditioning_is_batched_through_every_loss(name):
    """An ``added_cond_kwargs``-style nested dict (with lists, tuples, a shared table and a flag) reaches every
    model call with each batched tensor repeated to that call's batch (2- and 3-call batching included)."""
    fn, kwargs = CASES[name]
    student = _NestedCond(TwoTimeNet(D))
    second = _NestedCond(_second(fn))
    models = {"student": student, "teacher": second}
    if "ema" in BATCHING[name]:
        models["ema"] = kwargs_ema = _NestedCond(TwoTimeNet(D))
        kwargs = {**kwargs, "ema": kwargs_ema}
    cond = _nested(N)
    loss, _ = fn(student, second, torch.randn(N, D, dtype=DTYPE), cond=cond, **kwargs)
    loss.backward()
    for role, model in models.items():
        assert {seen["batch"] for seen in model.seen} == BATCHING[name][role], role
        for seen in model.seen:
            _assert_repeated(seen, cond)


def test_nested_conditioning_reaches_flow_matching():
    model, cond = _NestedCond(VelocityNet(D)), _nested(N)
    flow_matching_loss(model, torch.randn(N, D, dtype=DTYPE), cond=cond)[0].backward()
    assert len(model.seen) == 1
    _assert_repeated(model.seen[0], cond)


@pytest.mark.parametrize("name", CASES)
def test_teacher_cond_reaches_the_teacher_only(name):
    """``teacher_cond`` updates ``cond`` for the teacher's (or PFMM's frozen model's) calls: a key it replaces
    and a key it adds are seen there, batched like the rest, and never by the student or the EMA."""
    fn, kwargs = CASES[name]
    student = _NestedCond(TwoTimeNet(D))
    second = _NestedCond(_second(fn))
    others = [student]
    if "ema" in BATCHING[name]:
        others.append(_NestedCond(TwoTimeNet(D)))
        kwargs = {**kwargs, "ema": others[-1]}
    cond = _nested(N)
    null = torch.zeros(N, dtype=torch.long)
    fn(student, second, torch.randn(N, D, dtype=DTYPE), cond=cond,
       teacher_cond={"y": null, "scale": torch.full((N, 1), 2.0, dtype=DTYPE)}, **kwargs)
    assert second.seen
    for seen in second.seen:
        reps = seen["batch"] // N
        assert torch.equal(seen["y"], null.repeat(reps))
        assert torch.equal(seen["scale"], torch.full((seen["batch"], 1), 2.0, dtype=DTYPE))
        _assert_repeated({**seen, "y": cond["y"].repeat(reps)}, cond)
    for model in others:
        assert model.seen
        for seen in model.seen:
            assert "scale" not in seen
            _assert_repeated(seen, cond)


def test_teacher_cond_must_be_a_mapping_and_ema_is_rejected_without_a_target_network():
    student, teacher, x1 = TwoTimeNet(D), VelocityNet(D), torch.randn(N, D, dtype=DTYPE)
    for fn in SECOND:
        with pytest.raises(TypeError, match="teacher_cond must be a mapping"):
            fn(student, _second(fn), x1, teacher_cond=[("y", None)])
    for fn in (lfmd_loss, progressive_loss):
        with pytest.raises(ValueError, match=f"{fn.__name__} uses no target network"):
            fn(student, _second(fn), x1, ema=TwoTimeNet(D))
    with pytest.raises(ValueError, match="backend must be one of"):
        emd_loss(student, teacher, x1, backend="gpu")
