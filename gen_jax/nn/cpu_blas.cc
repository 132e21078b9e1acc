// XLA:CPU custom calls (XLA FFI) that hand float32 matrix products to a CBLAS sgemm (MKL's, by default).
// Built on first use by gen_jax/nn/cpu_blas.py; the sgemm is passed in as a function pointer, so this file
// links against nothing but the XLA FFI headers that jaxlib ships.
//
// Work is split over XLA's intra-op thread pool: the calling thread claims chunks from a shared counter
// like the pool's threads do, so it never waits on a chunk nobody has started (no deadlock when every pool
// thread is itself inside a custom call), and a single-threaded pool runs everything in the caller.
#include <algorithm>
#include <cmath>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Sgemm = void (*)(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha, const float* a,
                       int lda, const float* b, int ldb, float beta, float* c, int ldc);
Sgemm g_sgemm = nullptr;
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

struct Work {
  explicit Work(int64_t n, std::function<void(int64_t)> f) : total(n), fn(std::move(f)) {}
  const int64_t total;
  const std::function<void(int64_t)> fn;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;

  void Drain() {
    for (int64_t i; (i = next.fetch_add(1)) < total;) {
      fn(i);
      if (done.fetch_add(1) + 1 == total) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
};

// Runs fn(0 .. n-1) on the caller and up to (pool threads) helpers; returns when all have finished.
void ParallelFor(ffi::ThreadPool& pool, int64_t n, std::function<void(int64_t)> fn) {
  if (n <= 0) return;
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  if (helpers <= 0) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  auto work = std::make_shared<Work>(n, std::move(fn));
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { work->Drain(); });
  work->Drain();
  std::unique_lock<std::mutex> lock(work->mu);
  work->cv.wait(lock, [&] { return work->done.load() == work->total; });
}

int64_t Prod(ffi::Span<const int64_t> dims, size_t upto) {
  int64_t p = 1;
  for (size_t i = 0; i < upto; ++i) p *= dims[i];
  return p;
}

// Offset (in matrices) of operand batch entry for output batch entry g: batch axes of size 1 broadcast.
int64_t BroadcastIndex(int64_t g, ffi::Span<const int64_t> out, ffi::Span<const int64_t> in, size_t nbatch) {
  int64_t index = 0, stride = 1;
  for (size_t d = nbatch; d-- > 0;) {
    const int64_t i = g % out[d];
    g /= out[d];
    if (in[d] != 1) index += i * stride;
    stride *= in[d];
  }
  return index;
}

// c[g] = op(a[g]) @ op(b[g]) for row-major a [..., ra, ca], b [..., rb, cb], c [..., m, n] with the batch axes
// of a and b broadcast (size 1) or equal to c's. Each product is split into column blocks of c, so that one
// large product also runs in parallel.
ffi::Error Gemm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                ffi::ResultBuffer<ffi::F32> c, bool trans_a, bool trans_b) {
  if (g_sgemm == nullptr) return ffi::Error(ffi::ErrorCode::kFailedPrecondition, "gen_jax cpu_blas: no sgemm set");
  auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  if (ad.size() < 2 || bd.size() != ad.size() || cd.size() != ad.size())
    return ffi::Error::InvalidArgument("gen_jax cpu_blas gemm: operands must have equal rank >= 2");
  const size_t r = ad.size(), nb = r - 2;
  const int64_t ra = ad[r - 2], ca = ad[r - 1], rb = bd[r - 2], cb = bd[r - 1];
  const int64_t m = trans_a ? ca : ra, k = trans_a ? ra : ca, n = trans_b ? rb : cb;
  const int64_t kb = trans_b ? cb : rb;
  bool ok = k == kb && cd[r - 2] == m && cd[r - 1] == n;
  for (size_t d = 0; d < nb; ++d)
    ok = ok && (ad[d] == cd[d] || ad[d] == 1) && (bd[d] == cd[d] || bd[d] == 1);
  if (!ok) return ffi::Error::InvalidArgument("gen_jax cpu_blas gemm: operand shapes do not match");
  const int64_t gc = Prod(cd, nb);
  if (m == 0 || n == 0 || gc == 0) return ffi::Error::Success();
  const float* ap = a.typed_data();
  const float* bp = b.typed_data();
  float* cp = c->typed_data();
  if (k == 0) {
    std::fill(cp, cp + gc * m * n, 0.f);
    return ffi::Error::Success();
  }
  // column blocks (multiples of the 16-float vector), enough of them to feed every thread
  const int64_t threads = std::max<int64_t>(1, pool.num_threads() + 1);
  int64_t blocks = 1;
  if (gc < threads && 2 * m * n * k >= (int64_t{1} << 22))
    blocks = std::min<int64_t>((threads + gc - 1) / gc, (n + 63) / 64);
  const int64_t width = ((n + blocks - 1) / blocks + 15) / 16 * 16;
  blocks = (n + width - 1) / width;
  ParallelFor(pool, gc * blocks, [=](int64_t i) {
    const int64_t g = i / blocks, n0 = (i % blocks) * width, nn = std::min(width, n - n0);
    const float* ag = ap + BroadcastIndex(g, cd, ad, nb) * ra * ca;
    const float* bg = bp + BroadcastIndex(g, cd, bd, nb) * rb * cb + (trans_b ? n0 * cb : n0);
    g_sgemm(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, (int)m, (int)nn, (int)k, 1.f, ag,
            (int)ca, bg, (int)cb, 0.f, cp + g * m * n + n0, (int)n);
  });
  return ffi::Error::Success();
}

