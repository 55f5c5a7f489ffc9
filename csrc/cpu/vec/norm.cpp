// CPU kernel of the modulated norm op and its JVP (docs/math.md section 6), vectorized with at::vec.
//
// One "row" is what one set of statistics covers: a row of C features (LayerNorm, num_groups == 0, x viewed
// as (B, N, C)) or one group of C/G channels x HW positions (GroupNorm, x (B, C, HW)). Rows run in parallel;
// each row is read from memory once (the statistics passes re-read it from cache) and y, ty written once.
// Per element everything is affine in xc = x - mean(x) and tc = tx - mean(tx) with per-(sample, channel)
// coefficients:   y = A xc + B,   ty = A tc + D xc + E,   then z = y sigmoid(y), tz = ty sigmoid(y) (1 + y (1 - sigmoid(y)))
// The small parameters (weight, bias, scale, shift, tscale, tshift) arrive in the accumulation type
// (float, or double for double inputs), contiguous; the wrapper fills absent ones with 1 / 0.
// The op is functional (docs/design.md, "How to add an op"): it returns [y], or [y, ty] with with_ty; its fake
// kernel and autograd are registered from Python (ttfm_kernels/ops/norm/function.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "ttfm/alloc.h"

namespace ttfm {
namespace {

using at::vec::Vectorized;

struct RowStats {
  double mean, rstd, tmean, txh;  // mean, 1/sd, mean(tx), mean(xh * tx)
};

// Elements per block of the statistics sums: within a block the sums run in vector lanes of T, and the block sums
// are added in double, so a long row (GroupNorm: C/G channels x H x W, 65536 and more) never grows one float
// chain of n / V terms (with a large mean that drifted by about 5e-4 relative at 65536 elements). A multiple of
// every vector width.
constexpr int64_t kStatBlock = 2048;

template <typename T>
T reduce_lanes(const Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>([](Vectorized<T> a, Vectorized<T> b) { return a + b; }, v);
}

// Statistics of one row of n elements (two passes over cache-resident data, exact centred sums, blocked).
template <typename T>
RowStats row_stats(const T* x, const T* tx, int64_t n, double eps) {
  using Vec = Vectorized<T>;
  const int64_t V = Vec::size();
  const int64_t nv = n - n % V;
  double sum_x = 0, sum_t = 0;
  for (int64_t b0 = 0; b0 < nv; b0 += kStatBlock) {
    const int64_t b1 = std::min(nv, b0 + kStatBlock);
    Vec sx(0), st(0);
    for (int64_t i = b0; i < b1; i += V) {
      sx += Vec::loadu(x + i);
      if (tx) st += Vec::loadu(tx + i);
    }
    sum_x += reduce_lanes(sx);
    if (tx) sum_t += reduce_lanes(st);
  }
  for (int64_t i = nv; i < n; ++i) {
    sum_x += x[i];
    if (tx) sum_t += tx[i];
  }
  const T mean = static_cast<T>(sum_x / n);
  const Vec vmean(mean);
  double sum_sq = 0, sum_cr = 0;
  for (int64_t b0 = 0; b0 < nv; b0 += kStatBlock) {
    const int64_t b1 = std::min(nv, b0 + kStatBlock);
    Vec sq(0), cr(0);
    for (int64_t i = b0; i < b1; i += V) {
      const Vec c = Vec::loadu(x + i) - vmean;
      sq = at::vec::fmadd(c, c, sq);
      if (tx) cr = at::vec::fmadd(c, Vec::loadu(tx + i), cr);
    }
    sum_sq += reduce_lanes(sq);
    if (tx) sum_cr += reduce_lanes(cr);
  }
  for (int64_t i = nv; i < n; ++i) {
    const T c = x[i] - mean;
    sum_sq += c * c;
    if (tx) sum_cr += c * tx[i];
  }
  const double rstd = 1.0 / std::sqrt(sum_sq / n + eps);
  return {static_cast<double>(mean), rstd, sum_t / n, rstd * sum_cr / n};
}

// Coefficients of one channel (scalars, or vectors of channels for LayerNorm rows), in the centred variables
// xc = x - mean and tc = tx - mean(tx) (a form affine in x and tx themselves cancels catastrophically when a
// row's mean is large against its spread, e.g. a tangent that is nearly constant over the row).
template <typename V>
struct Coeffs {
  V mean, tmean, a, b, d, e;
};

template <typename V, typename T>
Coeffs<V> coeffs(V w, V bias, V scale, V shift, V tscale, V tshift, const RowStats& st) {
  const V rstd(static_cast<T>(st.rstd)), tmean(static_cast<T>(st.tmean)), txh(static_cast<T>(st.txh));
  const V one(static_cast<T>(1));
  const V wr = w * rstd;          // d(norm affine)/dx
  const V a = wr * (one + scale);  // dy/dx
  // ty = a (tc - xh txh) + (wr xc + bias) tscale + tshift, with xh = rstd xc.
  return {V(static_cast<T>(st.mean)), tmean, a, bias * (one + scale) + shift, wr * tscale - a * rstd * txh,
          bias * tscale + tshift};
}

// y (and ty) for n elements sharing coefficient vectors (broadcast scalars for GroupNorm):
//   y = a xc + b,  ty = a tc + d xc + e,  then the SiLU and its tangent.
template <typename T, bool HasTx, bool HasTy, bool Silu>
inline void apply(const Coeffs<Vectorized<T>>& c, const T* x, const T* tx, T* y, T* ty, int64_t count) {
  using Vec = Vectorized<T>;
  const Vec xc = Vec::loadu(x, count) - c.mean;
  Vec yv = at::vec::fmadd(c.a, xc, c.b);
  Vec tyv;
  if constexpr (HasTy) {
    tyv = at::vec::fmadd(c.d, xc, c.e);
    if constexpr (HasTx) tyv = at::vec::fmadd(c.a, Vec::loadu(tx, count) - c.tmean, tyv);
  }
  if constexpr (Silu) {
    const Vec one(static_cast<T>(1));
    const Vec sig = one / (one + yv.neg().exp());
    if constexpr (HasTy) tyv = tyv * sig * at::vec::fmadd(yv, one - sig, one);
    yv = yv * sig;
  }
  yv.store(y, count);
  if constexpr (HasTy) tyv.store(ty, count);
}

struct Params {
  const void* w;
  const void* b;
  const void* s;
  const void* sh;
  const void* ts;
  const void* tsh;
};

// One row: statistics, then y/ty. LayerNorm rows vectorize over channels, GroupNorm rows over positions.
template <typename T, bool HasTx, bool HasTy, bool Silu>
void row_kernel(const T* x, const T* tx, T* y, T* ty, int64_t len, int64_t hw, int64_t ch0, int64_t sample,
                int64_t channels, bool layer_norm, const Params& p, double eps) {
  using Vec = Vectorized<T>;
  const int64_t V = Vec::size();
  const RowStats st = row_stats<T>(x, HasTx ? tx : nullptr, len, eps);
  const T* w = static_cast<const T*>(p.w);
  const T* b = static_cast<const T*>(p.b);
  const int64_t off = sample * channels;
  const T* s = static_cast<const T*>(p.s) + off;
  const T* sh = static_cast<const T*>(p.sh) + off;
  const T* ts = static_cast<const T*>(p.ts) + off;
  const T* tsh = static_cast<const T*>(p.tsh) + off;
  if (layer_norm) {
    for (int64_t c = 0; c < len; c += V) {
      const int64_t n = std::min(V, len - c);
      const Coeffs<Vec> k = coeffs<Vec, T>(Vec::loadu(w + c, n), Vec::loadu(b + c, n), Vec::loadu(s + c, n),
                                           Vec::loadu(sh + c, n), Vec::loadu(ts + c, n), Vec::loadu(tsh + c, n), st);
      apply<T, HasTx, HasTy, Silu>(k, x + c, HasTx ? tx + c : nullptr, y + c, HasTy ? ty + c : nullptr, n);
    }
    return;
  }
  for (int64_t cg = 0; cg * hw < len; ++cg) {
    const int64_t c = ch0 + cg;
    const Coeffs<T> k1 = coeffs<T, T>(w[c], b[c], s[c], sh[c], ts[c], tsh[c], st);
    const Coeffs<Vec> k{Vec(k1.mean), Vec(k1.tmean), Vec(k1.a), Vec(k1.b), Vec(k1.d), Vec(k1.e)};
    const int64_t base = cg * hw;
    for (int64_t i = 0; i < hw; i += V) {
      const int64_t n = std::min(V, hw - i);
      apply<T, HasTx, HasTy, Silu>(k, x + base + i, HasTx ? tx + base + i : nullptr, y + base + i, HasTy ? ty + base + i : nullptr, n);
    }
  }
}

template <typename T>
using RowFn = void (*)(const T*, const T*, T*, T*, int64_t, int64_t, int64_t, int64_t, int64_t, bool, const Params&,
                       double);

template <typename T>
RowFn<T> pick_row_fn(bool has_tx, bool has_ty, bool silu) {
  // has_tx implies has_ty (a tangent input always produces a tangent output).
  if (has_tx) return silu ? &row_kernel<T, true, true, true> : &row_kernel<T, true, true, false>;
  if (has_ty) return silu ? &row_kernel<T, false, true, true> : &row_kernel<T, false, true, false>;
  return silu ? &row_kernel<T, false, false, true> : &row_kernel<T, false, false, false>;
}

struct RowLayout {
  int64_t len, hw, rows_per_sample, ch_per_row, channels;
  bool layer_norm;
};

// All rows, in parallel. Reduced-precision rows are widened into per-chunk scratch buffers (allocated once
// per chunk, never per row).
template <typename scalar_t>
void run_rows(const scalar_t* xp, const scalar_t* txp, scalar_t* yp, scalar_t* typ, int64_t rows, const RowLayout& l,
              const Params& params, double eps, bool silu) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowFn<acc_t> fn = pick_row_fn<acc_t>(txp != nullptr, typ != nullptr, silu);
  const int64_t len = l.len;
  const int64_t grain = std::max<int64_t>(1, 32768 / len);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> buf(std::is_same_v<scalar_t, acc_t> ? 0 : 4 * len);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = r * len;
      const int64_t sample = r / l.rows_per_sample;
      const int64_t ch0 = (r % l.rows_per_sample) * l.ch_per_row;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        fn(xp + base, txp ? txp + base : nullptr, yp + base, typ ? typ + base : nullptr, len, l.hw, ch0, sample,
           l.channels, l.layer_norm, params, eps);
      } else {
        acc_t *xb = buf.data(), *tb = xb + len, *yb = tb + len, *tyb = yb + len;
        at::vec::convert(xp + base, xb, len);
        if (txp) at::vec::convert(txp + base, tb, len);
        fn(xb, txp ? tb : nullptr, yb, typ ? tyb : nullptr, len, l.hw, ch0, sample, l.channels, l.layer_norm, params,
           eps);
        at::vec::convert(yb, yp + base, len);
        if (typ) at::vec::convert(tyb, typ + base, len);
      }
    }
  });
}

