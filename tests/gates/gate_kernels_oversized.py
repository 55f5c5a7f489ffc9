"""The gate-test kernel with one configuration too big for any GPU (not collected as a test)."""

from tests.gates.gate_kernels import matmul_config

# 64 x 256 fp16 tiles of a and b, 4 pipeline stages: 192 KB (sm_80) / 256 KB (sm_90) of shared memory.
matmul_config("gate_test/matmul/BM64/BK256/S4", 64, 256, 4)