// ---- attention softmax: y = softmax(where(mask, scale * x, -1e30)) over the last axis, and its gradient ----
// x, y [B, N, T, S]; mask [Bm, Tm, S] with Bm in {1, B}, Tm in {1, T}, broadcast over heads N. -1e30 (finite)
// keeps a fully masked row uniform rather than NaN, as the JAX formula it replaces. Each row is a few KB, so
// the three passes run in L1 and the whole op is one read and one write of memory (XLA:CPU makes several).
// GCC/Clang vector extensions: one 16-float vector (an AVX-512 register; narrower machines get it split)
typedef float F16 __attribute__((vector_size(64)));
typedef int32_t I16 __attribute__((vector_size(64)));
typedef uint8_t B16 __attribute__((vector_size(16)));
constexpr int kLanes = 16;
constexpr float kMaskedLogit = -1e30f;

inline F16 Load(const float* p) {
  F16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void Store(float* p, F16 v) { std::memcpy(p, &v, sizeof(v)); }
inline I16 LoadMask(const bool* p) {  // all ones where true
  B16 m;
  std::memcpy(&m, p, sizeof(m));
  return __builtin_convertvector(m, I16) != 0;
}
inline F16 Splat(float x) { return F16{} + x; }
inline F16 Select(I16 c, F16 a, F16 b) {  // c ? a : b lane-wise, with c all ones or zero
  I16 ai, bi;
  std::memcpy(&ai, &a, sizeof(ai));
  std::memcpy(&bi, &b, sizeof(bi));
  I16 r = (ai & c) | (bi & ~c);
  F16 out;
  std::memcpy(&out, &r, sizeof(out));
  return out;
}

// exp(x) for x <= 0 to float32 rounding (Cephes' expf polynomial), 0 below -87.3 (true value < 1.2e-38)
inline F16 ExpNonPositive(F16 x) {
  const F16 z = x * 1.44269504088896341f + 0.5f;
  F16 n = __builtin_convertvector(__builtin_convertvector(z, I16), F16);
  n = Select(n > z, n - 1.f, n);  // floor: conversion truncates toward zero
  n = Select(n < -126.f, Splat(-126.f), n);
  const F16 r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  F16 p = Splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const I16 bits = (__builtin_convertvector(n, I16) + 127) << 23;
  F16 two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return Select(x < -87.3f, F16{}, p * two_n);
}

float HorizontalMax(F16 v) {
  float m = v[0];
  for (int l = 1; l < kLanes; ++l) m = v[l] > m ? v[l] : m;
  return m;
}
float HorizontalSum(F16 v) {
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

// y = softmax(where(mask, scale * x, -1e30)) of one row; rows whose length is not a multiple of 16 take the
// plain scalar loop (no tail handling in the vector path)
void SoftmaxRow(const float* x, const bool* mask, float scale, float* y, int64_t S) {
  if (S % kLanes != 0) {
    float mx = -INFINITY, sum = 0.f;
    for (int64_t j = 0; j < S; ++j) mx = std::max(mx, y[j] = mask[j] ? x[j] * scale : kMaskedLogit);
    for (int64_t j = 0; j < S; ++j) sum += (y[j] = std::exp(y[j] - mx));
    for (int64_t j = 0; j < S; ++j) y[j] /= sum;
    return;
  }
  F16 lane_max = Splat(-INFINITY);
  for (int64_t i = 0; i < S; i += kLanes) {
    const F16 v = Select(LoadMask(mask + i), Load(x + i) * scale, Splat(kMaskedLogit));
    Store(y + i, v);
    lane_max = Select(v > lane_max, v, lane_max);
  }
  const float mx = HorizontalMax(lane_max);
  if (!std::isfinite(mx)) {  // NaN or +-inf logits: let the plain formula say what it says
    float sum = 0.f;
    for (int64_t j = 0; j < S; ++j) sum += (y[j] = std::exp(y[j] - mx));
    for (int64_t j = 0; j < S; ++j) y[j] /= sum;
    return;
  }
  F16 lane_sum{};
  for (int64_t i = 0; i < S; i += kLanes) {
    const F16 e = ExpNonPositive(Load(y + i) - mx);
    Store(y + i, e);
    lane_sum += e;
  }
  const float inv = 1.f / HorizontalSum(lane_sum);
  for (int64_t i = 0; i < S; i += kLanes) Store(y + i, Load(y + i) * inv);
}

// dx = where(mask, scale * p * (g - <g, p>), 0): the VJP of SoftmaxRow given its output p
void SoftmaxGradRow(const float* p, const float* g, const bool* mask, float scale, float* dx, int64_t S) {
  if (S % kLanes != 0) {
    float dot = 0.f;
    for (int64_t j = 0; j < S; ++j) dot += g[j] * p[j];
    for (int64_t j = 0; j < S; ++j) dx[j] = mask[j] ? scale * p[j] * (g[j] - dot) : 0.f;
    return;
  }
  F16 lane_dot{};
  for (int64_t i = 0; i < S; i += kLanes) lane_dot += Load(g + i) * Load(p + i);
  const float dot = HorizontalSum(lane_dot);
  for (int64_t i = 0; i < S; i += kLanes)
    Store(dx + i, Select(LoadMask(mask + i), (Load(g + i) - dot) * Load(p + i) * scale, F16{}));
}

// ---- LayerNorm over the last axis, y = (x - mean) / sqrt(var + eps) * gamma + beta, and its gradient ----
// x [R, D] with D a multiple of 16 (the Python side keeps other widths on XLA). Two-pass mean and variance per
// row in L1; the gradient recomputes them from x rather than saving them, so that both calls are functions of
// (x, gamma[, g]) alone and the second-order rule can be XLA's VJP of the closed form.
struct RowMoments {
  float mean, rstd;
};

inline RowMoments Moments(const float* x, int64_t D, float eps) {
  F16 s{};
  for (int64_t i = 0; i < D; i += kLanes) s += Load(x + i);
  const float mean = HorizontalSum(s) / D;
  F16 q{};
  for (int64_t i = 0; i < D; i += kLanes) {
    const F16 d = Load(x + i) - mean;
    q += d * d;
  }
  return {mean, 1.f / std::sqrt(HorizontalSum(q) / D + eps)};
}

ffi::Error LayerNorm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> gamma,
                     ffi::Buffer<ffi::F32> beta, ffi::ResultBuffer<ffi::F32> y, float eps) {
  auto xd = x.dimensions();
  const int64_t D = xd.size() == 0 ? 0 : xd[xd.size() - 1], R = D ? x.element_count() / D : 0;
  if (D % kLanes != 0 || gamma.element_count() != D || beta.element_count() != D)
    return ffi::Error::InvalidArgument("gen_jax layer_norm: last axis must be a multiple of 16 and match gamma, beta");
  const float* xp = x.typed_data();
  const float* gp = gamma.typed_data();
  const float* bp = beta.typed_data();
  float* yp = y->typed_data();
  const int64_t chunk = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(D, 1));
  ParallelFor(pool, (R + chunk - 1) / chunk, [=](int64_t c) {
    for (int64_t r = c * chunk, end = std::min(R, r + chunk); r < end; ++r) {
      const float* xr = xp + r * D;
      const RowMoments m = Moments(xr, D, eps);
      for (int64_t i = 0; i < D; i += kLanes)
        Store(yp + r * D + i, (Load(xr + i) - m.mean) * m.rstd * Load(gp + i) + Load(bp + i));
    }
  });
  return ffi::Error::Success();
}

