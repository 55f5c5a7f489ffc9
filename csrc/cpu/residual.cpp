// CPU kernels of the residual ops (MATH.md sections 1-2). Schemas are declared here for every backend.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace ttfm {
namespace {

// out[b, :] = x[b, :] + (t[b] - s[b]) * u[b, :]; all of x, u, out contiguous (B, D) views.
void flow_map_step_cpu(const at::Tensor& x, const at::Tensor& u, const at::Tensor& s, const at::Tensor& t,
                       at::Tensor& out) {
  TORCH_CHECK(x.is_contiguous() && u.is_contiguous() && out.is_contiguous(),
              "ttfm::flow_map_step: x, u and out must be contiguous");
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(ttfm, m) {
  m.def("flow_map_step(Tensor x, Tensor u, Tensor s, Tensor t, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(ttfm, CPU, m) {
  m.impl("flow_map_step", &flow_map_step_cpu);
}

}  // namespace ttfm
