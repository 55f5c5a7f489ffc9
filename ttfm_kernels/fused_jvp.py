"""``fused_jvp``: a ``TorchFunctionMode`` that gives any PyTorch model the library's fused forward-mode tangents.

Inside ``with fused_jvp():`` a call of a routed torch function whose input carries a forward-AD tangent
(``torch.func.jvp`` or ``torch.autograd.forward_ad``) and whose parameters carry none runs the fused form:

- ``F.linear``, ``F.conv1d/2d/3d``: the op on the primal with its bias and on the tangent without, two plain
  calls outside forward AD (the op is linear in its input; ``ttfm_kernels.nn.linear.linear_tangent``);
- ``F.layer_norm`` / ``torch.layer_norm``, ``F.group_norm`` / ``torch.group_norm``: the fused norm JVP op
  (``jvp_norm_modulate_silu`` without modulation or activation), whose backward recomputes the explicit formula:
  gradients through the tangent are right, unlike torch 2.13's own ``F.layer_norm`` rule (docs/support.md);
- ``F.scaled_dot_product_attention``: ``ttfm_kernels.attention`` (the fused attention JVP);
- ``x * c``, ``c * x``, ``x / c`` (``torch.mul`` / ``torch.div`` and the Tensor methods) with a Python number c:
  the op on the primal and on the tangent (torch's own rule costs about 6x the op; diffusers divides every ResNet
  and attention output by a scale factor). Products and quotients of two tensors are not routed (not counted).

Everything else, and every routed call with no tangent, a tangent on a weight or bias (a JVP with respect to
parameters), a tensor-subclass argument (DTensor, quantized weights) or an active ``vmap`` (the library's
autograd Functions have no vmap rule) runs torch's own function and rule, untouched. The mode is thread-local
(torch keeps one mode stack per thread) and composes with other modes. The handler calls ``func(*args,
**kwargs)`` directly: torch pops the mode while its handler runs, so there is no recursion.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.overrides import TorchFunctionMode

from ttfm_kernels._dispatch import BACKENDS, warn_once
from ttfm_kernels.nn.linear import linear_tangent
from ttfm_kernels.ops.attention import attention
from ttfm_kernels.ops.norm import group_norm_jvp, layer_norm_jvp

__all__ = ["OPS", "FusedJvp", "RoutingStats", "active_fused_jvp", "fused_jvp"]

#: The op families ``fused_jvp(ops=...)`` can route.
OPS = ("linear", "conv", "norm", "sdpa", "scale")

Tensor = torch.Tensor


@dataclass
class RoutingStats:
    """What a ``fused_jvp(stats=True)`` mode did, per routed torch function (thread-safe counters).

    ``routed[name]``: calls that took the fused form ("linear", "conv2d", "layer_norm", "sdpa", ...);
    ``passed[(name, reason)]``: calls of a routed function that ran torch's own, with reason one of
    "no tangent", "parameter tangent", "tensor subclass", "vmap", "empty input", "not routed" (its family is
    not in ``ops``).
    """

    routed: Counter[str] = field(default_factory=Counter)
    passed: Counter[tuple[str, str]] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count(self, name: str, reason: str | None) -> None:
        with self._lock:
            if reason is None:
                self.routed[name] += 1
            else:
                self.passed[(name, reason)] += 1


@dataclass(frozen=True)
class _Route:
    """One routed torch function: its name, op family, parameter names in order, and the fused form."""

    name: str
    family: str
    params: tuple[str, ...]
    inputs: tuple[str, ...]  # the arguments whose tangents the fused form takes
    weights: tuple[str, ...]  # parameters: a tangent on any of them falls through
    fused: Callable[..., Tensor]
    applies: Callable[[Mapping[str, Any]], bool] | None = None  # False: not this route's call (tensor * tensor)

    def bind(self, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        bound = dict(zip(self.params, args, strict=False))
        bound.update(kwargs)
        return bound


def _input_linear(func: Callable[..., Tensor], b: Mapping[str, Any], backend: str, x: Tensor, tx: Tensor) -> Tensor:
    """F.linear / F.conv*d: ``func`` with its bias on the primal and without on the tangent."""
    weight = b["weight"]
    rest = {k: b[k] for k in ("stride", "padding", "dilation", "groups") if k in b}  # conv only
    return fwAD.make_dual(*linear_tangent(lambda z, bias: func(z, weight, bias, **rest), x, tx, b.get("bias")))


def _scale(func: Callable[..., Tensor], b: Mapping[str, Any], backend: str, x: Tensor, tx: Tensor) -> Tensor:
    """x * c, c * x, x / c with a Python number c: the same op on the primal and on the tangent."""
    return fwAD.make_dual(func(x, b["other"]), func(tx, b["other"]))


def _by_number(b: Mapping[str, Any]) -> bool:
    other = b.get("other")
    return (isinstance(other, (int, float)) and not isinstance(other, bool) and isinstance(b.get("input"), Tensor)
            and b.keys() <= {"input", "other"})  # div's rounding_mode (not linear) and out= take torch's rule


def _layer_norm(func: Callable[..., Tensor], b: Mapping[str, Any], backend: str, x: Tensor, tx: Tensor) -> Tensor:
    shape = b["normalized_shape"]
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if tuple(x.shape[x.dim() - len(shape):]) != shape or x.dim() < len(shape):
        return func(**b)  # torch raises its own error on the mismatch
    y, ty = layer_norm_jvp(x, tx, shape, b.get("weight"), b.get("bias"), b.get("eps", 1e-5), backend=backend)
    return fwAD.make_dual(y, ty)


def _group_norm(func: Callable[..., Tensor], b: Mapping[str, Any], backend: str, x: Tensor, tx: Tensor) -> Tensor:
    groups = b["num_groups"]
    if x.dim() < 2 or x.shape[1] % groups:
        return func(**b)  # torch raises its own error
    y, ty = group_norm_jvp(x, tx, groups, b.get("weight"), b.get("bias"), b.get("eps", 1e-5), backend=backend)
    return fwAD.make_dual(y, ty)


def _sdpa(func: Callable[..., Tensor], b: Mapping[str, Any], backend: str, *_: Tensor) -> Tensor:
    return attention(**b, backend=backend)  # reads the tangents off the dual query, key and value itself


_CONV = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_LN = ("input", "normalized_shape", "weight", "bias", "eps")
_GN = ("input", "num_groups", "weight", "bias", "eps")
_SDPA = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_ROUTES: dict[Callable[..., Tensor], _Route] = {
    F.linear: _Route("linear", "linear", ("input", "weight", "bias"), ("input",), ("weight", "bias"), _input_linear),
    **{conv: _Route(f"conv{n}d", "conv", _CONV, ("input",), ("weight", "bias"), _input_linear)
       for n, conv in ((1, F.conv1d), (2, F.conv2d), (3, F.conv3d))},
    F.layer_norm: _Route("layer_norm", "norm", _LN, ("input",), ("weight", "bias"), _layer_norm),
    torch.layer_norm: _Route("layer_norm", "norm", (*_LN, "cudnn_enable"), ("input",), ("weight", "bias"),
                             _layer_norm),
    F.group_norm: _Route("group_norm", "norm", _GN, ("input",), ("weight", "bias"), _group_norm),
    torch.group_norm: _Route("group_norm", "norm", (*_GN, "cudnn_enabled"), ("input",), ("weight", "bias"),
                             _group_norm),
    F.scaled_dot_product_attention: _Route("sdpa", "sdpa", _SDPA, ("query", "key", "value"), (), _sdpa),
    **{func: _Route(name, "scale", ("input", "other"), ("input",), (), _scale, _by_number)
       for name, funcs in (("mul", (torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__)),
                           ("div", (torch.div, Tensor.div, Tensor.__truediv__)))
       for func in funcs},
}
_LAYER_NORM_ADVICE = ("F.layer_norm ran torch's own forward-AD rule ({reason}) with a graph kept: gradients "
                      "through its tangent are wrong in torch 2.13 (pytorch issue 196700; docs/support.md). "
                      "Route norms with ttfm_kernels.fused_jvp() (the default of jvp_t / jvp_sx).")


_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))
_open = threading.local()  # .depth: how many fused_jvp modes this thread has open


@torch._dynamo.assume_constant_result
def _vmap_active() -> bool:
    """Whether a ``torch.func.vmap`` level is on the functorch stack (the fused Functions have no vmap rule).

    Batched tensors cannot be told apart from the outside under ``vmap(jvp(...))`` (the dual wraps them), so
    this reads functorch's interpreter stack (only when a transform is active). Dynamo cannot trace that read;
    it runs it once while tracing, when the stack of the traced transforms is the real one, and keeps the answer
    as a constant of the graph (a transform's nesting is fixed by the traced code).
    """
    return any(i.key() == torch._C._functorch.TransformType.Vmap for i in retrieve_all_functorch_interpreters())


def _graph_kept(bound: Mapping[str, Any]) -> bool:
    """Whether autograd records this call (a backward could run through its tangent)."""
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in bound.values())


def _tangent(t: object) -> tuple[object, Tensor | None]:
    return fwAD.unpack_dual(t) if isinstance(t, Tensor) else (t, None)


class FusedJvp(TorchFunctionMode):
    """The mode ``fused_jvp`` returns; ``stats`` holds its ``RoutingStats`` (None unless ``stats=True``)."""

    def __init__(self, ops: Sequence[str], backend: str, stats: bool) -> None:
        super().__init__()
        families = frozenset(ops)
        self._routes = {f: r for f, r in _ROUTES.items() if r.family in families or r.name == "layer_norm"}
        self._families = families
        self.backend = backend
        self.stats: RoutingStats | None = RoutingStats() if stats else None

    def __torch_function__(self, func: Callable[..., Any], types: tuple, args: tuple = (),
                           kwargs: Mapping[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        route = self._routes.get(func)
        if route is None:
            return func(*args, **kwargs)
        bound = route.bind(args, kwargs)
        if route.applies is not None and not route.applies(bound):
            return func(*args, **kwargs)
        reason, unpacked = self._fall_through(route, types, bound)
        if self.stats is not None:
            self.stats.count(route.name, reason)
        if reason is None:
            (x, tx), *_ = unpacked
            return route.fused(func, bound, self.backend, x, tx)
        if route.name == "layer_norm" and reason not in ("no tangent", "vmap") and _graph_kept(bound):
            warn_once("fused_jvp", _LAYER_NORM_ADVICE.format(reason=reason))
        return func(*args, **kwargs)

    def _fall_through(self, route: _Route, types: tuple,
                      bound: Mapping[str, Any]) -> tuple[str | None, list[tuple[Any, Tensor | None]]]:
        """(why this call runs torch's own function, or None for the fused form; the inputs' (primal, tangent))."""
        if not _PLAIN.issuperset(types):  # Python-level functions (F.layer_norm) list plain tensors too
            return "tensor subclass", []
        if fwAD._current_level < 0 and torch._C._functorch.maybe_current_level() is None:
            return "no tangent", []  # no dual level and no functorch transform: nothing can carry a tangent
        if _vmap_active():  # checked before unpacking: unpacking a dual under vmap raises
            return "vmap", []
        unpacked = [_tangent(bound.get(n)) for n in route.inputs]
        if any(_tangent(bound.get(n))[1] is not None for n in route.weights):
            return "parameter tangent", unpacked
        if all(tangent is None for _, tangent in unpacked):
            return "no tangent", unpacked
        if route.family not in self._families:
            return "not routed", unpacked
        if any(isinstance(p, Tensor) and p.numel() == 0 for p, _ in unpacked):
            return "empty input", unpacked
        return None, unpacked

    def __enter__(self) -> FusedJvp:
        _open.depth = getattr(_open, "depth", 0) + 1
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        _open.depth -= 1
        super().__exit__(*exc)


def fused_jvp(ops: Sequence[str] = OPS, *, backend: str = "auto", stats: bool = False) -> FusedJvp:
    """Context manager: route forward-AD tangents of standard torch layers to the library's fused kernels.

    ``ops``: any of "linear" (F.linear), "conv" (F.conv1d/2d/3d), "norm" (F.layer_norm / torch.layer_norm,
    F.group_norm / torch.group_norm), "sdpa" (F.scaled_dot_product_attention, full signature), "scale" (x * c,
    c * x, x / c with a Python number c; other products are not looked at). ``backend``: the
    fused ops' backend ("auto", "reference", "cpu", "cuda", "triton"). ``stats=True``: the mode's ``stats``
    (``RoutingStats``) counts routed and passed-through calls. ``with fused_jvp() as mode:`` yields the mode.
    Results equal ``torch.func.jvp`` over the same model without the mode (values and gradients through the
    tangent; for LayerNorm they are right where torch 2.13's own rule is not). ``jvp_t`` / ``jvp_sx`` enter
    it around their ``torch.func.jvp`` unless a ``fused_jvp`` mode is already open on this thread.

    Eager equivalent: no mode at all (``torch.func.jvp`` over the model as it is).
    """
    if isinstance(ops, str):
        ops = (ops,)
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        raise ValueError(f"fused_jvp(ops=...): unknown op(s) {unknown}; valid ones are {OPS}")
    if backend not in BACKENDS:
        raise ValueError(f"fused_jvp(backend=...) must be one of {BACKENDS}, got {backend!r}")
    return FusedJvp(tuple(ops), backend, stats)


def active_fused_jvp() -> bool:
    """Whether a ``fused_jvp`` mode is open on this thread (``jvp_t`` / ``jvp_sx`` then use it as it is)."""
    return getattr(_open, "depth", 0) > 0