// dx = rstd (gy - mean(gy) - xhat mean(gy xhat)) with gy = g gamma; dgamma = sum_rows g xhat; dbeta = sum_rows g.
// The row sums go through one [D] partial per chunk, added up in chunk order (deterministic).
ffi::Error LayerNormGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> gamma,
                         ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dgamma,
                         ffi::ResultBuffer<ffi::F32> dbeta, float eps) {
  auto xd = x.dimensions();
  const int64_t D = xd.size() == 0 ? 0 : xd[xd.size() - 1], R = D ? x.element_count() / D : 0;
  if (D % kLanes != 0 || gamma.element_count() != D || g.element_count() != x.element_count())
    return ffi::Error::InvalidArgument("gen_jax layer_norm grad: shapes do not match");
  const float* xp = x.typed_data();
  const float* gam = gamma.typed_data();
  const float* gp = g.typed_data();
  float* dxp = dx->typed_data();
  const int64_t chunk = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(D, 1));
  const int64_t chunks = (R + chunk - 1) / chunk;
  std::vector<float> partial(2 * chunks * D, 0.f);  // [chunks, 2, D]: dgamma, dbeta
  float* pp = partial.data();
  ParallelFor(pool, chunks, [=](int64_t c) {
    float* pg = pp + 2 * c * D;
    float* pb = pg + D;
    for (int64_t r = c * chunk, end = std::min(R, r + chunk); r < end; ++r) {
      const float* xr = xp + r * D;
      const float* gr = gp + r * D;
      const RowMoments m = Moments(xr, D, eps);
      F16 s1{}, s2{};
      for (int64_t i = 0; i < D; i += kLanes) {
        const F16 xhat = (Load(xr + i) - m.mean) * m.rstd, gv = Load(gr + i), gy = gv * Load(gam + i);
        s1 += gy * xhat;
        s2 += gy;
        Store(pg + i, Load(pg + i) + gv * xhat);
        Store(pb + i, Load(pb + i) + gv);
      }
      const float c1 = HorizontalSum(s1) / D, c2 = HorizontalSum(s2) / D;
      for (int64_t i = 0; i < D; i += kLanes) {
        const F16 xhat = (Load(xr + i) - m.mean) * m.rstd, gy = Load(gr + i) * Load(gam + i);
        Store(dxp + r * D + i, m.rstd * (gy - c2 - xhat * c1));
      }
    }
  });
  float* dg = dgamma->typed_data();
  float* db = dbeta->typed_data();
  std::fill(dg, dg + D, 0.f);
  std::fill(db, db + D, 0.f);
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t i = 0; i < D; ++i) {
      dg[i] += pp[2 * c * D + i];
      db[i] += pp[(2 * c + 1) * D + i];
    }
  return ffi::Error::Success();
}

// ---- GroupNorm over NHWC, optionally followed by SiLU, and its gradient ----
// x [B, P, C] (P = H W pixels), C a multiple of 16, G groups of C / G adjacent channels; per image b and group:
// y = act((x - mean) / sqrt(var + eps) gamma + beta), statistics over the group's P C / G values (two-pass).
// Parallel over images; one image's activations (P C floats) stay in L2 across the passes.
struct GroupStats {
  std::vector<float> mean, rstd;  // per channel (the group's value repeated): the vector loops read them by lane
};

GroupStats ImageGroupStats(const float* x, int64_t P, int64_t C, int64_t G, float eps) {
  const int64_t cg = C / G;
  std::vector<float> sum(C, 0.f);
  for (int64_t p = 0; p < P; ++p)
    for (int64_t c = 0; c < C; c += kLanes) Store(sum.data() + c, Load(sum.data() + c) + Load(x + p * C + c));
  GroupStats st{std::vector<float>(C), std::vector<float>(C)};
  const float n = static_cast<float>(P * cg);
  for (int64_t g = 0; g < G; ++g) {
    float s = 0.f;
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) s += sum[c];
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) st.mean[c] = s / n;
  }
  std::fill(sum.begin(), sum.end(), 0.f);
  for (int64_t p = 0; p < P; ++p)
    for (int64_t c = 0; c < C; c += kLanes) {
      const F16 d = Load(x + p * C + c) - Load(st.mean.data() + c);
      Store(sum.data() + c, Load(sum.data() + c) + d * d);
    }
  for (int64_t g = 0; g < G; ++g) {
    float s = 0.f;
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) s += sum[c];
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) st.rstd[c] = 1.f / std::sqrt(s / n + eps);
  }
  return st;
}

