// The CUDA kernels of ttfm_kernels: the single CUDA source (each .cu costs minutes per architecture to build).
// Only TORCH_LIBRARY_IMPL(ttfm, CUDA, m) registrations live here; the schemas are declared by the CPU library
// (csrc/cpu/), which ttfm_kernels._ext loads first. Compiled by `make check-cuda`, not run on a GPU yet.
//
// Residual ops (MATH.md sections 1-2), per-element math and per-sample reduction from ttfm/residual.h:
// - flow_map_step: one elementwise pass.
// - itvm_residual_loss_fwd: each sample's features are split over several blocks (grid = chunks x B) so a
//   batch of 64 still fills every SM; each block reduces its chunk with warp shuffles and writes one partial,
//   and a second kernel combines a sample's partials in chunk order (deterministic, no atomics).
// - itvm_residual_loss_bwd: one elementwise pass writing both gradients.
// All accumulate in float32 (float64 for float64 inputs) and launch on the current stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "ttfm/residual.h"
#include "ttfm/residual_op.h"

namespace ttfm {
namespace {

namespace rs = ttfm::residual;

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
constexpr unsigned kFullMask = 0xffffffffu;

// Blocks for an elementwise grid-stride launch over n elements: enough to fill the GPU, no more.
int elementwise_blocks(int64_t n) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t wanted = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, sms * 8)));
}

template <typename scalar_t>
__global__ void flow_map_step_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ u,
                                     const double* __restrict__ s, const double* __restrict__ t,
                                     scalar_t* __restrict__ out, int64_t dim, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / dim;
    // The step size is rounded to x's dtype first, exactly like the reference (t - s).to(x.dtype).
    const acc_t h = static_cast<acc_t>(static_cast<scalar_t>(t[b] - s[b]));
    out[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) + h * static_cast<acc_t>(u[i]));
  }
}

void flow_map_step_cuda(const at::Tensor& x, const at::Tensor& u, const at::Tensor& s, const at::Tensor& t,
                        at::Tensor& out) {
  check_flow_map_step_args(x, u, s, t, out);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.numel();
  if (n == 0) return;
  const int64_t dim = n / x.size(0);
  const at::Tensor s64 = s.to(at::kDouble).contiguous();
  const at::Tensor t64 = t.to(at::kDouble).contiguous();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "flow_map_step_cuda", [&] {
    flow_map_step_kernel<scalar_t><<<elementwise_blocks(n), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(), s64.const_data_ptr<double>(),
        t64.const_data_ptr<double>(), out.mutable_data_ptr<scalar_t>(), dim, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Sums of a warp's values, tree-reduced with shuffles (lane 0 holds the result).
template <typename acc_t>
__device__ __forceinline__ rs::SquareSums<acc_t> warp_sums(rs::SquareSums<acc_t> v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const rs::SquareSums<acc_t> other{__shfl_down_sync(kFullMask, v.init, offset),
                                      __shfl_down_sync(kFullMask, v.term, offset)};
    v = rs::combine(v, other);
  }
  return v;
}

// Sums over a block of kThreads threads (thread 0 holds the result): warps, then the warp sums in warp order.
template <typename acc_t>
__device__ __forceinline__ rs::SquareSums<acc_t> block_sums(rs::SquareSums<acc_t> v) {
  __shared__ rs::SquareSums<acc_t> per_warp[kWarps];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  v = warp_sums(v);
  if (lane == 0) per_warp[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? per_warp[lane] : rs::zero_sums<acc_t>();
    v = warp_sums(v);
  }
  return v;
}

// Stage 1: block (c, b) reduces elements [c * chunk, min((c + 1) * chunk, dim)) of sample b into partial[b, c].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) residual_partial_kernel(
    const scalar_t* __restrict__ u_st, const scalar_t* __restrict__ u_ss, const scalar_t* __restrict__ v_s,
    const scalar_t* __restrict__ target_a, const scalar_t* __restrict__ target_b, const acc_t* __restrict__ coef,
    rs::SquareSums<acc_t>* __restrict__ partial, int64_t dim, int64_t chunk) {
  const int64_t b = blockIdx.y;
  const int64_t begin = blockIdx.x * chunk;
  const int64_t end = begin + chunk < dim ? begin + chunk : dim;
  const int64_t base = b * dim;
  const acc_t coef_b = coef[b];
  rs::SquareSums<acc_t> sums = rs::zero_sums<acc_t>();
  for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) {
    const int64_t i = base + j;
    const acc_t r_init = rs::init_residual<acc_t>(u_ss[i], v_s[i]);
    const acc_t r_term = rs::term_residual<acc_t>(u_st[i], target_a[i], target_b[i], coef_b);
    rs::accumulate(sums, r_init, r_term);
  }
  sums = block_sums(sums);
  if (threadIdx.x == 0) partial[b * gridDim.x + blockIdx.x] = sums;
}

