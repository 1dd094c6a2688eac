// Native CPU kernels of the adder convolution, as XLA FFI handlers.
//
// Both are written like an SGEMM micro-kernel: a tile of MR output pixels
// (consecutive along a row) by one or two vectors of channels is held in
// vector registers while the reduction streams through it, reading the input
// in place (implicit im2col: per reduction element, one offset into the
// padded input). The layers' rows are shared out over XLA's intra-op threads.
//
// Forward, with the max trick |a - b| = 2 max(a, b) - a - b:
//   Y[p, o] = -(2 sum_k max(X[p, k], F[k, o]) - SX[p] - SF[o])
// where SX (sum of each patch) and SF (sum of each filter) are summed here, in a
// fixed order, so that a pixel's output does not depend on the batch or on how
// XLA fuses the surrounding program: one vmaxps and one vaddps per pair instead
// of a subtract, an abs and an add.
//
// Input gradient, full precision, any stride (gathered: no scatter, no atomics):
//   dX[y, x, c] = sum_{i, j, o} G[oy, ox, o] * clip(F[i, j, c, o] - X[y, x, c], -1, 1)
//   oy = (y + top - i dh) / sh,  ox = (x + left - j dw) / sw
// over the taps where both divisions are exact and (oy, ox) is an output. A row y
// keeps the taps i whose oy is one; its pixels are split into sw column phases
// x = px + sw n, which share the taps j and read consecutive columns of G, so a
// tile of a phase is a GEMM-like tile over its list of taps. G's columns are
// padded by the caller so that every column a phase reads exists (zeros outside).
// At stride 1 there is one phase with every tap j.
//
// Layouts (prepared by adderjax/ops/cpu_native.py):
//   forward:    xp (B, Hp, Wp, C) padded input; wt (G, K, Opad) with
//               K = kh*kw*Cg in (i, j, c) order and Opad a multiple of the
//               vector width (zero columns); y (B, Ho, Wo, G*Og).
//   input grad: x (B, H, W, C); gp (B, Ho, g_left + (W - 1 + left) / sw + 1, G*Og),
//               G with g_left zero columns before its first (cropped or
//               padded with zeros after its last); wt (G, kh, kw, Og, Cpad),
//               Cpad a multiple of the vector width (zero columns); dx (B, H, W, C).

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
struct Vec {
  using T = __m512;
  using Mask = __mmask16;
  static constexpr int kWidth = 16;
  static T zero() { return _mm512_setzero_ps(); }
  static T set1(float a) { return _mm512_set1_ps(a); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static T load(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static void store(float* p, T v, Mask m) { _mm512_mask_storeu_ps(p, m, v); }
  static Mask mask(int64_t n) {
    return n >= kWidth ? Mask(0xFFFF) : Mask((1u << n) - 1u);
  }
  static T max(T a, T b) { return _mm512_max_ps(a, b); }
  static T min(T a, T b) { return _mm512_min_ps(a, b); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static T fmadd(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(T a) { return _mm512_reduce_add_ps(a); }
};
#elif defined(__AVX2__) && defined(__FMA__)
struct Vec {
  using T = __m256;
  using Mask = __m256i;
  static constexpr int kWidth = 8;
  static T zero() { return _mm256_setzero_ps(); }
  static T set1(float a) { return _mm256_set1_ps(a); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static T load(const float* p, Mask m) { return _mm256_maskload_ps(p, m); }
  static void store(float* p, T v, Mask m) { _mm256_maskstore_ps(p, m, v); }
  static Mask mask(int64_t n) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(std::min<int64_t>(n, kWidth))), lanes);
  }
  static T max(T a, T b) { return _mm256_max_ps(a, b); }
  static T min(T a, T b) { return _mm256_min_ps(a, b); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static T fmadd(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(T a) {
    const __m128 half = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(quarter, _mm_shuffle_ps(quarter, quarter, 1)));
  }
};
#else
#error "adderjax's native kernels need AVX2 and FMA, or AVX-512"
#endif

using V = typename Vec::T;
constexpr int kMR = 8;  // Output pixels per tile: 8 x 2 vectors = 16 accumulators.

// Runs fn(item) for item in [0, total) on the calling thread and the pool.
// Work is claimed from a shared counter; the caller waits only for items
// claimed by running threads, so a helper that never starts cannot block it,
// and one that starts late finds nothing left and touches no buffer.
template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t total, const Fn& fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), total) - 1;
  const Fn* body = &fn;
  auto work = [state, body, total]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < total;) {
      (*body)(i);
      if (state->done.fetch_add(1) + 1 == total) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([work]() { work(); });
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == total; });
}

struct ForwardGeometry {
  int64_t hp, wp, c, ho, wo, groups, cg, og, opad, kh, kw, sh, sw, dh, dw;
};

