"""Flow-map machinery: the interpolant, time sampling, sampling and ODE solves, EMA weights, guidance."""

from ttfm_kernels.flow.ema import EMA
from ttfm_kernels.flow.guidance import GuidedTeacher
from ttfm_kernels.flow.interpolant import interpolate, resolve_sigma
from ttfm_kernels.flow.sampler import flow_map, ode_solve, sample, time_grid
from ttfm_kernels.flow.time_sampling import TimeSampler

__all__ = ["EMA", "GuidedTeacher", "TimeSampler", "flow_map", "interpolate", "ode_solve", "resolve_sigma",
           "sample", "time_grid"]
