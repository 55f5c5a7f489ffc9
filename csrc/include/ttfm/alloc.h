// The C++ twin of ttfm_kernels/_alloc.py: the one way C++ ops allocate their outputs. With
// TTFM_DEBUG_NAN_FILL=1 (set by the test suite) floating outputs are NaN-filled instead of left uninitialised,
// so a kernel that forgets to write part of an output cannot pass a parity test.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <limits>

namespace ttfm {

inline bool debug_nan_fill() {
  const char* flag = std::getenv("TTFM_DEBUG_NAN_FILL");
  return flag != nullptr && std::strcmp(flag, "1") == 0;
}

// at::empty(sizes, options), NaN-filled under TTFM_DEBUG_NAN_FILL=1 when the dtype is floating. Symbolic sizes
// are allowed (tracing under torch.compile).
inline at::Tensor empty_output(c10::SymIntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty_symint(sizes, options);
  if (debug_nan_fill() && at::isFloatingType(out.scalar_type())) {
    out.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return out;
}

// empty_output with t's sizes and options (contiguous).
inline at::Tensor empty_output_like(const at::Tensor& t) {
  return empty_output(t.sym_sizes(), t.options());
}

}  // namespace ttfm