inline F16 Sigmoid(F16 z) {  // exp of -|z| only, so nothing overflows
  const F16 e = ExpNonPositive(Select(z < 0.f, z, -z));
  const F16 r = 1.f / (1.f + e);
  return Select(z < 0.f, e * r, r);
}

ffi::Error CheckGroupNorm(ffi::Span<const int64_t> xd, int64_t gamma_n, int64_t beta_n, int64_t groups) {
  if (xd.size() < 2) return ffi::Error::InvalidArgument("gen_jax group_norm: x [B, ..., C] expected");
  const int64_t C = xd[xd.size() - 1];
  if (C % kLanes != 0 || groups <= 0 || C % groups != 0 || gamma_n != C || beta_n != C)
    return ffi::Error::InvalidArgument("gen_jax group_norm: channels must be a multiple of 16 and of the groups, "
                                       "gamma and beta [C]");
  return ffi::Error::Success();
}

ffi::Error GroupNorm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> gamma,
                     ffi::Buffer<ffi::F32> beta, ffi::ResultBuffer<ffi::F32> y, int64_t groups, float eps, bool silu) {
  auto xd = x.dimensions();
  if (auto err = CheckGroupNorm(xd, gamma.element_count(), beta.element_count(), groups); err.failure()) return err;
  const int64_t B = xd[0], C = xd[xd.size() - 1], P = B ? x.element_count() / (B * C) : 0;
  const float* xp = x.typed_data();
  const float* gp = gamma.typed_data();
  const float* bp = beta.typed_data();
  float* yp = y->typed_data();
  ParallelFor(pool, B, [=](int64_t b) {
    const float* xb = xp + b * P * C;
    float* yb = yp + b * P * C;
    const GroupStats st = ImageGroupStats(xb, P, C, groups, eps);
    // per channel: y = x a + d with a = rstd gamma, d = beta - mean a
    std::vector<float> a(C), d(C);
    for (int64_t c = 0; c < C; ++c) {
      a[c] = st.rstd[c] * gp[c];
      d[c] = bp[c] - st.mean[c] * a[c];
    }
    for (int64_t p = 0; p < P; ++p)
      for (int64_t c = 0; c < C; c += kLanes) {
        const F16 z = Load(xb + p * C + c) * Load(a.data() + c) + Load(d.data() + c);
        Store(yb + p * C + c, silu ? z * Sigmoid(z) : z);
      }
  });
  return ffi::Error::Success();
}

// With z = xhat gamma + beta and dz = g act'(z): dgamma = sum dz xhat, dbeta = sum dz (over images and pixels),
// dx = rstd (dxhat - mean_group(dxhat) - xhat mean_group(dxhat xhat)) with dxhat = dz gamma.
ffi::Error GroupNormGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> gamma,
                         ffi::Buffer<ffi::F32> beta, ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dx,
                         ffi::ResultBuffer<ffi::F32> dgamma, ffi::ResultBuffer<ffi::F32> dbeta, int64_t groups,
                         float eps, bool silu) {
  auto xd = x.dimensions();
  if (auto err = CheckGroupNorm(xd, gamma.element_count(), beta.element_count(), groups); err.failure()) return err;
  if (g.element_count() != x.element_count())
    return ffi::Error::InvalidArgument("gen_jax group_norm grad: x and its cotangent differ in size");
  const int64_t B = xd[0], C = xd[xd.size() - 1], P = B ? x.element_count() / (B * C) : 0, cg = C / groups;
  const float* xp = x.typed_data();
  const float* gam = gamma.typed_data();
  const float* bet = beta.typed_data();
  const float* gp = g.typed_data();
  float* dxp = dx->typed_data();
  std::vector<float> partial(2 * B * C, 0.f);  // [B, 2, C]: dgamma, dbeta of each image
  float* pp = partial.data();
  ParallelFor(pool, B, [=](int64_t b) {
    const float* xb = xp + b * P * C;
    const float* gb = gp + b * P * C;
    float* db = dxp + b * P * C;
    float* pg = pp + 2 * b * C;
    float* pb = pg + C;
    const GroupStats st = ImageGroupStats(xb, P, C, groups, eps);
    // dz is kept in the output buffer between the passes
    std::vector<float> s1(C, 0.f), s2(C, 0.f);  // per channel: sum dxhat xhat, sum dxhat
    for (int64_t p = 0; p < P; ++p)
      for (int64_t c = 0; c < C; c += kLanes) {
        const F16 xhat = (Load(xb + p * C + c) - Load(st.mean.data() + c)) * Load(st.rstd.data() + c);
        F16 dz = Load(gb + p * C + c);
        if (silu) {
          const F16 z = xhat * Load(gam + c) + Load(bet + c), sg = Sigmoid(z);
          dz = dz * (sg + z * sg * (1.f - sg));
        }
        Store(db + p * C + c, dz);
        Store(pg + c, Load(pg + c) + dz * xhat);
        Store(pb + c, Load(pb + c) + dz);
        const F16 dxhat = dz * Load(gam + c);
        Store(s1.data() + c, Load(s1.data() + c) + dxhat * xhat);
        Store(s2.data() + c, Load(s2.data() + c) + dxhat);
      }
    const float n = static_cast<float>(P * cg);
    std::vector<float> m1(C), m2(C);
    for (int64_t grp = 0; grp < groups; ++grp) {
      float a = 0.f, c2 = 0.f;
      for (int64_t c = grp * cg; c < (grp + 1) * cg; ++c) a += s1[c], c2 += s2[c];
      for (int64_t c = grp * cg; c < (grp + 1) * cg; ++c) m1[c] = a / n, m2[c] = c2 / n;
    }
    for (int64_t p = 0; p < P; ++p)
      for (int64_t c = 0; c < C; c += kLanes) {
        const F16 rstd = Load(st.rstd.data() + c);
        const F16 xhat = (Load(xb + p * C + c) - Load(st.mean.data() + c)) * rstd;
        const F16 dxhat = Load(db + p * C + c) * Load(gam + c);
        Store(db + p * C + c, rstd * (dxhat - Load(m2.data() + c) - xhat * Load(m1.data() + c)));
      }
  });
  float* dg = dgamma->typed_data();
  float* dbt = dbeta->typed_data();
  std::fill(dg, dg + C, 0.f);
  std::fill(dbt, dbt + C, 0.f);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c) {
      dg[c] += pp[2 * b * C + c];
      dbt[c] += pp[(2 * b + 1) * C + c];
    }
  return ffi::Error::Success();
}

