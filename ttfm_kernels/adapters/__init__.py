"""Other libraries' models in this library's conventions (diffusers models as teachers).

diffusers is imported lazily (only by ``Teacher.from_pretrained`` and ``load_two_time``): ``import ttfm_kernels``
never needs it.
"""

from ttfm_kernels.adapters.teacher import PREDICTIONS, VP_PREDICTIONS, Teacher
from ttfm_kernels.adapters.two_time import TwoTimeStudent, load_two_time, two_time

__all__ = ["PREDICTIONS", "VP_PREDICTIONS", "Teacher", "TwoTimeStudent", "load_two_time", "two_time"]
