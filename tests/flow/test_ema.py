"""EMA: the update rule, warmup, buffers, state_dict round trip, forward and forward_jvp delegation."""

import pytest
import torch

from tests.flow_models import DTYPE, TwoTimeNet
from ttfm_kernels import EMA


def test_update_is_the_moving_average():
    model = TwoTimeNet(3)
    ema = EMA(model, decay=0.9)
    before = [p.clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for p0, p, q in zip(before, model.parameters(), ema.module.parameters(), strict=True):
        torch.testing.assert_close(q, 0.9 * p0 + 0.1 * p)
        assert not q.requires_grad
    assert int(ema.num_updates) == 1 and ema.sigma == model.sigma


def test_warmup_ramps_the_decay():
    model = TwoTimeNet(3)
    model.embed.bfloat16()  # parameters of two dtypes: the device-side decay is cast to each
    ema = EMA(model, decay=0.999, warmup=10)
    assert ema.current_decay() == pytest.approx(2 / 11)
    before = [p.clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)  # the decay 2/11 as a device tensor
    for p0, p, q in zip(before, model.parameters(), ema.module.parameters(), strict=True):
        tol = {"rtol": 1e-6, "atol": 1e-7} if q.dtype == DTYPE else {"rtol": 1.6e-2, "atol": 1e-2}  # bf16 rounding
        torch.testing.assert_close(q, 2 / 11 * p0 + 9 / 11 * p, **tol)
    assert ema.current_decay() == pytest.approx(3 / 12)
    ema.num_updates.fill_(10_000)
    assert ema.current_decay() == pytest.approx(0.999)


def test_forward_state_dict_and_forward_jvp():
    model = TwoTimeNet(3)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.net[0].weight.mul_(2)
    ema.update(model)
    x, s, t = torch.randn(2, 3, dtype=DTYPE), torch.zeros(2, dtype=DTYPE), torch.ones(2, dtype=DTYPE)
    other = EMA(TwoTimeNet(3))
    other.load_state_dict(ema.state_dict())
    torch.testing.assert_close(other(x, s, t), ema(x, s, t))
    assert int(other.num_updates) == 1
    with pytest.raises(AttributeError):
        _ = ema.forward_jvp  # the copy has none, so jvp_t falls back to torch.func.jvp
    model.forward_jvp = lambda *a, **k: "fused"
    assert EMA(model).forward_jvp() == "fused"


def test_update_rejects_another_architecture():
    with pytest.raises(ValueError, match="different parameters"):
        EMA(TwoTimeNet(3)).update(torch.nn.Linear(3, 3))
