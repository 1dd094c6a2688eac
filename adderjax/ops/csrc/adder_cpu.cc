// Native CPU kernels of the adder convolution, as XLA FFI handlers.
//
// All are written like an SGEMM micro-kernel: a tile of outputs is held in
// vector registers while the reduction streams through it, reading the input
// in place (implicit im2col: per reduction element, one offset into the
// input; the zero padding is read in place, never written out by XLA). The
// forward and the input gradient tile MR pixels (consecutive along a row) by one
// or two vectors of channels and share the
// rows out over XLA's intra-op threads; the weight gradient tiles output
// channels by (filter column, channel vector) pairs, reduces over the pixels,
// and shares out the tiles (and, for small layers, chunks of the batch).
//
// Tile sizes (a vector is 16 floats with AVX-512, 32 registers; 8 with AVX2, 16 registers):
//   forward:      kMR = 8 (AVX-512) or 6 (AVX2) pixels x 1 or 2 vectors of output channels, a
//                 row's last tile taking a remainder up to kMaxMR = 8 pixels;
//   forward, pixels in the lanes (AVX-512 only, or -DADDERJAX_PIXEL_LANES=1 for the tests;
//                 stride 1, at most one vector of output channels per group, rows of at least
//                 2 vectors of pixels): kPixelMR = 8 output channels (the filter broadcast) x
//                 kPixelNP = 2 vectors of consecutive pixels, read from the rows transposed to
//                 (row, channel, column), so a small layer does not spend a broadcast per max;
//   input grad:   kInputGradMR = 8 pixels x 1 vector, or 6 x 2 vectors, of input channels; with
//                 AVX2 the bounds tiles, kInputGradBoundsMR = 4 x 1 or 2 x 2 (below);
//   weight grad:  kWeightGradMR = 8 (AVX-512) or 4 (AVX2) output channels x 3 vectors of input
//                 channels.
//
// Forward, with the max trick |a - b| = 2 max(a, b) - a - b:
//   Y[p, o] = -(2 sum_k max(X[p, k], F[k, o]) - SX[p] - SF[o])
// where SX (sum of each patch) and SF (sum of each filter) are summed here, in a
// fixed order, so that a pixel's output does not depend on the batch or on how
// XLA fuses the surrounding program: one vmaxps and one vaddps per pair instead
// of a subtract, an abs and an add (with AVX2 the add is a multiply-add by one,
// on pipes of its own: Vec::accumulate). Where that is not finite (an infinite input
// gives inf - inf, a huge one overflows 2 max) each tile's epilogue notices and
// sums those outputs again as -sum |X - F| (FixNonFinite), which is what the XLA
// loops give: -inf for an infinity, NaN only for a NaN input or inf - inf in a term.
//
// Input gradient, full precision, any stride (gathered: no scatter, no atomics):
//   dX[y, x, c] = sum_{i, j, o} G[oy, ox, o] * clip(F[i, j, c, o] - X[y, x, c], -1, 1)
//   oy = (y + top - i dh) / sh,  ox = (x + left - j dw) / sw
// over the taps where both divisions are exact and (oy, ox) is an output. A row y
// keeps the taps i whose oy is one; its pixels are split into sw column phases
// x = px + sw n, which share the taps j and read consecutive columns of G, so a
// tile of a phase is a GEMM-like tile over its list of taps. G's columns are
// padded by the caller so that every column a phase reads exists (zeros outside).
// At stride 1 there is one phase with every tap j. With AVX2 a tile whose inputs
// are all small sums clip(F, X - 1, X + 1) - X instead (InputGradBoundsTile).
//
// Weight gradient, full precision (any stride and dilation):
//   dW[i, j, c, o] = sum_{b, y, x} G[y, x, o] * (Xp[y sh + i dh, x sw + j dw, c] - F[i, j, c, o])
// (Xp: the input with its zero padding)
// as sum G Xp (fused multiply-adds) less F sum G, summed an image at a time.
//
// Layouts (prepared by adderjax/ops/cpu_native.py):
//   forward:    x (B, H, W, C); wt (G, K, Opad) with
//               K = kh*kw*Cg in (i, j, c) order and Opad a multiple of the
//               vector width (zero columns); y (B, Ho, Wo, G*Og).
//   input grad: x (B, H, W, C); gp (B, Ho, g_left + (W - 1 + left) / sw + 1, G*Og),
//               G with g_left zero columns before its first (cropped or
//               padded with zeros after its last); wt (G, kh, kw, Og, Cpad),
//               Cpad a multiple of the vector width (zero columns); dx (B, H, W, C).
//   weight grad: x (B, H, W, C); g (B, Ho, Wo, G*Og); wt and dwt (G, kh, kw, Og, Cpad).

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel_for.h"


namespace ffi = xla::ffi;
using adderjax::ChunksToFill;
using adderjax::ParallelFor;