// One tile: MR pixels x NV vectors of output channels.
template <int MR, int NV>
inline void ForwardTile(const float* x, int64_t x_step, const int64_t* offsets, int64_t k_size,
                        const float* w, int64_t w_row, const float* sx, const float* sf,
                        float* y, int64_t y_step, int64_t valid) {
  V acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = Vec::zero();
  for (int64_t k = 0; k < k_size; ++k) {
    const float* xk = x + offsets[k];
    const float* wk = w + k * w_row;
    V wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = Vec::load(wk + v * Vec::kWidth);
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const V xv = Vec::set1(xk[m * x_step]);
      for (int v = 0; v < NV; ++v) acc[m][v] = Vec::add(acc[m][v], Vec::max(xv, wv[v]));
    }
  }
  const V two = Vec::set1(2.0f);
  for (int m = 0; m < MR; ++m) {
    const V patch = Vec::set1(sx[m]);
    for (int v = 0; v < NV; ++v) {
      const int64_t left = valid - v * Vec::kWidth;
      if (left <= 0) break;
      // -(2 acc - SX - SF) = SX + SF - 2 acc
      const V out = Vec::sub(Vec::add(patch, Vec::load(sf + v * Vec::kWidth)),
                             Vec::fmadd(two, acc[m][v], Vec::zero()));
      Vec::store(y + m * y_step + v * Vec::kWidth, out, Vec::mask(left));
    }
  }
}

template <int NV>
void ForwardTileAnyMR(int mr, const float* x, int64_t x_step, const int64_t* offsets,
                      int64_t k_size, const float* w, int64_t w_row, const float* sx,
                      const float* sf, float* y, int64_t y_step, int64_t valid) {
#define ADDERJAX_MR_CASE(R)                                                                \
  case R:                                                                                  \
    ForwardTile<R, NV>(x, x_step, offsets, k_size, w, w_row, sx, sf, y, y_step, valid);    \
    return;
  switch (mr) {
    ADDERJAX_MR_CASE(1) ADDERJAX_MR_CASE(2) ADDERJAX_MR_CASE(3) ADDERJAX_MR_CASE(4)
    ADDERJAX_MR_CASE(5) ADDERJAX_MR_CASE(6) ADDERJAX_MR_CASE(7) ADDERJAX_MR_CASE(8)
  }
#undef ADDERJAX_MR_CASE
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xp, ffi::Buffer<ffi::F32> wt,
                       ffi::ResultBuffer<ffi::F32> y, int64_t kh, int64_t kw, int64_t sh,
                       int64_t sw, int64_t dh, int64_t dw, int64_t groups) {
  const auto xd = xp.dimensions(), wd = wt.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || wd.size() != 3 || yd.size() != 4)
    return ffi::Error::InvalidArgument("adderjax_adder_forward: bad ranks");
  ForwardGeometry g{xd[1], xd[2], xd[3], yd[1], yd[2], groups, xd[3] / groups,
                    yd[3] / groups, wd[2], kh, kw, sh, sw, dh, dw};
  const int64_t batch = xd[0], k_size = wd[1];
  if (k_size != kh * kw * g.cg || wd[0] != groups || g.opad % Vec::kWidth)
    return ffi::Error::InvalidArgument("adderjax_adder_forward: bad filter layout");
  std::vector<int64_t> offsets(k_size);
  for (int64_t i = 0, k = 0; i < kh; ++i)
    for (int64_t j = 0; j < kw; ++j)
      for (int64_t c = 0; c < g.cg; ++c, ++k) offsets[k] = (i * dh * g.wp + j * dw) * g.c + c;
  const float* x_data = xp.typed_data();
  const float* w_data = wt.typed_data();
  float* y_data = y->typed_data();
  // SF: each filter's sum, in k order.
  std::vector<float> sf(groups * g.opad, 0.0f);
  for (int64_t grp = 0; grp < groups; ++grp)
    for (int64_t k = 0; k < k_size; ++k)
      for (int64_t n = 0; n < g.opad; ++n)
        sf[grp * g.opad + n] += w_data[(grp * k_size + k) * g.opad + n];
  const int64_t x_step = sw * g.c, out_c = groups * g.og;
  const int64_t tile_n = 2 * Vec::kWidth;
  const auto tail = Vec::mask(g.cg % Vec::kWidth == 0 ? Vec::kWidth : g.cg % Vec::kWidth);
  auto row = [&](int64_t item) {
    const int64_t b = item / g.ho, r = item % g.ho;
    std::vector<float> sx(g.wo);
    for (int64_t grp = 0; grp < groups; ++grp) {
      const float* x_row = x_data + (b * g.hp + r * sh) * g.wp * g.c + grp * g.cg;
      // SX: each patch's sum, taps in order, channels a vector at a time.
      for (int64_t p = 0; p < g.wo; ++p) {
        V acc = Vec::zero();
        for (int64_t i = 0; i < kh; ++i)
          for (int64_t j = 0; j < kw; ++j) {
            const float* px = x_row + (i * dh * g.wp + p * sw + j * dw) * g.c;
            int64_t c0 = 0;
            for (; c0 + Vec::kWidth <= g.cg; c0 += Vec::kWidth)
              acc = Vec::add(acc, Vec::load(px + c0));
            if (c0 < g.cg) acc = Vec::add(acc, Vec::load(px + c0, tail));
          }
        sx[p] = Vec::sum(acc);
      }
      for (int64_t n0 = 0; n0 < g.og; n0 += tile_n) {
        const int64_t valid = std::min(tile_n, g.og - n0);
        const float* w = w_data + grp * k_size * g.opad + n0;
        const float* sf_ = sf.data() + grp * g.opad + n0;
        for (int64_t c0 = 0; c0 < g.wo; c0 += kMR) {
          const int mr = int(std::min<int64_t>(kMR, g.wo - c0));
          const float* x = x_row + c0 * sw * g.c;
          float* y_ = y_data + ((b * g.ho + r) * g.wo + c0) * out_c + grp * g.og + n0;
          if (valid > Vec::kWidth)
            ForwardTileAnyMR<2>(mr, x, x_step, offsets.data(), k_size, w, g.opad, sx.data() + c0,
                                sf_, y_, out_c, valid);
          else
            ForwardTileAnyMR<1>(mr, x, x_step, offsets.data(), k_size, w, g.opad, sx.data() + c0,
                                sf_, y_, out_c, valid);
        }
      }
    }
  };
  ParallelFor(pool, batch * g.ho, row);
  return ffi::Error::Success();
}