// Stage 2: one warp per sample combines its partials (lane l takes chunks l, l + 32, ... in order) and writes
// the weighted per-sample loss.
template <typename acc_t>
__global__ void residual_finish_kernel(const rs::SquareSums<acc_t>* __restrict__ partial,
                                       const acc_t* __restrict__ weight, acc_t* __restrict__ losses,
                                       int64_t chunks, int64_t dim, acc_t lambda_init, acc_t lambda_term) {
  const int64_t b = blockIdx.x;
  rs::SquareSums<acc_t> sums = rs::zero_sums<acc_t>();
  for (int64_t c = threadIdx.x; c < chunks; c += kWarpSize) sums = rs::combine(sums, partial[b * chunks + c]);
  sums = warp_sums(sums);
  if (threadIdx.x == 0) {
    losses[b] = rs::sample_loss<acc_t>(sums, dim, lambda_init, lambda_term, weight ? weight[b] : acc_t(1));
  }
}

// Chunk length (a multiple of kThreads) so that chunks x batch blocks fill the GPU about four times over.
int64_t chunk_length(int64_t batch, int64_t dim) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t per_sample = std::max<int64_t>(1, (4 * sms + batch - 1) / batch);
  const int64_t min_chunk = 4 * kThreads;  // at least four elements per thread
  int64_t chunk = std::max<int64_t>(min_chunk, (dim + per_sample - 1) / per_sample);
  return (chunk + kThreads - 1) / kThreads * kThreads;
}

void itvm_residual_loss_fwd_cuda(const at::Tensor& u_st, const at::Tensor& u_ss, const at::Tensor& v_s,
                                 const at::Tensor& target_a, const at::Tensor& target_b, const at::Tensor& coef,
                                 const std::optional<at::Tensor>& weight, double lambda_init, double lambda_term,
                                 at::Tensor& losses) {
  const at::Tensor& w = weight.has_value() ? *weight : coef;
  check_residual_args(u_st, {&u_ss, &v_s, &target_a, &target_b}, {&coef, &w, &losses});
  const c10::cuda::CUDAGuard guard(u_st.device());
  const int64_t batch = u_st.size(0);
  const int64_t dim = u_st.numel() / batch;
  TORCH_CHECK(batch <= 65535, "ttfm::itvm_residual_loss: the CUDA kernel supports B <= 65535, got ", batch);
  const int64_t chunk = chunk_length(batch, dim);
  const int64_t chunks = rs::num_chunks(dim, chunk);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u_st.scalar_type(), "itvm_residual_loss_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Scratch for the stage-1 partials: two acc_t per (sample, chunk).
    const at::Tensor scratch = at::empty({batch * chunks * 2}, coef.options());
    auto* partial = reinterpret_cast<rs::SquareSums<acc_t>*>(scratch.data_ptr<acc_t>());
    const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(batch));
    residual_partial_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        u_st.const_data_ptr<scalar_t>(), u_ss.const_data_ptr<scalar_t>(), v_s.const_data_ptr<scalar_t>(),
        target_a.const_data_ptr<scalar_t>(), target_b.const_data_ptr<scalar_t>(), coef.const_data_ptr<acc_t>(),
        partial, dim, chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    residual_finish_kernel<acc_t><<<static_cast<unsigned>(batch), kWarpSize, 0, stream>>>(
        partial, weight.has_value() ? weight->const_data_ptr<acc_t>() : nullptr, losses.mutable_data_ptr<acc_t>(),
        chunks, dim, static_cast<acc_t>(lambda_init), static_cast<acc_t>(lambda_term));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename scalar_t, typename acc_t>