namespace {

#if defined(__AVX512F__)
struct Vec {
  using T = __m512;
  using Mask = __mmask16;
  static constexpr int kWidth = 16;
  static constexpr int kRegisters = 32;
  static T zero() { return _mm512_setzero_ps(); }
  static T set1(float a) { return _mm512_set1_ps(a); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static T load(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static void store(float* p, T v, Mask m) { _mm512_mask_storeu_ps(p, m, v); }
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static void store_first(float* p, T v, int64_t n) {  // The first n lanes (n > 0).
    if (n >= kWidth)
      store(p, v);
    else
      store(p, v, mask(n));
  }
  static Mask mask(int64_t n) {
    return n >= kWidth ? Mask(0xFFFF) : Mask((1u << n) - 1u);
  }
  static T max(T a, T b) { return _mm512_max_ps(a, b); }
  static T min(T a, T b) { return _mm512_min_ps(a, b); }
  // clip(a, -1, 1) with `one` = set1(1), NaN for a NaN as XLA's clamp gives: the smaller
  // magnitude of a and 1, a's sign (AVX-512 DQ's vrangeps: one instruction where
  // min(max(a, -1), 1) takes two; it returns a NaN first operand). vmaxps and vminps return
  // their second operand where either is NaN, so a goes second.
#if defined(__AVX512DQ__)
  static T clip_unit(T a, T one) { return _mm512_range_ps(a, one, 0b0010); }
#else
  static T clip_unit(T a, T one) {
    return _mm512_min_ps(one, _mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), one), a));
  }
#endif
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  // The inner loops' adds and subtracts (see the AVX2 struct): plain adds here, where the
  // multiply-add form was not measured.
  static T opaque_one() { return set1(1.0f); }
  static T accumulate(T acc, T a, T) { return _mm512_add_ps(acc, a); }
  static T difference(T a, T b, T) { return _mm512_sub_ps(a, b); }
  static T fmadd(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T fnmadd(T a, T b, T c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a b
  // Whether every lane has |a| <= limit (false for a NaN).
  static bool all_within(T a, T limit) {
    return _mm512_cmp_ps_mask(_mm512_abs_ps(a), limit, _CMP_LE_OQ) == Mask(0xFFFF);
  }
  static float sum(T a) { return _mm512_reduce_add_ps(a); }
  // Ors the bits of v - v (zero for a finite v, NaN for an infinity or a NaN) into acc.
  static T or_nonfinite(T acc, T v) {
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(acc),
                                               _mm512_castps_si512(_mm512_sub_ps(v, v))));
  }
  static bool any_bits(T a) {
    return _mm512_test_epi32_mask(_mm512_castps_si512(a), _mm512_castps_si512(a)) != 0;
  }
};
#elif defined(__AVX2__) && defined(__FMA__)
struct Vec {
  using T = __m256;
  using Mask = __m256i;
  static constexpr int kWidth = 8;
  static constexpr int kRegisters = 16;
  static T zero() { return _mm256_setzero_ps(); }
  static T set1(float a) { return _mm256_set1_ps(a); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static T load(const float* p, Mask m) { return _mm256_maskload_ps(p, m); }
  static void store(float* p, T v, Mask m) { _mm256_maskstore_ps(p, m, v); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  // The first n lanes (n > 0); whole vectors without vmaskmovps, which AMD's cores run as
  // microcode (the input gradient measured 0.91-0.99x without it, benchmarks/native_ab.py).
  static void store_first(float* p, T v, int64_t n) {
    if (n >= kWidth)
      store(p, v);
    else
      store(p, v, mask(n));
  }
  static Mask mask(int64_t n) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(std::min<int64_t>(n, kWidth))), lanes);
  }
  static T max(T a, T b) { return _mm256_max_ps(a, b); }
  static T min(T a, T b) { return _mm256_min_ps(a, b); }
  // clip(a, -1, 1), NaN for a NaN: vmaxps and vminps return their second operand where
  // either is NaN, so a goes second.
  static T clip_unit(T a, T one) {
    return _mm256_min_ps(one, _mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), one), a));
  }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  // The inner loops' adds and subtracts as multiply-adds by one (the same rounding): on Zen 3
  // vaddps, vsubps, vmaxps and vminps share two pipes and the multiply-adds have two of their
  // own (benchmarks/README.md). `one` must come from opaque_one(): GCC folds a literal 1.
  static T opaque_one() {
    T one = set1(1.0f);
    __asm__("" : "+x"(one));
    return one;
  }
  static T accumulate(T acc, T a, T one) { return _mm256_fmadd_ps(a, one, acc); }  // acc + a
  static T difference(T a, T b, T one) { return _mm256_fnmadd_ps(b, one, a); }     // a - b
  static T fmadd(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T fnmadd(T a, T b, T c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a b
  // Whether every lane has |a| <= limit (false for a NaN).
  static bool all_within(T a, T limit) {
    const T magnitude = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a);
    return _mm256_movemask_ps(_mm256_cmp_ps(magnitude, limit, _CMP_LE_OQ)) == 0xFF;
  }
  static float sum(T a) {
    const __m128 half = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(quarter, _mm_shuffle_ps(quarter, quarter, 1)));
  }
  // Ors the bits of v - v (zero for a finite v, NaN for an infinity or a NaN) into acc.
  static T or_nonfinite(T acc, T v) { return _mm256_or_ps(acc, _mm256_sub_ps(v, v)); }
  static bool any_bits(T a) {
    return !_mm256_testz_si256(_mm256_castps_si256(a), _mm256_castps_si256(a));
  }
};
#else
#error "adderjax's native kernels need AVX2 and FMA, or AVX-512"
#endif

using V = typename Vec::T;

// A tile is a function of its own: inlined into a row's loop, GCC kept its accumulators in
// memory (a store of each per reduction step, seen in the assembly) and the forward ran 1.2-1.7x
// slower (benchmarks/README.md).
#define ADDERJAX_TILE __attribute__((noinline))
// Output pixels per forward tile, by 2 vectors of channels: with AVX2, 6 x 2 accumulators,
// the filter vectors, the broadcast and `one` fill the 16 registers. A row's last tile takes
// the remainder with it up to kMaxMR pixels (a tile of 2 pixels costs nearly a full one).
constexpr int kMR = Vec::kRegisters == 32 ? 8 : 6;
constexpr int kMaxMR = 8;
constexpr int kSumPixels = 4;  // Patch sums taken at once (forward).

struct ForwardGeometry {
  int64_t h, w, wp, c, ho, wo, groups, cg, og, opad, kh, kw, sh, sw, dh, dw;
};

// Floor and ceiling of a / b for b > 0 and any a.
inline int64_t FloorDiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
inline int64_t CeilDiv(int64_t a, int64_t b) { return -FloorDiv(-a, b); }

// Copies the input rows row0 + i*dh (i < rows) of image x (h, w, c) into rows
// (rows, wp, c), column q holding input column q - left: zeros outside the
// input, so the kernels read the zero padding without XLA writing it out.
void CopyPaddedRows(const float* x, int64_t h, int64_t w, int64_t c, int64_t row0, int64_t dh,
                    int64_t rows, int64_t left, int64_t wp, float* out) {
  const int64_t q0 = std::clamp<int64_t>(left, 0, wp), q1 = std::clamp<int64_t>(left + w, q0, wp);
  for (int64_t i = 0; i < rows; ++i) {
    float* o = out + i * wp * c;
    const int64_t r = row0 + i * dh;
    if (r < 0 || r >= h) {
      std::fill_n(o, wp * c, 0.0f);
      continue;
    }
    std::fill_n(o, q0 * c, 0.0f);
    std::copy_n(x + (r * w + q0 - left) * c, (q1 - q0) * c, o + q0 * c);
    std::fill_n(o + q1 * c, (wp - q1) * c, 0.0f);
  }
}

