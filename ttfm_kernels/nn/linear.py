"""Conv2d and Linear whose forward-mode tangent is ONE call on primal and tangent stacked along the batch dim.

Both layers are linear in their input, so with weights that carry no tangent (always true in ``jvp_t`` and
``jvp_sx``) the tangent is the same op, without bias, on the tangent (docs/math.md section 6). torch's own
forward-AD rule runs the op twice; here the primal and the tangent share one call. Drop-in subclasses of
torch's modules: same constructor arguments, same state_dict keys. The result stays differentiable end to end
(gradients through the tangent included). A weight that does carry a tangent falls back to torch's own rule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

__all__ = ["Conv2d", "Linear", "stacked_tangent"]


def _has_tangent(*tensors: torch.Tensor | None) -> bool:
    return any(t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors)


def stacked_tangent(op: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tx: torch.Tensor,
                    bias: torch.Tensor | None, batched: bool,
                    bias_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(op(x) + bias, op(tx)) from one call of the bias-free, input-linear ``op`` on x and tx stacked along dim 0.

    ``batched``: x has a batch dim (x and tx are concatenated along it); otherwise a new leading dim is stacked
    (an unbatched input is never stacked along its channel dim). ``bias_shape``: how the (out,) bias broadcasts
    against one output. Used by the layers here and by ``ttfm_kernels.fused_jvp`` for F.linear / F.conv*d.
    """
    if batched:
        out = op(torch.cat((x, tx)))
        y, ty = out[: x.shape[0]], out[x.shape[0]:]
    else:  # no batch dim: stack one
        y, ty = op(torch.stack((x, tx))).unbind(0)
    if bias is not None:  # in the output's dtype, as F.linear / conv add it under autocast (no promotion)
        y = y + bias.view(bias_shape).to(y.dtype)
    return y, ty


class _StackedTangent:
    """forward / forward_jvp of a layer linear in its input: the tangent rides along in the primal's call."""

    _bias_shape: tuple[int, ...]  # how the (out,) bias broadcasts against the output

    def _bias_free(self, inp: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _batched(self, x: torch.Tensor) -> bool:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xp, tx = fwAD.unpack_dual(x)
        if tx is None or _has_tangent(self.weight, self.bias):
            return super().forward(x)
        return fwAD.make_dual(*self.forward_jvp(xp, tx))

    def forward_jvp(self, x: torch.Tensor, tx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(layer(x), layer(tx) without bias) in one call; tx None gives (layer(x), None)."""
        if tx is None:
            return super().forward(x), None
        return stacked_tangent(self._bias_free, x, tx, self.bias, self._batched(x), self._bias_shape)


class Conv2d(_StackedTangent, nn.Conv2d):
    """``torch.nn.Conv2d`` with a fused forward-mode tangent (one convolution of [x; tx]).

    x: (B, C_in, H, W) or unbatched (C_in, H, W).
    """

    _bias_shape = (-1, 1, 1)

    def _bias_free(self, inp: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(inp, self.weight, None)

    def _batched(self, x: torch.Tensor) -> bool:
        return x.dim() == 4


class Linear(_StackedTangent, nn.Linear):
    """``torch.nn.Linear`` with a fused forward-mode tangent (one matmul of [x; tx]). x: (..., in_features)."""

    _bias_shape = (-1,)

    def _bias_free(self, inp: torch.Tensor) -> torch.Tensor:
        return F.linear(inp, self.weight)

    def _batched(self, x: torch.Tensor) -> bool:
        return x.dim() >= 2
