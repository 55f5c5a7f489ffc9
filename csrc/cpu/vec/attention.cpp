// CPU kernel of the fused attention JVP (docs/math.md section 5): o, t_o and lse in one pass over key blocks.
//
// Work items are (batch, head, query block), spread over threads with at::parallel_for. Each item walks the
// key blocks once with an online softmax (running max m, sum l), keeping its accumulators in a per-thread
// scratch area that is reused across items and calls (nothing is allocated inside the tile loop, nothing is
// Nq x Nk). Per key block the six matmul-shaped products run as four sgemm calls on fp32 tiles:
//   S    = Qc K^T                      Qc = scale * q
//   dS   = [tQc | Qc] [K | tK]^T        inner dim 2D (the columns of an absent tangent are skipped)
//   acc_o += P V
//   acc_t += [P*dS | P] [V ; tV]        inner dim 2 * block (the rows of an absent tangent are skipped)
// with P = exp(S - m) unnormalised. bf16 inputs are converted to fp32 tiles; accumulation is fp32 throughout.
// Compiled with the AVX2 CPU_CAPABILITY flags (setup.py) so at::vec::Vectorized<float> is 8 lanes wide.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

// Fortran BLAS (MKL inside libtorch_cpu exports it; at::native::cpublas::gemm is not exported). Called inside
// at::parallel_for (an OpenMP region), MKL runs each call on the calling thread.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace ttfm {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Row-major C (m x n, ldc) = A (m x k, lda) * B^T (B: n x k, ldb) + beta * C.
void gemm_nt(int m, int n, int k, const float* a, int lda, const float* b, int ldb, float beta, float* c,
             int ldc) {
  const float one = 1.0f;
  sgemm_("T", "N", &n, &m, &k, &one, b, &ldb, a, &lda, &beta, c, &ldc);
}

// Row-major C (m x n, ldc) = A (m x k, lda) * B (k x n, ldb) + beta * C.
void gemm_nn(int m, int n, int k, const float* a, int lda, const float* b, int ldb, float beta, float* c,
             int ldc) {
  const float one = 1.0f;
  sgemm_("N", "N", &n, &m, &k, &one, b, &ldb, a, &lda, &beta, c, &ldc);
}

// dst[i] = mul * float(src[i]), i < n.
template <typename T>
void load_row(float* dst, const T* src, int64_t n, float mul) {
  if constexpr (std::is_same_v<T, float>) {
    if (mul == 1.0f) {
      std::memcpy(dst, src, n * sizeof(float));
      return;
    }
  }
  for (int64_t i = 0; i < n; ++i) dst[i] = mul * static_cast<float>(src[i]);
}

template <typename T>
void store_row(T* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

float row_max(const float* x, int64_t n) {
  int64_t i = 0;
  float result = kNegInf;
  if (n >= Vec::size()) {
    Vec acc = Vec::loadu(x);
    for (i = Vec::size(); i + Vec::size() <= n; i += Vec::size()) acc = at::vec::maximum(acc, Vec::loadu(x + i));
    result = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, acc);
  }
  for (; i < n; ++i) result = std::max(result, x[i]);
  return result;
}

// In place: p[j] = exp(p[j] - m) for j < n, returning the sum. exp_u20 (about 20 ulp) is well inside the
// fp32 tolerance and several times faster than the 1-ulp exp.
float exp_sum(float* p, int64_t n, float m) {
  const Vec vm(m);
  Vec acc(0.0f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec e = (Vec::loadu(p + i) - vm).exp_u20();
    e.store(p + i);
    acc = acc + e;
  }
  float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
  for (; i < n; ++i) {
    p[i] = std::exp(p[i] - m);
    sum += p[i];
  }
  return sum;
}

// In place: e[j] = p[j] * e[j] for j < n, returning the sum.
float mul_sum(float* e, const float* p, int64_t n) {
  Vec acc(0.0f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec x = Vec::loadu(p + i) * Vec::loadu(e + i);
    x.store(e + i);
    acc = acc + x;
  }
  float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
  for (; i < n; ++i) {
    e[i] *= p[i];
    sum += e[i];
  }
  return sum;
}

void scale_row(float* x, int64_t n, float a) {
  const Vec va(a);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(x + i) * va).store(x + i);
  for (; i < n; ++i) x[i] *= a;
}

struct Shape {
  int64_t batch_heads, n_q, n_k, dim, block_q, block_k;
  bool causal;
  float scale;
};

