// The residual ops (docs/math.md sections 1-2): schemas for every backend, the CPU kernels, and the autograd of
// the loss op users call. The per-element math and the per-sample reduction come from ttfm/residual.h, shared
// with the CUDA kernels (csrc/cuda/ttfm_cuda.cu); the functional op wrappers (check, allocate, run a backend's
// kernel) from ttfm/residual_op.h.
//
// Ops, all functional (inputs in, fresh outputs out; docs/design.md, "How to add an op"):
// - flow_map_step -> out, itvm_residual_loss_fwd -> [losses, terms(, grads)]: private kernel ops
//   with CPU (here) and CUDA kernels; their fake kernels and (flow_map_step) autograd are registered from Python
//   (ttfm_kernels/ops/residual/function.py). itvm_residual_loss_fwd computes the per-sample losses, the
//   per-sample unweighted means of both squared residuals (B, 2) and, given an incoming gradient of the losses,
//   both gradients in the same pass (grads = {grad_u_st, grad_u_ss}, one (2, B, ...) tensor). The terminal target is target_a + coef * target_b (+ coef_c * target_c
//   when target_c is given), formed in the accumulation dtype.
// - itvm_residual_loss: the functional loss (per-sample losses, weights, reduction) and the two statistics
//   (the unweighted means of r_I^2 and r_T^2 over the batch, from the same pass), with its autograd
//   registered here in C++ at the Autograd key, calling the kernel op through the dispatcher so CPU and CUDA
//   tensors share this code. The one documented exception to registering autograd from Python: the Python
//   registration costs more per call than the kernels themselves at everyday sizes (docs/performance.md,
//   docs/design.md). No forward-AD rule: the Python entry point computes tangents itself.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "ttfm/alloc.h"
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

// out[b, :] = x[b, :] + (t[b] - s[b]) * u[b, :]; all of x, u, out contiguous (B, D) views (checked by
// flow_map_step_op).
void flow_map_step_kernel(const at::Tensor& x, const at::Tensor& u, const at::Tensor& s, const at::Tensor& t,
                          const at::Tensor& out) {
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
        // The step size t - s stays in the accumulator dtype (never rounded to a half-precision x's dtype),
        // like the reference's (t - s).to(accumulator).
        const acc_t h = static_cast<acc_t>(tp[b] - sp[b]);
        const int64_t base = b * dim;
        for (int64_t i = 0; i < dim; ++i) {
          op[base + i] = static_cast<scalar_t>(static_cast<acc_t>(xp[base + i]) + h * static_cast<acc_t>(up[base + i]));
        }
      }
    });
  });
}

at::Tensor flow_map_step_cpu(const at::Tensor& x, const at::Tensor& u, const at::Tensor& s, const at::Tensor& t) {
  return flow_map_step_op(&flow_map_step_kernel, x, u, s, t);
}

// Pointers to the (B, D) inputs of one residual call; target_c is null when the target has two terms.
template <typename scalar_t>
struct Inputs {
  const scalar_t* u_st;
  const scalar_t* u_ss;
  const scalar_t* v_s;
  const scalar_t* target_a;
  const scalar_t* target_b;
  const scalar_t* target_c;
};

template <typename scalar_t>
Inputs<scalar_t> inputs_of(const ResidualTensors& t) {
  return {t.u_st.const_data_ptr<scalar_t>(), t.u_ss.const_data_ptr<scalar_t>(), t.v_s.const_data_ptr<scalar_t>(),
          t.target_a.const_data_ptr<scalar_t>(), t.target_b.const_data_ptr<scalar_t>(),
          t.target_c.has_value() ? t.target_c->const_data_ptr<scalar_t>() : nullptr};
}

// The per-sample coefficients of one call (coef_c null without target_c, weight null for all ones).
template <typename acc_t>
struct Coefs {
  const acc_t* coef;
  const acc_t* coef_c;
  const acc_t* weight;
};

template <typename acc_t>
Coefs<acc_t> coefs_of(const ResidualTensors& t) {
  return {t.coef.const_data_ptr<acc_t>(), t.coef_c.has_value() ? t.coef_c->const_data_ptr<acc_t>() : nullptr,
          t.weight.has_value() ? t.weight->const_data_ptr<acc_t>() : nullptr};
}

