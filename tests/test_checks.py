"""The argument check shared by every model's forward (``_checks.check_model_input``), through the MLP pair."""

import pytest
import torch

from ttfm_kernels.models import MLP, TwoTimeMLP


def test_mlp_pair_checks_x_and_times_by_name():
    teacher = MLP.from_preset("tiny", dim=3)
    student = TwoTimeMLP.from_teacher(teacher)
    x, t = torch.randn(4, 3), torch.rand(4)
    assert teacher(x, t).shape == student(x, t, t).shape == (4, 3)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3\), got \(4, 2\)"):
        teacher(torch.randn(4, 2), t)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3\), got \(4, 3, 1\)"):
        student(x[..., None], t, t)
    with pytest.raises(ValueError, match=r"t must be a floating tensor of shape \(B,\) = \(4,\), got torch\.int64"):
        teacher(x, torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"s must be a floating tensor of shape \(B,\) = \(4,\), .* \(4, 1\)"):
        student(x, t[:, None], t)