// Pointers to one (batch, head) slice of every tensor; tangents may be null (absent).
template <typename T>
struct Slices {
  const T *q, *k, *v, *tq, *tk, *tv;
  T *o, *t_o;
  float* lse;
};

// The per-thread scratch tiles of one work item, carved from one buffer reused across items and calls.
struct Scratch {
  float* qq;     // block_q x 2D:        [scale * tq | scale * q]
  float* kk;     // block_k x 2D:        [k | tk]
  float* vv;     // 2 block_k x D:       [v ; tv]
  float* x;      // block_q x 2 nk:      [P * dS | P] (S and dS are written here by their GEMMs)
  float* acc_o;  // block_q x D
  float* acc_t;  // block_q x D
  float* m;      // block_q: running max
  float* l;      // block_q: running sum of exp
  float* mu;     // block_q: running sum of exp * dS

  static int64_t floats(const Shape& s) {
    return s.block_q * 2 * s.dim + s.block_k * 2 * s.dim + 2 * s.block_k * s.dim + s.block_q * 2 * s.block_k +
           2 * s.block_q * s.dim + 3 * s.block_q;
  }

  explicit Scratch(const Shape& s) {
    thread_local std::vector<float> buffer;
    const auto need = static_cast<size_t>(floats(s));
    if (buffer.size() < need) buffer.resize(need);
    float* p = buffer.data();
    qq = p, p += s.block_q * 2 * s.dim;
    kk = p, p += s.block_k * 2 * s.dim;
    vv = p, p += 2 * s.block_k * s.dim;
    x = p, p += s.block_q * 2 * s.block_k;
    acc_o = p, p += s.block_q * s.dim;
    acc_t = p, p += s.block_q * s.dim;
    m = p, p += s.block_q;
    l = p, p += s.block_q;
    mu = p;
  }
};

// One work item: query rows [q0, q0 + bq) of one (batch, head) slice.
template <typename T>
void attend_query_block(const Shape& s, const Slices<T>& in, int64_t q0, Scratch& w) {
  const int64_t dim = s.dim, dim2 = 2 * s.dim;
  const int64_t bq = std::min(s.block_q, s.n_q - q0);
  const bool has_ds = in.tq != nullptr || in.tk != nullptr;
  // Columns [lo, hi) of qq and kk that form dS (an absent tangent's half is skipped).
  const int64_t ds_lo = in.tq != nullptr ? 0 : dim, ds_hi = in.tk != nullptr ? dim2 : dim;
  for (int64_t r = 0; r < bq; ++r) {
    const int64_t row = (q0 + r) * dim;
    if (in.tq != nullptr) load_row(w.qq + r * dim2, in.tq + row, dim, s.scale);
    load_row(w.qq + r * dim2 + dim, in.q + row, dim, s.scale);
  }
  std::fill(w.m, w.m + bq, kNegInf);
  std::fill(w.l, w.l + bq, 0.0f);
  std::fill(w.mu, w.mu + bq, 0.0f);
  std::fill(w.acc_o, w.acc_o + bq * dim, 0.0f);
  std::fill(w.acc_t, w.acc_t + bq * dim, 0.0f);

  // Causal (top-left): row i sees keys j <= i, so keys at or past q0 + bq are never seen by this block.
  const int64_t k_end = s.causal ? std::min(s.n_k, q0 + bq) : s.n_k;
  for (int64_t k0 = 0; k0 < k_end; k0 += s.block_k) {
    const int64_t nk = std::min(s.block_k, k_end - k0), nk2 = 2 * nk;
    for (int64_t j = 0; j < nk; ++j) {
      const int64_t row = (k0 + j) * dim;
      load_row(w.kk + j * dim2, in.k + row, dim, 1.0f);
      if (in.tk != nullptr) load_row(w.kk + j * dim2 + dim, in.tk + row, dim, 1.0f);
      load_row(w.vv + j * dim, in.v + row, dim, 1.0f);
      if (in.tv != nullptr) load_row(w.vv + (nk + j) * dim, in.tv + row, dim, 1.0f);
    }
    float* p = w.x + nk;  // P block (row stride nk2); E = P * dS lives at w.x
    gemm_nt(bq, nk, dim, w.qq + dim, dim2, w.kk, dim2, 0.0f, p, nk2);
    if (has_ds) gemm_nt(bq, nk, ds_hi - ds_lo, w.qq + ds_lo, dim2, w.kk + ds_lo, dim2, 0.0f, w.x, nk2);
    for (int64_t r = 0; r < bq; ++r) {
      float* p_row = p + r * nk2;
      float* e_row = w.x + r * nk2;
      const int64_t valid = s.causal ? std::clamp<int64_t>(q0 + r - k0 + 1, 0, nk) : nk;
      const float m_new = std::max(w.m[r], row_max(p_row, valid));
      // m_new is finite: the first key block always holds key 0, which every row sees.
      const float alpha = std::exp(w.m[r] - m_new);
      const float sum_p = exp_sum(p_row, valid, m_new);
      std::fill(p_row + valid, p_row + nk, 0.0f);
      float sum_e = 0.0f;
      if (has_ds) {
        sum_e = mul_sum(e_row, p_row, valid);
        std::fill(e_row + valid, e_row + nk, 0.0f);
      }
      if (alpha != 1.0f) {
        scale_row(w.acc_o + r * dim, dim, alpha);
        scale_row(w.acc_t + r * dim, dim, alpha);
      }
      w.m[r] = m_new;
      w.l[r] = alpha * w.l[r] + sum_p;
      w.mu[r] = alpha * w.mu[r] + sum_e;
    }
    gemm_nn(bq, dim, nk, p, nk2, w.vv, dim, 1.0f, w.acc_o, dim);
    // Rows [lo, hi) of [v ; tv] against columns [lo, hi) of [P * dS | P].
    const int64_t t_lo = has_ds ? 0 : nk, t_hi = in.tv != nullptr ? nk2 : nk;
    if (t_hi > t_lo) gemm_nn(bq, dim, t_hi - t_lo, w.x + t_lo, nk2, w.vv + t_lo * dim, dim, 1.0f, w.acc_t, dim);
  }

  for (int64_t r = 0; r < bq; ++r) {
    const float inv_l = 1.0f / w.l[r];
    const float mu = w.mu[r] * inv_l;
    float* o_row = w.acc_o + r * dim;
    float* t_row = w.acc_t + r * dim;
    for (int64_t d = 0; d < dim; ++d) {
      o_row[d] *= inv_l;
      t_row[d] = t_row[d] * inv_l - mu * o_row[d];
    }
    store_row(in.o + (q0 + r) * dim, o_row, dim);
    store_row(in.t_o + (q0 + r) * dim, t_row, dim);
    in.lse[q0 + r] = w.m[r] + std::log(w.l[r]);
  }
}

