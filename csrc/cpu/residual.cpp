// CPU kernels of the residual ops (MATH.md sections 1-2). Schemas are declared here for every backend.
// The per-element math and the per-sample reduction come from ttfm/residual.h, shared with the CUDA kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "ttfm/residual.h"
#include "ttfm/residual_op.h"

namespace ttfm {
namespace {

namespace rs = ttfm::residual;

// Elements per work item: a sample's features are split into chunks of this size, so a small batch still
// spreads over every thread, and the chunk partial sums are combined in chunk order (deterministic for any
// thread count).
constexpr int64_t kChunk = 16384;
// Independent accumulators per chunk (vectorizable, and shorter summation chains for accuracy).
constexpr int kLanes = 16;

// out[b, :] = x[b, :] + (t[b] - s[b]) * u[b, :]; all of x, u, out contiguous (B, D) views.
void flow_map_step_cpu(const at::Tensor& x, const at::Tensor& u, const at::Tensor& s, const at::Tensor& t,
                       at::Tensor& out) {
  check_flow_map_step_args(x, u, s, t, out);
  const int64_t batch = x.size(0);
  const int64_t dim = batch == 0 ? 0 : x.numel() / batch;
  const at::Tensor s64 = s.to(at::kDouble).contiguous();
  const at::Tensor t64 = t.to(at::kDouble).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "flow_map_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const double* sp = s64.const_data_ptr<double>();
    const double* tp = t64.const_data_ptr<double>();
    at::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        // The step size is rounded to x's dtype first, exactly like the reference (t - s).to(x.dtype).
        const acc_t h = static_cast<acc_t>(static_cast<scalar_t>(tp[b] - sp[b]));
        const int64_t base = b * dim;
        for (int64_t i = 0; i < dim; ++i) {
          op[base + i] = static_cast<scalar_t>(static_cast<acc_t>(xp[base + i]) + h * static_cast<acc_t>(up[base + i]));
        }
      }
    });
  });
}

// Pointers to the five (B, D) inputs of one residual call.
template <typename scalar_t>
struct Inputs {
  const scalar_t* u_st;
  const scalar_t* u_ss;
  const scalar_t* v_s;
  const scalar_t* target_a;
  const scalar_t* target_b;
};

template <typename scalar_t>
Inputs<scalar_t> inputs_of(const at::Tensor& u_st, const at::Tensor& u_ss, const at::Tensor& v_s,
                           const at::Tensor& target_a, const at::Tensor& target_b) {
  return {u_st.const_data_ptr<scalar_t>(), u_ss.const_data_ptr<scalar_t>(), v_s.const_data_ptr<scalar_t>(),
          target_a.const_data_ptr<scalar_t>(), target_b.const_data_ptr<scalar_t>()};
}

// Square sums of the flat element range [begin, end) of one sample with terminal coefficient `coef`.
template <typename scalar_t, typename acc_t>
rs::SquareSums<acc_t> chunk_sums(const Inputs<scalar_t>& in, acc_t coef, int64_t begin, int64_t end) {
  rs::SquareSums<acc_t> lanes[kLanes];
  for (auto& lane : lanes) lane = rs::zero_sums<acc_t>();
  auto add = [&](rs::SquareSums<acc_t>& lane, int64_t i) {
    const acc_t r_init = rs::init_residual<acc_t>(in.u_ss[i], in.v_s[i]);
    const acc_t r_term = rs::term_residual<acc_t>(in.u_st[i], in.target_a[i], in.target_b[i], coef);
    rs::accumulate(lane, r_init, r_term);
  };
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) add(lanes[k], i + k);
  }
  for (int k = 0; i < end; ++i, ++k) add(lanes[k], i);
  return rs::tree_reduce<kLanes>(lanes);
}

// losses[b] = weight[b] * (lambda_init * mean(r_I^2) + lambda_term * mean(r_T^2)) over sample b.
void itvm_residual_loss_fwd_cpu(const at::Tensor& u_st, const at::Tensor& u_ss, const at::Tensor& v_s,
                                const at::Tensor& target_a, const at::Tensor& target_b, const at::Tensor& coef,
                                const std::optional<at::Tensor>& weight, double lambda_init, double lambda_term,
                                at::Tensor& losses) {
  const at::Tensor& w = weight.has_value() ? *weight : coef;
  check_residual_args(u_st, {&u_ss, &v_s, &target_a, &target_b}, {&coef, &w, &losses});
  const int64_t batch = u_st.size(0);
  const int64_t dim = u_st.numel() / batch;
  const int64_t chunks = rs::num_chunks(dim, kChunk);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u_st.scalar_type(), "itvm_residual_loss_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Inputs<scalar_t> in = inputs_of<scalar_t>(u_st, u_ss, v_s, target_a, target_b);
    const acc_t* cp = coef.const_data_ptr<acc_t>();
    const acc_t* wp = weight.has_value() ? weight->const_data_ptr<acc_t>() : nullptr;
    acc_t* lp = losses.mutable_data_ptr<acc_t>();
    std::vector<rs::SquareSums<acc_t>> partial(batch * chunks);
    at::parallel_for(0, batch * chunks, 1, [&](int64_t w0, int64_t w1) {
      for (int64_t item = w0; item < w1; ++item) {
        const int64_t b = item / chunks;
        const int64_t begin = b * dim + (item % chunks) * kChunk;
        const int64_t end = std::min(begin + kChunk, (b + 1) * dim);
        partial[item] = chunk_sums<scalar_t, acc_t>(in, cp[b], begin, end);
      }
    });
    for (int64_t b = 0; b < batch; ++b) {
      rs::SquareSums<acc_t> sums = partial[b * chunks];
      for (int64_t c = 1; c < chunks; ++c) sums = rs::combine(sums, partial[b * chunks + c]);
      lp[b] = rs::sample_loss<acc_t>(sums, dim, lambda_init, lambda_term, wp ? wp[b] : acc_t(1));
    }
  });
}