// Calls f(std::bool_constant<grads>, std::bool_constant<three_terms>): the kernels' compile-time variants.
template <typename F>
void with_variant(bool grads, bool three_terms, F&& f) {
  if (grads) {
    three_terms ? f(std::true_type{}, std::true_type{}) : f(std::true_type{}, std::false_type{});
  } else {
    three_terms ? f(std::false_type{}, std::true_type{}) : f(std::false_type{}, std::false_type{});
  }
}

// Outputs of the gradient part of a residual call: both null, or both (B, D) like the inputs.
template <typename scalar_t>
struct Grads {
  scalar_t* u_st;
  scalar_t* u_ss;
};

// Square sums of the flat element range [begin, end) of one sample with terminal coefficients `coef` (and
// `coef_c` with kThree); with kGrads also writes the gradients grad_u_ss[i] = scale.init * r_I and
// grad_u_st[i] = scale.term * r_T in the same pass.
template <bool kGrads, bool kThree, typename scalar_t, typename acc_t>
rs::SquareSums<acc_t> chunk_pass(const Inputs<scalar_t>& in, const Grads<scalar_t>& grads, acc_t coef, acc_t coef_c,
                                 rs::GradScales<acc_t> scale, int64_t begin, int64_t end) {
  rs::SquareSums<acc_t> lanes[kLanes];
  for (auto& lane : lanes) lane = rs::zero_sums<acc_t>();
  // Indexed from the struct's pointers with the absolute index: with -fwrapv (Python's flags) this form
  // vectorizes better than local __restrict__ pointers offset by `begin` (docs/performance.md).
  auto step = [&](rs::SquareSums<acc_t>& lane, int64_t i) {
    const acc_t r_init = rs::init_residual<acc_t>(in.u_ss[i], in.v_s[i]);
    acc_t r_term;
    if constexpr (kThree) {
      r_term = rs::term_residual<acc_t>(in.u_st[i], in.target_a[i], in.target_b[i], coef, in.target_c[i], coef_c);
    } else {
      r_term = rs::term_residual<acc_t>(in.u_st[i], in.target_a[i], in.target_b[i], coef);
    }
    rs::accumulate(lane, r_init, r_term);
    if constexpr (kGrads) {
      grads.u_ss[i] = static_cast<scalar_t>(scale.init * r_init);
      grads.u_st[i] = static_cast<scalar_t>(scale.term * r_term);
    }
  };
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) step(lanes[k], i + k);
  }
  for (int k = 0; i < end; ++i, ++k) step(lanes[k], i);
  return rs::tree_reduce<kLanes>(lanes);
}

// The per-sample losses (B,) of one call, the unweighted per-sample means {init, term} into `terms` (B, 2) when
// it is not null, and with kGrads the gradients of sum_b grad_losses[b] * losses[b]: parallel over
// (sample, chunk) work items, chunk sums combined in chunk order.
template <bool kGrads, bool kThree, typename scalar_t, typename acc_t>
void cpu_residual_pass(const Inputs<scalar_t>& in, const Grads<scalar_t>& grads, const Coefs<acc_t>& co,
                       const acc_t* grad_losses, int64_t batch, int64_t dim, double lambda_init, double lambda_term,
                       acc_t* losses, acc_t* terms) {
  const acc_t* weight = co.weight;
  const int64_t chunks = rs::num_chunks(dim, kChunk);
  std::vector<rs::SquareSums<acc_t>> partial(batch * chunks);
  at::parallel_for(0, batch * chunks, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t item = w0; item < w1; ++item) {
      const int64_t b = item / chunks;
      const int64_t begin = b * dim + (item % chunks) * kChunk;
      const int64_t end = std::min(begin + kChunk, (b + 1) * dim);
      const rs::GradScales<acc_t> scale =
          kGrads ? rs::grad_scales<acc_t>(grad_losses[b], weight ? weight[b] : acc_t(1), dim, lambda_init,
                                          lambda_term)
                 : rs::GradScales<acc_t>{acc_t(0), acc_t(0)};
      partial[item] = chunk_pass<kGrads, kThree, scalar_t, acc_t>(in, grads, co.coef[b],
                                                                  kThree ? co.coef_c[b] : acc_t(0), scale, begin, end);
    }
  });
  for (int64_t b = 0; b < batch; ++b) {
    rs::SquareSums<acc_t> sums = partial[b * chunks];
    for (int64_t c = 1; c < chunks; ++c) sums = rs::combine(sums, partial[b * chunks + c]);
    losses[b] = rs::sample_loss<acc_t>(sums, dim, lambda_init, lambda_term, weight ? weight[b] : acc_t(1));
    if (terms != nullptr) {
      const rs::SquareSums<acc_t> means = rs::sample_terms(sums, dim);
      terms[2 * b] = means.init;
      terms[2 * b + 1] = means.term;
    }
  }
}

