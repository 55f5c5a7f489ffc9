// The CUDA kernels of ttfm_kernels: the single CUDA source (each .cu costs minutes per architecture to build).
// Only TORCH_LIBRARY_IMPL(ttfm, CUDA, m) registrations live here; the schemas are declared by the CPU library
// (csrc/cpu/), which ttfm_kernels._ext loads first. Compiled by `make check-cuda`, not run on a GPU yet.
//
// Residual ops (docs/math.md sections 1-2), per-element math and per-sample reduction from ttfm/residual.h:
// - flow_map_step: one elementwise pass.
// - itvm_residual_loss_fwd: each sample's features are split over several blocks (grid = chunks x B) so a
//   batch of 64 still fills every SM; each block reduces its chunk with warp shuffles and writes one partial,
//   and a second kernel combines a sample's partials in chunk order (deterministic, no atomics) into the
//   per-sample loss and, when asked, the per-sample means of both squared residuals. The three-term target
//   (target_c given) is a compile-time variant, so the two-term one reads no sixth tensor. Given an
//   incoming gradient of the losses, the first kernel also writes both gradients in the same pass (the autograd
//   in csrc/cpu/residual.cpp uses that in backward).
// Loads and stores move 16-byte packs when D is a multiple of the pack and the pointers are aligned.
// All accumulate in float32 (float64 for float64 inputs) and launch on the current stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
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
    // The step size t - s stays in the accumulator dtype (never rounded to a half-precision x's dtype),
    // like the reference's (t - s).to(accumulator).
    const acc_t h = static_cast<acc_t>(t[b] - s[b]);
    out[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) + h * static_cast<acc_t>(u[i]));
  }
}

// A FlowMapStepKernel (ttfm/residual_op.h: flow_map_step_op checks and allocates).
void flow_map_step_kernel_cuda(const at::Tensor& x, const at::Tensor& u, const at::Tensor& s, const at::Tensor& t,
                               const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.numel();
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

// The pointers and scalars of one residual call, passed by value to the kernels. weight may be null (all 1);
// target_c and coef_c are null for the two-term target.
template <typename scalar_t, typename acc_t>
struct ResidualArgs {
  const scalar_t* u_st;
  const scalar_t* u_ss;
  const scalar_t* v_s;
  const scalar_t* target_a;
  const scalar_t* target_b;
  const scalar_t* target_c;
  const acc_t* coef;
  const acc_t* coef_c;
  const acc_t* weight;
  int64_t dim;
  acc_t lambda_init;
  acc_t lambda_term;
};

// VEC consecutive elements moved with one load or store (16 bytes when VEC > 1).
template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

template <int VEC, typename scalar_t>
__device__ __forceinline__ Pack<scalar_t, VEC> load_pack(const scalar_t* __restrict__ p, int64_t i) {
  return *reinterpret_cast<const Pack<scalar_t, VEC>*>(p + i);
}

// Residuals r_I, r_T of the VEC elements starting at flat index i (all in one sample, coefficients coef_b and,
// with kThree, coef_c_b).
template <bool kThree, int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void residual_pack(const ResidualArgs<scalar_t, acc_t>& a, int64_t i, acc_t coef_b,
                                              acc_t coef_c_b, acc_t (&r_init)[VEC], acc_t (&r_term)[VEC]) {
  const Pack<scalar_t, VEC> u_st = load_pack<VEC>(a.u_st, i), u_ss = load_pack<VEC>(a.u_ss, i),
                            v_s = load_pack<VEC>(a.v_s, i), t_a = load_pack<VEC>(a.target_a, i),
                            t_b = load_pack<VEC>(a.target_b, i);
  if constexpr (kThree) {
    const Pack<scalar_t, VEC> t_c = load_pack<VEC>(a.target_c, i);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      r_term[k] = rs::term_residual<acc_t>(u_st.v[k], t_a.v[k], t_b.v[k], coef_b, t_c.v[k], coef_c_b);
    }
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) r_term[k] = rs::term_residual<acc_t>(u_st.v[k], t_a.v[k], t_b.v[k], coef_b);
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) r_init[k] = rs::init_residual<acc_t>(u_ss.v[k], v_s.v[k]);
}