// Checks the shapes; rows() calls fn(row of x, row of mask) for every row, in parallel chunks.
template <typename RowFn>
ffi::Error ForEachSoftmaxRow(ffi::ThreadPool& pool, ffi::Span<const int64_t> xd, ffi::Span<const int64_t> md,
                             RowFn fn) {
  if (xd.size() != 4 || md.size() != 3)
    return ffi::Error::InvalidArgument("gen_jax softmax: scores [B, N, T, S] and mask [B or 1, T or 1, S] expected");
  const int64_t B = xd[0], N = xd[1], T = xd[2], S = xd[3];
  if ((md[0] != B && md[0] != 1) || (md[1] != T && md[1] != 1) || md[2] != S)
    return ffi::Error::InvalidArgument("gen_jax softmax: the mask does not broadcast to the scores");
  const int64_t rows = B * N * T, chunk = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(S, 1));
  const int64_t mB = md[0] == 1 ? 0 : md[1], mT = md[1] == 1 ? 0 : 1;
  ParallelFor(pool, (rows + chunk - 1) / chunk, [=](int64_t c) {
    for (int64_t r = c * chunk, end = std::min(rows, r + chunk); r < end; ++r) {
      const int64_t t = r % T, b = r / (N * T);
      fn(r * S, (b * mB + t * mT) * S, S);
    }
  });
  return ffi::Error::Success();
}

ffi::Error Softmax(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::PRED> mask,
                   ffi::ResultBuffer<ffi::F32> y, float scale) {
  const float* xp = x.typed_data();
  const bool* mp = mask.typed_data();
  float* yp = y->typed_data();
  return ForEachSoftmaxRow(pool, x.dimensions(), mask.dimensions(), [=](int64_t xo, int64_t mo, int64_t S) {
    SoftmaxRow(xp + xo, mp + mo, scale, yp + xo, S);
  });
}

ffi::Error SoftmaxGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> p, ffi::Buffer<ffi::F32> g,
                       ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> dx, float scale) {
  const float* pp = p.typed_data();
  const float* gp = g.typed_data();
  const bool* mp = mask.typed_data();
  float* dp = dx->typed_data();
  return ForEachSoftmaxRow(pool, p.dimensions(), mask.dimensions(), [=](int64_t xo, int64_t mo, int64_t S) {
    SoftmaxGradRow(pp + xo, gp + xo, mp + mo, scale, dp + xo, S);
  });
}

// im2col for a stride-1 "SAME" k x k convolution of NHWC x [B, H, W, C]: rows r0 .. r0+m-1 of the [B H W, k k C]
// patch matrix (row (b, h, w) holds x[b, h+i-p, w+j-p, :] for every tap (i, j), zeros outside the image).
void FillPatches(const float* x, int64_t H, int64_t W, int64_t C, int64_t k, int64_t r0, int64_t m, float* patches) {
  const int64_t p = k / 2, K = k * k * C;
  for (int64_t r = r0; r < r0 + m; ++r) {
    const int64_t b = r / (H * W), h = (r / W) % H, w = r % W;
    float* dst = patches + (r - r0) * K;
    for (int64_t i = 0; i < k; ++i) {
      const int64_t hh = h + i - p;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t ww = w + j - p;
        float* d = dst + (i * k + j) * C;
        if (hh < 0 || hh >= H || ww < 0 || ww >= W)
          std::memset(d, 0, sizeof(float) * C);
        else
          std::memcpy(d, x + ((b * H + hh) * W + ww) * C, sizeof(float) * C);
      }
    }
  }
}

// Rows per patch tile: about 1 MB of patches (L2-sized), a multiple of 16, between 16 and 1024.
int64_t PatchTileRows(int64_t K) {
  return std::min<int64_t>(std::max<int64_t>(16, ((int64_t{1} << 18) / K) / 16 * 16), 1024);
}