enum class Reduction : int64_t { kMean, kSum, kNone };

Reduction parse_reduction(c10::string_view reduction) {
  if (reduction == "mean") return Reduction::kMean;
  if (reduction == "sum") return Reduction::kSum;
  TORCH_CHECK(reduction == "none", "ttfm::itvm_residual_loss: reduction must be 'mean', 'sum' or 'none', got '",
              reduction, "'");
  return Reduction::kNone;
}

// losses[b] = weight[b] * (lambda_init * mean(r_I^2) + lambda_term * mean(r_T^2)) over sample b and
// terms[b] = {mean(r_I^2), mean(r_T^2)}. With grad_losses (B,) given, also grad_u_st, grad_u_ss =
// d(sum_b grad_losses[b] * losses[b]) / d(u_st, u_ss), in the same pass over the inputs (a ResidualKernel).
void itvm_residual_loss_kernel(const ResidualTensors& args, double lambda_init, double lambda_term,
                               const at::Tensor& losses, const at::Tensor& terms,
                               const std::optional<at::Tensor>& grad_losses, const at::Tensor& grad_u_st,
                               const at::Tensor& grad_u_ss) {
  const at::Tensor& u_st = args.u_st;
  const int64_t batch = u_st.size(0);
  const int64_t dim = u_st.numel() / batch;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u_st.scalar_type(), "itvm_residual_loss_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Inputs<scalar_t> in = inputs_of<scalar_t>(args);
    const Coefs<acc_t> co = coefs_of<acc_t>(args);
    acc_t* lp = losses.mutable_data_ptr<acc_t>();
    acc_t* tp = terms.mutable_data_ptr<acc_t>();
    const bool grad = grad_losses.has_value();
    const Grads<scalar_t> grads{grad ? grad_u_st.mutable_data_ptr<scalar_t>() : nullptr,
                                grad ? grad_u_ss.mutable_data_ptr<scalar_t>() : nullptr};
    const acc_t* gp = grad ? grad_losses->const_data_ptr<acc_t>() : nullptr;
    with_variant(grad, args.target_c.has_value(), [&](auto kGrads, auto kThree) {
      cpu_residual_pass<kGrads, kThree, scalar_t, acc_t>(in, grads, co, gp, batch, dim, lambda_init, lambda_term, lp,
                                                         tp);
    });
  });
}

std::vector<at::Tensor> itvm_residual_loss_fwd_cpu(
    const at::Tensor& u_st, const at::Tensor& u_ss, const at::Tensor& v_s, const at::Tensor& target_a,
    const at::Tensor& target_b, const at::Tensor& coef, const std::optional<at::Tensor>& target_c,
    const std::optional<at::Tensor>& coef_c, const std::optional<at::Tensor>& weight, double lambda_init,
    double lambda_term, const std::optional<at::Tensor>& grad_losses) {
  return itvm_residual_loss_fwd_op(&itvm_residual_loss_kernel, u_st, u_ss, v_s, target_a, target_b, coef, target_c,
                                   coef_c, weight, lambda_init, lambda_term, grad_losses);
}

// ---- itvm_residual_loss: the functional op and its autograd ----

// A CPU tensor holding real data: not a fake or functional tensor being traced (torch.compile, opcheck), whose
// values cannot be read.
bool is_plain_cpu(const at::Tensor& t) {
  return t.device().is_cpu() &&
         !t.key_set().has_any(c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize}));
}

// Uninitialised outputs for grad_u_st and grad_u_ss, contiguous and shaped like u_st, as the two halves of ONE
// allocation: glibc returns two separate buffers of this size to the system after every step, and the next step
// pays page faults to map them again (docs/performance.md). For plain CPU tensors (cpu_loss), the halves come
// without a torch op (at::from_blob keeping the buffer's storage alive; the kernel op uses select and view).
std::tuple<at::Tensor, at::Tensor> gradient_buffers(const at::Tensor& u_st) {
  const at::Tensor both = empty_output({2, u_st.sym_numel()}, u_st.options());
  const int64_t bytes = u_st.numel() * u_st.element_size();
  auto half = [&](int64_t index) {
    return at::from_blob(static_cast<char*>(both.data_ptr()) + index * bytes, u_st.sizes(),
                         [keep = both.storage()](void*) {}, u_st.options());
  };
  return {half(0), half(1)};
}