template <typename T>
const T* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

template <typename T>
void jvp_attention_fwd_impl(const Shape& s, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& tq, const std::optional<at::Tensor>& tk,
                            const std::optional<at::Tensor>& tv, at::Tensor& o, at::Tensor& t_o,
                            at::Tensor& lse) {
  const T *qp = q.const_data_ptr<T>(), *kp = k.const_data_ptr<T>(), *vp = v.const_data_ptr<T>();
  const T *tqp = data_or_null<T>(tq), *tkp = data_or_null<T>(tk), *tvp = data_or_null<T>(tv);
  T *op = o.mutable_data_ptr<T>(), *top = t_o.mutable_data_ptr<T>();
  float* lsep = lse.mutable_data_ptr<float>();
  const int64_t q_blocks = (s.n_q + s.block_q - 1) / s.block_q;
  const int64_t q_stride = s.n_q * s.dim, k_stride = s.n_k * s.dim;
  at::parallel_for(0, s.batch_heads * q_blocks, 1, [&](int64_t begin, int64_t end) {
    Scratch w(s);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / q_blocks, qb = item % q_blocks;
      auto at_q = [&](const T* p) { return p == nullptr ? nullptr : p + bh * q_stride; };
      auto at_k = [&](const T* p) { return p == nullptr ? nullptr : p + bh * k_stride; };
      const Slices<T> in{at_q(qp), at_k(kp), at_k(vp), at_q(tqp), at_k(tkp), at_k(tvp),
                         op + bh * q_stride, top + bh * q_stride, lsep + bh * s.n_q};
      attend_query_block<T>(s, in, qb * s.block_q, w);
    }
  });
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& tq, const std::optional<at::Tensor>& tk,
                  const std::optional<at::Tensor>& tv, const at::Tensor& o, const at::Tensor& t_o,
                  const at::Tensor& lse) {
  TORCH_CHECK(q.dim() == 4, "ttfm::jvp_attention_fwd: q must be (B, H, Nq, D), got ", q.sizes());
  TORCH_CHECK(k.dim() == 4 && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "ttfm::jvp_attention_fwd: k must be (B, H, Nk, D) like q ", q.sizes(), ", got ", k.sizes());
  auto check = [&](const at::Tensor& t, const char* name, const at::Tensor& like) {
    TORCH_CHECK(t.sizes() == like.sizes(), "ttfm::jvp_attention_fwd: ", name, " has shape ", t.sizes(),
                ", expected ", like.sizes());
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), "ttfm::jvp_attention_fwd: ", name, " has dtype ",
                t.scalar_type(), ", expected ", q.scalar_type());
    TORCH_CHECK(t.is_contiguous(), "ttfm::jvp_attention_fwd: ", name, " must be contiguous");
  };
  check(q, "q", q);
  check(k, "k", k);
  check(v, "v", k);
  if (tq.has_value()) check(*tq, "tq", q);
  if (tk.has_value()) check(*tk, "tk", k);
  if (tv.has_value()) check(*tv, "tv", k);
  check(o, "o", q);
  check(t_o, "t_o", q);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.sizes() == q.sizes().slice(0, 3),
              "ttfm::jvp_attention_fwd: lse must be a contiguous float32 (B, H, Nq) tensor, got ",
              lse.scalar_type(), " ", lse.sizes());
}