// Stride-1 "SAME" k x k convolution (k odd), NHWC x [B, H, W, C], HWIO w [k, k, C, O] -> y [B, H, W, O]:
// im2col in tiles of output rows small enough to stay in L2 (each tile's [m, k k C] patch matrix is built
// and multiplied at once: y[tile] = patches @ w viewed as [k k C, O]), so the patch matrix never goes to memory.
// The input gradient is this convolution of g with the flipped, transposed kernel (built by the caller).
ffi::Error ConvForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y) {
  if (g_sgemm == nullptr) return ffi::Error(ffi::ErrorCode::kFailedPrecondition, "gen_jax cpu_blas: no sgemm set");
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument("gen_jax cpu_blas conv: NHWC input and HWIO kernel expected");
  const int64_t B = xd[0], H = xd[1], W = xd[2], C = xd[3], k = wd[0], O = wd[3];
  if (wd[1] != k || k % 2 != 1 || wd[2] != C || yd[0] != B || yd[1] != H || yd[2] != W || yd[3] != O)
    return ffi::Error::InvalidArgument("gen_jax cpu_blas conv: shapes do not match a stride-1 SAME odd-k conv");
  const int64_t K = k * k * C, rows = B * H * W;
  if (rows == 0 || O == 0) return ffi::Error::Success();
  const int64_t tile = PatchTileRows(K);
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  ParallelFor(pool, (rows + tile - 1) / tile, [=](int64_t t) {
    thread_local std::vector<float> patches;
    patches.resize(tile * K);
    const int64_t r0 = t * tile, m = std::min(tile, rows - r0);
    FillPatches(xp, H, W, C, k, r0, m, patches.data());
    g_sgemm(kRowMajor, kNoTrans, kNoTrans, (int)m, (int)O, (int)K, 1.f, patches.data(), (int)K, wp, (int)O, 0.f,
            yp + r0 * O, (int)O);
  });
  return ffi::Error::Success();
}

// out [k, k, O, C] = w [k, k, C, O] flipped in both spatial axes with C and O swapped: the kernel whose
// SAME convolution of the output gradient is the input gradient. In 32 x 32 blocks, because XLA:CPU's
// transpose of a 256 x 256 plane (1 KB row stride, cache-set conflicts) ran at ~0.3 GB/s.
ffi::Error FlipTransposeKernel(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> out) {
  auto wd = w.dimensions(), od = out->dimensions();
  if (wd.size() != 4 || od.size() != 4 || od[0] != wd[0] || od[1] != wd[1] || od[2] != wd[3] || od[3] != wd[2])
    return ffi::Error::InvalidArgument("gen_jax cpu_blas flip_transpose: [kh, kw, C, O] -> [kh, kw, O, C] expected");
  const int64_t kh = wd[0], kw = wd[1], C = wd[2], O = wd[3];
  const float* wp = w.typed_data();
  float* op = out->typed_data();
  constexpr int64_t kBlock = 32;
  const int64_t taps = kh * kw;
  ParallelFor(pool, taps, [=](int64_t t) {
    const int64_t i = t / kw, j = t % kw;
    const float* src = wp + ((kh - 1 - i) * kw + (kw - 1 - j)) * C * O;  // [C, O]
    float* dst = op + t * O * C;                                        // [O, C]
    for (int64_t c0 = 0; c0 < C; c0 += kBlock)
      for (int64_t o0 = 0; o0 < O; o0 += kBlock) {
        const int64_t c1 = std::min(C, c0 + kBlock), o1 = std::min(O, o0 + kBlock);
        for (int64_t o = o0; o < o1; ++o)
          for (int64_t c = c0; c < c1; ++c) dst[o * C + c] = src[c * O + o];
      }
  });
  return ffi::Error::Success();
}

// One Adam step of one parameter tensor, in place (the results alias p, m, v and the EMA): optax's
// clip_by_global_norm, scale_by_adam, scale_by_learning_rate and apply_updates (and the trainer's EMA), in
// optax's order of operations, in one pass over memory instead of XLA's several fusions and the copies
// its keep-the-old-state-on-a-non-finite-step select forced. scalars = [clip trigger (1: g_norm < max_norm),
// g_norm, max_norm, 1 - b1^t, 1 - b2^t, -learning rate, finite]. A non-finite step leaves everything as it was.
// No FMA contraction, so each product and sum rounds like XLA's separate operations.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
void AdamChunk(const float* __restrict p, const float* __restrict g, const float* __restrict m,
               const float* __restrict v, int64_t n, float* po, float* mo, float* vo, float g_norm,
               float max_norm, bool trigger, float b1, float one_minus_b1, float b2, float one_minus_b2, float bc1,
               float bc2, float step, float eps, float eps_root) {
  for (int64_t i = 0; i < n; ++i) {
    const float gi = trigger ? g[i] : (g[i] / g_norm) * max_norm;
    const float mi = one_minus_b1 * gi + b1 * m[i];
    const float vi = one_minus_b2 * (gi * gi) + b2 * v[i];
    const float u = (mi / bc1) / (__builtin_sqrtf(vi / bc2 + eps_root) + eps);
    po[i] = p[i] + u * step;
    mo[i] = mi;
    vo[i] = vi;
  }
}

void EmaChunk(const float* __restrict p, const float* e, int64_t n, float* eo, float decay, float one_minus_decay) {
  for (int64_t i = 0; i < n; ++i) eo[i] = decay * e[i] + one_minus_decay * p[i];
}

ffi::Error AdamStepImpl(ffi::ThreadPool& pool, const float* p, const float* g, const float* m, const float* v,
                        const float* e, const float* sc, int64_t n, float* po, float* mo, float* vo, float* eo,
                        float b1, float one_minus_b1, float b2, float one_minus_b2, float eps, float eps_root,
                        float ema_decay, float one_minus_ema_decay) {
  const bool trigger = sc[0] != 0.f, finite = sc[6] != 0.f;
  const float g_norm = sc[1], max_norm = sc[2], bc1 = sc[3], bc2 = sc[4], step = sc[5];
  if (!finite) {  // keep the last good state (copy only where XLA did not alias the buffers)
    if (po != p) std::memcpy(po, p, sizeof(float) * n);
    if (mo != m) std::memcpy(mo, m, sizeof(float) * n);
    if (vo != v) std::memcpy(vo, v, sizeof(float) * n);
    if (e != nullptr && eo != e) std::memcpy(eo, e, sizeof(float) * n);
    return ffi::Error::Success();
  }
  constexpr int64_t kChunk = 1 << 14;  // 64 KB per stream: the EMA pass rereads the new parameters from L2
  ParallelFor(pool, (n + kChunk - 1) / kChunk, [=](int64_t c) {
    const int64_t i0 = c * kChunk, len = std::min(n, i0 + kChunk) - i0;
    AdamChunk(p + i0, g + i0, m + i0, v + i0, len, po + i0, mo + i0, vo + i0, g_norm, max_norm, trigger, b1,
              one_minus_b1, b2, one_minus_b2, bc1, bc2, step, eps, eps_root);
    if (e != nullptr) EmaChunk(po + i0, e + i0, len, eo + i0, ema_decay, one_minus_ema_decay);
  });
  return ffi::Error::Success();
}
#pragma GCC pop_options

