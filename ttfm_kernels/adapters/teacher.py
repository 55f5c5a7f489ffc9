"""Other libraries' models as teachers v(x, t) in this library's convention (docs/math.md, "Adapted teachers").

This library: x_t = (1 - t) x0 + t x1, x0 = sigma eps, t = 0 noise, t = 1 data, v = E[x1 - x0 | x_t]; an adapted
teacher fixes sigma = 1. The wrapped model is called as ``model(x, timestep, **cond)`` (diffusers' calling style)
and may return a tensor, an object with ``.sample`` (diffusers' outputs) or a tuple (its first item).
diffusers itself is imported only by ``Teacher.from_pretrained``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from ttfm_kernels._per_sample import per_sample

__all__ = ["PREDICTIONS", "VP_PREDICTIONS", "Conversion", "Teacher"]

VP_PREDICTIONS = ("epsilon", "v_prediction", "sample")
PREDICTIONS = ("velocity", "flow", *VP_PREDICTIONS)


def _schedule_times(alphas_cumprod: torch.Tensor | Sequence[float], prediction: str) -> torch.Tensor:
    """Library times t_i = alpha_i / (alpha_i + sigma_i) of a VP table abar_i (float64, CPU), after checking it.

    Raises ValueError unless the table is 1-D with at least two finite entries in [0, 1], strictly decreasing;
    abar = 0 (zero terminal SNR, t = 0) is refused for "epsilon" and abar = 1 (t = 1) for "sample", where the
    conversion divides by alpha or sigma_v = 0.
    """
    abar = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
    if abar.dim() != 1 or abar.numel() < 2:
        raise ValueError(f"alphas_cumprod must be a 1-D table of at least 2 entries, got shape {tuple(abar.shape)}")
    if not torch.isfinite(abar).all() or (abar < 0).any() or (abar > 1).any():
        raise ValueError("alphas_cumprod must hold finite values in [0, 1]")
    if (abar[1:] >= abar[:-1]).any():
        raise ValueError("alphas_cumprod must be strictly decreasing along the timestep index (index 0: least "
                         "noise); got a table that is not")
    if prediction == "epsilon" and abar[-1] == 0:
        raise ValueError("alphas_cumprod ends at 0 (zero terminal SNR): an epsilon-prediction model gives no "
                         "estimate of x1 there (x1_hat = (x - sigma_v eps_hat) / alpha with alpha = 0); use "
                         "a schedule with abar > 0 or a v_prediction / sample model")
    if prediction == "sample" and abar[0] == 1:
        raise ValueError("alphas_cumprod starts at 1 (no noise): a sample-prediction model gives no estimate "
                         "of the noise there (eps_hat = (x - alpha x1_hat) / sigma_v with sigma_v = 0)")
    alpha, sigma_v = abar.sqrt(), (1 - abar).sqrt()
    return alpha / (alpha + sigma_v)


def _unwrap(out: object) -> object:
    """The prediction tensor of a model output: ``out.sample`` (diffusers), the first item of a tuple, or out."""
    if hasattr(out, "sample") and not isinstance(out, torch.Tensor):
        return out.sample
    if isinstance(out, (tuple, list)) and out:
        return out[0]
    return out


class Conversion(nn.Module):
    """The conversion of a wrapped model's prediction into this library's velocity, shared by ``Teacher`` and the
    two-time students of ``two_time``. ``model``, ``prediction``, ``timestep_scale``, ``t_range`` and the VP
    table of library times are set by ``Teacher.__init__``, or copied from a teacher by ``copy_conversion``.
    """

    sigma = 1.0
    model: nn.Module
    prediction: str
    timestep_scale: float | None
    t_range: tuple[float, float]
    _tables: dict[torch.device, torch.Tensor]

    def copy_conversion(self, other: Conversion) -> None:
        """Take ``other``'s conversion (prediction, timestep scale, t_range, VP table), not its model."""
        self.prediction, self.timestep_scale, self.t_range = other.prediction, other.timestep_scale, other.t_range
        self._tables = dict(other._tables)

    def conversion_config(self) -> dict[str, object]:
        """The conversion as JSON-able values (``load_two_time`` checks a saved student's against its teacher)."""
        return {"prediction": self.prediction, "timestep_scale": self.timestep_scale, "t_range": list(self.t_range)}

    def extra_repr(self) -> str:
        return f"prediction={self.prediction!r}, t_range=({self.t_range[0]:.6g}, {self.t_range[1]:.6g})"

    def _table(self, device: torch.device) -> torch.Tensor:
        """The ascending library times of the VP table, float64, on ``device`` (copied once per device)."""
        table = self._tables.get(device)
        if table is None:
            table = self._tables[device] = next(iter(self._tables.values())).to(device)
        return table

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The model's timestep for library times t (B,), in t's dtype.

        "velocity": timestep_scale * t; "flow": timestep_scale * (1 - t). VP: the fractional index tau whose
        library time is t, by linear interpolation of the table's times t_tau over the index (t = sigmoid of
        half the log-SNR, so this is a monotone, finite reparametrisation of log-SNR, valid at zero terminal SNR
        too); at t = t_tau it is the integer tau, to rounding.
        """
        if self.prediction == "velocity":
            return self.timestep_scale * t
        if self.prediction == "flow":
            return self.timestep_scale * (1 - t)
        table = self._table(t.device)
        t64 = t.to(torch.float64)
        hi = torch.searchsorted(table, t64.contiguous()).clamp(1, table.numel() - 1)
        lo_t, hi_t = table[hi - 1], table[hi]
        position = (hi - 1).to(torch.float64) + (t64 - lo_t) / (hi_t - lo_t)  # ascending index, N - 1 - tau
        return ((table.numel() - 1) - position).to(t.dtype)

    def _predict(self, x: torch.Tensor, timestep: torch.Tensor, cond: dict[str, object]) -> torch.Tensor:
        out = _unwrap(self.model(x, timestep, **cond))
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the model returned {type(out).__name__}; expected a tensor, an output with "
                            ".sample, or a tuple whose first item is the prediction")
        if out.shape != x.shape:
            raise ValueError(f"the model's prediction has shape {tuple(out.shape)}, but x has {tuple(x.shape)} "
                             "(a model with learned variance predicts 2x the channels: wrap it to return the "
                             "mean prediction only)")
        return out

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, object]) -> torch.Tensor:
        """v(x, t) of ``self.model`` called with ``cond``: the conversion of ``prediction`` (``Teacher``)."""
        t = t.to(torch.promote_types(torch.promote_types(t.dtype, x.dtype), torch.float32))
        if self.prediction == "velocity":
            return self._predict(x, self.timestep(t), cond)
        if self.prediction == "flow":
            return -self._predict(x, self.timestep(t), cond)
        norm = (t.square() + (1 - t).square()).sqrt()  # c = 1 / (alpha + sigma_v): x = c x_tau
        alpha, sigma_v = (per_sample(v, x).to(x.dtype) for v in (t / norm, (1 - t) / norm))
        x_vp = x / per_sample(norm, x).to(x.dtype)
        out = self._predict(x_vp, self.timestep(t), cond)
        if self.prediction == "epsilon":
            x1_hat, eps_hat = (x_vp - sigma_v * out) / alpha, out
        elif self.prediction == "v_prediction":
            x1_hat, eps_hat = alpha * x_vp - sigma_v * out, sigma_v * x_vp + alpha * out
        else:
            x1_hat, eps_hat = out, (x_vp - alpha * out) / sigma_v
        return x1_hat - eps_hat


class Teacher(Conversion):
    """A model in another convention as a teacher v(x, t, **cond) of this library, with ``sigma = 1.0``.

    ``prediction`` says what ``model(x, timestep, **cond)`` predicts:
      - "velocity": this library's v already; v(x, t) = model(x, timestep_scale * t).
      - "flow": diffusers' flow matching (FlowMatchEulerDiscreteScheduler, SD3, Flux): x = (1 - sigma_d) x1 +
        sigma_d eps, prediction eps - x1, timestep = timestep_scale * sigma_d; v(x, t) = -model(x, ts (1 - t)).
      - "epsilon", "v_prediction", "sample": a VP model, x_tau = alpha x1 + sigma_v eps with alpha^2 =
        ``alphas_cumprod[tau]`` (the table of its integer training timesteps tau = 0 .. N - 1; ``timestep_scale``
        does not apply: the timestep passed is the index tau). With sigma = 1: t = alpha / (alpha + sigma_v),
        the model sees x_tau = x (alpha + sigma_v) at the timestep ``timestep(t)``, and
        v = x1_hat - eps_hat from its prediction (docs/math.md, "Adapted teachers").
    ``t_range = (t_min, t_max)`` is the interval of library time the model covers: (0, 1) for "velocity" and
    "flow"; (t(abar_{N-1}), t(abar_0)) for VP, e.g. (0.0063, 0.990) for diffusers' 1000-step "linear" betas.
    Every loss, time sampler, ``sample`` and ``ode_solve`` keep times inside it. Outside it the VP timestep is
    extrapolated linearly from the end intervals of the table.

    x: (B, ...) in the model's dtype; t: (B,) float (times computed in at least float32, float64 if x is).
    Returns v with x's shape; the model output may be a tensor, have ``.sample`` or be a tuple (first item).
    Eager equivalent: the formulas above on the model's output; no graph is cut (a loss calls it under no_grad).
    """

    def __init__(self, model: nn.Module, prediction: str, *,
                 alphas_cumprod: torch.Tensor | Sequence[float] | None = None, timestep_scale: float = 1000.0) -> None:
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if not callable(model):
            raise TypeError(f"model must be callable as model(x, timestep, **cond), got {type(model).__name__}")
        self.model, self.prediction = model, prediction
        self._tables: dict[torch.device, torch.Tensor] = {}
        if prediction in VP_PREDICTIONS:
            if alphas_cumprod is None:
                raise ValueError(f"prediction={prediction!r} is a VP model: pass alphas_cumprod, the table "
                                 "abar[tau] of its training timesteps (a diffusers scheduler's .alphas_cumprod)")
            if timestep_scale != 1000.0:
                raise ValueError("timestep_scale applies to 'velocity' and 'flow' models only: a VP model "
                                 "receives the index into alphas_cumprod as its timestep")
            times = _schedule_times(alphas_cumprod, prediction).flip(0)  # ascending in t: index N - 1 first
            self._tables[times.device] = times
            self.t_range = (float(times[0]), float(times[-1]))
            self.timestep_scale = None
        else:
            if alphas_cumprod is not None:
                raise ValueError(f"alphas_cumprod is for VP models (prediction in {VP_PREDICTIONS}); "
                                 f"prediction={prediction!r} takes none")
            if not (isinstance(timestep_scale, (int, float)) and math.isfinite(timestep_scale)
                    and timestep_scale > 0):
                raise ValueError(f"timestep_scale must be a finite positive number, got {timestep_scale!r}")
            self.t_range = (0.0, 1.0)
            self.timestep_scale = float(timestep_scale)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond: object) -> torch.Tensor:
        return self.velocity(x, t, cond)

    @classmethod
    def from_pretrained(cls, local_dir: str | Path, *, prediction: str | None = None,
                        scheduler_dir: str | Path | None = None) -> Teacher:
        """Load a diffusers model saved in ``local_dir`` (its ``config.json`` names the class) without any
        download, in eval mode, as a Teacher.

        ``scheduler_dir``: a saved diffusers scheduler; a FlowMatch* scheduler means prediction "flow" with
        ``timestep_scale = num_train_timesteps``; any other gives ``alphas_cumprod`` and its ``prediction_type``.
        ``prediction``: required without a scheduler ("velocity" or "flow": VP models need the schedule); with
        one it defaults to the scheduler's, and a different one is an error. Needs diffusers installed.
        """
        diffusers = _import_diffusers()
        model = _load_local(diffusers, Path(local_dir), "local_dir")
        alphas_cumprod, timestep_scale, implied = None, 1000.0, None
        if scheduler_dir is not None:
            scheduler = _load_local(diffusers, Path(scheduler_dir), "scheduler_dir")
            config = scheduler.config
            if type(scheduler).__name__.startswith("FlowMatch"):
                implied, timestep_scale = "flow", float(config.num_train_timesteps)
            elif hasattr(scheduler, "alphas_cumprod"):
                implied, alphas_cumprod = config.prediction_type, scheduler.alphas_cumprod
            else:
                raise ValueError(f"scheduler {type(scheduler).__name__} in {scheduler_dir} has no alphas_cumprod "
                                 "and is not a flow-matching scheduler: pass prediction= and no scheduler_dir")
            if prediction is not None and prediction != implied:
                raise ValueError(f"prediction={prediction!r} but the scheduler in {scheduler_dir} says "
                                 f"{implied!r}")
        prediction = prediction if prediction is not None else implied
        if prediction is None:
            raise ValueError("pass prediction= (one of "
                             f"{PREDICTIONS}) or a scheduler_dir whose config states it")
        if prediction in VP_PREDICTIONS and alphas_cumprod is None:
            raise ValueError(f"prediction={prediction!r} is a VP model: pass scheduler_dir, the saved scheduler "
                             "holding its alphas_cumprod")
        return cls(model.eval(), prediction, alphas_cumprod=alphas_cumprod, timestep_scale=timestep_scale)


def _import_diffusers() -> ModuleType:
    try:
        import diffusers
    except ImportError as err:
        raise ImportError("loading a saved diffusers model needs diffusers: pip install diffusers") from err
    return diffusers


def _load_local(diffusers: ModuleType, path: Path, name: str, **kwargs: object) -> object:
    """A diffusers model or scheduler saved in ``path``: the class named by its config, from local files only
    (``kwargs`` go to its ``from_pretrained``, e.g. ``torch_dtype``)."""
    config_path = next((path / f for f in ("config.json", "scheduler_config.json") if (path / f).is_file()), None)
    if config_path is None:
        raise FileNotFoundError(f"{name}={str(path)!r} holds no config.json or scheduler_config.json: pass the "
                                "directory a diffusers model or scheduler was saved to (save_pretrained)")
    class_name = json.loads(config_path.read_text()).get("_class_name")
    loader = getattr(diffusers, class_name, None) if isinstance(class_name, str) else None
    if loader is None or not hasattr(loader, "from_pretrained"):
        raise ValueError(f"{config_path} names class {class_name!r}, which diffusers does not provide")
    return loader.from_pretrained(path, local_files_only=True, **kwargs)
