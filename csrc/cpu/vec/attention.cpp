// CPU kernel of the fused attention JVP (docs/math.md section 5): o, t_o and lse in one pass over key blocks.
//
// Work items are (batch, head, query block), spread over threads with at::parallel_for. Each item walks the
// key blocks once with an online softmax (running max m, sum l), keeping its accumulators in a per-thread
// scratch area that is reused across items and calls (nothing is allocated inside the tile loop, nothing is
// Nq x Nk). Per key block the six matmul-shaped products run as four GEMM calls:
//   S    = scale Q K^T                 (scale as the GEMM's alpha)
//   dS   = scale [tQ | Q] [K | tK]^T    inner dim 2D (the columns of an absent tangent are skipped)
//   acc_o += P V
//   acc_t += [P*(dS - c) | P] [V ; tV]  inner dim 2 * block (the rows of an absent tangent are skipped)
// with P = exp(S - m) unnormalised and c a per-row shift (docs/math.md). fp32 inputs run MKL sgemm_ on fp32
// tiles; bf16 inputs run MKL's bf16 x bf16 -> fp32 GEMM on bf16 tiles where the CPU has avx512_bf16, else
// sgemm_ on tiles converted to fp32. Accumulation and the softmax statistics are fp32 throughout.
// It also writes lse and mu (the per-row mean of the score tangent under P), all the backward needs.
//
// The backward (ttfm::jvp_attention_bwd, docs/math.md "Backward of the attention JVP") recomputes P, ds and
// the products with the output gradients tile by tile from lse and mu: one work item is one (batch, head),
// query blocks outside and key blocks inside, with fp32 accumulators for dk, dv, dtk, dtv (Nk x D) in the
// thread's scratch. Nothing is Nq x Nk.
//
// Every (B, H, N, D) input is read through its strides (the last one must be 1), so the permuted / transposed
// views of attention layers reach the kernel without copies. Both ops are functional (docs/design.md, "How to
// add an op"): they allocate their outputs (contiguous); fake kernels and autograd are registered from Python
// (ttfm_kernels/ops/attention/function.py).
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
#include <optional>
#include <tuple>
#include <vector>

#include "ttfm/alloc.h"

// Fortran BLAS (MKL inside libtorch_cpu exports it; at::native::cpublas::gemm is not exported). Called inside
// at::parallel_for (an OpenMP region), MKL runs each call on the calling thread.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

// MKL's bf16 x bf16 -> fp32 GEMM (also exported by libtorch_cpu; avx512_bf16 / AMX kernels where the CPU has
// them). Enum arguments as ints: CblasRowMajor = 101, CblasNoTrans = 111, CblasTrans = 112.
extern "C" void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                                       const c10::BFloat16* a, int lda, const c10::BFloat16* b, int ldb,
                                       float beta, float* c, int ldc);