// The gradient outputs of a residual call (kGrads kernels only): grad_u_st, grad_u_ss (B, D) and the incoming
// gradient of the per-sample losses grad_losses (B,).
template <typename scalar_t, typename acc_t>
struct GradArgs {
  const acc_t* grad_losses;
  scalar_t* grad_u_st;
  scalar_t* grad_u_ss;
};

// Stage 1: block (c, b) reduces elements [c * chunk, min((c + 1) * chunk, dim)) of sample b into partial[b, c];
// with kGrads it also writes both gradients of those elements in the same pass.
// VEC divides dim and chunk, so a pack never crosses a chunk or a sample.
template <bool kGrads, bool kThree, int VEC, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) residual_partial_kernel(ResidualArgs<scalar_t, acc_t> a,
                                                                    GradArgs<scalar_t, acc_t> g,
                                                                    rs::SquareSums<acc_t>* __restrict__ partial,
                                                                    int64_t chunk) {
  const int64_t b = blockIdx.y;
  const int64_t begin = blockIdx.x * chunk;
  // Elements of this chunk (at most 2^24, see chunk_length) and its first flat index.
  const int len = static_cast<int>((begin + chunk < a.dim ? begin + chunk : a.dim) - begin);
  const int64_t base = b * a.dim + begin;
  const acc_t coef_b = a.coef[b];
  const acc_t coef_c_b = kThree ? a.coef_c[b] : acc_t(0);
  rs::GradScales<acc_t> scale{acc_t(0), acc_t(0)};
  if constexpr (kGrads) {
    scale = rs::grad_scales<acc_t>(g.grad_losses[b], a.weight ? a.weight[b] : acc_t(1), a.dim, a.lambda_init,
                                   a.lambda_term);
  }
  rs::SquareSums<acc_t> sums = rs::zero_sums<acc_t>();
  // Not unrolled: five (six) independent 16-byte loads per iteration keep enough bytes in flight, and unrolling made
  // ptxas spill (bf16 on sm_80, float on sm_90a).
#pragma unroll 1
  for (int j = threadIdx.x * VEC; j < len; j += kThreads * VEC) {
    acc_t r_init[VEC], r_term[VEC];
    residual_pack<kThree, VEC>(a, base + j, coef_b, coef_c_b, r_init, r_term);
#pragma unroll
    for (int k = 0; k < VEC; ++k) rs::accumulate(sums, r_init[k], r_term[k]);
    if constexpr (kGrads) {
      Pack<scalar_t, VEC> g_st, g_ss;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        g_ss.v[k] = static_cast<scalar_t>(scale.init * r_init[k]);
        g_st.v[k] = static_cast<scalar_t>(scale.term * r_term[k]);
      }
      *reinterpret_cast<Pack<scalar_t, VEC>*>(g.grad_u_st + base + j) = g_st;
      *reinterpret_cast<Pack<scalar_t, VEC>*>(g.grad_u_ss + base + j) = g_ss;
    }
  }
  sums = block_sums(sums);
  if (threadIdx.x == 0) partial[b * gridDim.x + blockIdx.x] = sums;
}

