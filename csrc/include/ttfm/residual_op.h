// Host-side argument checks and output allocation of the residual kernel ops, shared by the CPU and CUDA
// implementations. The ops are functional (inputs in, fresh outputs out: docs/design.md, "How to add an op"):
// each backend supplies a kernel writing into outputs, and the *_op functions below check, allocate and call it.
// The Python entry points (ttfm_kernels/ops/residual/function.py) validate user input with clear messages;
// these checks guard the private kernel ops against a wrong call from Python.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <initializer_list>
#include <optional>
#include <vector>

#include "ttfm/alloc.h"

namespace ttfm {

// x, u of flow_map_step: same shape, dtype and device, contiguous; s, t of shape (B,).
inline void check_flow_map_step_args(const at::Tensor& x, const at::Tensor& u, const at::Tensor& s,
                                     const at::Tensor& t) {
  TORCH_CHECK(x.dim() >= 1, "ttfm::flow_map_step: x must be (B, ...)");
  TORCH_CHECK(u.sizes() == x.sizes() && u.scalar_type() == x.scalar_type() && u.device() == x.device(),
              "ttfm::flow_map_step: u must match x in shape, dtype and device");
  TORCH_CHECK(x.is_contiguous() && u.is_contiguous(), "ttfm::flow_map_step: x and u must be contiguous");
  TORCH_CHECK(s.dim() == 1 && s.size(0) == x.size(0) && t.dim() == 1 && t.size(0) == x.size(0),
              "ttfm::flow_map_step: s and t must have shape (B,)");
}

// A backend's flow_map_step kernel: writes out = x + (t - s) u into the contiguous `out` shaped like x.
using FlowMapStepKernel = void (*)(const at::Tensor& x, const at::Tensor& u, const at::Tensor& s,
                                   const at::Tensor& t, const at::Tensor& out);

// The functional op ttfm::flow_map_step on one backend's kernel: checks, allocates the output, runs the kernel.
inline at::Tensor flow_map_step_op(FlowMapStepKernel kernel, const at::Tensor& x, const at::Tensor& u,
                                   const at::Tensor& s, const at::Tensor& t) {
  check_flow_map_step_args(x, u, s, t);
  at::Tensor out = empty_output_like(x);
  if (x.numel() > 0) kernel(x, u, s, t, out);
  return out;
}

// Each tensor must match u_st in shape, dtype and device and be contiguous.
inline void check_like_u_st(const at::Tensor& u_st, std::initializer_list<const at::Tensor*> like) {
  for (const at::Tensor* t : like) {
    TORCH_CHECK(t->sizes() == u_st.sizes() && t->scalar_type() == u_st.scalar_type() &&
                    t->device() == u_st.device() && t->is_contiguous(),
                "ttfm::itvm_residual_loss: every (B, ...) tensor must match u_st in shape, dtype and device and "
                "be contiguous");
  }
}

// Each tensor must be a contiguous (B,) tensor in the accumulation dtype of u_st (float32, or float64 for
// float64 inputs) on u_st's device.
inline void check_per_sample_of(const at::Tensor& u_st, std::initializer_list<const at::Tensor*> per_sample) {
  const at::ScalarType acc = at::toOpMathType(u_st.scalar_type());
  for (const at::Tensor* t : per_sample) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == u_st.size(0) && t->scalar_type() == acc &&
                    t->device() == u_st.device() && t->is_contiguous(),
                "ttfm::itvm_residual_loss: coef, coef_c, weight, losses and grad_losses must be contiguous (B,) tensors of "
                "dtype ", acc, " on u_st's device");
  }
}

// The inputs of one residual loss call, by reference (the callers' tensors outlive it). target_c and coef_c are
// given together or not at all (the two-term target).
struct ResidualTensors {
  const at::Tensor& u_st;
  const at::Tensor& u_ss;
  const at::Tensor& v_s;
  const at::Tensor& target_a;
  const at::Tensor& target_b;
  const at::Tensor& coef;
  const std::optional<at::Tensor>& target_c;
  const std::optional<at::Tensor>& coef_c;
  const std::optional<at::Tensor>& weight;
};

