"""DiT specifics: patchify/unpatchify layout, argument errors (shared behaviour: test_zoo.py)."""

from __future__ import annotations

import pytest
import torch

from ttfm_kernels import models


def test_unpatchify_puts_each_patch_back_where_it_came_from():
    """Without blocks, output patch (i, j) depends on input patch (i, j) only: the two layouts agree."""
    model = models.DiT(8, 2, patch_size=2, hidden_size=32, depth=0, num_heads=2, freq_dim=16).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, t = torch.randn(1, 2, 8, 8, dtype=torch.float64), torch.rand(1, dtype=torch.float64)
    bumped = x.clone()
    bumped[0, 1, 5, 2] += 1.0  # pixel (5, 2) lies in patch rows 4:6, cols 2:4
    with torch.no_grad():
        changed = (model(bumped, t) - model(x, t)).abs().amax(dim=(0, 1)) > 0
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[4:6, 2:4] = True
    assert torch.equal(changed, expected)


def test_argument_errors():
    with pytest.raises(ValueError, match="patch_size=3 must divide image_size=8"):
        models.DiT(8, 3, patch_size=3)
    with pytest.raises(ValueError, match="multiple of 4"):
        models.DiT(8, 3, hidden_size=30, num_heads=3)
    with pytest.raises(ValueError, match="num_classes must be >= 0"):
        models.TwoTimeDiT.from_preset("tiny", num_classes=-1)
