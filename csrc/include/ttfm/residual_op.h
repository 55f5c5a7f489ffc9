// Host-side argument checks of the residual kernel ops, shared by the CPU and CUDA implementations.
// The Python entry points (ttfm_kernels/ops/residual/function.py) validate user input with clear messages;
// these checks guard the private kernel ops against a wrong call from Python.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <initializer_list>
#include <optional>

namespace ttfm {

// x, u, out of flow_map_step: same shape, dtype and device, contiguous; s, t of shape (B,).
inline void check_flow_map_step_args(const at::Tensor& x, const at::Tensor& u, const at::Tensor& s,
                                     const at::Tensor& t, const at::Tensor& out) {
  TORCH_CHECK(x.dim() >= 1, "ttfm::flow_map_step: x must be (B, ...)");
  for (const at::Tensor* other : {&u, &out}) {
    TORCH_CHECK(other->sizes() == x.sizes() && other->scalar_type() == x.scalar_type() &&
                    other->device() == x.device(),
                "ttfm::flow_map_step: u and out must match x in shape, dtype and device");
  }
  TORCH_CHECK(x.is_contiguous() && u.is_contiguous() && out.is_contiguous(),
              "ttfm::flow_map_step: x, u and out must be contiguous");
  TORCH_CHECK(s.dim() == 1 && s.size(0) == x.size(0) && t.dim() == 1 && t.size(0) == x.size(0),
              "ttfm::flow_map_step: s and t must have shape (B,)");
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

// The outputs of itvm_residual_loss_fwd: losses (B,); terms (B, 2) if given; grad_losses (B,), grad_u_st and
// grad_u_ss (like u_st) given together or not at all.
inline void check_residual_outputs(const at::Tensor& u_st, const at::Tensor& losses,
                                   const std::optional<at::Tensor>& terms,
                                   const std::optional<at::Tensor>& grad_losses,
                                   const std::optional<at::Tensor>& grad_u_st,
                                   const std::optional<at::Tensor>& grad_u_ss) {
  check_per_sample_of(u_st, {&losses});
  if (terms.has_value()) {
    TORCH_CHECK(terms->dim() == 2 && terms->size(0) == u_st.size(0) && terms->size(1) == 2 &&
                    terms->scalar_type() == losses.scalar_type() && terms->device() == u_st.device() &&
                    terms->is_contiguous(),
                "ttfm::itvm_residual_loss: terms must be a contiguous (B, 2) tensor like losses");
  }
  const bool grads = grad_losses.has_value();
  TORCH_CHECK(grad_u_st.has_value() == grads && grad_u_ss.has_value() == grads,
              "ttfm::itvm_residual_loss: grad_losses, grad_u_st and grad_u_ss must be given together");
  if (grads) {
    check_per_sample_of(u_st, {&*grad_losses});
    check_like_u_st(u_st, {&*grad_u_st, &*grad_u_ss});
  }
}

}  // namespace ttfm