// What the loss computes in one forward: the reduced loss, the two statistics (0-dim, the unweighted means of
// r_I^2 and r_T^2 over the batch) and, when written for a unit incoming gradient, both gradients (else undefined).
struct ForwardResult {
  at::Tensor loss;
  at::Tensor init_mean;
  at::Tensor term_mean;
  at::Tensor grad_u_st;
  at::Tensor grad_u_ss;
};

// The loss of plain CPU tensors computed here directly rather than through the kernel op and torch ops: the
// reduction and the statistics run on the per-sample values in a plain loop and, with `unit_grads`, the gradients
// for a unit incoming gradient of the reduced loss are written in the same pass. Every torch op avoided saves
// microseconds per call, which matter next to a kernel of a few hundred microseconds.
ForwardResult cpu_loss(const ResidualTensors& t, double lambda_init, double lambda_term, Reduction reduction,
                       bool unit_grads) {
  check_residual_inputs(t);
  const at::Tensor& u_st = t.u_st;
  const int64_t batch = u_st.size(0);
  const int64_t dim = u_st.numel() / batch;
  const auto options = t.coef.options();
  ForwardResult r;
  r.loss = reduction == Reduction::kNone ? empty_output({u_st.sym_size(0)}, options) : empty_output({}, options);
  r.init_mean = empty_output({}, options);
  r.term_mean = empty_output({}, options);
  if (unit_grads) std::tie(r.grad_u_st, r.grad_u_ss) = gradient_buffers(u_st);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u_st.scalar_type(), "itvm_residual_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Inputs<scalar_t> in = inputs_of<scalar_t>(t);
    const Coefs<acc_t> co = coefs_of<acc_t>(t);
    std::vector<acc_t> losses(batch), terms(2 * batch);
    // d loss / d losses[b] for a unit gradient of the reduced loss.
    const std::vector<acc_t> unit(unit_grads ? batch : 0, reduction == Reduction::kMean
                                                              ? acc_t(1) / static_cast<acc_t>(batch)
                                                              : acc_t(1));
    const Grads<scalar_t> grads{unit_grads ? r.grad_u_st.mutable_data_ptr<scalar_t>() : nullptr,
                                unit_grads ? r.grad_u_ss.mutable_data_ptr<scalar_t>() : nullptr};
    with_variant(unit_grads, t.target_c.has_value(), [&](auto kGrads, auto kThree) {
      cpu_residual_pass<kGrads, kThree, scalar_t, acc_t>(in, grads, co, unit.data(), batch, dim, lambda_init,
                                                         lambda_term, losses.data(), terms.data());
    });
    acc_t* out = r.loss.mutable_data_ptr<acc_t>();
    if (reduction == Reduction::kNone) {
      std::copy(losses.begin(), losses.end(), out);
    } else {
      acc_t total = 0;
      for (const acc_t l : losses) total += l;
      *out = reduction == Reduction::kMean ? total / static_cast<acc_t>(batch) : total;
    }
    acc_t init = 0, term = 0;
    for (int64_t b = 0; b < batch; ++b) {
      init += terms[2 * b];
      term += terms[2 * b + 1];
    }
    *r.init_mean.mutable_data_ptr<acc_t>() = init / static_cast<acc_t>(batch);
    *r.term_mean.mutable_data_ptr<acc_t>() = term / static_cast<acc_t>(batch);
  });
  return r;
}

// One pass of the kernel op: the weighted per-sample losses (B,) in coef's dtype, the per-sample means (B, 2)
// and, when grad_losses is defined, the gradients of sum_b grad_losses[b] * losses[b] (returned as
// {losses, terms, grad_u_st, grad_u_ss}, the gradients undefined where not asked for).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_pass(const ResidualTensors& t,
                                                                         double lambda_init, double lambda_term,
                                                                         const at::Tensor& grad_losses) {
  using OptTensor = std::optional<at::Tensor>;
  static const auto kernel =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("ttfm::itvm_residual_loss_fwd", "")
          .typed<std::vector<at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                                         const OptTensor&, double, double, const OptTensor&)>();
  const std::vector<at::Tensor> out =
      kernel.call(t.u_st, t.u_ss, t.v_s, t.target_a, t.target_b, t.coef, t.target_c, t.coef_c, t.weight, lambda_init,
                  lambda_term, grad_losses.defined() ? OptTensor(grad_losses) : OptTensor());
  if (out.size() == 2) return {out[0], out[1], at::Tensor(), at::Tensor()};
  return {out[0], out[1], out[2].select(0, 0), out[2].select(0, 1)};
}