// The outputs y[p * y_step + n] (p < pixels, n < channels) of a tile that are not finite,
// summed again term by term, -sum_k |x[p * x_step + offsets[k]] - w[k * w_row + n]|: the
// result of the XLA loops, where the max trick overflowed or met an infinity. Called only
// for a tile that has such an output, so finite layers pay only the epilogue's check (two
// vector operations per output vector: no difference measured); scalar code, so a layer whose
// outputs are all NaN (a diverged network) takes 12-21x its usual time.
void FixNonFinite(int64_t pixels, int64_t channels, const float* x, int64_t x_step,
                  const int64_t* offsets, int64_t k_size, const float* w, int64_t w_row,
                  float* y, int64_t y_step) {
  for (int64_t p = 0; p < pixels; ++p)
    for (int64_t n = 0; n < channels; ++n) {
      float& out = y[p * y_step + n];
      if (std::isfinite(out)) continue;
      float acc = 0.0f;
      for (int64_t k = 0; k < k_size; ++k)
        acc += std::fabs(x[p * x_step + offsets[k]] - w[k * w_row + n]);
      out = -acc;
    }
}

// One tile: MR pixels x NV vectors of output channels. Returns whether an output it stored
// is not finite.
template <int MR, int NV>
ADDERJAX_TILE bool ForwardTile(const float* x, int64_t x_step, const int64_t* offsets, int64_t k_size,
                        const float* w, int64_t w_row, const float* sx, const float* sf,
                        float* y, int64_t y_step, int64_t valid) {
  V acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = Vec::zero();
  const V one = Vec::opaque_one();
  for (int64_t k = 0; k < k_size; ++k) {
    const float* xk = x + offsets[k];
    const float* wk = w + k * w_row;
    V wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = Vec::load(wk + v * Vec::kWidth);
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const V xv = Vec::set1(xk[m * x_step]);
      for (int v = 0; v < NV; ++v)
        acc[m][v] = Vec::accumulate(acc[m][v], Vec::max(xv, wv[v]), one);
    }
  }
  const V two = Vec::set1(2.0f);
  V bad = Vec::zero();
  for (int m = 0; m < MR; ++m) {
    const V patch = Vec::set1(sx[m]);
    for (int v = 0; v < NV; ++v) {
      const int64_t left = valid - v * Vec::kWidth;
      if (left <= 0) break;
      // -(2 acc - SX - SF) = SX + SF - 2 acc
      const V out = Vec::sub(Vec::add(patch, Vec::load(sf + v * Vec::kWidth)),
                             Vec::fmadd(two, acc[m][v], Vec::zero()));
      bad = Vec::or_nonfinite(bad, out);
      Vec::store_first(y + m * y_step + v * Vec::kWidth, out, left);
    }
  }
  return Vec::any_bits(bad);
}

template <int NV>
void ForwardTileAnyMR(int mr, const float* x, int64_t x_step, const int64_t* offsets,
                      int64_t k_size, const float* w, int64_t w_row, const float* sx,
                      const float* sf, float* y, int64_t y_step, int64_t valid) {
  bool bad = false;
#define ADDERJAX_MR_CASE(R)                                                                   \
  case R:                                                                                     \
    bad = ForwardTile<R, NV>(x, x_step, offsets, k_size, w, w_row, sx, sf, y, y_step, valid); \
    break;
  switch (mr) {
    ADDERJAX_MR_CASE(1) ADDERJAX_MR_CASE(2) ADDERJAX_MR_CASE(3) ADDERJAX_MR_CASE(4)
    ADDERJAX_MR_CASE(5) ADDERJAX_MR_CASE(6) ADDERJAX_MR_CASE(7) ADDERJAX_MR_CASE(8)
  }
#undef ADDERJAX_MR_CASE
  if (bad) FixNonFinite(mr, valid, x, x_step, offsets, k_size, w, w_row, y, y_step);
}

// The forward with the pixels in the lanes, for layers with at most one vector of
// output channels per group, where the tile above would spend a broadcast of the
// input on a single max and add: a tile of MR output channels (the filter
// broadcast) by NP vectors of consecutive pixels of a stride-1 row, read from the
// image transposed to (row, channel, column). Each output is still summed in k order.
constexpr int kPixelMR = 8;
constexpr int kPixelNP = 2;
#if defined(ADDERJAX_PIXEL_LANES)  // For tests: -DADDERJAX_PIXEL_LANES=1 takes it on AVX2 too.
constexpr bool kPixelLanes = ADDERJAX_PIXEL_LANES;
#else
constexpr bool kPixelLanes = Vec::kRegisters == 32;
#endif

// Returns whether an output it computed is not finite.
template <int MR>
inline bool ForwardPixelTile(const float* xt, const int64_t* offsets, int64_t k_size,
                             const float* w, int64_t w_row, const float* sx, const float* sf,
                             float* y, int64_t y_step, int64_t pixels) {
  V acc[MR][kPixelNP];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 2
    for (int v = 0; v < kPixelNP; ++v) acc[m][v] = Vec::zero();
  for (int64_t k = 0; k < k_size; ++k) {
    const float* xk = xt + offsets[k];
    const float* wk = w + k * w_row;
    V xv[kPixelNP];
#pragma GCC unroll 2
    for (int v = 0; v < kPixelNP; ++v) xv[v] = Vec::load(xk + v * Vec::kWidth);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const V wv = Vec::set1(wk[m]);
#pragma GCC unroll 2
      for (int v = 0; v < kPixelNP; ++v) acc[m][v] = Vec::add(acc[m][v], Vec::max(xv[v], wv));
    }
  }
  const V two = Vec::set1(2.0f);
  V bad = Vec::zero();
  float out[kPixelNP * Vec::kWidth];
  for (int m = 0; m < MR; ++m) {
    const V filter = Vec::set1(sf[m]);
    for (int v = 0; v < kPixelNP; ++v) {
      const V patch = Vec::load(sx + v * Vec::kWidth);
      const V o = Vec::sub(Vec::add(patch, filter), Vec::fmadd(two, acc[m][v], Vec::zero()));
      bad = Vec::or_nonfinite(bad, o);  // Lanes past `pixels` too: at worst a needless check.
      Vec::store(out + v * Vec::kWidth, o);
    }
    for (int64_t p = 0; p < pixels; ++p) y[p * y_step + m] = out[p];
  }
  return Vec::any_bits(bad);
}

