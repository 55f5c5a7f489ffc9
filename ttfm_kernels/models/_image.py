"""What the image teachers and students share: time (+ class) conditioning, presets, config, ``from_teacher``.

A teacher v(x, t, y=None) and its student u(x, s, t, y=None) differ only in their conditioning vector c: the
teacher embeds t (``TimeEmbedding``), the student embeds s and t - s (``TwoTimeEmbedding``). The network body
that consumes c is the same class with the same state_dict keys, so ``from_teacher`` copies the body and the
label table, loads the teacher's time embedding into the s-branch and zeroes the (t - s) branch's output
layer: then u(x, s, t) == v(x, s) for every t at the start of distillation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from ttfm_kernels._checks import check_model_input
from ttfm_kernels.models import _tangent
from ttfm_kernels.models._tangent import Opt
from ttfm_kernels.models.distributed import check_fsdp_forward_jvp
from ttfm_kernels.models.embeddings import TimeEmbedding, TwoTimeEmbedding

__all__ = ["Conditioning", "ImageFlowModel", "StudentModel", "TeacherModel"]


class Conditioning(nn.Module):
    """c = time_embed(t) or time_embed(s, t), plus label_embed(y) when ``num_classes > 0``: -> (B, dim).

    ``gap_scale`` None: a teacher's ``TimeEmbedding``; otherwise a student's ``TwoTimeEmbedding`` with s
    scaled by ``time_scale`` and t - s by ``gap_scale``.

    Labels y are (B,) integers in [0, num_classes]; ``num_classes`` itself is the null class (unconditional,
    for classifier-free guidance), and y=None means the null class for every sample: a guided teacher is
    ``GuidedTeacher(teacher, w, {"y": None})``.
    """

    def __init__(self, dim: int, *, num_classes: int, freq_dim: int, time_scale: float,
                 gap_scale: float | None) -> None:
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.time_embed = (TimeEmbedding(dim, freq_dim, scale=time_scale) if gap_scale is None
                           else TwoTimeEmbedding(dim, freq_dim, scale=time_scale, gap_scale=gap_scale))
        self.num_classes = num_classes
        self.label_embed = nn.Embedding(num_classes + 1, dim) if num_classes else None
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.weight, std=0.02)

    def forward(self, *times: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_jvp(times, {}, y=y)[0]

    def forward_jvp(self, times: tuple[torch.Tensor, ...], tangents: Mapping[str, Opt],
                    y: torch.Tensor | None = None) -> tuple[torch.Tensor, Opt]:
        """(c, tc) for times (t,) or (s, t) and their tangents {"tt": ..} or {"ts": .., "tt": ..}; labels carry none."""
        c, tc = _tangent.call(self.time_embed, *times, **tangents)
        if self.label_embed is None:
            if y is not None:
                raise ValueError("y was given but the model has num_classes=0 (no class conditioning)")
            return c, tc
        batch = times[0].shape[0]
        if y is None:
            y = torch.full((batch,), self.num_classes, dtype=torch.long, device=c.device)
        elif not isinstance(y, torch.Tensor) or y.dtype.is_floating_point or y.dtype.is_complex \
                or y.shape != (batch,):
            raise ValueError(f"y must be integer class labels of shape (B,) = ({batch},), "
                             f"got {getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}")
        return c + self.label_embed(y.to(c.device)), tc


class ImageFlowModel(nn.Module):
    """Base of the image teachers and students: ``config``, ``sigma``, ``null_class``, ``from_preset``.

    An architecture base sets ``PRESETS`` (name -> constructor arguments) and its ``__init__`` calls ``_setup``
    with its arguments and a ``body(x, c)`` module; the public classes put ``TeacherModel`` or ``StudentModel``
    (the forward signature) before it, and students name their ``teacher_class``.
    """

    PRESETS: ClassVar[dict[str, dict[str, Any]]]
    two_time: ClassVar[bool] = False
    teacher_class: ClassVar[type[ImageFlowModel] | None] = None
    config: dict[str, Any]

    def _setup(self, config: dict[str, Any], body: nn.Module, cond_dim: int, gap_scale: float | None) -> None:
        """``gap_scale``: a student's scale of t - s (default 1.0, stored in ``config``); a teacher takes none."""
        if self.two_time:
            config = {**config, "gap_scale": 1.0 if gap_scale is None else float(gap_scale)}
        elif gap_scale is not None:
            raise ValueError(f"gap_scale is a two-time student's argument; {type(self).__name__} embeds t alone")
        self.config = config
        self.image_size, self.in_channels = config["image_size"], config["in_channels"]
        self.sigma = float(config["sigma"])
        self.num_classes = config["num_classes"]
        self.cond = Conditioning(cond_dim, num_classes=self.num_classes, freq_dim=config["freq_dim"],
                                 time_scale=config["time_scale"], gap_scale=config.get("gap_scale"))
        self.body = body

    @property
    def null_class(self) -> int | None:
        """The label of the unconditional (null) class, or None without class conditioning."""
        return self.num_classes if self.num_classes else None

    def _jvp(self, x: torch.Tensor, times: tuple[torch.Tensor, ...], y: torch.Tensor | None,
             tangents: tuple[Opt, ...]) -> tuple[torch.Tensor, Opt]:
        """(out, tangent) for times (t,) or (s, t) and tangents (tx, tt) or (tx, ts, tt), None = zero."""
        primals = dict(zip(("s", "t") if self.two_time else ("t",), times, strict=True))
        check_model_input(x, (self.in_channels, self.image_size, self.image_size), **primals)
        tx, *ttimes = tangents
        ttimes = {f"t{name}": tan for name, tan in zip(primals, ttimes, strict=True)}
        _tangent.check({"x": x, **primals}, {"tx": tx, **ttimes})
        c, tc = self.cond.forward_jvp(times, ttimes, y=y)
        return _tangent.call(self.body, x, c, tx=tx, tc=tc)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any):
        """Build from a named size (see ``PRESETS``); ``overrides`` replace any constructor argument."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})

    @classmethod
    def from_teacher(cls, teacher: ImageFlowModel, *, gap_scale: float = 1.0):
        """A student with the teacher's arguments, weights, dtype and device such that u(x, s, t) == v(x, s).

        ``gap_scale`` multiplies t - s in the student's gap embedding (its branch starts at zero, so any value
        keeps u == v at the start).
        """
        if cls.teacher_class is None:
            raise TypeError(f"{cls.__name__} is a teacher; call from_teacher on its two-time student")
        if not isinstance(teacher, cls.teacher_class):
            raise TypeError(f"teacher must be a models.{cls.teacher_class.__name__}, got {type(teacher).__name__}")
        ref = next(teacher.parameters())
        student = cls(**teacher.config, gap_scale=gap_scale).to(device=ref.device, dtype=ref.dtype)
        time_keys = "cond.time_embed."
        state = {k: v for k, v in teacher.state_dict().items() if not k.startswith(time_keys)}
        missing, unexpected = student.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith(time_keys) for k in missing):
            raise RuntimeError(f"teacher and student layouts differ: missing {missing}, unexpected {unexpected}")
        student.cond.time_embed.load_from_time_embedding(teacher.cond.time_embed)
        return student


class TeacherModel(ImageFlowModel):
    """Mixin before an architecture base: forward(x, t, y=None) -> v (B, C, H, W)."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, *,
                tangents: Mapping[str, Opt] | None = None) -> torch.Tensor | tuple[torch.Tensor, Opt]:
        """v; with ``tangents={"tx": ..., "tt": ...}`` the pair ``forward_jvp`` returns (the DDP route)."""
        v, dv = self._jvp(x, (t,), y, _tangent.unpack(tangents, ("tx", "tt")))
        return v if tangents is None else (v, dv)

    def forward_jvp(self, x: torch.Tensor, t: torch.Tensor, *, tx: Opt = None, tt: Opt = None,
                    y: torch.Tensor | None = None) -> tuple[torch.Tensor, Opt]:
        """(v, dv): v and its JVP along tx (like x) and tt (B,) (None: zero, its products skipped).

        An explicit tangent pass through the fused ops (no forward-AD tensors; compiles, runs under FSDP2 after
        ``register_fsdp_forward_jvp``), differentiable w.r.t. the parameters; dv is None when both tangents
        are. Labels y carry no tangent. Eager equivalent: ``torch.func.jvp(lambda x, t: model(x, t, y=y),
        (x, t), (tx, tt))`` with zeros for absent tangents.
        """
        check_fsdp_forward_jvp(self)
        return self._jvp(x, (t,), y, (tx, tt))