ffi::Error CheckAdam(std::initializer_list<int64_t> sizes, int64_t scalars) {
  const int64_t n = *sizes.begin();
  for (int64_t s : sizes)
    if (s != n) return ffi::Error::InvalidArgument("gen_jax cpu adam_step: parameter, gradient and state sizes differ");
  if (scalars != 7) return ffi::Error::InvalidArgument("gen_jax cpu adam_step: 7 scalars expected");
  return ffi::Error::Success();
}

ffi::Error AdamStep(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> p, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> m,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> sc, ffi::ResultBuffer<ffi::F32> po,
                    ffi::ResultBuffer<ffi::F32> mo, ffi::ResultBuffer<ffi::F32> vo, float b1, float one_minus_b1,
                    float b2, float one_minus_b2, float eps, float eps_root) {
  auto err = CheckAdam({(int64_t)p.element_count(), (int64_t)g.element_count(), (int64_t)m.element_count(),
                        (int64_t)v.element_count(), (int64_t)po->element_count(), (int64_t)mo->element_count(),
                        (int64_t)vo->element_count()}, (int64_t)sc.element_count());
  if (!err.success()) return err;
  return AdamStepImpl(pool, p.typed_data(), g.typed_data(), m.typed_data(), v.typed_data(), nullptr,
                      sc.typed_data(), (int64_t)p.element_count(), po->typed_data(), mo->typed_data(),
                      vo->typed_data(), nullptr, b1, one_minus_b1, b2, one_minus_b2, eps, eps_root, 0.f, 0.f);
}

ffi::Error AdamStepEma(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> p, ffi::Buffer<ffi::F32> g,
                       ffi::Buffer<ffi::F32> m, ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> e,
                       ffi::Buffer<ffi::F32> sc, ffi::ResultBuffer<ffi::F32> po, ffi::ResultBuffer<ffi::F32> mo,
                       ffi::ResultBuffer<ffi::F32> vo, ffi::ResultBuffer<ffi::F32> eo, float b1,
                       float one_minus_b1, float b2, float one_minus_b2, float eps, float eps_root,
                       float ema_decay, float one_minus_ema_decay) {
  auto err = CheckAdam({(int64_t)p.element_count(), (int64_t)g.element_count(), (int64_t)m.element_count(),
                        (int64_t)v.element_count(), (int64_t)e.element_count(), (int64_t)po->element_count(),
                        (int64_t)mo->element_count(), (int64_t)vo->element_count(), (int64_t)eo->element_count()},
                       (int64_t)sc.element_count());
  if (!err.success()) return err;
  return AdamStepImpl(pool, p.typed_data(), g.typed_data(), m.typed_data(), v.typed_data(), e.typed_data(),
                      sc.typed_data(), (int64_t)p.element_count(), po->typed_data(), mo->typed_data(),
                      vo->typed_data(), eo->typed_data(), b1, one_minus_b1, b2, one_minus_b2, eps, eps_root,
                      ema_decay, one_minus_ema_decay);
}

// Kernel gradient of a stride-1 "SAME" k x k convolution (k odd), NHWC x / g, HWIO dw, through im2col:
// dw [k k C, O] = sum over row tiles of patches^T g,
// each contiguous range of output rows accumulated by one worker (its own [k k C, O] sum), the ranges' sums
// added in order at the end.
ffi::Error ConvKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                                ffi::ResultBuffer<ffi::F32> dw) {
  if (g_sgemm == nullptr) return ffi::Error(ffi::ErrorCode::kFailedPrecondition, "gen_jax cpu_blas: no sgemm set");
  auto xd = x.dimensions(), gd = g.dimensions(), wd = dw->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || wd.size() != 4)
    return ffi::Error::InvalidArgument("gen_jax cpu_blas conv: NHWC input/gradient and HWIO kernel expected");
  const int64_t B = xd[0], H = xd[1], W = xd[2], C = xd[3], O = gd[3], k = wd[0];
  if (wd[1] != k || k % 2 != 1 || wd[2] != C || wd[3] != O || gd[0] != B || gd[1] != H || gd[2] != W)
    return ffi::Error::InvalidArgument("gen_jax cpu_blas conv: shapes do not match a stride-1 SAME odd-k conv");
  const int64_t K = k * k * C, rows = B * H * W;
  float* out = dw->typed_data();
  std::fill(out, out + K * O, 0.f);
  if (rows == 0) return ffi::Error::Success();
  const int64_t tile = PatchTileRows(K);
  const int64_t workers = std::min<int64_t>(pool.num_threads() + 1, (rows + tile - 1) / tile);
  const int64_t span = (rows + workers - 1) / workers;
  std::vector<float> sums(workers > 1 ? (workers - 1) * K * O : 0);
  const float* xp = x.typed_data();
  const float* gp = g.typed_data();
  ParallelFor(pool, workers, [&](int64_t wk) {
    float* acc = wk == 0 ? out : sums.data() + (wk - 1) * K * O;
    std::vector<float> patches(tile * K);
    bool first = true;
    for (int64_t r0 = wk * span, end = std::min(rows, (wk + 1) * span); r0 < end; r0 += tile) {
      const int64_t m = std::min(tile, end - r0);
      FillPatches(xp, H, W, C, k, r0, m, patches.data());
      g_sgemm(kRowMajor, kTrans, kNoTrans, (int)K, (int)O, (int)m, 1.f, patches.data(), (int)K, gp + r0 * O, (int)O,
              first ? 0.f : 1.f, acc, (int)O);
      first = false;
    }
  });
  for (int64_t wk = 1; wk < workers; ++wk)
    for (int64_t i = 0; i < K * O; ++i) out[i] += sums[(wk - 1) * K * O + i];
  return ffi::Error::Success();
}

