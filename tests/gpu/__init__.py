"""GPU parity tests: ``@pytest.mark.gpu``, skipped without CUDA, run on a GPU by ``make gpu-check``.

Each test runs a GPU kernel (Triton compiled for the device, or a CUDA kernel of ``_C_cuda``) on CUDA tensors
and compares it with the reference computed on the CPU (float64 where possible) through
``ttfm_kernels.testing``. On a CUDA machine ``make gpu-check`` fails on any failure AND on any skip.

Adding the cases of a new kernel (every kernel issue does):

- put them in ``tests/gpu/test_<op>_gpu.py`` with ``pytestmark = pytest.mark.gpu``; build inputs on the CPU
  (reuse the CPU test module's input and oracle helpers), move them with ``.cuda()``, compare on the CPU;
- keep them within about 30 s of gpu-check time: a curated list of shapes and dtypes, not a cross product.
  Every distinct Triton specialisation (dtype, constexprs, and each integer argument's divisibility by 16 or
  value 1) is one JIT compilation of a few seconds; the whole suite stays within about 30 of them per kernel
  family (the count of each module is in its docstring);
- a module needing a package the GPU machine lacks (diffusers) starts with ``pytest.importorskip``, so
  collection never fails there (gpu-check lists it as not collected);
- raise ``EXPECTED_GPU_TESTS`` in ``tests/gpu/test_gpu_check.py`` to the new total.
"""