// Stage 2: one warp per sample combines its partials (lane l takes chunks l, l + 32, ... in order) and writes
// the weighted per-sample loss and, when `terms` is not null, the per-sample means {init, term}.
template <typename scalar_t, typename acc_t>
__global__ void residual_finish_kernel(ResidualArgs<scalar_t, acc_t> a,
                                       const rs::SquareSums<acc_t>* __restrict__ partial, int64_t chunks,
                                       acc_t* __restrict__ losses, acc_t* __restrict__ terms) {
  const int64_t b = blockIdx.x;
  rs::SquareSums<acc_t> sums = rs::zero_sums<acc_t>();
  for (int64_t c = threadIdx.x; c < chunks; c += kWarpSize) sums = rs::combine(sums, partial[b * chunks + c]);
  sums = warp_sums(sums);
  if (threadIdx.x == 0) {
    losses[b] = rs::sample_loss<acc_t>(sums, a.dim, a.lambda_init, a.lambda_term, a.weight ? a.weight[b] : acc_t(1));
    if (terms != nullptr) {
      const rs::SquareSums<acc_t> means = rs::sample_terms(sums, a.dim);
      terms[2 * b] = means.init;
      terms[2 * b + 1] = means.term;
    }
  }
}

template <typename scalar_t, typename acc_t>
ResidualArgs<scalar_t, acc_t> residual_args(const ResidualTensors& t, double lambda_init, double lambda_term) {
  return {t.u_st.const_data_ptr<scalar_t>(),
          t.u_ss.const_data_ptr<scalar_t>(),
          t.v_s.const_data_ptr<scalar_t>(),
          t.target_a.const_data_ptr<scalar_t>(),
          t.target_b.const_data_ptr<scalar_t>(),
          t.target_c.has_value() ? t.target_c->const_data_ptr<scalar_t>() : nullptr,
          t.coef.const_data_ptr<acc_t>(),
          t.coef_c.has_value() ? t.coef_c->const_data_ptr<acc_t>() : nullptr,
          t.weight.has_value() ? t.weight->const_data_ptr<acc_t>() : nullptr,
          t.u_st.numel() / t.u_st.size(0),
          static_cast<acc_t>(lambda_init),
          static_cast<acc_t>(lambda_term)};
}

// 16-byte packs when every (B, D) pointer is 16-byte aligned and D is a multiple of the pack; else 1.
template <typename scalar_t>
constexpr int kPack = 16 / sizeof(scalar_t);

template <typename scalar_t>
bool can_pack(int64_t dim, std::initializer_list<const void*> pointers) {
  if (dim % kPack<scalar_t> != 0) return false;
  return std::all_of(pointers.begin(), pointers.end(),
                     [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; });
}

template <typename scalar_t, typename acc_t>
bool can_pack(const ResidualArgs<scalar_t, acc_t>& a) {
  // A null target_c (the two-term target) counts as aligned.
  return can_pack<scalar_t>(a.dim, {a.u_st, a.u_ss, a.v_s, a.target_a, a.target_b, a.target_c});
}

// Chunk length (a multiple of kThreads, hence of every pack width) so that chunks x batch blocks fill the GPU
// about four times over; at most 2^24 elements, so the kernel indexes within a chunk in 32 bits.
int64_t chunk_length(int64_t batch, int64_t dim) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t per_sample = std::max<int64_t>(1, (4 * sms + batch - 1) / batch);
  const int64_t min_chunk = 4 * kThreads;  // at least four elements per thread
  const int64_t max_chunk = int64_t(1) << 24;
  const int64_t chunk = std::clamp<int64_t>((dim + per_sample - 1) / per_sample, min_chunk, max_chunk);
  return (chunk + kThreads - 1) / kThreads * kThreads;
}