// Direct stride-1 "SAME" k x k convolution for narrow layers (O = 16 OV output channels, OV <= 4): each image is
// copied zero-padded into a thread-local buffer; for a block of PB output pixels the PB x OV accumulator vectors
// stay in registers while every tap and input channel adds x (broadcast) times the kernel's O-vector.
template <int OV, int PB>
void DirectConvImage(const float* xpad, const float* w, float* y, int64_t H, int64_t W, int64_t C, int64_t k) {
  const int64_t Wp = W + k - 1, O = OV * kLanes;
  for (int64_t h = 0; h < H; ++h) {
    int64_t w0 = 0;
    for (; w0 < W; w0 += PB) {
      const int64_t pb_n = std::min<int64_t>(PB, W - w0);
      F16 acc[PB][OV] = {};
      for (int64_t i = 0; i < k; ++i)
        for (int64_t j = 0; j < k; ++j) {
          const float* xrow = xpad + ((h + i) * Wp + w0 + j) * C;
          const float* wt = w + (i * k + j) * C * O;
          for (int64_t c = 0; c < C; ++c) {
            F16 wv[OV];
            for (int v = 0; v < OV; ++v) wv[v] = Load(wt + c * O + v * kLanes);
            for (int pb = 0; pb < PB; ++pb) {
              const float xs = xrow[pb * C + c];  // past the row end only in padding or the next row: unused
              for (int v = 0; v < OV; ++v) acc[pb][v] += xs * wv[v];
            }
          }
        }
      for (int64_t pb = 0; pb < pb_n; ++pb)
        for (int v = 0; v < OV; ++v) Store(y + (h * W + w0 + pb) * O + v * kLanes, acc[pb][v]);
    }
  }
}

ffi::Error DirectConv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument("gen_jax direct conv: NHWC input and HWIO kernel expected");
  const int64_t B = xd[0], H = xd[1], W = xd[2], C = xd[3], k = wd[0], O = wd[3];
  if (wd[1] != k || k % 2 != 1 || wd[2] != C || yd[0] != B || yd[1] != H || yd[2] != W || yd[3] != O)
    return ffi::Error::InvalidArgument("gen_jax direct conv: shapes do not match a stride-1 SAME odd-k conv");
  if (O % kLanes != 0 || O > 4 * kLanes)
    return ffi::Error::InvalidArgument("gen_jax direct conv: output channels must be 16, 32, 48 or 64");
  const int64_t p = k / 2, Hp = H + 2 * p, Wp = W + 2 * p;
  constexpr int kPB = 8;
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  ParallelFor(pool, B, [=](int64_t b) {
    thread_local std::vector<float> xpad;
    // kPB extra pixels: the last block of a row may read past the row's end (those sums are not stored)
    xpad.assign((Hp * Wp + kPB) * C, 0.f);
    for (int64_t h = 0; h < H; ++h)
      std::memcpy(xpad.data() + ((h + p) * Wp + p) * C, xp + (b * H + h) * W * C, sizeof(float) * W * C);
    float* yb = yp + b * H * W * O;
    switch (O / kLanes) {
      case 1: DirectConvImage<1, kPB>(xpad.data(), wp, yb, H, W, C, k); break;
      case 2: DirectConvImage<2, kPB>(xpad.data(), wp, yb, H, W, C, k); break;
      case 3: DirectConvImage<3, kPB>(xpad.data(), wp, yb, H, W, C, k); break;
      default: DirectConvImage<4, kPB>(xpad.data(), wp, yb, H, W, C, k); break;
    }
  });
  return ffi::Error::Success();
}

}  // namespace

extern "C" void gen_jax_cpu_blas_set_sgemm(void* sgemm) { g_sgemm = reinterpret_cast<Sgemm>(sgemm); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(GenJaxGemmF32, Gemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GenJaxConvKernelGradF32, ConvKernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GenJaxSoftmaxF32, Softmax,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GenJaxSoftmaxGradF32, SoftmaxGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GenJaxLayerNormF32, LayerNorm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GenJaxLayerNormGradF32, LayerNormGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GenJaxGroupNormF32, GroupNorm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("groups")
                                  .Attr<float>("eps")
                                  .Attr<bool>("silu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GenJaxGroupNormGradF32, GroupNormGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("groups")
                                  .Attr<float>("eps")
                                  .Attr<bool>("silu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GenJaxConvForwardF32, ConvForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GenJaxDirectConvF32, DirectConv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());


XLA_FFI_DEFINE_HANDLER_SYMBOL(GenJaxFlipTransposeKernelF32, FlipTransposeKernel,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GenJaxAdamStepF32, AdamStep,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("b1")
                                  .Attr<float>("one_minus_b1")
                                  .Attr<float>("b2")
                                  .Attr<float>("one_minus_b2")
                                  .Attr<float>("eps")
                                  .Attr<float>("eps_root"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GenJaxAdamStepEmaF32, AdamStepEma,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("b1")
                                  .Attr<float>("one_minus_b1")
                                  .Attr<float>("b2")
                                  .Attr<float>("one_minus_b2")
                                  .Attr<float>("eps")
                                  .Attr<float>("eps_root")
                                  .Attr<float>("ema_decay")
                                  .Attr<float>("one_minus_ema_decay"));