class StudentModel(ImageFlowModel):
    """Mixin before an architecture base: forward(x, s, t, y=None) -> u (B, C, H, W), embedding s and t - s."""

    two_time = True

    def forward(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, *,
                tangents: Mapping[str, Opt] | None = None) -> torch.Tensor | tuple[torch.Tensor, Opt]:
        """u; with ``tangents={"tx": ..., "ts": ..., "tt": ...}`` the pair ``forward_jvp`` returns (DDP route)."""
        u, du = self._jvp(x, (s, t), y, _tangent.unpack(tangents, ("tx", "ts", "tt")))
        return u if tangents is None else (u, du)

    def forward_jvp(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, *, tx: Opt = None, ts: Opt = None,
                    tt: Opt = None, y: torch.Tensor | None = None) -> tuple[torch.Tensor, Opt]:
        """(u, du): u and its JVP along tx (like x), ts and tt (B,); otherwise as ``TeacherModel.forward_jvp``.

        ``jvp_t`` is tt = 1; ``jvp_sx`` is (tx, ts) = (v, 1). Eager equivalent: ``torch.func.jvp(lambda x, s, t:
        model(x, s, t, y=y), (x, s, t), (tx, ts, tt))`` with zeros for absent tangents.
        """
        check_fsdp_forward_jvp(self)
        return self._jvp(x, (s, t), y, (tx, ts, tt))