void ForwardPixelTileAnyMR(int mr, const float* xt, const int64_t* offsets, int64_t k_size,
                           const float* w, int64_t w_row, const float* sx, const float* sf,
                           float* y, int64_t y_step, int64_t pixels) {
  bool bad = false;
#define ADDERJAX_MR_CASE(R)                                                                 \
  case R:                                                                                   \
    bad = ForwardPixelTile<R>(xt, offsets, k_size, w, w_row, sx, sf, y, y_step, pixels);    \
    break;
  switch (mr) {
    ADDERJAX_MR_CASE(1) ADDERJAX_MR_CASE(2) ADDERJAX_MR_CASE(3) ADDERJAX_MR_CASE(4)
    ADDERJAX_MR_CASE(5) ADDERJAX_MR_CASE(6) ADDERJAX_MR_CASE(7) ADDERJAX_MR_CASE(8)
  }
#undef ADDERJAX_MR_CASE
  // Here the pixels are consecutive columns (stride 1) of the transposed rows.
  if (bad) FixNonFinite(pixels, mr, xt, 1, offsets, k_size, w, w_row, y, y_step);
}

// An image (or, for small batches, a chunk of its rows) at a time: the padded input
// rows transposed once to (row, channel, column), then each output row's tiles, and
// SX summed a vector of pixels at a time.
void ForwardPixelLanes(ffi::ThreadPool& pool, const float* x_data, const float* w_data,
                       const float* sf, float* y_data, const ForwardGeometry& g, int64_t batch,
                       int64_t top, int64_t left) {
  constexpr int64_t kTile = kPixelNP * Vec::kWidth;
  const int64_t row_len = g.wp + kTile;  // Slack: a tile's loads may run past the row.
  const int64_t k_size = g.kh * g.kw * g.cg, out_c = g.groups * g.og;
  std::vector<int64_t> offsets(k_size);
  for (int64_t i = 0, k = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j)
      for (int64_t c = 0; c < g.cg; ++c, ++k)
        offsets[k] = (i * g.dh * g.c + c) * row_len + j * g.dw;
  // Row chunks of an image where the batch is too small to keep the threads busy.
  const int64_t chunks = ChunksToFill(pool, batch, 2, g.ho);
  auto item = [&](int64_t it) {
    const int64_t b = it / chunks, chunk = it % chunks;
    const int64_t r0 = g.ho * chunk / chunks, r1 = g.ho * (chunk + 1) / chunks;
    // Padded input rows [r0 sh, (r1 - 1) sh + (kh - 1) dh] transposed.
    const int64_t first = r0 * g.sh, rows = (r1 - 1 - r0) * g.sh + (g.kh - 1) * g.dh + 1;
    thread_local std::vector<float> t;
    t.assign(rows * g.c * row_len, 0.0f);
    const float* x = x_data + b * g.h * g.w * g.c;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t iy = first + r - top;
      if (iy < 0 || iy >= g.h) continue;
      for (int64_t q = std::max<int64_t>(0, left); q < std::min(g.wp, g.w + left); ++q) {
        const float* px = x + (iy * g.w + q - left) * g.c;
        for (int64_t c = 0; c < g.c; ++c) t[(r * g.c + c) * row_len + q] = px[c];
      }
    }
    alignas(64) float sx[kTile];
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        const float* xt = t.data() + ((r - r0) * g.sh * g.c + grp * g.cg) * row_len;
        for (int64_t p0 = 0; p0 < g.wo; p0 += kTile) {
          for (int v = 0; v < kPixelNP; ++v) {
            V acc = Vec::zero();
            for (int64_t k = 0; k < k_size; ++k)
              acc = Vec::add(acc, Vec::load(xt + offsets[k] + p0 + v * Vec::kWidth));
            Vec::store(sx + v * Vec::kWidth, acc);
          }
          const int64_t pixels = std::min(kTile, g.wo - p0);
          for (int64_t n0 = 0; n0 < g.og; n0 += kPixelMR)
            ForwardPixelTileAnyMR(int(std::min<int64_t>(kPixelMR, g.og - n0)), xt + p0,
                                  offsets.data(), k_size, w_data + grp * k_size * g.opad + n0,
                                  g.opad, sx, sf + grp * g.opad + n0,
                                  y_data + ((b * g.ho + r) * g.wo + p0) * out_c + grp * g.og + n0,
                                  out_c, pixels);
        }
      }
  };
  ParallelFor(pool, batch * chunks, item);
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xb, ffi::Buffer<ffi::F32> wt,
                       ffi::ResultBuffer<ffi::F32> y, int64_t kh, int64_t kw, int64_t sh,
                       int64_t sw, int64_t dh, int64_t dw, int64_t top, int64_t left,
                       int64_t groups) {
  const auto xd = xb.dimensions(), wd = wt.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || wd.size() != 3 || yd.size() != 4)
    return ffi::Error::InvalidArgument("adderjax_adder_forward: bad ranks");
  // Each row's patches read kh padded input rows of wp columns, copied per row.
  const int64_t wp = (yd[2] - 1) * sw + (kw - 1) * dw + 1;
  ForwardGeometry g{xd[1], xd[2], wp, xd[3], yd[1], yd[2], groups, xd[3] / groups,
                    yd[3] / groups, wd[2], kh, kw, sh, sw, dh, dw};
  const int64_t batch = xd[0], k_size = wd[1];
  if (k_size != kh * kw * g.cg || wd[0] != groups || g.opad % Vec::kWidth)
    return ffi::Error::InvalidArgument("adderjax_adder_forward: bad filter layout");
  const float* x_data = xb.typed_data();
  const float* w_data = wt.typed_data();
  float* y_data = y->typed_data();
  // SF: each filter's sum, in k order.
  std::vector<float> sf(groups * g.opad, 0.0f);
  for (int64_t grp = 0; grp < groups; ++grp)
    for (int64_t k = 0; k < k_size; ++k)
      for (int64_t n = 0; n < g.opad; ++n)
        sf[grp * g.opad + n] += w_data[(grp * k_size + k) * g.opad + n];
  if (kPixelLanes && sw == 1 && g.og <= Vec::kWidth && g.wo >= kPixelNP * Vec::kWidth) {
    ForwardPixelLanes(pool, x_data, w_data, sf.data(), y_data, g, batch, top, left);
    return ffi::Error::Success();
  }
  std::vector<int64_t> offsets(k_size);
  for (int64_t i = 0, k = 0; i < kh; ++i)
    for (int64_t j = 0; j < kw; ++j)
      for (int64_t c = 0; c < g.cg; ++c, ++k) offsets[k] = (i * g.wp + j * dw) * g.c + c;
  const int64_t x_step = sw * g.c, out_c = groups * g.og;
  const int64_t tile_n = 2 * Vec::kWidth;
  const auto tail = Vec::mask(g.cg % Vec::kWidth == 0 ? Vec::kWidth : g.cg % Vec::kWidth);
  auto row = [&](int64_t item) {
    const int64_t b = item / g.ho, r = item % g.ho;
    std::vector<float> sx(g.wo);
    thread_local std::vector<float> rows;
    rows.resize(kh * g.wp * g.c);
    CopyPaddedRows(x_data + b * g.h * g.w * g.c, g.h, g.w, g.c, r * sh - top, dh, kh, left, g.wp,
                   rows.data());
    for (int64_t grp = 0; grp < groups; ++grp) {
      const float* x_row = rows.data() + grp * g.cg;
      // SX: each patch's sum, taps in order, channels a vector at a time; kSumPixels pixels
      // at once, so that their chains of adds overlap (each pixel's order is unchanged).
      for (int64_t p0 = 0; p0 < g.wo; p0 += kSumPixels) {
        const int64_t n = std::min<int64_t>(kSumPixels, g.wo - p0);
        V acc[kSumPixels];
        for (int q = 0; q < kSumPixels; ++q) acc[q] = Vec::zero();
        for (int64_t i = 0; i < kh; ++i)
          for (int64_t j = 0; j < kw; ++j) {
            const float* px = x_row + (i * g.wp + p0 * sw + j * dw) * g.c;
            int64_t c0 = 0;
            for (; c0 + Vec::kWidth <= g.cg; c0 += Vec::kWidth)
              for (int q = 0; q < n; ++q) acc[q] = Vec::add(acc[q], Vec::load(px + q * x_step + c0));
            if (c0 < g.cg)
              for (int q = 0; q < n; ++q)
                acc[q] = Vec::add(acc[q], Vec::load(px + q * x_step + c0, tail));
          }
        for (int q = 0; q < n; ++q) sx[p0 + q] = Vec::sum(acc[q]);
      }
      for (int64_t n0 = 0; n0 < g.og; n0 += tile_n) {
        const int64_t valid = std::min(tile_n, g.og - n0);
        const float* w = w_data + grp * k_size * g.opad + n0;
        const float* sf_ = sf.data() + grp * g.opad + n0;
        for (int64_t c0 = 0, mr; c0 < g.wo; c0 += mr) {
          mr = g.wo - c0 <= kMaxMR ? g.wo - c0 : kMR;
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

// An input-gradient tap as offsets from a tile's base: into the filters (tap (i, j)), into G
// (the output row and column its first pixel feeds) and into SG (G summed over a group's
// output channels, one value per output pixel and group).
struct InputGradTap {
  int64_t w, g, s;
};

// One tile of the input gradient: MR pixels x NV vectors of input channels, summed over the
// taps the tile's pixels feed through (the same for all of them; pixel m's output is
// g_step further along G than pixel m-1's).
template <int MR, int NV>
ADDERJAX_TILE void InputGradTile(const float* x, int64_t x_step, int64_t valid, const float* g,
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
  const V hi = Vec::set1(1.0f), one = Vec::opaque_one();
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
          const V d = Vec::clip_unit(Vec::difference(wv[v], xv[m][v], one), hi);
          acc[m][v] = Vec::fmadd(gv, d, acc[m][v]);
        }
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v)
      Vec::store_first(dx + m * x_step + v * Vec::kWidth, acc[m][v], valid - v * Vec::kWidth);
}

// The same tile with the clip turned into bounds on the filter (AVX2, where vsubps, vmaxps and
// vminps share two pipes and the multiply-adds have two of their own):
//   clip(F - X, -1, 1) = clip(F, X - 1, X + 1) - X,
// so a pair costs a min, a max and a multiply-add, and -X sum_o G is added once per tap (from
// SG). Its terms are of X's magnitude rather than at most 1, so it takes only tiles whose
// inputs all have |X| <= kBoundsInputLimit, where the rounding stays within a few units of the
// direct tile's; returns false, having written nothing, for any other tile (or a NaN).
constexpr float kBoundsInputLimit = 8.0f;

template <int MR, int NV>
ADDERJAX_TILE bool InputGradBoundsTile(const float* x, int64_t x_step, int64_t valid, const float* g,
                                int64_t g_step, const float* sg, int64_t sg_step,
                                const float* w, int64_t w_row, const InputGradTap* taps,
                                int64_t n_taps, int64_t og, float* dx) {
  typename Vec::Mask masks[NV];
  for (int v = 0; v < NV; ++v) masks[v] = Vec::mask(valid - v * Vec::kWidth);
  const V one = Vec::set1(1.0f), limit = Vec::set1(kBoundsInputLimit);
  V lo[MR][NV], hi[MR][NV], acc[MR][NV];
  bool inside = true;
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) {
      const V xv = Vec::load(x + m * x_step + v * Vec::kWidth, masks[v]);
      inside &= Vec::all_within(xv, limit);
      lo[m][v] = Vec::sub(xv, one);
      hi[m][v] = Vec::add(xv, one);
      acc[m][v] = Vec::zero();
    }
  if (!inside) return false;
  for (int64_t t = 0; t < n_taps; ++t) {
    const float* gs = g + taps[t].g;
    const float* ss = sg + taps[t].s;
    const float* ws = w + taps[t].w;
    for (int m = 0; m < MR; ++m) {
      const V s = Vec::set1(ss[m * sg_step]);
      for (int v = 0; v < NV; ++v)
        acc[m][v] = Vec::fnmadd(Vec::load(x + m * x_step + v * Vec::kWidth, masks[v]), s,
                                acc[m][v]);
    }
    for (int64_t o = 0; o < og; ++o) {
      V wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = Vec::load(ws + o * w_row + v * Vec::kWidth);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const V gv = Vec::set1(gs[m * g_step + o]);
        for (int v = 0; v < NV; ++v) {
          // min and max return their second operand where either is NaN: a NaN filter stays NaN.
          const V bounded = Vec::max(lo[m][v], Vec::min(hi[m][v], wv[v]));
          acc[m][v] = Vec::fmadd(gv, bounded, acc[m][v]);
        }
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v)
      Vec::store_first(dx + m * x_step + v * Vec::kWidth, acc[m][v], valid - v * Vec::kWidth);
  return true;
}

// The bounds tiles where the build has them (AVX2: 16 registers hold 4 x 1 or 2 x 2 tiles of
// accumulators and both bounds); otherwise, and for any tile they decline, the direct tiles.
constexpr bool kClipByBounds = Vec::kRegisters == 16;

// Pixel tiles. Direct: 8 for one vector of channels, 6 for two (acc and inputs fill the
// registers). Bounds: 4 and 2 (acc and two bounds per input).
template <int NV>
constexpr int kInputGradMR = NV == 1 ? 8 : 6;
template <int NV>
constexpr int kInputGradBoundsMR = NV == 1 ? 4 : 2;

template <int NV>
void InputGradTileAnyMR(int mr, bool bounds, const float* x, int64_t x_step, int64_t valid,
                        const float* g, int64_t g_step, const float* sg, int64_t sg_step,
                        const float* w, int64_t w_row, const InputGradTap* taps, int64_t n_taps,
                        int64_t og, float* dx) {
  if constexpr (kClipByBounds) {
    if (bounds) {
      bool done = false;
      switch (mr) {
#define ADDERJAX_MR_CASE(R)                                                                 \
  case R:                                                                                   \
    if constexpr (R <= kInputGradBoundsMR<NV>)                                              \
      done = InputGradBoundsTile<R, NV>(x, x_step, valid, g, g_step, sg, sg_step, w, w_row, \
                                        taps, n_taps, og, dx);                              \
    break;
        ADDERJAX_MR_CASE(1) ADDERJAX_MR_CASE(2) ADDERJAX_MR_CASE(3) ADDERJAX_MR_CASE(4)
#undef ADDERJAX_MR_CASE
      }
      if (done) return;
    }
  }
  switch (mr) {
#define ADDERJAX_MR_CASE(R)                                                                 \
  case R:                                                                                   \
    if constexpr (R <= kInputGradMR<NV>)                                                    \
      InputGradTile<R, NV>(x, x_step, valid, g, g_step, w, w_row, taps, n_taps, og, dx);    \
    return;
    ADDERJAX_MR_CASE(1) ADDERJAX_MR_CASE(2) ADDERJAX_MR_CASE(3) ADDERJAX_MR_CASE(4)
    ADDERJAX_MR_CASE(5) ADDERJAX_MR_CASE(6) ADDERJAX_MR_CASE(7) ADDERJAX_MR_CASE(8)
#undef ADDERJAX_MR_CASE
  }
}

// SG for the bounds tiles: G (b, rows, wg, groups * og) summed over each group's channels, in
// order, a vector at a time. Returns false where a sum is not finite (an infinite or NaN
// cotangent, or an overflow), and the caller then takes the direct tiles for the whole call.
bool SumOutputChannels(ffi::ThreadPool& pool, const float* g, int64_t rows, int64_t wg,
                       int64_t groups, int64_t og, float* sg) {
  std::atomic<bool> finite{true};
  const auto tail = Vec::mask(og % Vec::kWidth);
  ParallelFor(pool, rows, [&](int64_t r) {
    const float* gr = g + r * wg * groups * og;
    float* sr = sg + r * wg * groups;
    bool ok = true;
    for (int64_t p = 0; p < wg * groups; ++p) {
      V acc = Vec::zero();
      int64_t o = 0;
      for (; o + Vec::kWidth <= og; o += Vec::kWidth) acc = Vec::add(acc, Vec::load(gr + p * og + o));
      if (o < og) acc = Vec::add(acc, Vec::load(gr + p * og + o, tail));
      sr[p] = Vec::sum(acc);
      ok &= std::isfinite(sr[p]);
    }
    if (!ok) finite.store(false);
  });
  return finite.load();
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
  std::vector<float> sg;
  bool bounds = false;
  if constexpr (kClipByBounds) {
    sg.resize(batch * ho * wg * groups);
    bounds = SumOutputChannels(pool, g_data, batch * ho, wg, groups, og, sg.data());
  }
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
        for (const auto& [j, column] : column_taps[px]) {
          const int64_t pixel = (b * ho + a / sh) * wg + column;
          taps.push_back({(i * kw + j) * og * cpad, pixel * out_c, pixel * groups});
        }
      }
      const int64_t n_taps = int64_t(taps.size()), pixels = (w - 1 - px) / sw + 1;
      for (int64_t grp = 0; grp < groups; ++grp) {
        for (int64_t c0 = 0; c0 < cg;) {
          // Two vectors of channels per tile where at least two remain: one broadcast of G
          // serves both.
          const bool two = cg - c0 > Vec::kWidth;
          const int64_t tile_c = two ? 2 * Vec::kWidth : Vec::kWidth;
          const int64_t mr_max = bounds ? (two ? kInputGradBoundsMR<2> : kInputGradBoundsMR<1>)
                                        : (two ? kInputGradMR<2> : kInputGradMR<1>);
          const int64_t valid = std::min(tile_c, cg - c0);
          const float* wgrp = w_data + grp * kh * kw * og * cpad + c0;
          for (int64_t n0 = 0; n0 < pixels; n0 += mr_max) {
            const int mr = int(std::min<int64_t>(mr_max, pixels - n0));
            const int64_t at = ((b * h + r) * w + px + sw * n0) * c + grp * cg + c0;
            const float* gs = g_data + n0 * out_c + grp * og;
            const float* ss = sg.data() + n0 * groups + grp;
            if (two)
              InputGradTileAnyMR<2>(mr, bounds, x_data + at, sw * c, valid, gs, out_c, ss, groups,
                                    wgrp, cpad, taps.data(), n_taps, og, dx_data + at);
            else
              InputGradTileAnyMR<1>(mr, bounds, x_data + at, sw * c, valid, gs, out_c, ss, groups,
                                    wgrp, cpad, taps.data(), n_taps, og, dx_data + at);
          }
          c0 += tile_c;
        }
      }
    }
  };
  ParallelFor(pool, batch * h, row);
  return ffi::Error::Success();
}

