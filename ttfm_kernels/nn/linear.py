"""Conv2d and Linear whose forward-mode tangent is ONE call on primal and tangent stacked along the batch dim.

Both layers are linear in their input, so with weights that carry no tangent (always true in ``jvp_t`` and
``jvp_sx``) the tangent is the same op, without bias, on the tangent (MATH.md section 6). torch's own
forward-AD rule runs the op twice; here the primal and the tangent share one call. Drop-in subclasses of
torch's modules: same constructor arguments, same state_dict keys. The result stays differentiable end to end
(gradients through the tangent included). A weight that does carry a tangent falls back to torch's own rule.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

__all__ = ["Conv2d", "Linear"]


def _has_tangent(*tensors: torch.Tensor | None) -> bool:
    return any(t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors)


def _stacked(op, x: torch.Tensor, tx: torch.Tensor, bias: torch.Tensor | None, batched: bool,
             bias_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(op(x) + bias, op(tx)) from one call of the bias-free ``op`` on x and tx stacked along dim 0."""
    if batched:
        out = op(torch.cat((x, tx)))
        y, ty = out[: x.shape[0]], out[x.shape[0]:]
    else:  # no batch dim: stack one
        y, ty = op(torch.stack((x, tx))).unbind(0)
    if bias is not None:
        y = y + bias.view(bias_shape)
    return y, ty


class Conv2d(nn.Conv2d):
    """``torch.nn.Conv2d`` with a fused forward-mode tangent (one convolution of [x; tx])."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xp, tx = fwAD.unpack_dual(x)
        if tx is None or _has_tangent(self.weight, self.bias):
            return super().forward(x)
        y, ty = self.forward_jvp(xp, tx)
        return fwAD.make_dual(y, ty)

    def forward_jvp(self, x: torch.Tensor, tx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(conv(x), conv(tx) without bias) in one call; x, tx: (B, C_in, H, W) or (C_in, H, W)."""
        if tx is None:
            return super().forward(x), None
        return _stacked(lambda inp: self._conv_forward(inp, self.weight, None), x, tx, self.bias, x.dim() == 4,
                        (-1, 1, 1))


class Linear(nn.Linear):
    """``torch.nn.Linear`` with a fused forward-mode tangent (one matmul of [x; tx])."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xp, tx = fwAD.unpack_dual(x)
        if tx is None or _has_tangent(self.weight, self.bias):
            return super().forward(x)
        y, ty = self.forward_jvp(xp, tx)
        return fwAD.make_dual(y, ty)

    def forward_jvp(self, x: torch.Tensor, tx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(linear(x), tx @ weight.T) in one call; x, tx: (..., in_features)."""
        if tx is None:
            return super().forward(x), None
        return _stacked(lambda inp: F.linear(inp, self.weight), x, tx, self.bias, x.dim() >= 2, (-1,))
