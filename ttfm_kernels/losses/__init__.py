"""The distillation losses (docs/math.md sections 2-3), each a thin composition of flow/, jvp and the residual ops.

Every distillation loss is ``loss(student, teacher, x1, *, ema=None, cond=None, teacher_cond=None, x0=None,
s=None, t=None, sigma=None, weight=None, reduction="mean", time_sampler=None, backend="auto", extrapolate=False,
<its own keywords>) -> (loss, stats)`` (``progressive_loss``'s second argument is its ``frozen`` two-time model);
``flow_matching_loss(model, x1, *, cond, x0, t, sigma, weight, reduction, time_sampler, extrapolate)`` trains
the teacher.

- ``ema``: the target network theta^- where the loss uses one (ITVM, EMD); None means the student itself, run
  without a graph. The losses without one (LFMD, PFMM) reject an ema.
- ``cond``: keyword arguments for every model call; ``teacher_cond``: keyword arguments updating ``cond`` for the
  teacher's calls only (a guidance scale, null labels), never seen by the student or the EMA. When a loss
  batches two or three calls of one model, conditioning is repeated along the batch recursively (mappings,
  lists, tuples; a tensor whose leading dim is the batch).
- ``x0`` / ``s`` / ``t``: overrides (default: x0 ~ N(0, sigma^2 I), times from ``time_sampler``); only these
  user-given values are checked in ways that read them on the host (finite, s <= t, inside the time range).
- Time range: drawn times lie inside ``getattr(teacher, "t_range", (0.0, 1.0))`` (the frozen model's for
  ``progressive_loss``, the model's for ``flow_matching_loss``; an ``adapters.Teacher`` of a VP model covers
  only part of [0, 1]); a given ``s`` or ``t`` outside it raises unless ``extrapolate=True`` (the keyword after
  ``backend``; after ``time_sampler`` for ``flow_matching_loss``).
- ``sigma``: default the teacher's ``sigma`` attribute, else 1.0; ``weight``: per-sample (B,);
  ``reduction``: "mean" | "sum" | "none"; ``backend``: the residual ops' kernel choice.
- stats: a dict of detached 0-dim tensors (no host sync inside a loss; convert when logging): "loss" (mean of
  the returned loss), "init" and "term" (ITVM's residuals), "residual" (the single-residual losses), "gap"
  (mean t - s), each an unweighted mean of squared residuals where it is one.
"""

from ttfm_kernels.losses.emd import emd_loss
from ttfm_kernels.losses.flow_matching import flow_matching_loss
from ttfm_kernels.losses.itvm import itvm_loss
from ttfm_kernels.losses.lfmd import lfmd_loss
from ttfm_kernels.losses.progressive import progressive_loss

__all__ = ["emd_loss", "flow_matching_loss", "itvm_loss", "lfmd_loss", "progressive_loss"]
