// Tests of csrc/include/ttfm/residual.h, the math shared by the CPU and CUDA residual kernels, against a
// straightforward double-precision evaluation of docs/math.md section 2 and against finite differences.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "ttfm/residual.h"

namespace rs = ttfm::residual;

namespace {

int failures = 0;

void expect_near(double actual, double expected, double rel, const char* what) {
  const double tol = rel * std::max(1.0, std::fabs(expected));
  if (!(std::fabs(actual - expected) <= tol)) {
    std::printf("FAIL %s: got %.17g, expected %.17g (tol %.3g)\n", what, actual, expected, tol);
    ++failures;
  }
}

struct Sample {
  std::vector<double> u_st, u_ss, v_s, a, b;
  double coef;
};

Sample random_sample(int n, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal;
  Sample s{std::vector<double>(n), std::vector<double>(n), std::vector<double>(n), std::vector<double>(n),
           std::vector<double>(n), normal(gen)};
  for (int i = 0; i < n; ++i) {
    s.u_st[i] = normal(gen);
    s.u_ss[i] = normal(gen);
    s.v_s[i] = normal(gen);
    s.a[i] = normal(gen);
    s.b[i] = normal(gen);
  }
  return s;
}

// The loss of one sample written out directly from docs/math.md section 2.
double direct_loss(const Sample& s, double lambda_init, double lambda_term, double weight) {
  double si = 0, st = 0;
  const size_t n = s.u_st.size();
  for (size_t i = 0; i < n; ++i) {
    const double ri = s.u_ss[i] - s.v_s[i];
    const double rt = s.u_st[i] - (s.a[i] + s.coef * s.b[i]);
    si += ri * ri;
    st += rt * rt;
  }
  return weight * (lambda_init * si / n + lambda_term * st / n);
}

// The loss through the header, with the sums split into chunks of `chunk` elements and LANES lanes each,
// the way the CPU kernel walks a sample.
template <typename acc_t, int LANES>
acc_t header_loss(const Sample& s, int64_t chunk, acc_t lambda_init, acc_t lambda_term, acc_t weight) {
  const int64_t n = static_cast<int64_t>(s.u_st.size());
  rs::SquareSums<acc_t> total = rs::zero_sums<acc_t>();
  for (int64_t c = 0; c < rs::num_chunks(n, chunk); ++c) {
    rs::SquareSums<acc_t> lanes[LANES];
    for (auto& lane : lanes) lane = rs::zero_sums<acc_t>();
    for (int64_t i = c * chunk, k = 0; i < std::min(n, (c + 1) * chunk); ++i, k = (k + 1) % LANES) {
      rs::accumulate(lanes[k], rs::init_residual<acc_t>(s.u_ss[i], s.v_s[i]),
                     rs::term_residual<acc_t>(s.u_st[i], s.a[i], s.b[i], s.coef));
    }
    total = rs::combine(total, rs::tree_reduce<LANES>(lanes));
  }
  return rs::sample_loss<acc_t>(total, n, lambda_init, lambda_term, weight);
}

void test_loss_matches_direct_formula() {
  for (int n : {1, 3, 8, 1000, 4099}) {
    const Sample s = random_sample(n, 17 + n);
    const double expected = direct_loss(s, 0.3, 1.7, 0.8);
    expect_near(header_loss<double, 8>(s, 1024, 0.3, 1.7, 0.8), expected, 1e-12, "double loss");
    expect_near(header_loss<double, 1>(s, 7, 0.3, 1.7, 0.8), expected, 1e-12, "double loss, 1 lane, chunk 7");
    expect_near(header_loss<float, 16>(s, 256, 0.3f, 1.7f, 0.8f), expected, 1e-5, "float loss");
  }
}

void test_zero_lambdas_select_terms() {
  const Sample s = random_sample(100, 3);
  const double both = direct_loss(s, 1.0, 1.0, 1.0);
  const double init = header_loss<double, 4>(s, 64, 1.0, 0.0, 1.0);
  const double term = header_loss<double, 4>(s, 64, 0.0, 1.0, 1.0);
  expect_near(init + term, both, 1e-12, "init + term == both");
  expect_near(init, direct_loss(s, 1.0, 0.0, 1.0), 1e-12, "init term alone");
}

void test_tree_reduce_order() {
  // Values whose float sum depends on the order: the tree must pair lane i with lane i + half.
  rs::SquareSums<float> lanes[4] = {{1e8f, 1.f}, {1.f, 2.f}, {-1e8f, 3.f}, {1.f, 4.f}};
  const rs::SquareSums<float> sum = rs::tree_reduce<4>(lanes);
  // ((1e8 + -1e8) + (1 + 1)) = 2 exactly in this order; a left-to-right sum would lose the first 1.
  expect_near(sum.init, 2.0, 0.0, "tree order (init)");
  expect_near(sum.term, 10.0, 0.0, "tree order (term)");
}

void test_gradients_match_finite_differences() {
  const int n = 5;
  const Sample s = random_sample(n, 99);
  const double li = 0.6, lt = 1.4, w = 0.7, g = 1.3, h = 1e-6;
  const rs::GradScales<double> scale = rs::grad_scales<double>(g, w, n, li, lt);
  for (int i = 0; i < n; ++i) {
    for (int which = 0; which < 2; ++which) {
      Sample plus = s, minus = s;
      (which == 0 ? plus.u_st : plus.u_ss)[i] += h;
      (which == 0 ? minus.u_st : minus.u_ss)[i] -= h;
      const double fd = g * (direct_loss(plus, li, lt, w) - direct_loss(minus, li, lt, w)) / (2 * h);
      const double analytic = which == 0
          ? scale.term * rs::term_residual<double>(s.u_st[i], s.a[i], s.b[i], s.coef)
          : scale.init * rs::init_residual<double>(s.u_ss[i], s.v_s[i]);
      expect_near(analytic, fd, 1e-7, which == 0 ? "d loss / d u_st" : "d loss / d u_ss");
    }
  }
}

// The "fd" target in float: a + (-b / delta + c / delta) with b and c of magnitude 1 and c - b of order delta.
// Formed in float it keeps the small difference to float's precision relative to the large terms (about
// |b| / delta * 2^-24); the per-sample means come back unweighted.
void test_three_term_target_and_sample_terms() {
  const double delta = 0.01;
  std::mt19937 gen(5);
  std::normal_distribution<double> normal;
  rs::SquareSums<float> sums = rs::zero_sums<float>();
  double init = 0, term = 0;
  const int n = 257;
  for (int i = 0; i < n; ++i) {
    const float u_st = static_cast<float>(normal(gen)), a = static_cast<float>(normal(gen));
    const float b = static_cast<float>(normal(gen));
    const float c = static_cast<float>(b + delta * normal(gen));
    const double expected = static_cast<double>(u_st) - (a + (static_cast<double>(c) - b) / delta);
    const float r_t = rs::term_residual<float>(u_st, a, b, static_cast<float>(-1 / delta), c,
                                               static_cast<float>(1 / delta));
    expect_near(r_t, expected, 4 * std::ldexp(1.0 / delta, -24), "three-term residual in float");
    expect_near(rs::term_residual<double>(u_st, a, b, 0.5, c, 0.0), rs::term_residual<double>(u_st, a, b, 0.5),
                0.0, "a zero coef_c drops target_c");
    rs::accumulate(sums, 2.0f * r_t, r_t);
    init += 4.0 * r_t * r_t;
    term += static_cast<double>(r_t) * r_t;
  }
  const rs::SquareSums<float> means = rs::sample_terms(sums, n);
  expect_near(means.init, init / n, 1e-5, "sample_terms init");
  expect_near(means.term, term / n, 1e-5, "sample_terms term");
}

void test_num_chunks() {
  expect_near(rs::num_chunks(0, 256), 1, 0, "num_chunks(0)");
  expect_near(rs::num_chunks(256, 256), 1, 0, "num_chunks(256)");
  expect_near(rs::num_chunks(257, 256), 2, 0, "num_chunks(257)");
}

}  // namespace

int main() {
  test_loss_matches_direct_formula();
  test_zero_lambdas_select_terms();
  test_tree_reduce_order();
  test_gradients_match_finite_differences();
  test_three_term_target_and_sample_terms();
  test_num_chunks();
  if (failures == 0) std::printf("residual math: all tests passed\n");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
