"""One registry of the GPU launch configurations of every Triton kernel, for the GPU compile gate.

Each ``ttfm_kernels/ops/<op>/triton.py`` registers, at import, the configurations its launcher uses on a
GPU (block sizes, num_warps, num_stages) for representative dtypes and head/feature sizes. The gate
(``make check-gpu-compile``) imports every ``ttfm_kernels.ops.*.triton`` module, compiles each
registered configuration for sm_80 and sm_90 without a GPU, and checks shared memory, registers and spills.

Registering (the ASTSource form, verified with triton 3.7)::

    register(TritonConfig(
        name="jvp_attention_fwd/fp16/D64/BM128/BN64",
        kernel=_jvp_attention_fwd_kernel,                 # the @triton.jit function itself
        signature={"q_ptr": "*fp16", "n_q": "i32", "scale": "fp32", "BLOCK_M": "constexpr", ...},
        constexprs={"BLOCK_M": 128, ...},                  # every "constexpr" argument, by name
        num_warps=4, num_stages=2))

``signature`` names EVERY kernel argument in order; ``default=True`` marks a configuration the launcher
picks by default: it must compile within the shared-memory limit and without register spills.

Compile what a GPU launch compiles: at launch Triton specializes each argument on its value, and the code
(vectorised loads, cp.async pipelining, hence registers and shared memory) depends on it. The gate mirrors
that: every pointer is taken as 16-byte aligned (true of torch's allocations and contiguous views from
offset 0); an int argument listed in ``divisible_by_16`` is taken as a multiple of 16 (list the sizes and
strides that are, in the representative shapes); an int that is 1 at launch (a unit stride) becomes a
constant there, so register it as ``"constexpr"`` with the value 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["GPU_CONFIGS", "TritonConfig", "register"]


@dataclass(frozen=True)
class TritonConfig:
    """One GPU launch configuration of one Triton kernel."""

    name: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
    default: bool = True
    divisible_by_16: tuple[str, ...] = ()


GPU_CONFIGS: list[TritonConfig] = []


def register(config: TritonConfig) -> TritonConfig:
    """Add ``config`` to the registry (names are unique); returns it."""
    if any(c.name == config.name for c in GPU_CONFIGS):
        raise ValueError(f"GPU configuration {config.name!r} registered twice")
    GPU_CONFIGS.append(config)
    return config