// An input-gradient tap as offsets from a tile's base: into the filters (tap (i, j)) and into
// G (the output row and column its first pixel feeds).
struct InputGradTap {
  int64_t w, g;
};

// One tile of the input gradient: MR pixels x NV vectors of input channels, summed over the
// taps the tile's pixels feed through (the same for all of them; pixel m's output is
// g_step further along G than pixel m-1's).
template <int MR, int NV>
inline void InputGradTile(const float* x, int64_t x_step, int64_t valid, const float* g,
                          int64_t g_step, const float* w, int64_t w_row,
                          const InputGradTap* taps, int64_t n_taps, int64_t og, float* dx) {
  typename Vec::Mask masks[NV];
  for (int v = 0; v < NV; ++v) masks[v] = Vec::mask(valid - v * Vec::kWidth);
  V xv[MR][NV], acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) {
      xv[m][v] = Vec::load(x + m * x_step + v * Vec::kWidth, masks[v]);
      acc[m][v] = Vec::zero();
    }
  const V lo = Vec::set1(-1.0f), hi = Vec::set1(1.0f);
  for (int64_t t = 0; t < n_taps; ++t) {
    const float* gs = g + taps[t].g;
    const float* ws = w + taps[t].w;
    for (int64_t o = 0; o < og; ++o) {
      V wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = Vec::load(ws + o * w_row + v * Vec::kWidth);
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) {
        const V gv = Vec::set1(gs[m * g_step + o]);
        for (int v = 0; v < NV; ++v) {
          const V d = Vec::min(Vec::max(Vec::sub(wv[v], xv[m][v]), lo), hi);
          acc[m][v] = Vec::fmadd(gv, d, acc[m][v]);
        }
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) Vec::store(dx + m * x_step + v * Vec::kWidth, acc[m][v], masks[v]);
}

// Pixel tiles: 8 for one vector of channels, 6 for two (acc and inputs fill the registers).
template <int NV>
constexpr int kInputGradMR = NV == 1 ? 8 : 6;

template <int NV>
void InputGradTileAnyMR(int mr, const float* x, int64_t x_step, int64_t valid, const float* g,
                        int64_t g_step, const float* w, int64_t w_row, const InputGradTap* taps,
                        int64_t n_taps, int64_t og, float* dx) {
#define ADDERJAX_MR_CASE(R)                                                                 \
  case R:                                                                                   \
    if constexpr (R <= kInputGradMR<NV>)                                                    \
      InputGradTile<R, NV>(x, x_step, valid, g, g_step, w, w_row, taps, n_taps, og, dx);    \
    return;
  switch (mr) {
    ADDERJAX_MR_CASE(1) ADDERJAX_MR_CASE(2) ADDERJAX_MR_CASE(3) ADDERJAX_MR_CASE(4)
    ADDERJAX_MR_CASE(5) ADDERJAX_MR_CASE(6) ADDERJAX_MR_CASE(7) ADDERJAX_MR_CASE(8)
  }
#undef ADDERJAX_MR_CASE
}