// Weight gradient, full precision: dW = sum G (Xp - F) = sum G Xp - F sum G.
// A tile of MR output channels (G broadcast) by NV column vectors (each a
// filter column j and a vector of input channels, Xp read in place) is held in
// registers over one image's pixels and one filter row i, then added to the
// sums in memory: one broadcast serves NV fused multiply-adds.
constexpr int kWeightGradMR = Vec::kRegisters == 32 ? 8 : 4;
constexpr int kWeightGradNV = 3;

struct WeightGradColumns {
  int count = 0;
  int64_t column[kWeightGradNV];    // j * dw: the filter column's offset in input columns.
  int64_t channel[kWeightGradNV];   // The vector's first channel.
  int64_t s_offset[kWeightGradNV];  // Into the sums, from (i, o) = (0, o0).
  typename Vec::Mask mask[kWeightGradNV];
  bool full = true;  // Every vector holds kWidth channels.
};

// The input rows (or columns) an output row (column) y reads at offset `tap`:
// y * stride + tap - pad. Returns the outputs [lo, hi) whose reads all fall in
// [0, size) for the offsets first..last.
inline std::pair<int64_t, int64_t> InsideRange(int64_t size, int64_t stride, int64_t pad,
                                               int64_t first, int64_t last, int64_t outputs) {
  const int64_t lo = std::clamp<int64_t>(CeilDiv(pad - first, stride), 0, outputs);
  return {lo, std::clamp<int64_t>(CeilDiv(size + pad - last, stride), lo, outputs)};
}

