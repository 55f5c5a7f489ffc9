"""Two-time students u(x, s, t) made from an adapted diffusers teacher (docs/math.md, "Two-time students").

``two_time(teacher)`` deep-copies the teacher's model and adds a zero-initialised embedding of (t - s) onto the
model's own time embedding, wherever the model uses it; the teacher's conversion (time change, x scaling,
sign, timestep scale) is reused unchanged, so at initialisation u(x, s, t) == v(x, s) bit for bit, for any t.
The t-tangent enters only through the (t - s) embedding.

Where the (t - s) embedding is added (the output of each named submodule, by a forward hook):
  - ``UNet2DModel``, ``UNet2DConditionModel``: ``time_embedding`` (before class / text embeddings are added);
  - ``DiTTransformer2DModel``: every ``transformer_blocks.{i}.norm1.emb``: each block embeds its own adaLN
    conditioning, and the output layer calls block 0's again, so the embedding reaches all num_layers + 1 uses;
  - SD3-style transformers (a ``time_text_embed`` submodule: ``SD3Transformer2DModel``; Flux's has the same role,
    untested): ``time_text_embed``;
  - any other model: ``time_embedding="<submodule name>"``, a submodule returning a (B, D) tensor.
A wrapper holding one such model (e.g. an SD3 transformer behind a ``model(x, timestep, **cond)`` adapter) is
searched for it. diffusers is imported only by ``load_two_time``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ttfm_kernels.adapters.teacher import Conversion, Teacher, _import_diffusers, _load_local
from ttfm_kernels.models.embeddings import TimeEmbedding

__all__ = ["CONFIG_NAME", "EMBEDDING_NAME", "TwoTimeStudent", "load_two_time", "two_time"]

CONFIG_NAME = "two_time.json"
EMBEDDING_NAME = "two_time_embedding.safetensors"
# 64 sinusoidal features of 1.0 * (t - s): frequencies <= 1 keep d/dt of the embedding small (with DiT's 1000 the
# ITVM "jvp" target, which holds (t - s) du/dt of the EMA, grew without bound within 200 steps in the example)
_FREQ_DIM, _SCALE = 64, 1.0
_FORMAT = 1


def _known_sites(module: nn.Module) -> list[str] | None:
    """The submodules of a known diffusers class whose outputs take the (t - s) embedding, else None."""
    names = {c.__name__ for c in type(module).__mro__}
    if names & {"UNet2DModel", "UNet2DConditionModel"}:
        return ["time_embedding"]
    if "DiTTransformer2DModel" in names:
        return [f"transformer_blocks.{i}.norm1.emb" for i in range(len(module.transformer_blocks))]
    if isinstance(getattr(module, "time_text_embed", None), nn.Module):
        return ["time_text_embed"]
    return None


def _sites(model: nn.Module, time_embedding: str | None) -> list[str]:
    """The names (in ``model``) of the submodules the (t - s) embedding is added to."""
    if time_embedding is not None:
        if not isinstance(time_embedding, str) or not time_embedding:
            raise TypeError(f"time_embedding must be a submodule name (str), got {time_embedding!r}")
        try:
            model.get_submodule(time_embedding)
        except AttributeError as err:
            raise ValueError(f"time_embedding={time_embedding!r} names no submodule of the teacher's "
                             f"{type(model).__name__}") from err
        return [time_embedding]
    found: list[tuple[str, list[str]]] = []
    for name, module in model.named_modules():
        if any(not outer or name.startswith(f"{outer}.") for outer, _ in found):
            continue  # inside a model already found
        sites = _known_sites(module)
        if sites is not None:
            found.append((name, sites))
    if len(found) != 1:
        what = "no model of a known class" if not found else f"{len(found)} known models ({[n for n, _ in found]})"
        raise ValueError(f"the teacher's {type(model).__name__} holds {what} (UNet2DModel, UNet2DConditionModel, "
                         "DiTTransformer2DModel, or a transformer with a time_text_embed submodule): pass "
                         "time_embedding='<submodule name>', the submodule whose (B, D) output is the time "
                         "embedding the (t - s) embedding is added to")
    prefix, sites = found[0]
    return [f"{prefix}.{site}" if prefix else site for site in sites]


def _embedding_dim(module: nn.Module, name: str) -> int:
    """The width D of a time-embedding submodule's (B, D) output: its last nn.Linear's out_features."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"time_embedding={name!r} ({type(module).__name__}) holds no nn.Linear whose out_features "
                         "give the embedding width; name the submodule whose last layer is a Linear")
    return linears[-1].out_features


