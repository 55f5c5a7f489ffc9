"""UNet specifics: level/skip bookkeeping, argument errors (shared behaviour: test_zoo.py)."""

from __future__ import annotations

import pytest
import torch

from ttfm_kernels import models


@pytest.mark.parametrize(("channel_mult", "num_res_blocks"), [((1,), 1), ((1, 2, 2), 2), ((2, 1), 0)])
def test_levels_and_skips(channel_mult, num_res_blocks):
    student = models.TwoTimeUNet(8, 2, channels=8, channel_mult=channel_mult, num_res_blocks=num_res_blocks,
                                 num_heads=2, groups=4)
    x, s = torch.randn(2, 2, 8, 8), torch.rand(2)
    with torch.no_grad():
        assert student(x, s, s + 0.1).shape == x.shape


def test_argument_errors():
    with pytest.raises(ValueError, match="divisible by 2 \\*\\* \\(len\\(channel_mult\\) - 1\\) = 4"):
        models.UNet(6, 3, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="num_groups=32 must divide"):
        models.UNet(8, 3, channels=16)
