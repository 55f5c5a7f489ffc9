"""Conv2d and Linear whose forward-mode tangent is the same op, without bias, on the tangent: no forward-AD rule.

Both layers are linear in their input, so with weights that carry no tangent (always true in ``jvp_t`` and
``jvp_sx``) the tangent is the same op, without bias, on the tangent (docs/math.md section 6). torch's own
forward-AD rule pays its dual-tensor bookkeeping on top of the two ops; here they are two plain calls. Drop-in
subclasses of torch's modules: same constructor arguments, same state_dict keys. The result stays differentiable
end to end (gradients through the tangent included). A weight that does carry a tangent falls back to torch's own rule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from ttfm_kernels._dispatch import carries_tangent

__all__ = ["Conv2d", "Linear", "linear_tangent"]


def linear_tangent(op: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], x: torch.Tensor,
                   tx: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(op(x, bias), op(tx, None)): the value and tangent of ``op``, linear in its input, with a tangent-free weight.

    ``op(input, bias)``: F.linear / F.conv*d with the weight bound. Two plain calls: on CPU they beat one call on
    [x; tx] stacked along the batch dim, whose concatenation and separate bias add cost 20-40% of a forward at
    (8, 1024, 768) and (4, 256, 64, 64) (docs/performance.md). Used by the layers here and by
    ``ttfm_kernels.fused_jvp`` for F.linear / F.conv*d.
    """
    return op(x, bias), op(tx, None)


class _LinearInInput:
    """forward / forward_jvp of a layer linear in its input: the tangent is the layer without bias on tx."""

    def _call(self, inp: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xp, tx = fwAD.unpack_dual(x)
        if tx is None or carries_tangent(self.weight, self.bias):
            return super().forward(x)
        return fwAD.make_dual(*self.forward_jvp(xp, tx))

    def forward_jvp(self, x: torch.Tensor, tx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(layer(x), layer(tx) without bias); tx None gives (layer(x), None)."""
        if tx is None:
            return super().forward(x), None
        return linear_tangent(self._call, x, tx, self.bias)


class Conv2d(_LinearInInput, nn.Conv2d):
    """``torch.nn.Conv2d`` whose forward-mode tangent is the bias-free convolution of tx (no forward-AD rule).

    x: (B, C_in, H, W) or unbatched (C_in, H, W).
    """

    def _call(self, inp: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._conv_forward(inp, self.weight, bias)


class Linear(_LinearInInput, nn.Linear):
    """``torch.nn.Linear`` whose forward-mode tangent is the bias-free matmul of tx (no forward-AD rule).

    x: (..., in_features).
    """

    def _call(self, inp: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(inp, self.weight, bias)
