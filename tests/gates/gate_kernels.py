"""A small Triton kernel and its GPU configurations for the compile-gate tests (not collected as a test)."""

import triton
import triton.language as tl

from ttfm_kernels._gpu_configs import TritonConfig, register


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c (BLOCK_M, BLOCK_N) fp32 = a (BLOCK_M, K) @ b (K, BLOCK_N), fp16 operands, K a multiple of BLOCK_K."""
    m = tl.arange(0, BLOCK_M)
    n = tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + m[:, None] * K + k[None, :]
    b_ptrs = b_ptr + k[:, None] * BLOCK_N + n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, tl.cdiv(K, BLOCK_K)):
        acc = tl.dot(tl.load(a_ptrs), tl.load(b_ptrs), acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * BLOCK_N
    tl.store(c_ptr + m[:, None] * BLOCK_N + n[None, :], acc)


def matmul_config(name: str, block_m: int, block_k: int, num_stages: int) -> TritonConfig:
    return register(TritonConfig(
        name=name, kernel=_matmul_kernel,
        signature={"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "K": "i32",
                   "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
        constexprs={"BLOCK_M": block_m, "BLOCK_N": block_m, "BLOCK_K": block_k},
        num_warps=4, num_stages=num_stages, divisible_by_16=("K",)))


# 64 x 64 x 64 tiles, 2 stages: 16-32 KB of shared memory, no spills.
matmul_config("gate_test/matmul/BM64/BK64/S2", 64, 64, 2)