// grad_u_st, grad_u_ss = d(sum_b grad_losses[b] * losses[b]) / d(u_st, u_ss), in one pass over the inputs.
void itvm_residual_loss_bwd_cpu(const at::Tensor& grad_losses, const at::Tensor& u_st, const at::Tensor& u_ss,
                                const at::Tensor& v_s, const at::Tensor& target_a, const at::Tensor& target_b,
                                const at::Tensor& coef, const std::optional<at::Tensor>& weight, double lambda_init,
                                double lambda_term, at::Tensor& grad_u_st, at::Tensor& grad_u_ss) {
  const at::Tensor& w = weight.has_value() ? *weight : coef;
  check_residual_args(u_st, {&u_ss, &v_s, &target_a, &target_b, &grad_u_st, &grad_u_ss}, {&coef, &w, &grad_losses});
  const int64_t batch = u_st.size(0);
  const int64_t dim = u_st.numel() / batch;
  const int64_t chunks = rs::num_chunks(dim, kChunk);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u_st.scalar_type(), "itvm_residual_loss_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Inputs<scalar_t> in = inputs_of<scalar_t>(u_st, u_ss, v_s, target_a, target_b);
    const acc_t* cp = coef.const_data_ptr<acc_t>();
    const acc_t* wp = weight.has_value() ? weight->const_data_ptr<acc_t>() : nullptr;
    const acc_t* gp = grad_losses.const_data_ptr<acc_t>();
    scalar_t* g_st = grad_u_st.mutable_data_ptr<scalar_t>();
    scalar_t* g_ss = grad_u_ss.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, batch * chunks, 1, [&](int64_t w0, int64_t w1) {
      for (int64_t item = w0; item < w1; ++item) {
        const int64_t b = item / chunks;
        const int64_t begin = b * dim + (item % chunks) * kChunk;
        const int64_t end = std::min(begin + kChunk, (b + 1) * dim);
        const acc_t coef_b = cp[b];
        const rs::GradScales<acc_t> scale =
            rs::grad_scales<acc_t>(gp[b], wp ? wp[b] : acc_t(1), dim, lambda_init, lambda_term);
        for (int64_t i = begin; i < end; ++i) {
          const acc_t r_init = rs::init_residual<acc_t>(in.u_ss[i], in.v_s[i]);
          const acc_t r_term = rs::term_residual<acc_t>(in.u_st[i], in.target_a[i], in.target_b[i], coef_b);
          g_ss[i] = static_cast<scalar_t>(scale.init * r_init);
          g_st[i] = static_cast<scalar_t>(scale.term * r_term);
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ttfm, m) {
  m.def("flow_map_step(Tensor x, Tensor u, Tensor s, Tensor t, Tensor(a!) out) -> ()");
  m.def("itvm_residual_loss_fwd(Tensor u_st, Tensor u_ss, Tensor v_s, Tensor target_a, Tensor target_b, "
        "Tensor coef, Tensor? weight, float lambda_init, float lambda_term, Tensor(a!) losses) -> ()");
  m.def("itvm_residual_loss_bwd(Tensor grad_losses, Tensor u_st, Tensor u_ss, Tensor v_s, Tensor target_a, "
        "Tensor target_b, Tensor coef, Tensor? weight, float lambda_init, float lambda_term, "
        "Tensor(a!) grad_u_st, Tensor(b!) grad_u_ss) -> ()");
}

TORCH_LIBRARY_IMPL(ttfm, CPU, m) {
  m.impl("flow_map_step", &flow_map_step_cpu);
  m.impl("itvm_residual_loss_fwd", &itvm_residual_loss_fwd_cpu);
  m.impl("itvm_residual_loss_bwd", &itvm_residual_loss_bwd_cpu);
}

}  // namespace ttfm
