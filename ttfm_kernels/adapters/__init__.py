"""Other libraries' models in this library's conventions (diffusers models as teachers).

diffusers is imported lazily (only by ``Teacher.from_pretrained``): ``import ttfm_kernels`` never needs it.
"""

from ttfm_kernels.adapters.teacher import PREDICTIONS, VP_PREDICTIONS, Teacher

__all__ = ["PREDICTIONS", "VP_PREDICTIONS", "Teacher"]