// Sums G Xp over output rows [y0, y1) of one image for filter row i (x points at
// the input row y * sh + i*dh - top for y = 0, which may lie outside the image).
// Pixels [p0, p1) read only inside columns; the others read zeros outside.
template <int MR, int NV>
ADDERJAX_TILE void WeightGradTile(const float* x, int64_t x_row, int64_t w, int64_t c, int64_t sw,
                           int64_t left, int64_t y0, int64_t y1, int64_t p0, int64_t p1,
                           int64_t wo, const float* g, int64_t g_row, int64_t g_col,
                           const WeightGradColumns& cols, float* s, int64_t s_o) {
  const bool full = cols.full;
  V acc[MR][NV];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[m][v] = Vec::zero();
  int64_t offset[NV];
  for (int v = 0; v < NV; ++v) offset[v] = cols.column[v] * c + cols.channel[v];
  for (int64_t y = y0; y < y1; ++y) {
    const float* xr = x + y * x_row;
    const float* gs = g + y * g_row;
    // Three runs of pixels: before p0, [p0, p1) where every read is inside the input, and
    // after p1. Inside, where every vector is whole, the reads need no mask or select (a third
    // fewer instructions per pixel).
    const int64_t ends[3] = {std::min(p0, wo), p1, wo};
    for (int64_t run = 0, p = 0; run < 3; ++run) {
      if (run == 1 && full) {
        for (const float* xs = xr + (p * sw - left) * c; p < ends[1]; ++p, gs += g_col, xs += sw * c) {
          V xv[NV];
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) {
            xv[v] = Vec::load(xs + offset[v]);
            // In a register: GCC would otherwise fold the load into each of the MR
            // multiply-adds, MR loads where one does.
            __asm__("" : "+x"(xv[v]));
          }
#pragma GCC unroll 8
          for (int m = 0; m < MR; ++m) {
            const V gv = Vec::set1(gs[m]);
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) acc[m][v] = Vec::fmadd(gv, xv[v], acc[m][v]);
          }
        }
        continue;
      }
      for (; p < ends[run]; ++p, gs += g_col) {
        const int64_t col = p * sw - left;
        const float* xs = xr + col * c;
        const bool inside = run == 1;
        V xv[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) {
          // Columns outside the input read zeros: an empty mask, at an address inside.
          const int64_t at = col + cols.column[v];
          const bool read = inside || (at >= 0 && at < w);
          xv[v] = Vec::load(read ? xs + offset[v] : xr, read ? cols.mask[v] : Vec::mask(0));
        }
#pragma GCC unroll 8
        for (int m = 0; m < MR; ++m) {
          const V gv = Vec::set1(gs[m]);
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) acc[m][v] = Vec::fmadd(gv, xv[v], acc[m][v]);
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* t = s + cols.s_offset[v] + m * s_o;
      Vec::store(t, Vec::add(Vec::load(t), acc[m][v]));
    }
}

