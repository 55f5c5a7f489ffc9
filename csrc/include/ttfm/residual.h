// Per-element math and per-sample reduction of the ITVM residual loss (docs/math.md sections 1-2), shared by the
// C++ CPU kernel (csrc/cpu/residual.cpp) and the CUDA kernel (csrc/cuda/ttfm_cuda.cu), so the arithmetic the
// GPU runs is the arithmetic the CPU tests check. Plain C++17, no torch: csrc/tests/ tests it under ctest.
//
// For one sample b with n = prod(non-batch dims) elements, accumulating in acc_t (float, or double for double):
//   r_I = u_ss - v_s,  r_T = u_st - (target_a + (coef_b * target_b + coef_c_b * target_c))
//   loss_b = (lambda_init * sum(r_I^2) / n + lambda_term * sum(r_T^2) / n) * weight_b
//   d loss / d u_ss = g_b * weight_b * lambda_init * 2 r_I / n,  d loss / d u_st = g_b * weight_b * lambda_term * 2 r_T / n
// where g_b is the incoming gradient of loss_b; the term in target_c is optional (absent: zero). Every input is
// converted to acc_t before it enters the target, so a difference of two large scaled terms (the "fd" target's
// (u' - u^-) / delta) is formed in acc_t, never in the inputs' dtype (docs/math.md section 2).
// The statistics are the unweighted per-sample means sum(r_I^2) / n and sum(r_T^2) / n (sample_terms).
// The sums are split into fixed chunks (a CPU work item or a CUDA block each), every chunk reduced in a fixed
// order and the chunks combined in index order: deterministic.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define TTFM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TTFM_HOST_DEVICE inline
#endif

namespace ttfm {
namespace residual {

// The two running sums of squared residuals of one sample (or of one chunk of it).
template <typename acc_t>
struct SquareSums {
  acc_t init;  // sum of r_I^2
  acc_t term;  // sum of r_T^2
};

template <typename acc_t>
TTFM_HOST_DEVICE SquareSums<acc_t> zero_sums() {
  return SquareSums<acc_t>{acc_t(0), acc_t(0)};
}

// r_I = u_ss - v_s: the initial-velocity residual.
template <typename acc_t>
TTFM_HOST_DEVICE acc_t init_residual(acc_t u_ss, acc_t v_s) {
  return u_ss - v_s;
}

// r_T = u_st - (target_a + coef * target_b): the terminal-velocity residual against target_T = A + c B.
template <typename acc_t>
TTFM_HOST_DEVICE acc_t term_residual(acc_t u_st, acc_t target_a, acc_t target_b, acc_t coef) {
  return u_st - (target_a + coef * target_b);
}

// r_T = u_st - (target_a + (coef * target_b + coef_c * target_c)): the three-term target. The two scaled terms
// are added first, since they are the ones that cancel (the "fd" target: -u^- / delta + u' / delta).
template <typename acc_t>
TTFM_HOST_DEVICE acc_t term_residual(acc_t u_st, acc_t target_a, acc_t target_b, acc_t coef, acc_t target_c,
                                     acc_t coef_c) {
  return u_st - (target_a + (coef * target_b + coef_c * target_c));
}

// Adds one element's squared residuals to the running sums.
template <typename acc_t>
TTFM_HOST_DEVICE void accumulate(SquareSums<acc_t>& sums, acc_t r_init, acc_t r_term) {
  sums.init += r_init * r_init;
  sums.term += r_term * r_term;
}

// Combines two partial sums; callers always combine in a fixed order (chunk index, tree position).
template <typename acc_t>
TTFM_HOST_DEVICE SquareSums<acc_t> combine(SquareSums<acc_t> a, SquareSums<acc_t> b) {
  return SquareSums<acc_t>{a.init + b.init, a.term + b.term};
}

// Reduces LANES partial sums (a power of two) pairwise in place: lane i takes lane i + half, half = LANES/2 ...
// the same tree a warp shuffle reduction walks. Returns lane 0.
template <int LANES, typename acc_t>
TTFM_HOST_DEVICE SquareSums<acc_t> tree_reduce(SquareSums<acc_t>* lanes) {
  static_assert(LANES > 0 && (LANES & (LANES - 1)) == 0, "LANES must be a power of two");
  for (int half = LANES / 2; half > 0; half /= 2) {
    for (int i = 0; i < half; ++i) {
      lanes[i] = combine(lanes[i], lanes[i + half]);
    }
  }
  return lanes[0];
}

// The weighted per-sample loss from the complete sums of one sample of `numel` elements.
template <typename acc_t>
TTFM_HOST_DEVICE acc_t sample_loss(SquareSums<acc_t> sums, int64_t numel, acc_t lambda_init, acc_t lambda_term,
                                   acc_t weight) {
  const SquareSums<acc_t> means = sample_terms(sums, numel);
  return (lambda_init * means.init + lambda_term * means.term) * weight;
}

// The unweighted per-sample means of the squared residuals {sum(r_I^2) / n, sum(r_T^2) / n}: the statistics.
template <typename acc_t>
TTFM_HOST_DEVICE SquareSums<acc_t> sample_terms(SquareSums<acc_t> sums, int64_t numel) {
  const acc_t n = static_cast<acc_t>(numel);
  return SquareSums<acc_t>{sums.init / n, sums.term / n};
}

// Per-sample factors of the backward pass: d loss_b / d u_ss = init * r_I and d loss_b / d u_st = term * r_T.
template <typename acc_t>
struct GradScales {
  acc_t init;
  acc_t term;
};

template <typename acc_t>
TTFM_HOST_DEVICE GradScales<acc_t> grad_scales(acc_t grad_loss, acc_t weight, int64_t numel, acc_t lambda_init,
                                                acc_t lambda_term) {
  const acc_t g = grad_loss * weight * acc_t(2) / static_cast<acc_t>(numel);
  return GradScales<acc_t>{g * lambda_init, g * lambda_term};
}

// Number of fixed-size chunks covering `numel` elements (at least one, so an empty sample still gets a loss).
TTFM_HOST_DEVICE int64_t num_chunks(int64_t numel, int64_t chunk) {
  return numel <= 0 ? 1 : (numel + chunk - 1) / chunk;
}

}  // namespace residual
}  // namespace ttfm