std::vector<at::Tensor> norm_modulate_jvp_cpu(const at::Tensor& x, const std::optional<at::Tensor>& tx,
                                              const at::Tensor& weight, const at::Tensor& bias,
                                              const at::Tensor& scale, const at::Tensor& shift,
                                              const at::Tensor& tscale, const at::Tensor& tshift, int64_t num_groups,
                                              double eps, bool silu, bool with_ty) {
  TORCH_CHECK(x.is_contiguous(), "ttfm::norm_modulate_jvp: x must be contiguous");
  TORCH_CHECK(!tx || (tx->is_contiguous() && tx->sizes() == x.sizes() && tx->scalar_type() == x.scalar_type()),
              "ttfm::norm_modulate_jvp: tx must be contiguous and like x");
  TORCH_CHECK(!tx || with_ty, "ttfm::norm_modulate_jvp: a tangent input needs with_ty");
  const bool layer_norm = num_groups == 0;
  TORCH_CHECK(layer_norm ? x.dim() == 3 : x.dim() == 4, "ttfm::norm_modulate_jvp: x must be (B, N, C) or (B, C, H, W)");
  const int64_t batch = x.size(0);
  const int64_t channels = layer_norm ? x.size(2) : x.size(1);
  TORCH_CHECK(layer_norm || channels % num_groups == 0, "ttfm::norm_modulate_jvp: num_groups must divide C");
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const at::Tensor* t : {&weight, &bias}) {
    TORCH_CHECK(t->scalar_type() == acc && t->is_contiguous() && t->numel() == channels,
                "ttfm::norm_modulate_jvp: weight/bias must be contiguous (C,) in the accumulation dtype");
  }
  for (const at::Tensor* t : {&scale, &shift, &tscale, &tshift}) {
    TORCH_CHECK(t->scalar_type() == acc && t->is_contiguous() && t->numel() == batch * channels,
                "ttfm::norm_modulate_jvp: scale/shift/tscale/tshift must be contiguous (B, C) in the accumulation dtype");
  }
  const int64_t rows = layer_norm ? x.numel() / channels : batch * num_groups;
  const int64_t len = x.numel() / rows;
  const int64_t rows_per_sample = rows / batch;
  const int64_t hw = layer_norm ? 1 : x.numel() / (batch * channels);
  const int64_t ch_per_row = layer_norm ? 0 : channels / num_groups;
  const Params params{weight.const_data_ptr(), bias.const_data_ptr(), scale.const_data_ptr(),
                      shift.const_data_ptr(), tscale.const_data_ptr(), tshift.const_data_ptr()};
  const bool has_tx = tx.has_value();
  std::vector<at::Tensor> out{empty_output_like(x)};
  if (with_ty) out.push_back(empty_output_like(x));
  const at::Tensor& y = out[0];

  const RowLayout layout{len, hw, rows_per_sample, ch_per_row, channels, layer_norm};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "norm_modulate_jvp_cpu", [&] {
    run_rows<scalar_t>(x.const_data_ptr<scalar_t>(), has_tx ? tx->const_data_ptr<scalar_t>() : nullptr,
                       y.mutable_data_ptr<scalar_t>(), with_ty ? out[1].mutable_data_ptr<scalar_t>() : nullptr, rows,
                       layout, params, eps, silu);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ttfm, m) {
  m.def(
      "norm_modulate_jvp(Tensor x, Tensor? tx, Tensor weight, Tensor bias, Tensor scale, Tensor shift, "
      "Tensor tscale, Tensor tshift, int num_groups, float eps, bool silu, bool with_ty) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(ttfm, CPU, m) {
  m.impl("norm_modulate_jvp", &norm_modulate_jvp_cpu);
}

}  // namespace ttfm