ffi::Error InputGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                         ffi::Buffer<ffi::F32> gp, ffi::Buffer<ffi::F32> wt,
                         ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw, int64_t dh,
                         int64_t dw, int64_t top, int64_t left, int64_t g_left,
                         int64_t groups) {
  const auto xd = x.dimensions(), gd = gp.dimensions(), wd = wt.dimensions();
  if (xd.size() != 4 || gd.size() != 4 || wd.size() != 5)
    return ffi::Error::InvalidArgument("adderjax_adder_input_grad: bad ranks");
  const int64_t batch = xd[0], h = xd[1], w = xd[2], c = xd[3];
  const int64_t kh = wd[1], kw = wd[2], og = wd[3], cpad = wd[4], cg = c / groups;
  const int64_t ho = gd[1], wg = gd[2], out_c = gd[3];
  if (sh < 1 || sw < 1 || gd[0] != batch || wd[0] != groups || out_c != groups * og ||
      cpad % Vec::kWidth || cpad < cg)
    return ffi::Error::InvalidArgument("adderjax_adder_input_grad: bad operand layout");
  // Column phases: the pixels x = px + sw n (n = 0, 1, ...) all feed through the same taps j,
  // those with sw | px + left - j dw, pixel n to output column n + q, q = (px + left - j dw) / sw,
  // which is column n + q + g_left of G (zeros outside the output).
  const int64_t phases = std::min(sw, w);
  std::vector<std::vector<std::pair<int64_t, int64_t>>> column_taps(phases);  // (j, q + g_left)
  for (int64_t px = 0; px < phases; ++px) {
    const int64_t last = (w - 1 - px) / sw;
    for (int64_t j = 0; j < kw; ++j) {
      const int64_t a = px + left - j * dw;
      if (a % sw) continue;
      const int64_t column = a / sw + g_left;
      if (column < 0 || column + last >= wg)
        return ffi::Error::InvalidArgument("adderjax_adder_input_grad: G is not padded enough");
      column_taps[px].emplace_back(j, column);
    }
  }
  const float* x_data = x.typed_data();
  const float* g_data = gp.typed_data();
  const float* w_data = wt.typed_data();
  float* dx_data = dx->typed_data();
  auto row = [&](int64_t item) {
    const int64_t b = item / h, r = item % h;
    std::vector<InputGradTap> taps;
    taps.reserve(kh * kw);
    for (int64_t px = 0; px < phases; ++px) {
      // Row r feeds output row (r + top - i dh) / sh through tap i where that is exact and an
      // output row.
      taps.clear();
      for (int64_t i = 0; i < kh; ++i) {
        const int64_t a = r + top - i * dh;
        if (a < 0 || a % sh || a / sh >= ho) continue;
        for (const auto& [j, column] : column_taps[px])
          taps.push_back({(i * kw + j) * og * cpad, ((b * ho + a / sh) * wg + column) * out_c});
      }
      const int64_t n_taps = int64_t(taps.size()), pixels = (w - 1 - px) / sw + 1;
      for (int64_t grp = 0; grp < groups; ++grp) {
        for (int64_t c0 = 0; c0 < cg;) {
          // Two vectors of channels per tile where at least two remain: one broadcast of G
          // serves both.
          const bool two = cg - c0 > Vec::kWidth;
          const int64_t tile_c = two ? 2 * Vec::kWidth : Vec::kWidth;
          const int64_t mr_max = two ? kInputGradMR<2> : kInputGradMR<1>;
          const int64_t valid = std::min(tile_c, cg - c0);
          const float* wgrp = w_data + grp * kh * kw * og * cpad + c0;
          for (int64_t n0 = 0; n0 < pixels; n0 += mr_max) {
            const int mr = int(std::min<int64_t>(mr_max, pixels - n0));
            const int64_t at = ((b * h + r) * w + px + sw * n0) * c + grp * cg + c0;
            const float* gs = g_data + n0 * out_c + grp * og;
            if (two)
              InputGradTileAnyMR<2>(mr, x_data + at, sw * c, valid, gs, out_c, wgrp, cpad,
                                    taps.data(), n_taps, og, dx_data + at);
            else
              InputGradTileAnyMR<1>(mr, x_data + at, sw * c, valid, gs, out_c, wgrp, cpad,
                                    taps.data(), n_taps, og, dx_data + at);
          }
          c0 += tile_c;
        }
      }
    }
  };
  ParallelFor(pool, batch * h, row);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdderjaxAdderForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("dh")
                                  .Attr<int64_t>("dw")
                                  .Attr<int64_t>("groups"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdderjaxAdderInputGrad, InputGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("dh")
                                  .Attr<int64_t>("dw")
                                  .Attr<int64_t>("top")
                                  .Attr<int64_t>("left")
                                  .Attr<int64_t>("g_left")
                                  .Attr<int64_t>("groups"));

extern "C" int AdderjaxVectorWidth() { return Vec::kWidth; }