// Default tiles: 64 query rows (enough work items to keep every thread busy) by up to 512 keys.
int64_t pick_block(int64_t requested, int64_t fallback, int64_t n) {
  TORCH_CHECK(requested >= 0, "ttfm::jvp_attention_fwd: block sizes must be >= 0 (0 = default), got ", requested);
  return std::max<int64_t>(1, std::min(requested > 0 ? requested : fallback, n));
}

void jvp_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::optional<at::Tensor>& tq, const std::optional<at::Tensor>& tk,
                           const std::optional<at::Tensor>& tv, bool causal, double scale, at::Tensor& o,
                           at::Tensor& t_o, at::Tensor& lse, int64_t block_q, int64_t block_k) {
  check_inputs(q, k, v, tq, tk, tv, o, t_o, lse);
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "ttfm::jvp_attention_fwd: the CPU kernel supports float32 and bfloat16, got ", q.scalar_type());
  TORCH_CHECK(q.size(3) > 0, "ttfm::jvp_attention_fwd: the head dim D must be >= 1");
  TORCH_CHECK(k.size(2) > 0 || q.size(2) == 0, "ttfm::jvp_attention_fwd: k has no keys (Nk = 0)");
  if (lse.numel() == 0) return;  // no query rows
  const Shape s{q.size(0) * q.size(1), q.size(2), k.size(2), q.size(3), pick_block(block_q, 64, q.size(2)),
                pick_block(block_k, 512, k.size(2)), causal, static_cast<float>(scale)};
  TORCH_CHECK(s.block_k * 2 * s.dim <= std::numeric_limits<int>::max(), "ttfm::jvp_attention_fwd: tiles too large");
  if (q.scalar_type() == at::kFloat) {
    jvp_attention_fwd_impl<float>(s, q, k, v, tq, tk, tv, o, t_o, lse);
  } else {
    jvp_attention_fwd_impl<c10::BFloat16>(s, q, k, v, tq, tk, tv, o, t_o, lse);
  }
}

// The outputs are preallocated out arguments, so tracing (FakeTensor / torch.compile) needs only the checks.
void jvp_attention_fwd_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& tq, const std::optional<at::Tensor>& tk,
                            const std::optional<at::Tensor>& tv, bool causal, double scale, at::Tensor& o,
                            at::Tensor& t_o, at::Tensor& lse, int64_t block_q, int64_t block_k) {
  check_inputs(q, k, v, tq, tk, tv, o, t_o, lse);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ttfm, m) {
  // block_q / block_k: tile sizes (0 = the kernel's default); tests force several key blocks with them.
  m.def("jvp_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? tq, Tensor? tk, Tensor? tv, bool causal, "
        "float scale, Tensor(a!) o, Tensor(b!) t_o, Tensor(c!) lse, int block_q=0, int block_k=0) -> ()");
}

TORCH_LIBRARY_IMPL(ttfm, CPU, m) {
  m.impl("jvp_attention_fwd", &jvp_attention_fwd_cpu);
}

TORCH_LIBRARY_IMPL(ttfm, Meta, m) {
  m.impl("jvp_attention_fwd", &jvp_attention_fwd_meta);
}

}  // namespace ttfm