template <int NV>
void WeightGradTileAnyMR(int mr, const float* x, int64_t x_row, int64_t w, int64_t c,
                         int64_t sw, int64_t left, int64_t y0, int64_t y1, int64_t p0,
                         int64_t p1, int64_t wo, const float* g, int64_t g_row, int64_t g_col,
                         const WeightGradColumns& cols, float* s, int64_t s_o) {
#define ADDERJAX_MR_CASE(R)                                                                  \
  case R:                                                                                    \
    if constexpr (R <= kWeightGradMR)                                                        \
      WeightGradTile<R, NV>(x, x_row, w, c, sw, left, y0, y1, p0, p1, wo, g, g_row, g_col,   \
                            cols, s, s_o);                                                   \
    return;
  switch (mr) {
    ADDERJAX_MR_CASE(1) ADDERJAX_MR_CASE(2) ADDERJAX_MR_CASE(3) ADDERJAX_MR_CASE(4)
    ADDERJAX_MR_CASE(5) ADDERJAX_MR_CASE(6) ADDERJAX_MR_CASE(7) ADDERJAX_MR_CASE(8)
  }
#undef ADDERJAX_MR_CASE
}

ffi::Error WeightGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xb,
                          ffi::Buffer<ffi::F32> gb, ffi::Buffer<ffi::F32> wt,
                          ffi::ResultBuffer<ffi::F32> dwt, int64_t sh, int64_t sw, int64_t dh,
                          int64_t dw, int64_t top, int64_t left, int64_t groups) {
  const auto xd = xb.dimensions(), gd = gb.dimensions(), wd = wt.dimensions();
  if (xd.size() != 4 || gd.size() != 4 || wd.size() != 5)
    return ffi::Error::InvalidArgument("adderjax_adder_weight_grad: bad ranks");
  const int64_t batch = xd[0], h = xd[1], w = xd[2], c = xd[3], cg = c / groups;
  const int64_t ho = gd[1], wo = gd[2], out_c = gd[3];
  const int64_t kh = wd[1], kw = wd[2], og = wd[3], cpad = wd[4];
  if (wd[0] != groups || out_c != groups * og || cpad % Vec::kWidth || gd[0] != batch)
    return ffi::Error::InvalidArgument("adderjax_adder_weight_grad: bad operand layout");
  const float* x_data = xb.typed_data();
  const float* g_data = gb.typed_data();
  const float* w_data = wt.typed_data();
  float* out = dwt->typed_data();
  const int64_t size = groups * kh * kw * og * cpad;
  // The (column, channel vector) pairs of a filter row, NV to a tile.
  std::vector<WeightGradColumns> column_groups;
  for (int64_t j = 0; j < kw; ++j)
    for (int64_t c0 = 0; c0 < cg; c0 += Vec::kWidth) {
      if (column_groups.empty() || column_groups.back().count == kWeightGradNV)
        column_groups.emplace_back();
      WeightGradColumns& cols = column_groups.back();
      cols.column[cols.count] = j * dw;
      cols.channel[cols.count] = c0;
      cols.s_offset[cols.count] = j * og * cpad + c0;
      cols.mask[cols.count] = Vec::mask(cg - c0);
      cols.full = cols.full && cg - c0 >= Vec::kWidth;
      ++cols.count;
    }
  const int64_t o_tiles = (og + kWeightGradMR - 1) / kWeightGradMR;
  const int64_t tiles = groups * o_tiles * int64_t(column_groups.size());
  // Split the batch into chunks (summed in a fixed order at the end) only where the
  // tiles alone cannot keep every thread busy.
  const int64_t chunks = ChunksToFill(pool, tiles, 4, batch);
  std::vector<float> partial((chunks - 1) * size);
  std::vector<float> sum_g(chunks * out_c, 0.0f);
  auto sums = [&](int64_t chunk) { return chunk == 0 ? out : partial.data() + (chunk - 1) * size; };
  auto item = [&](int64_t it) {
    const int64_t chunk = it / tiles, t = it % tiles;
    const int64_t grp = t / (o_tiles * column_groups.size());
    const int64_t o0 = (t / column_groups.size()) % o_tiles * kWeightGradMR;
    const WeightGradColumns& cols = column_groups[t % column_groups.size()];
    const int mr = int(std::min<int64_t>(kWeightGradMR, og - o0));
    float* s = sums(chunk) + (grp * kh * kw * og + o0) * cpad;
    for (int64_t i = 0; i < kh; ++i)
      for (int v = 0; v < cols.count; ++v)
        for (int m = 0; m < mr; ++m)
          std::fill_n(s + i * kw * og * cpad + cols.s_offset[v] + m * cpad, Vec::kWidth, 0.0f);
    const bool first_columns = &cols == &column_groups[0];
    static constexpr decltype(&WeightGradTileAnyMR<1>) kTiles[kWeightGradNV] = {
        WeightGradTileAnyMR<1>, WeightGradTileAnyMR<2>, WeightGradTileAnyMR<3>};
    const auto tile = kTiles[cols.count - 1];
    const int64_t b0 = batch * chunk / chunks, b1 = batch * (chunk + 1) / chunks;
    // Output columns whose reads all fall inside the input, for this tile's columns.
    const auto [p0, p1] = InsideRange(w, sw, left, cols.column[0], cols.column[cols.count - 1], wo);
    for (int64_t b = b0; b < b1; ++b) {
      const float* g = g_data + b * ho * wo * out_c + grp * og + o0;
      for (int64_t i = 0; i < kh; ++i) {
        const auto [y0, y1] = InsideRange(h, sh, top, i * dh, i * dh, ho);
        // Row y reads input row y * sh + i*dh - top; rows outside read zeros and add nothing.
        const float* x = x_data + b * h * w * c + (i * dh - top) * w * c + grp * cg;
        tile(mr, x, sh * w * c, w, c, sw, left, y0, y1, p0, p1, wo, g, wo * out_c, out_c, cols,
             s + i * kw * og * cpad, cpad);
      }
      if (first_columns) {  // This tile's share of sum G, an image at a time.
        V acc = Vec::zero();
        const auto mask = Vec::mask(mr);
        for (int64_t p = 0; p < ho * wo; ++p) acc = Vec::add(acc, Vec::load(g + p * out_c, mask));
        float* sg = sum_g.data() + chunk * out_c + grp * og + o0;
        Vec::store(sg, Vec::add(Vec::load(sg, mask), acc), mask);
      }
    }
  };
  ParallelFor(pool, chunks * tiles, item);
  // dW = sum G Xp - F sum G, the chunks added in order.
  for (int64_t chunk = 1; chunk < chunks; ++chunk) {
    const float* p = sums(chunk);
    for (int64_t n = 0; n < size; ++n) out[n] += p[n];
    for (int64_t o = 0; o < out_c; ++o) sum_g[o] += sum_g[chunk * out_c + o];
  }
  for (int64_t grp = 0; grp < groups; ++grp)
    for (int64_t tap = 0; tap < kh * kw; ++tap)
      for (int64_t o = 0; o < og; ++o) {
        const int64_t at = ((grp * kh * kw + tap) * og + o) * cpad;
        const float total = sum_g[grp * og + o];
        for (int64_t k = 0; k < cpad; ++k) out[at + k] -= w_data[at + k] * total;
      }
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
                                  .Attr<int64_t>("top")
                                  .Attr<int64_t>("left")
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdderjaxAdderWeightGrad, WeightGradImpl,
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
                                  .Attr<int64_t>("groups"));

extern "C" int AdderjaxVectorWidth() { return Vec::kWidth; }