// The inputs of the residual loss: the (B, ...) tensors alike and contiguous, the coefficients and weight (B,).
inline void check_residual_inputs(const ResidualTensors& t) {
  TORCH_CHECK(t.u_st.dim() >= 1 && t.u_st.size(0) >= 1,
              "ttfm::itvm_residual_loss: u_st must be (B, ...) with B >= 1");
  TORCH_CHECK(t.u_st.is_contiguous(), "ttfm::itvm_residual_loss: inputs must be contiguous");
  check_like_u_st(t.u_st, {&t.u_ss, &t.v_s, &t.target_a, &t.target_b});
  check_per_sample_of(t.u_st, {&t.coef});
  TORCH_CHECK(t.target_c.has_value() == t.coef_c.has_value(),
              "ttfm::itvm_residual_loss: target_c and coef_c must be given together");
  if (t.target_c.has_value()) {
    check_like_u_st(t.u_st, {&*t.target_c});
    check_per_sample_of(t.u_st, {&*t.coef_c});
  }
  if (t.weight.has_value()) check_per_sample_of(t.u_st, {&*t.weight});
}

// A backend's residual kernel: the per-sample losses (B,) and means {init, term} (B, 2) into `losses` and
// `terms` and, with grad_losses given, the gradients of sum_b grad_losses[b] * losses[b] into grad_u_st and
// grad_u_ss (shaped like u_st; undefined without grad_losses), all in one pass over the inputs.
using ResidualKernel = void (*)(const ResidualTensors& t, double lambda_init, double lambda_term,
                                const at::Tensor& losses, const at::Tensor& terms,
                                const std::optional<at::Tensor>& grad_losses, const at::Tensor& grad_u_st,
                                const at::Tensor& grad_u_ss);

// The functional op ttfm::itvm_residual_loss_fwd on one backend's kernel: returns [losses, terms], plus
// grads (2, *u_st.shape) = {grad_u_st, grad_u_ss} when grad_losses is given: ONE allocation, because two separate
// buffers of that size are returned to the system by glibc after every step and page-fault again in the next
// (docs/performance.md).
inline std::vector<at::Tensor> itvm_residual_loss_fwd_op(
    ResidualKernel kernel, const at::Tensor& u_st, const at::Tensor& u_ss, const at::Tensor& v_s,
    const at::Tensor& target_a, const at::Tensor& target_b, const at::Tensor& coef,
    const std::optional<at::Tensor>& target_c, const std::optional<at::Tensor>& coef_c,
    const std::optional<at::Tensor>& weight, double lambda_init, double lambda_term,
    const std::optional<at::Tensor>& grad_losses) {
  const ResidualTensors t{u_st, u_ss, v_s, target_a, target_b, coef, target_c, coef_c, weight};
  check_residual_inputs(t);
  if (grad_losses.has_value()) check_per_sample_of(u_st, {&*grad_losses});
  const auto options = coef.options();
  std::vector<at::Tensor> out{empty_output({u_st.sym_size(0)}, options),
                              empty_output({u_st.sym_size(0), 2}, options)};
  at::Tensor grads;
  if (grad_losses.has_value()) {
    std::vector<c10::SymInt> sizes{2};
    for (const c10::SymInt& size : u_st.sym_sizes()) sizes.push_back(size);
    grads = empty_output(sizes, u_st.options());
  }
  kernel(t, lambda_init, lambda_term, out[0], out[1], grad_losses, grads.defined() ? grads.select(0, 0) : grads,
         grads.defined() ? grads.select(0, 1) : grads);
  if (grads.defined()) out.push_back(grads);
  return out;
}

}  // namespace ttfm