namespace ttfm {
namespace {

using Vec = at::vec::Vectorized<float>;
using BF16 = c10::BFloat16;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

// Row-major C (m x n, ldc) = alpha * A (m x k, lda) * B^T (B: n x k, ldb) + beta * C.
void gemm_nt(int m, int n, int k, const float* a, int lda, const float* b, int ldb, float beta, float* c,
             int ldc, float alpha = 1.0f) {
  sgemm_("T", "N", &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}

// Row-major C (m x n, ldc) = alpha * A (m x k, lda) * B (k x n, ldb) + beta * C.
void gemm_nn(int m, int n, int k, const float* a, int lda, const float* b, int ldb, float beta, float* c,
             int ldc, float alpha = 1.0f) {
  sgemm_("N", "N", &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}

// The same on bf16 operands with an fp32 result (fp32 accumulation).
void gemm_nt(int m, int n, int k, const BF16* a, int lda, const BF16* b, int ldb, float beta, float* c, int ldc,
             float alpha = 1.0f) {
  cblas_gemm_bf16bf16f32(kRowMajor, kNoTrans, kTrans, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void gemm_nn(int m, int n, int k, const BF16* a, int lda, const BF16* b, int ldb, float beta, float* c, int ldc,
             float alpha = 1.0f) {
  cblas_gemm_bf16bf16f32(kRowMajor, kNoTrans, kNoTrans, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// dst[i] = mul * src[i], i < n (through float unless both are the same type and mul is 1).
template <typename T, typename U = float>
void load_row(U* dst, const T* src, int64_t n, float mul) {
  if constexpr (std::is_same_v<T, U>) {
    if (mul == 1.0f) {
      std::memcpy(dst, src, n * sizeof(T));
      return;
    }
  }
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<U>(mul * static_cast<float>(src[i]));
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

// In place: e[j] = p[j] * (e[j] - shift) for j < n, returning the sum.
float mul_sum(float* e, const float* p, int64_t n, float shift) {
  const Vec vs(shift);
  Vec acc(0.0f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec x = Vec::loadu(p + i) * (Vec::loadu(e + i) - vs);
    x.store(e + i);
    acc = acc + x;
  }
  float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
  for (; i < n; ++i) {
    e[i] = p[i] * (e[i] - shift);
    sum += e[i];
  }
  return sum;
}

float dot(const float* a, const float* b, int64_t n) {
  Vec acc(0.0f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) acc = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc);
  float sum = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

void scale_row(float* x, int64_t n, float a) {
  const Vec va(a);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(x + i) * va).store(x + i);
  for (; i < n; ++i) x[i] *= a;
}

struct Shape {
  int64_t batch, heads, n_q, n_k, dim, block_q, block_k;
  bool causal;
  float scale;
};

// A (B, H, N, D) tensor with a unit last stride, read (or written) through its other three strides; null
// data = an absent optional tensor.
template <typename T>
struct Strided {
  T* data = nullptr;
  int64_t batch = 0, head = 0, row = 0;

  Strided() = default;
  explicit Strided(const at::Tensor& t)
      : data(static_cast<T*>(t.data_ptr())), batch(t.stride(0)), head(t.stride(1)), row(t.stride(2)) {}
  explicit Strided(const std::optional<at::Tensor>& t) {
    if (t.has_value()) *this = Strided(*t);
  }
  // Rows of slice bh = b * H + h: pointer to row 0 and the row stride (null stays null).
  struct Rows {
    T* data;
    int64_t ld;
    T* operator[](int64_t i) const { return data + i * ld; }
    explicit operator bool() const { return data != nullptr; }
  };
  Rows slice(int64_t bh, int64_t heads) const {
    if (data == nullptr) return {nullptr, 0};
    return {data + (bh / heads) * batch + (bh % heads) * head, row};
  }
};

template <typename T>
using In = typename Strided<const T>::Rows;
template <typename T>
using Out = typename Strided<T>::Rows;

// Pointers to one (batch, head) slice of every tensor of the forward; tangents may be null (absent).
template <typename T>
struct FwdSlices {
  In<T> q, k, v, tq, tk, tv;
  Out<T> o, t_o;
  float *lse, *mu;
};

// One buffer per thread, grown on demand and reused by every later call (no page faults in steady state).
float* thread_scratch(int64_t floats) {
  thread_local std::vector<float> buffer;
  if (buffer.size() < static_cast<size_t>(floats)) buffer.resize(floats);
  return buffer.data();
}

// The per-thread scratch tiles of one forward work item, carved from the thread's buffer. U is the GEMM
// operand type: float, or bf16 for the bf16 GEMMs (then the fp32 GEMM results s are converted into x).
template <typename U>
struct FwdScratch {
  U* qq;         // block_q x 2D:        [tq | q]
  U* kk;         // block_k x 2D:        [k | tk]
  U* vv;         // 2 block_k x D:       [v ; tv]
  float* s;      // block_q x 2 nk:      [dS | S] from the GEMMs, then [P * (dS - shift) | P] in place
  U* x;          // the same as GEMM operand (s itself when U is float)
  float* acc_o;  // block_q x D
  float* acc_t;  // block_q x D
  float* m;      // block_q: running max
  float* l;      // block_q: running sum of exp
  float* mu;     // block_q: running sum of exp * (dS - shift)
  float* shift;  // block_q: the row's P-weighted mean of dS over the first key block

  static constexpr bool kSame = std::is_same_v<U, float>;
  // floats holding n values of U
  static int64_t room(int64_t n) { return (n * static_cast<int64_t>(sizeof(U)) + 3) / 4; }

  explicit FwdScratch(const Shape& sh) {
    const int64_t tile = sh.block_q * 2 * sh.block_k;
    float* p = thread_scratch(room(sh.block_q * 2 * sh.dim) + 2 * room(sh.block_k * 2 * sh.dim) + tile +
                              (kSame ? 0 : room(tile)) + 2 * sh.block_q * sh.dim + 4 * sh.block_q);
    qq = reinterpret_cast<U*>(p), p += room(sh.block_q * 2 * sh.dim);
    kk = reinterpret_cast<U*>(p), p += room(sh.block_k * 2 * sh.dim);
    vv = reinterpret_cast<U*>(p), p += room(sh.block_k * 2 * sh.dim);
    s = p, p += tile;
    if constexpr (kSame) {
      x = s;
    } else {
      x = reinterpret_cast<U*>(p), p += room(tile);
    }
    acc_o = p, p += sh.block_q * sh.dim;
    acc_t = p, p += sh.block_q * sh.dim;
    m = p, p += sh.block_q;
    l = p, p += sh.block_q;
    mu = p, p += sh.block_q;
    shift = p;
  }
};

// Loads rows [r0, r0 + n) of a (N, D) slice, times mul, into dst with row stride ld (nothing if src is absent).
template <typename T, typename U = float>
void load_rows(U* dst, int64_t ld, In<T> src, int64_t r0, int64_t n, int64_t dim, float mul) {
  if (!src) return;
  for (int64_t r = 0; r < n; ++r) load_row<T, U>(dst + r * ld, src[r0 + r], dim, mul);
}

// Rows of the causal (top-left) mask: row i sees keys j <= i; returns how many of the nk keys from k0 it sees.
int64_t visible(const Shape& s, int64_t row, int64_t k0, int64_t nk) {
  return s.causal ? std::clamp<int64_t>(row - k0 + 1, 0, nk) : nk;
}

// One forward work item: query rows [q0, q0 + bq) of one (batch, head) slice.
//
// The score tangent is accumulated shifted by a per-row constant (its P-weighted mean over the first key
// block): sum_j P (dS - c) v / l - (mu - c) o equals the unshifted t_o for any c, and the shift removes a large
// row-constant part of dS (keys sharing a mean direction) before it is rounded (to bf16 as a GEMM operand).
template <typename T, typename U>
void attend_query_block(const Shape& s, const FwdSlices<T>& in, int64_t q0, FwdScratch<U>& w) {
  const int64_t dim = s.dim, dim2 = 2 * s.dim;
  const int64_t bq = std::min(s.block_q, s.n_q - q0);
  const bool has_ds = in.tq || in.tk;
  // Columns [lo, hi) of qq and kk that form dS (an absent tangent's half is skipped).
  const int64_t ds_lo = in.tq ? 0 : dim, ds_hi = in.tk ? dim2 : dim;
  load_rows<T, U>(w.qq, dim2, in.tq, q0, bq, dim, 1.0f);
  load_rows<T, U>(w.qq + dim, dim2, in.q, q0, bq, dim, 1.0f);
  std::fill(w.m, w.m + bq, kNegInf);
  std::fill(w.l, w.l + bq, 0.0f);
  std::fill(w.mu, w.mu + bq, 0.0f);
  std::fill(w.acc_o, w.acc_o + bq * dim, 0.0f);
  std::fill(w.acc_t, w.acc_t + bq * dim, 0.0f);

  // Causal: keys at or past q0 + bq are never seen by this block.
  const int64_t k_end = s.causal ? std::min(s.n_k, q0 + bq) : s.n_k;
  for (int64_t k0 = 0; k0 < k_end; k0 += s.block_k) {
    const int64_t nk = std::min(s.block_k, k_end - k0), nk2 = 2 * nk;
    load_rows<T, U>(w.kk, dim2, in.k, k0, nk, dim, 1.0f);
    load_rows<T, U>(w.kk + dim, dim2, in.tk, k0, nk, dim, 1.0f);
    load_rows<T, U>(w.vv, dim, in.v, k0, nk, dim, 1.0f);
    load_rows<T, U>(w.vv + nk * dim, dim, in.tv, k0, nk, dim, 1.0f);
    float* p = w.s + nk;  // P block (row stride nk2); E = P * (dS - shift) lives at w.s
    gemm_nt(bq, nk, dim, w.qq + dim, dim2, w.kk, dim2, 0.0f, p, nk2, s.scale);
    if (has_ds) gemm_nt(bq, nk, ds_hi - ds_lo, w.qq + ds_lo, dim2, w.kk + ds_lo, dim2, 0.0f, w.s, nk2, s.scale);
    for (int64_t r = 0; r < bq; ++r) {
      float* p_row = p + r * nk2;
      float* e_row = w.s + r * nk2;
      const int64_t valid = visible(s, q0 + r, k0, nk);
      const float m_new = std::max(w.m[r], row_max(p_row, valid));
      // m_new is finite: the first key block always holds key 0, which every row sees.
      const float alpha = std::exp(w.m[r] - m_new);
      const float sum_p = exp_sum(p_row, valid, m_new);
      std::fill(p_row + valid, p_row + nk, 0.0f);
      float sum_e = 0.0f;
      if (has_ds) {
        if (k0 == 0) w.shift[r] = dot(p_row, e_row, valid) / sum_p;
        sum_e = mul_sum(e_row, p_row, valid, w.shift[r]);
        std::fill(e_row + valid, e_row + nk, 0.0f);
      }
      if (alpha != 1.0f) {
        scale_row(w.acc_o + r * dim, dim, alpha);
        scale_row(w.acc_t + r * dim, dim, alpha);
      }
      w.m[r] = m_new;
      w.l[r] = alpha * w.l[r] + sum_p;
      w.mu[r] = alpha * w.mu[r] + sum_e;
      if constexpr (!FwdScratch<U>::kSame) at::vec::convert(e_row, w.x + r * nk2, nk2);
    }
    gemm_nn(bq, dim, nk, w.x + nk, nk2, w.vv, dim, 1.0f, w.acc_o, dim);
    // Rows [lo, hi) of [v ; tv] against columns [lo, hi) of [P * dS | P].
    const int64_t t_lo = has_ds ? 0 : nk, t_hi = in.tv ? nk2 : nk;
    if (t_hi > t_lo) gemm_nn(bq, dim, t_hi - t_lo, w.x + t_lo, nk2, w.vv + t_lo * dim, dim, 1.0f, w.acc_t, dim);
  }

  for (int64_t r = 0; r < bq; ++r) {
    const float inv_l = 1.0f / w.l[r];
    const float mu = w.mu[r] * inv_l;  // the mean of dS - shift
    float* o_row = w.acc_o + r * dim;
    float* t_row = w.acc_t + r * dim;
    for (int64_t d = 0; d < dim; ++d) {
      o_row[d] *= inv_l;
      t_row[d] = t_row[d] * inv_l - mu * o_row[d];
    }
    store_row(in.o[q0 + r], o_row, dim);
    store_row(in.t_o[q0 + r], t_row, dim);
    in.lse[q0 + r] = w.m[r] + std::log(w.l[r]);
    in.mu[q0 + r] = has_ds ? w.shift[r] + mu : 0.0f;
  }
}

template <typename T, typename U>
void jvp_attention_fwd_impl(const Shape& s, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& tq, const std::optional<at::Tensor>& tk,
                            const std::optional<at::Tensor>& tv, at::Tensor& o, at::Tensor& t_o,
                            at::Tensor& lse, at::Tensor& mu) {
  const Strided<const T> sq(q), sk(k), sv(v), stq(tq), stk(tk), stv(tv);
  const Strided<T> so(o), sto(t_o);
  float *lsep = lse.mutable_data_ptr<float>(), *mup = mu.mutable_data_ptr<float>();
  const int64_t q_blocks = (s.n_q + s.block_q - 1) / s.block_q, h = s.heads;
  at::parallel_for(0, s.batch * h * q_blocks, 1, [&](int64_t begin, int64_t end) {
    FwdScratch<U> w(s);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / q_blocks, qb = item % q_blocks;
      const FwdSlices<T> in{sq.slice(bh, h),  sk.slice(bh, h),  sv.slice(bh, h),  stq.slice(bh, h),
                            stk.slice(bh, h), stv.slice(bh, h), so.slice(bh, h),  sto.slice(bh, h),
                            lsep + bh * s.n_q, mup + bh * s.n_q};
      attend_query_block<T, U>(s, in, qb * s.block_q, w);
    }
  });
}

// Row-major C (m x n, ldc) = A^T (A: k x m, lda) * B (k x n, ldb) + beta * C.
void gemm_tn(int m, int n, int k, const float* a, int lda, const float* b, int ldb, float beta, float* c,
             int ldc) {
  const float one = 1.0f;
  sgemm_("N", "T", &n, &m, &k, &one, b, &ldb, a, &lda, &beta, c, &ldc);
}

// Pointers to one (batch, head) slice of every tensor of the backward; absent tensors are null.
template <typename T>
struct BwdSlices {
  In<T> q, k, v, tq, tk, tv, o, t_o, g, h;  // g = dL/do, h = dL/dt_o
  const float *lse, *mu, *g_lse;
  Out<T> dq, dk, dv, dtq, dtk, dtv;
};

// Per-thread scratch of one backward work item (one (batch, head) slice).
struct BwdScratch {
  float* qq;   // block_q x 2D: [scale * tq | scale * q]
  float* gh;   // block_q x 2D: [g | h]
  float* kk;   // block_k x 2D: [k | tk]
  float* vv;   // block_k x 2D: [v | tv]
  float* p;    // block_q x block_k: S, then P
  float* ds;   // block_q x block_k: ds, then P * (ds - mu)
  float* a;    // block_q x block_k: A = g.v + h.tv, then dL/ds (softmax input)
  float* b;    // block_q x block_k: B = h.v, then E = dL/d(ds)
  float* dq;   // block_q x D (unscaled: times scale on store)
  float* dtq;  // block_q x D (unscaled)
  float* row;  // 4 block_q: lse, mu, g.o + h.t_o - g_lse, h.o (per query row)
  float* dk;   // Nk x D accumulators of the whole slice
  float* dv;
  float* dtk;
  float* dtv;

  explicit BwdScratch(const Shape& s) {
    const int64_t tile = s.block_q * s.block_k, nkd = s.n_k * s.dim;
    float* x = thread_scratch(6 * s.block_q * s.dim + 4 * s.block_k * s.dim + 4 * tile +
                                           4 * s.block_q + 4 * nkd);
    qq = x, x += 2 * s.block_q * s.dim;
    gh = x, x += 2 * s.block_q * s.dim;
    kk = x, x += 2 * s.block_k * s.dim;
    vv = x, x += 2 * s.block_k * s.dim;
    p = x, x += tile;
    ds = x, x += tile;
    a = x, x += tile;
    b = x, x += tile;
    dq = x, x += s.block_q * s.dim;
    dtq = x, x += s.block_q * s.dim;
    row = x, x += 4 * s.block_q;
    dk = x, x += nkd;
    dv = x, x += nkd;
    dtk = x, x += nkd;
    dtv = x;
  }
};

// Which products of the backward run (absent inputs remove theirs; docs/math.md "Backward of the attention JVP").
struct BwdTerms {
  bool g, h, tq, tk, tv, ds, e;  // ds: a q or k tangent; e: E = dL/d(ds) is nonzero (h and ds)
};

// The elementwise middle of one (I, J) tile, row r with `valid` visible keys (the rest are zeroed):
// P = exp(S - lse); E = P (B - h.o); dS = P (A + (ds - mu)(B - h.o) - c0) with c0 = g.o + h.t_o - g_lse;
// ds <- P (ds - mu) when h is present.
void tile_row(const BwdTerms& t, int64_t nk, int64_t valid, float lse, float mu, float c0, float ho, float* p,
              float* ds, float* a, float* b) {
  const Vec vlse(lse), vmu(mu), vc0(c0), vho(ho), zero(0.0f);
  for (int64_t j = 0; j < valid; j += Vec::size()) {
    const int n = static_cast<int>(std::min<int64_t>(Vec::size(), valid - j));
    const Vec pj = (Vec::loadu(p + j, n) - vlse).exp_u20();
    Vec inner = t.g || (t.h && t.tv) ? Vec::loadu(a + j, n) - vc0 : zero - vc0;
    if (t.e) {
      const Vec bt = Vec::loadu(b + j, n) - vho;
      const Vec dsm = Vec::loadu(ds + j, n) - vmu;
      inner = at::vec::fmadd(dsm, bt, inner);
      (pj * bt).store(b + j, n);
      (pj * dsm).store(ds + j, n);
    }
    (pj * inner).store(a + j, n);
    pj.store(p + j, n);
  }
  std::fill(p + valid, p + nk, 0.0f);
  std::fill(a + valid, a + nk, 0.0f);
  if (t.e) {
    std::fill(b + valid, b + nk, 0.0f);
    std::fill(ds + valid, ds + nk, 0.0f);
  }
}

// One backward work item: the whole (batch, head) slice, query blocks outside, key blocks inside.
template <typename T>
void attend_backward(const Shape& s, const BwdSlices<T>& in, const BwdTerms& t, BwdScratch& w) {
  const int64_t dim = s.dim, dim2 = 2 * s.dim, nkd = s.n_k * s.dim;
  for (float* acc : {w.dk, w.dv, w.dtk, w.dtv}) std::fill(acc, acc + nkd, 0.0f);
  // Columns [lo, hi) of [g | h] x [v | tv] that form A; of qq x kk that form ds.
  const int64_t a_lo = t.g ? 0 : dim, a_hi = t.h && t.tv ? dim2 : dim;
  const int64_t ds_lo = t.tq ? 0 : dim, ds_hi = t.tk ? dim2 : dim;
  std::vector<float> o_row(dim), t_row(dim);  // one allocation per slice, not per tile
  for (int64_t q0 = 0; q0 < s.n_q; q0 += s.block_q) {
    const int64_t bq = std::min(s.block_q, s.n_q - q0);
    load_rows<T>(w.qq, dim2, in.tq, q0, bq, dim, s.scale);
    load_rows<T>(w.qq + dim, dim2, in.q, q0, bq, dim, s.scale);
    load_rows<T>(w.gh, dim2, in.g, q0, bq, dim, 1.0f);
    load_rows<T>(w.gh + dim, dim2, in.h, q0, bq, dim, 1.0f);
    float *lse = w.row, *mu = w.row + bq, *c0 = w.row + 2 * bq, *ho = w.row + 3 * bq;
    for (int64_t r = 0; r < bq; ++r) {
      const int64_t i = q0 + r;
      load_row(o_row.data(), in.o[i], dim, 1.0f);
      lse[r] = in.lse[i];
      mu[r] = in.mu[i];
      c0[r] = in.g_lse != nullptr ? -in.g_lse[i] : 0.0f;
      ho[r] = 0.0f;
      if (t.g) c0[r] += dot(w.gh + r * dim2, o_row.data(), dim);
      if (t.h) {
        load_row(t_row.data(), in.t_o[i], dim, 1.0f);
        c0[r] += dot(w.gh + r * dim2 + dim, t_row.data(), dim);
        ho[r] = dot(w.gh + r * dim2 + dim, o_row.data(), dim);
      }
    }
    std::fill(w.dq, w.dq + bq * dim, 0.0f);
    std::fill(w.dtq, w.dtq + bq * dim, 0.0f);
    const int64_t k_end = s.causal ? std::min(s.n_k, q0 + bq) : s.n_k;
    for (int64_t k0 = 0; k0 < k_end; k0 += s.block_k) {
      const int64_t nk = std::min(s.block_k, k_end - k0);
      load_rows<T>(w.kk, dim2, in.k, k0, nk, dim, 1.0f);
      load_rows<T>(w.kk + dim, dim2, in.tk, k0, nk, dim, 1.0f);
      load_rows<T>(w.vv, dim2, in.v, k0, nk, dim, 1.0f);
      load_rows<T>(w.vv + dim, dim2, in.tv, k0, nk, dim, 1.0f);
      gemm_nt(bq, nk, dim, w.qq + dim, dim2, w.kk, dim2, 0.0f, w.p, nk);
      if (a_hi > a_lo) gemm_nt(bq, nk, a_hi - a_lo, w.gh + a_lo, dim2, w.vv + a_lo, dim2, 0.0f, w.a, nk);
      if (t.e) {
        gemm_nt(bq, nk, ds_hi - ds_lo, w.qq + ds_lo, dim2, w.kk + ds_lo, dim2, 0.0f, w.ds, nk);
        gemm_nt(bq, nk, dim, w.gh + dim, dim2, w.vv, dim2, 0.0f, w.b, nk);
      }
      for (int64_t r = 0; r < bq; ++r) {
        const int64_t o = r * nk;
        tile_row(t, nk, visible(s, q0 + r, k0, nk), lse[r], mu[r], c0[r], ho[r], w.p + o, w.ds + o, w.a + o,
                 w.b + o);
      }
      float *dk = w.dk + k0 * dim, *dv = w.dv + k0 * dim, *dtk = w.dtk + k0 * dim, *dtv = w.dtv + k0 * dim;
      gemm_nn(bq, dim, nk, w.a, nk, w.kk, dim2, 1.0f, w.dq, dim);             // dq += dS K
      gemm_tn(nk, dim, bq, w.a, nk, w.qq + dim, dim2, 1.0f, dk, dim);         // dk += dS^T (c Q)
      if (t.g) gemm_tn(nk, dim, bq, w.p, nk, w.gh, dim2, 1.0f, dv, dim);     // dv += P^T G
      if (t.h && t.tv) gemm_tn(nk, dim, bq, w.p, nk, w.gh + dim, dim2, 1.0f, dtv, dim);  // dtv += P^T H
      if (t.e) {
        gemm_tn(nk, dim, bq, w.ds, nk, w.gh + dim, dim2, 1.0f, dv, dim);     // dv += (P (ds - mu))^T H
        if (t.tk) gemm_nn(bq, dim, nk, w.b, nk, w.kk + dim, dim2, 1.0f, w.dq, dim);   // dq += E tK
        if (t.tq) gemm_nn(bq, dim, nk, w.b, nk, w.kk, dim2, 1.0f, w.dtq, dim);        // dtq += E K
        if (t.tq) gemm_tn(nk, dim, bq, w.b, nk, w.qq, dim2, 1.0f, dk, dim);          // dk += E^T (c tQ)
        if (t.tk) gemm_tn(nk, dim, bq, w.b, nk, w.qq + dim, dim2, 1.0f, dtk, dim);   // dtk += E^T (c Q)
      }
    }
    for (int64_t r = 0; r < bq; ++r) {
      scale_row(w.dq + r * dim, dim, s.scale);
      store_row(in.dq[q0 + r], w.dq + r * dim, dim);
      if (in.dtq) {
        scale_row(w.dtq + r * dim, dim, s.scale);
        store_row(in.dtq[q0 + r], w.dtq + r * dim, dim);
      }
    }
  }
  for (int64_t j = 0; j < s.n_k; ++j) {
    store_row(in.dk[j], w.dk + j * dim, dim);
    store_row(in.dv[j], w.dv + j * dim, dim);
    if (in.dtk) store_row(in.dtk[j], w.dtk + j * dim, dim);
    if (in.dtv) store_row(in.dtv[j], w.dtv + j * dim, dim);
  }
}

template <typename T>
void jvp_attention_bwd_impl(const Shape& s, const std::vector<std::optional<at::Tensor>>& ins,
                            const at::Tensor& lse, const at::Tensor& mu, const std::optional<at::Tensor>& g_lse,
                            const std::vector<std::optional<at::Tensor>>& outs) {
  std::vector<Strided<const T>> si;
  for (const auto& t : ins) si.emplace_back(t);
  std::vector<Strided<T>> so;
  for (const auto& t : outs) so.emplace_back(t);
  const BwdTerms terms{ins[8].has_value(), ins[9].has_value(), ins[3].has_value(), ins[4].has_value(),
                       ins[5].has_value(), ins[3].has_value() || ins[4].has_value(),
                       ins[9].has_value() && (ins[3].has_value() || ins[4].has_value())};
  const float *lsep = lse.const_data_ptr<float>(), *mup = mu.const_data_ptr<float>();
  const float* glp = g_lse.has_value() ? g_lse->const_data_ptr<float>() : nullptr;
  const int64_t h = s.heads;
  at::parallel_for(0, s.batch * h, 1, [&](int64_t begin, int64_t end) {
    BwdScratch w(s);
    for (int64_t bh = begin; bh < end; ++bh) {
      auto i = [&](int n) { return si[n].slice(bh, h); };
      auto o = [&](int n) { return so[n].slice(bh, h); };
      const BwdSlices<T> in{i(0), i(1), i(2), i(3), i(4), i(5), i(6), i(7), i(8), i(9),
                            lsep + bh * s.n_q, mup + bh * s.n_q, glp == nullptr ? nullptr : glp + bh * s.n_q,
                            o(0), o(1), o(2), o(3), o(4), o(5)};
      attend_backward<T>(s, in, terms, w);
    }
  });
}

// The argument checks shared by both ops (`op` names the op in the messages; q fixes the dtype).
struct Checker {
  const char* op;
  const at::Tensor& q;

  void like(const at::Tensor& t, const char* name, const at::Tensor& shape) const {
    TORCH_CHECK(t.sizes() == shape.sizes(), op, ": ", name, " has shape ", t.sizes(), ", expected ", shape.sizes());
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), ", expected ",
                q.scalar_type());
    TORCH_CHECK(t.stride(3) == 1 || t.size(3) == 1, op, ": ", name, " must have a unit last stride (strides ",
                t.strides(), ")");
  }
  void like(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& shape) const {
    if (t.has_value()) like(*t, name, shape);
  }
  void rows(const at::Tensor& t, const char* name) const {
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.sizes() == q.sizes().slice(0, 3), op, ": ",
                name, " must be a contiguous float32 (B, H, Nq) tensor, got ", t.scalar_type(), " ", t.sizes());
  }
  void qkv(const at::Tensor& k, const at::Tensor& v) const {
    TORCH_CHECK(q.dim() == 4, op, ": q must be (B, H, Nq, D), got ", q.sizes());
    TORCH_CHECK(k.dim() == 4 && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), op,
                ": k must be (B, H, Nk, D) like q ", q.sizes(), ", got ", k.sizes());
    like(q, "q", q);
    like(k, "k", k);
    like(v, "v", k);
  }
};

// The forward's inputs (the backward's too): shapes, dtypes, unit last strides.
void check_inputs(const Checker& c, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& tq,
                  const std::optional<at::Tensor>& tk, const std::optional<at::Tensor>& tv) {
  c.qkv(k, v);
  c.like(tq, "tq", c.q);
  c.like(tk, "tk", k);
  c.like(tv, "tv", k);
}

// Default tiles: 64 query rows (enough work items to keep every thread busy) by up to 512 keys.
int64_t pick_block(int64_t requested, int64_t fallback, int64_t n) {
  TORCH_CHECK(requested >= 0, "ttfm::jvp_attention: block sizes must be >= 0 (0 = default), got ", requested);
  return std::max<int64_t>(1, std::min(requested > 0 ? requested : fallback, n));
}

Shape make_shape(const char* op, const at::Tensor& q, const at::Tensor& k, bool causal, double scale,
                 int64_t block_q, int64_t block_k, int64_t default_q, int64_t default_k) {
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, op,
              ": the CPU kernel supports float32 and bfloat16, got ", q.scalar_type());
  TORCH_CHECK(q.size(3) > 0, op, ": the head dim D must be >= 1");
  TORCH_CHECK(k.size(2) > 0 || q.size(2) == 0, op, ": k has no keys (Nk = 0)");
  const Shape s{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), pick_block(block_q, default_q, q.size(2)),
                pick_block(block_k, default_k, k.size(2)), causal, static_cast<float>(scale)};
  TORCH_CHECK(s.block_k * 2 * s.dim <= std::numeric_limits<int>::max() &&
                  s.n_k * s.dim <= std::numeric_limits<int>::max(), op, ": tiles too large");
  return s;
}

// Whether bf16 GEMMs run natively (avx512_bf16 dot products; MKL also uses AMX where present). Without it
// MKL's bf16 GEMM is emulated and slower than converting the tiles to fp32, which the kernel then does.
bool cpu_has_bf16_dot() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

// (o, t_o, lse, mu): o, t_o contiguous like q, lse and mu (B, H, Nq) float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jvp_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& tq,
    const std::optional<at::Tensor>& tk, const std::optional<at::Tensor>& tv, bool causal, double scale,
    int64_t block_q, int64_t block_k, int64_t bf16_gemm) {
  check_inputs(Checker{"ttfm::jvp_attention_fwd", q}, k, v, tq, tk, tv);
  const Shape s = make_shape("ttfm::jvp_attention_fwd", q, k, causal, scale, block_q, block_k, 64, 512);
  TORCH_CHECK(bf16_gemm >= -1 && bf16_gemm <= 1, "ttfm::jvp_attention_fwd: bf16_gemm must be -1 (auto), 0 or 1");
  at::Tensor o = empty_output(q.sym_sizes(), q.options()), t_o = empty_output(q.sym_sizes(), q.options());
  const auto rows = q.sym_sizes().slice(0, 3);
  at::Tensor lse = empty_output(rows, q.options().dtype(at::kFloat));
  at::Tensor mu = empty_output(rows, q.options().dtype(at::kFloat));
  if (lse.numel() == 0) return {o, t_o, lse, mu};  // no query rows
  if (q.scalar_type() == at::kFloat) {
    jvp_attention_fwd_impl<float, float>(s, q, k, v, tq, tk, tv, o, t_o, lse, mu);
  } else if (bf16_gemm == 1 || (bf16_gemm == -1 && cpu_has_bf16_dot())) {
    jvp_attention_fwd_impl<BF16, BF16>(s, q, k, v, tq, tk, tv, o, t_o, lse, mu);
  } else {
    jvp_attention_fwd_impl<BF16, float>(s, q, k, v, tq, tk, tv, o, t_o, lse, mu);
  }
  return {o, t_o, lse, mu};
}