template <bool kGrads, int VEC, typename scalar_t, typename acc_t>
void launch_partial(const ResidualArgs<scalar_t, acc_t>& args, const GradArgs<scalar_t, acc_t>& grads,
                    rs::SquareSums<acc_t>* partial, int64_t chunk, dim3 grid, cudaStream_t stream) {
  if (args.target_c != nullptr) {
    residual_partial_kernel<kGrads, true, VEC><<<grid, kThreads, 0, stream>>>(args, grads, partial, chunk);
  } else {
    residual_partial_kernel<kGrads, false, VEC><<<grid, kThreads, 0, stream>>>(args, grads, partial, chunk);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The per-sample losses and means and, with grad_losses given, both gradients in the same pass (a ResidualKernel,
// see the CPU kernel; itvm_residual_loss_fwd_op checks and allocates).
void itvm_residual_loss_kernel_cuda(const ResidualTensors& tensors, double lambda_init, double lambda_term,
                                    const at::Tensor& losses, const at::Tensor& terms,
                                    const std::optional<at::Tensor>& grad_losses, const at::Tensor& grad_u_st,
                                    const at::Tensor& grad_u_ss) {
  const at::Tensor& u_st = tensors.u_st;
  const at::Tensor& coef = tensors.coef;
  const c10::cuda::CUDAGuard guard(u_st.device());
  const int64_t batch = u_st.size(0);
  const int64_t dim = u_st.numel() / batch;
  TORCH_CHECK(batch <= 65535, "ttfm::itvm_residual_loss: the CUDA kernel supports B <= 65535, got ", batch);
  const int64_t chunk = chunk_length(batch, dim);
  const int64_t chunks = rs::num_chunks(dim, chunk);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u_st.scalar_type(), "itvm_residual_loss_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int vec = kPack<scalar_t>;
    const auto args = residual_args<scalar_t, acc_t>(tensors, lambda_init, lambda_term);
    // Scratch for the stage-1 partials: two acc_t per (sample, chunk).
    const at::Tensor scratch = at::empty({batch * chunks * 2}, coef.options());
    auto* partial = reinterpret_cast<rs::SquareSums<acc_t>*>(scratch.data_ptr<acc_t>());
    const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(batch));
    if (grad_losses.has_value()) {
      const GradArgs<scalar_t, acc_t> grads{grad_losses->const_data_ptr<acc_t>(),
                                            grad_u_st.mutable_data_ptr<scalar_t>(),
                                            grad_u_ss.mutable_data_ptr<scalar_t>()};
      if (can_pack(args) && can_pack<scalar_t>(dim, {grads.grad_u_st, grads.grad_u_ss})) {
        launch_partial<true, vec>(args, grads, partial, chunk, grid, stream);
      } else {
        launch_partial<true, 1>(args, grads, partial, chunk, grid, stream);
      }
    } else {
      const GradArgs<scalar_t, acc_t> none{nullptr, nullptr, nullptr};
      if (can_pack(args)) {
        launch_partial<false, vec>(args, none, partial, chunk, grid, stream);
      } else {
        launch_partial<false, 1>(args, none, partial, chunk, grid, stream);
      }
    }
    residual_finish_kernel<<<static_cast<unsigned>(batch), kWarpSize, 0, stream>>>(
        args, partial, chunks, losses.mutable_data_ptr<acc_t>(), terms.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor flow_map_step_cuda(const at::Tensor& x, const at::Tensor& u, const at::Tensor& s, const at::Tensor& t) {
  return flow_map_step_op(&flow_map_step_kernel_cuda, x, u, s, t);
}

std::vector<at::Tensor> itvm_residual_loss_fwd_cuda(
    const at::Tensor& u_st, const at::Tensor& u_ss, const at::Tensor& v_s, const at::Tensor& target_a,
    const at::Tensor& target_b, const at::Tensor& coef, const std::optional<at::Tensor>& target_c,
    const std::optional<at::Tensor>& coef_c, const std::optional<at::Tensor>& weight, double lambda_init,
    double lambda_term, const std::optional<at::Tensor>& grad_losses) {
  return itvm_residual_loss_fwd_op(&itvm_residual_loss_kernel_cuda, u_st, u_ss, v_s, target_a, target_b, coef,
                                   target_c, coef_c, weight, lambda_init, lambda_term, grad_losses);
}

}  // namespace

TORCH_LIBRARY_IMPL(ttfm, CUDA, m) {
  m.impl("flow_map_step", &flow_map_step_cuda);
  m.impl("itvm_residual_loss_fwd", &itvm_residual_loss_fwd_cuda);
}

}  // namespace ttfm