class TwoTimeStudent(Conversion):
    """u(x, s, t, **cond): ``model`` with a (t - s) embedding added at ``sites``, and ``teacher``'s conversion.

    ``model``: the network (a copy of the teacher's, made by ``two_time``); ``sites``: the names of its
    submodules whose (B, D) outputs get ``delta_embedding(t - s)`` added (a forward hook each, active only inside
    this module's ``forward``: ``self.model`` called on its own is the base model). ``delta_embedding`` is a
    ``models.TimeEmbedding`` (64 sinusoidal features of t - s, Linear, SiLU, Linear) with its output
    layer zeroed, in the model's first parameter's dtype and device.

    x: (B, ...) in the model's dtype; s, t: (B,) float (computed in at least float32, float64 if x is). Returns
    u with x's shape. Eager equivalent: ``teacher(x, s, **cond)`` with ``delta_embedding(t - s)`` added to each
    site's output; exactly ``teacher(x, s, **cond)`` while the output layer is zero. ``t_range`` and ``sigma``
    are the teacher's.
    """

    def __init__(self, teacher: Conversion, model: nn.Module, sites: Sequence[str]) -> None:
        super().__init__()
        self.copy_conversion(teacher)
        self.model, self.sites = model, tuple(sites)
        dims = {_embedding_dim(model.get_submodule(name), name) for name in self.sites}
        if len(dims) != 1:
            raise ValueError(f"the time-embedding submodules {self.sites} have different widths {sorted(dims)}")
        param = next(model.parameters())
        self.delta_embedding = TimeEmbedding(dims.pop(), _FREQ_DIM, scale=_SCALE).to(param.device, param.dtype)
        with torch.no_grad():
            self.delta_embedding.mlp[-1].weight.zero_()
            self.delta_embedding.mlp[-1].bias.zero_()
        self._delta: torch.Tensor | None = None
        for name in self.sites:
            model.get_submodule(name).register_forward_hook(self._add_delta)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sites={list(self.sites)}"

    def _add_delta(self, module: nn.Module, args: object, out: object) -> torch.Tensor | None:
        delta = self._delta
        if delta is None:
            return None
        if not isinstance(out, torch.Tensor) or out.shape != delta.shape:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"the time embedding {type(module).__name__} returned {shape}; the (t - s) embedding "
                             f"is {tuple(delta.shape)}: choose time_embedding= a submodule returning (B, D)")
        return out + delta.to(out.dtype)

    def forward(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, **cond: object) -> torch.Tensor:
        dtype = torch.promote_types(torch.promote_types(torch.promote_types(s.dtype, t.dtype), x.dtype),
                                    torch.float32)
        s, t = s.to(dtype), t.to(dtype)
        self._delta = self.delta_embedding(t - s)
        try:
            return self.velocity(x, s, cond)
        finally:
            self._delta = None

    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Write the base model with its own ``save_pretrained`` (diffusers' format: the directory stays loadable
        by diffusers alone) plus ``two_time_embedding.safetensors`` and ``two_time.json`` (sites, conversion)
        beside it; ``load_two_time(save_directory, teacher)`` reads it back. Returns the directory."""
        save = getattr(self.model, "save_pretrained", None)
        if save is None:
            raise TypeError(f"save_pretrained needs a diffusers model; the base model is a {type(self.model).__name__}"
                            ": save student.state_dict() instead")
        from safetensors.torch import save_file

        directory = Path(save_directory)
        save(directory)
        save_file({k: v.detach().contiguous() for k, v in self.delta_embedding.state_dict().items()},
                  directory / EMBEDDING_NAME)
        config = {"format": _FORMAT, "sites": list(self.sites), "model_class": type(self.model).__name__,
                  **self.conversion_config()}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        return directory


def two_time(teacher: Teacher, *, time_embedding: str | None = None) -> TwoTimeStudent:
    """A two-time student u(x, s, t, **cond) equal to ``teacher(x, s, **cond)`` at initialisation (module docstring).

    ``teacher``: an ``adapters.Teacher`` (its model is deep-copied, the teacher is left untouched);
    ``time_embedding``: the name of the submodule to add the (t - s) embedding to, for a class not listed in the
    module docstring. Every parameter of the student requires grad; its training mode is the teacher model's.
    """
    if not isinstance(teacher, Teacher):
        raise TypeError(f"teacher must be an adapters.Teacher, got {type(teacher).__name__}")
    model = copy.deepcopy(teacher.model).requires_grad_(True)
    return TwoTimeStudent(teacher, model, _sites(model, time_embedding)).requires_grad_(True)


def load_two_time(directory: str | Path, teacher: Teacher) -> TwoTimeStudent:
    """The student written by ``TwoTimeStudent.save_pretrained(directory)``, with ``teacher``'s conversion.

    The base model is loaded by diffusers from ``directory`` (local files only), in the dtype and on the device
    of the teacher's model; raises ValueError when the saved conversion or model class differs from the teacher's.
    """
    if not isinstance(teacher, Teacher):
        raise TypeError(f"teacher must be an adapters.Teacher, got {type(teacher).__name__}")
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"directory={str(directory)!r} holds no {CONFIG_NAME}: pass a directory written by "
                                "TwoTimeStudent.save_pretrained")
    config = json.loads(config_path.read_text())
    if config.get("format") != _FORMAT:
        raise ValueError(f"{config_path} has format {config.get('format')!r}; this version reads {_FORMAT}")
    theirs = {k: config.get(k) for k in teacher.conversion_config()}
    if theirs != teacher.conversion_config():
        raise ValueError(f"the student in {directory} was made from a teacher with conversion {theirs}; this teacher "
                         f"has {teacher.conversion_config()}")
    if config["model_class"] != type(teacher.model).__name__:
        raise ValueError(f"the student in {directory} is a {config['model_class']}; the teacher's model is a "
                         f"{type(teacher.model).__name__}")
    from safetensors.torch import load_file

    param = next(teacher.model.parameters())
    model = _load_local(_import_diffusers(), directory, "directory", torch_dtype=param.dtype).to(param.device)
    student = TwoTimeStudent(teacher, model.train(teacher.model.training), config["sites"])
    student.delta_embedding.load_state_dict(load_file(directory / EMBEDDING_NAME, device=str(param.device)))
    return student.requires_grad_(True)