__global__ void residual_backward_kernel(
    const acc_t* __restrict__ grad_losses, const scalar_t* __restrict__ u_st, const scalar_t* __restrict__ u_ss,
    const scalar_t* __restrict__ v_s, const scalar_t* __restrict__ target_a, const scalar_t* __restrict__ target_b,
    const acc_t* __restrict__ coef, const acc_t* __restrict__ weight, scalar_t* __restrict__ grad_u_st,
    scalar_t* __restrict__ grad_u_ss, int64_t dim, int64_t n, acc_t lambda_init, acc_t lambda_term) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / dim;
    const rs::GradScales<acc_t> scale =
        rs::grad_scales<acc_t>(grad_losses[b], weight ? weight[b] : acc_t(1), dim, lambda_init, lambda_term);
    const acc_t r_init = rs::init_residual<acc_t>(u_ss[i], v_s[i]);
    const acc_t r_term = rs::term_residual<acc_t>(u_st[i], target_a[i], target_b[i], coef[b]);
    grad_u_ss[i] = static_cast<scalar_t>(scale.init * r_init);
    grad_u_st[i] = static_cast<scalar_t>(scale.term * r_term);
  }
}

void itvm_residual_loss_bwd_cuda(const at::Tensor& grad_losses, const at::Tensor& u_st, const at::Tensor& u_ss,
                                 const at::Tensor& v_s, const at::Tensor& target_a, const at::Tensor& target_b,
                                 const at::Tensor& coef, const std::optional<at::Tensor>& weight, double lambda_init,
                                 double lambda_term, at::Tensor& grad_u_st, at::Tensor& grad_u_ss) {
  const at::Tensor& w = weight.has_value() ? *weight : coef;
  check_residual_args(u_st, {&u_ss, &v_s, &target_a, &target_b, &grad_u_st, &grad_u_ss}, {&coef, &w, &grad_losses});
  const c10::cuda::CUDAGuard guard(u_st.device());
  const int64_t n = u_st.numel();
  if (n == 0) return;
  const int64_t dim = n / u_st.size(0);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u_st.scalar_type(), "itvm_residual_loss_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    residual_backward_kernel<scalar_t, acc_t><<<elementwise_blocks(n), kThreads, 0, stream>>>(
        grad_losses.const_data_ptr<acc_t>(), u_st.const_data_ptr<scalar_t>(), u_ss.const_data_ptr<scalar_t>(),
        v_s.const_data_ptr<scalar_t>(), target_a.const_data_ptr<scalar_t>(), target_b.const_data_ptr<scalar_t>(),
        coef.const_data_ptr<acc_t>(), weight.has_value() ? weight->const_data_ptr<acc_t>() : nullptr,
        grad_u_st.mutable_data_ptr<scalar_t>(), grad_u_ss.mutable_data_ptr<scalar_t>(), dim, n,
        static_cast<acc_t>(lambda_init), static_cast<acc_t>(lambda_term));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ttfm, CUDA, m) {
  m.impl("flow_map_step", &flow_map_step_cuda);
  m.impl("itvm_residual_loss_fwd", &itvm_residual_loss_fwd_cuda);
  m.impl("itvm_residual_loss_bwd", &itvm_residual_loss_bwd_cuda);
}

}  // namespace ttfm