at::Tensor reduce(const at::Tensor& losses, Reduction reduction) {
  switch (reduction) {
    case Reduction::kMean: return losses.mean();
    case Reduction::kSum: return losses.sum();
    case Reduction::kNone: break;
  }
  return losses;
}

// d loss / d losses[b] as a contiguous (B,) tensor in the accumulation dtype, from the gradient of the reduced loss.
at::Tensor per_sample_grad(const at::Tensor& grad, Reduction reduction, const c10::SymInt& batch,
                           at::ScalarType acc) {
  at::Tensor g = grad.to(acc);
  switch (reduction) {
    case Reduction::kMean: g = (g / c10::Scalar(batch)).expand_symint({batch}); break;
    case Reduction::kSum: g = g.expand_symint({batch}); break;
    case Reduction::kNone: break;
  }
  return g.contiguous();
}

// True when a CPU gradient is exactly one everywhere (what loss.backward() passes), checked without a device sync.
bool is_unit_cpu_grad(const at::Tensor& grad) {
  if (!is_plain_cpu(grad)) return false;
  if (grad.numel() != 1) return grad.eq(1).all().item<bool>();
  bool unit = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "is_unit_cpu_grad", [&] {
    unit = static_cast<double>(*grad.const_data_ptr<scalar_t>()) == 1.0;
  });
  return unit;
}