// [dq, dk, dv] and then the gradient of each given tangent (dtq, dtk, dtv in that order), contiguous.
std::vector<at::Tensor> jvp_attention_bwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const std::optional<at::Tensor>& tq,
                                              const std::optional<at::Tensor>& tk,
                                              const std::optional<at::Tensor>& tv, const at::Tensor& o,
                                              const at::Tensor& t_o, const at::Tensor& lse, const at::Tensor& mu,
                                              const std::optional<at::Tensor>& g_o,
                                              const std::optional<at::Tensor>& g_t_o,
                                              const std::optional<at::Tensor>& g_lse, bool causal, double scale,
                                              int64_t block_q, int64_t block_k) {
  const Checker c{"ttfm::jvp_attention_bwd", q};
  check_inputs(c, k, v, tq, tk, tv);
  c.like(o, "o", q);
  c.like(t_o, "t_o", q);
  c.rows(lse, "lse");
  c.rows(mu, "mu");
  c.like(g_o, "g_o", q);
  c.like(g_t_o, "g_t_o", q);
  if (g_lse.has_value()) c.rows(*g_lse, "g_lse");
  const Shape s = make_shape("ttfm::jvp_attention_bwd", q, k, causal, scale, block_q, block_k, 64, 256);
  std::vector<at::Tensor> grads;
  std::vector<std::optional<at::Tensor>> outs;
  for (const std::optional<at::Tensor>& t : {std::optional<at::Tensor>(q), std::optional<at::Tensor>(k),
                                             std::optional<at::Tensor>(v), tq, tk, tv}) {
    if (t.has_value()) grads.push_back(empty_output(t->sym_sizes(), t->options()));
    outs.push_back(t.has_value() ? std::optional<at::Tensor>(grads.back()) : std::nullopt);
  }
  if (lse.numel() == 0) return grads;
  const std::vector<std::optional<at::Tensor>> ins{q, k, v, tq, tk, tv, o, t_o, g_o, g_t_o};
  if (q.scalar_type() == at::kFloat) {
    jvp_attention_bwd_impl<float>(s, ins, lse, mu, g_lse, outs);
  } else {
    jvp_attention_bwd_impl<c10::BFloat16>(s, ins, lse, mu, g_lse, outs);
  }
  return grads;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ttfm, m) {
  // block_q / block_k: tile sizes (0 = the kernel's default); tests force several key blocks with them.
  // mu: the per-row mean of the score tangent under P (the backward's second row statistic after lse).
  // bf16_gemm (bf16 inputs): 1 = bf16 GEMMs with fp32 accumulation, 0 = fp32 GEMMs on converted tiles,
  // -1 = 1 where the CPU has avx512_bf16 (tests force both).
  m.def("jvp_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? tq, Tensor? tk, Tensor? tv, bool causal, "
        "float scale, int block_q=0, int block_k=0, int bf16_gemm=-1) -> (Tensor o, Tensor t_o, Tensor lse, "
        "Tensor mu)");
  // Gradients w.r.t. q, k, v and then the present tangents ([dq, dk, dv, dtq?, dtk?, dtv?]) from grad_o /
  // grad_t_o / grad_lse (each optional), by recomputation from lse and mu (docs/math.md "Backward of the
  // attention JVP").
  m.def("jvp_attention_bwd(Tensor q, Tensor k, Tensor v, Tensor? tq, Tensor? tk, Tensor? tv, Tensor o, "
        "Tensor t_o, Tensor lse, Tensor mu, Tensor? g_o, Tensor? g_t_o, Tensor? g_lse, bool causal, float scale, "
        "int block_q=0, int block_k=0) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(ttfm, CPU, m) {
  m.impl("jvp_attention_fwd", &jvp_attention_fwd_cpu);
  m.impl("jvp_attention_bwd", &jvp_attention_bwd_cpu);
}

}  // namespace ttfm