// The forward of the loss; with `unit_grads` on plain CPU tensors also the gradients for a unit incoming gradient.
ForwardResult loss_forward(const ResidualTensors& t, double lambda_init, double lambda_term, Reduction reduction,
                           bool unit_grads) {
  if (is_plain_cpu(t.u_st)) return cpu_loss(t, lambda_init, lambda_term, reduction, unit_grads);
  const auto [losses, terms, g_st, g_ss] = residual_pass(t, lambda_init, lambda_term, at::Tensor());
  return {reduce(losses, reduction), terms.select(1, 0).mean(), terms.select(1, 1).mean(), at::Tensor(),
          at::Tensor()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> itvm_residual_loss_composite(
    const at::Tensor& u_st, const at::Tensor& u_ss, const at::Tensor& v_s, const at::Tensor& target_a,
    const at::Tensor& target_b, const at::Tensor& coef, const std::optional<at::Tensor>& target_c,
    const std::optional<at::Tensor>& coef_c, const std::optional<at::Tensor>& weight, double lambda_init,
    double lambda_term, c10::string_view reduction) {
  const ForwardResult r = loss_forward({u_st, u_ss, v_s, target_a, target_b, coef, target_c, coef_c, weight},
                                       lambda_init, lambda_term, parse_reduction(reduction), /*unit_grads=*/false);
  return {r.loss, r.init_mean, r.term_mean};
}

std::optional<at::Tensor> optional_of(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// Gradients flow to u_st and u_ss only (v_s, the targets and the coefficients are stop-gradient by definition);
// the two statistics are not differentiable. On CPU the forward pass also writes the gradients for a unit
// incoming gradient (what loss.backward() passes): backward then returns them without touching the inputs
// again, 7 memory accesses per element in all instead of 12. Any other incoming gradient, every CUDA call (where
// checking the gradient's value would synchronise) and every traced call (torch.compile: values unknown)
// recomputes the gradients from the saved inputs in one pass.
class ResidualLossFunction : public torch::autograd::Function<ResidualLossFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& u_st,
                                                const at::Tensor& u_ss, const at::Tensor& v_s,
                                                const at::Tensor& target_a, const at::Tensor& target_b,
                                                const at::Tensor& coef, const std::optional<at::Tensor>& target_c,
                                                const std::optional<at::Tensor>& coef_c,
                                                const std::optional<at::Tensor>& weight, double lambda_init,
                                                double lambda_term, c10::string_view reduction) {
    const at::AutoDispatchBelowADInplaceOrView guard;
    const Reduction red = parse_reduction(reduction);
    const ForwardResult r = loss_forward({u_st, u_ss, v_s, target_a, target_b, coef, target_c, coef_c, weight},
                                         lambda_init, lambda_term, red, /*unit_grads=*/true);
    ctx->save_for_backward({u_st, u_ss, v_s, target_a, target_b, coef, target_c.value_or(at::Tensor()),
                            coef_c.value_or(at::Tensor()), weight.value_or(at::Tensor()), r.grad_u_st,
                            r.grad_u_ss});
    ctx->saved_data["lambda_init"] = lambda_init;
    ctx->saved_data["lambda_term"] = lambda_term;
    ctx->saved_data["reduction"] = static_cast<int64_t>(red);
    ctx->mark_non_differentiable({r.init_mean, r.term_mean});
    return {r.loss, r.init_mean, r.term_mean};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "ttfm::itvm_residual_loss: the compiled backward is not differentiable (create_graph=True); use "
                "itvm_residual_loss(..., backend=\"reference\") for higher-order gradients");
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad_u_st = saved[9];
    at::Tensor grad_u_ss = saved[10];
    const at::Tensor& grad = grad_outputs[0];
    if (!grad_u_st.defined() || !is_unit_cpu_grad(grad)) {
      const std::optional<at::Tensor> target_c = optional_of(saved[6]), coef_c = optional_of(saved[7]),
                                      weight = optional_of(saved[8]);
      const ResidualTensors t{saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], target_c, coef_c, weight};
      const auto red = static_cast<Reduction>(ctx->saved_data["reduction"].toInt());
      const at::Tensor grad_losses = per_sample_grad(grad, red, t.u_st.sym_size(0), t.coef.scalar_type());
      std::tie(std::ignore, std::ignore, grad_u_st, grad_u_ss) =
          residual_pass(t, ctx->saved_data["lambda_init"].toDouble(), ctx->saved_data["lambda_term"].toDouble(),
                        grad_losses);
    }
    torch::autograd::variable_list grads(12);
    if (ctx->needs_input_grad(0)) grads[0] = grad_u_st;
    if (ctx->needs_input_grad(1)) grads[1] = grad_u_ss;
    return grads;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> itvm_residual_loss_autograd(
    const at::Tensor& u_st, const at::Tensor& u_ss, const at::Tensor& v_s, const at::Tensor& target_a,
    const at::Tensor& target_b, const at::Tensor& coef, const std::optional<at::Tensor>& target_c,
    const std::optional<at::Tensor>& coef_c, const std::optional<at::Tensor>& weight, double lambda_init,
    double lambda_term, c10::string_view reduction) {
  if (!at::GradMode::is_enabled() || !(u_st.requires_grad() || u_ss.requires_grad())) {
    const at::AutoDispatchBelowADInplaceOrView guard;
    return itvm_residual_loss_composite(u_st, u_ss, v_s, target_a, target_b, coef, target_c, coef_c, weight,
                                        lambda_init, lambda_term, reduction);
  }
  const auto out = ResidualLossFunction::apply(u_st, u_ss, v_s, target_a, target_b, coef, target_c, coef_c, weight,
                                               lambda_init, lambda_term, reduction);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ttfm, m) {
  m.def("flow_map_step(Tensor x, Tensor u, Tensor s, Tensor t) -> Tensor");
  m.def("itvm_residual_loss_fwd(Tensor u_st, Tensor u_ss, Tensor v_s, Tensor target_a, Tensor target_b, "
        "Tensor coef, Tensor? target_c, Tensor? coef_c, Tensor? weight, float lambda_init, float lambda_term, "
        "Tensor? grad_losses) -> Tensor[]");
  m.def("itvm_residual_loss(Tensor u_st, Tensor u_ss, Tensor v_s, Tensor target_a, Tensor target_b, Tensor coef, "
        "Tensor? target_c, Tensor? coef_c, Tensor? weight, float lambda_init, float lambda_term, str reduction) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ttfm, CPU, m) {
  m.impl("flow_map_step", &flow_map_step_cpu);
  m.impl("itvm_residual_loss_fwd", &itvm_residual_loss_fwd_cpu);
}

TORCH_LIBRARY_IMPL(ttfm, CompositeExplicitAutograd, m) {
  m.impl("itvm_residual_loss", &itvm_residual_loss_composite);
}

TORCH_LIBRARY_IMPL(ttfm, Autograd, m) {
  m.impl("itvm_residual_loss", &itvm_residual_loss_autograd);
}

}  // namespace ttfm
