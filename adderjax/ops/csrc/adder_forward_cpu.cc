// The native forward of the adder convolution, an XLA FFI handler (and AdderjaxVectorWidth,
// the library's vector width).
//
// Written like an SGEMM micro-kernel, as are the input and weight gradients beside it: a tile of
// outputs is held in vector registers while the reduction streams through it, reading the input
// in place (implicit im2col: per reduction element, one offset into the input; the zero padding
// is read in place, never written out by XLA). A tile is MR pixels (consecutive along a row) by
// one or two vectors of output channels; images (or chunks of their rows, for small batches and
// wide rows) are shared out over XLA's intra-op threads.
//
// Tile sizes (a vector is 16 floats with AVX-512, 32 registers; 8 with AVX2, 16 registers):
//   kMR = 8 (AVX-512) or 6 (AVX2) pixels x 1 or 2 vectors of output channels, a row's last tile
//   taking a remainder up to kMaxMR = 8 pixels;
//   pixels in the lanes (AVX-512 only, or -DADDERJAX_PIXEL_LANES=1 for the tests; stride 1,
//   fewer output channels per group than a vector, rows of at least 2 vectors of pixels):
//   kPixelMR = 8 output channels (the filter broadcast) x kPixelNP = 2 vectors of consecutive
//   pixels, read from the rows transposed to (row, channel, column), so a small layer does not
//   spend a broadcast per max.
//
// With the max trick |a - b| = 2 max(a, b) - a - b:
//   Y[p, o] = -(2 sum_k max(X[p, k], F[k, o]) - SX[p] - SF[o])
// where SX (sum of each patch) and SF (sum of each filter) are summed here, in a fixed order, so
// that a pixel's output does not depend on the batch or on how XLA fuses the surrounding program:
// one vmaxps and one add per pair instead of a subtract, an abs and an add (Vec::accumulate).
// Where that is not finite (an infinite input gives inf - inf, a huge one overflows 2 max) each
// tile's epilogue notices and sums those outputs again as -sum |X - F| (FixNonFinite), which is
// what the XLA loops give: -inf for an infinity, NaN only for a NaN input or inf - inf in a term.
//
// Layout (prepared by adderjax/ops/cpu_native.py): x (B, H, W, C); wt (G, K, Opad) with
// K = kh*kw*Cg in (i, j, c) order and Opad a multiple of the vector width (zero columns);
// y (B, Ho, Wo, G*Og).
//
// AdderjaxAdderForwardStats also returns the batch mean and biased variance of y per channel,
// what a BatchNorm in training mode after the layer needs (adderjax/ops/adder_batch_norm.py),
// so that no pass over y is spent on them: each output row's sums are taken in its epilogue,
// while the row is in the first-level cache (RowStatistics), and the rows are combined in
// double, in order, at the end (CombineRows). Like the outputs, they do not depend on the
// number of threads or on how the batch is split into chunks.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel_for.h"
#include "vec.h"

namespace ffi = xla::ffi;
using adderjax::ChunksToFill;
using adderjax::CopyPaddedRows;
using adderjax::InputNorm;
using adderjax::MakeInputNorm;
using adderjax::ParallelFor;
using adderjax::V;
using adderjax::Vec;
using adderjax::WithTileRows;

namespace {

// Output pixels per forward tile, by 2 vectors of channels: with AVX2, 6 x 2 accumulators,
// the filter vectors, the broadcast and `one` fill the 16 registers. A row's last tile takes
// the remainder with it up to kMaxMR pixels (a tile of 2 pixels costs nearly a full one).
constexpr int kMR = Vec::kRegisters == 32 ? 8 : 6;
constexpr int kMaxMR = 8;
constexpr int kSumPixels = 4;  // Input pixels whose channels are summed at once.
// Row chunks per thread where a batch is split (ForwardChannelLanes; ForwardImpl's choice of
// lanes depends on whether it is).
constexpr int64_t kChunksPerThread = 8;

struct ForwardGeometry {
  int64_t h, w, wp, c, ho, wo, groups, cg, og, opad, kh, kw, sh, sw, dh, dw;
};

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

// Statistics per output row, stats[row] = (shift, s1, s2) of `c` channels each: the shift is the
// row's first pixel, s1 = sum (y - shift) and s2 = sum (y - shift)^2 over its `pixels` pixels,
// in float, in kChains interleaved chains of pixels (so that the adds overlap) added in a fixed
// order. Summed around a value of the row, an adder layer's offset (a mean near -sum |w|,
// thousands, over a spread of a few units) does not cancel the variance.
void RowStatistics(const float* y, int64_t pixels, int64_t c, float* stats) {
  constexpr int kChains = 4;
  for (int64_t k0 = 0; k0 < c; k0 += Vec::kWidth) {
    const auto lanes = Vec::mask(std::min<int64_t>(Vec::kWidth, c - k0));
    const V shift = Vec::load(y + k0, lanes);
    V s1[kChains], s2[kChains];
    for (int q = 0; q < kChains; ++q) s1[q] = s2[q] = Vec::zero();
    int64_t p = 1;  // Pixel 0 is the shift.
    for (; p + kChains <= pixels; p += kChains)
      for (int q = 0; q < kChains; ++q) {
        const V d = Vec::sub(Vec::load(y + (p + q) * c + k0, lanes), shift);
        s1[q] = Vec::add(s1[q], d);
        s2[q] = Vec::fmadd(d, d, s2[q]);
      }
    for (int q = 0; p < pixels; ++p, ++q) {
      const V d = Vec::sub(Vec::load(y + p * c + k0, lanes), shift);
      s1[q] = Vec::add(s1[q], d);
      s2[q] = Vec::fmadd(d, d, s2[q]);
    }
    Vec::store(stats + k0, shift, lanes);
    Vec::store(stats + c + k0, Vec::add(Vec::add(s1[0], s1[1]), Vec::add(s1[2], s1[3])), lanes);
    Vec::store(stats + 2 * c + k0, Vec::add(Vec::add(s2[0], s2[1]), Vec::add(s2[2], s2[3])),
               lanes);
  }
}

// The batch mean and biased variance per channel from the rows' statistics (`rows` rows of
// `pixels` pixels each), in double and in row order: each row's mean and sum of squared
// deviations, summed around the first row's mean.
void CombineRows(const float* stats, int64_t rows, int64_t pixels, int64_t c, float* mean,
                 float* var) {
  const double per_pixel = 1.0 / double(pixels);
  std::vector<double> shift(c), sum(c, 0.0), squares(c, 0.0);
  for (int64_t k = 0; k < c; ++k) shift[k] = double(stats[k]) + double(stats[c + k]) * per_pixel;
  double* __restrict sh = shift.data();
  double* __restrict s = sum.data();
  double* __restrict q = squares.data();
  for (int64_t r = 0; r < rows; ++r) {
    const float* __restrict row = stats + r * 3 * c;
#pragma GCC ivdep
    for (int64_t k = 0; k < c; ++k) {
      const double s1 = row[c + k], d = double(row[k]) + s1 * per_pixel - sh[k];
      s[k] += d;
      q[k] += d * d + (double(row[2 * c + k]) - s1 * s1 * per_pixel) * per_pixel;
    }
  }
  for (int64_t k = 0; k < c; ++k) {
    const double m = s[k] / double(rows), v = q[k] / double(rows) - m * m;
    mean[k] = float(sh[k] + m);
    // Rounding can make it slightly negative; v < 0 ? 0 : v keeps a NaN.
    var[k] = float(v < 0.0 ? 0.0 : v);
  }
}

// One tile: MR pixels x NV vectors of output channels. Returns whether an output it stored
// is not finite.
template <int MR, int NV>
ADDERJAX_TILE bool ForwardTile(const float* x, int64_t x_step, const int64_t* offsets,
                               int64_t k_size, const float* w, int64_t w_row, const float* sx,
                               const float* sf, float* y, int64_t y_step, int64_t valid) {
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
      const int64_t lanes = valid - v * Vec::kWidth;
      if (lanes <= 0) break;
      // -(2 acc - SX - SF) = SX + SF - 2 acc
      const V out = Vec::sub(Vec::add(patch, Vec::load(sf + v * Vec::kWidth)),
                             Vec::fmadd(two, acc[m][v], Vec::zero()));
      bad = Vec::or_nonfinite(bad, out);
      Vec::store_first(y + m * y_step + v * Vec::kWidth, out, lanes);
    }
  }
  return Vec::any_bits(bad);
}

template <int NV>
void ForwardTileAnyMR(int mr, const float* x, int64_t x_step, const int64_t* offsets,
                      int64_t k_size, const float* w, int64_t w_row, const float* sx,
                      const float* sf, float* y, int64_t y_step, int64_t valid) {
  bool bad = false;
  WithTileRows<kMaxMR>(mr, [&](auto rows) {
    constexpr int R = decltype(rows)::value;
    bad = ForwardTile<R, NV>(x, x_step, offsets, k_size, w, w_row, sx, sf, y, y_step, valid);
  });
  if (bad) FixNonFinite(mr, valid, x, x_step, offsets, k_size, w, w_row, y, y_step);
}

// The forward with the pixels in the lanes, for layers with fewer output channels per group
// than a vector, where the tile above would leave lanes idle and spend a broadcast of the
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
  WithTileRows<kPixelMR>(mr, [&](auto rows) {
    constexpr int R = decltype(rows)::value;
    bad = ForwardPixelTile<R>(xt, offsets, k_size, w, w_row, sx, sf, y, y_step, pixels);
  });
  // Here the pixels are consecutive columns (stride 1) of the transposed rows.
  if (bad) FixNonFinite(pixels, mr, xt, 1, offsets, k_size, w, w_row, y, y_step);
}

// An image (or, for small batches, a chunk of its rows) at a time: the padded input
// rows transposed once to (row, channel, column), then each output row's tiles, and
// SX summed a vector of pixels at a time.
void ForwardPixelLanes(ffi::ThreadPool& pool, const float* x_data, const float* w_data,
                       const float* sf, float* y_data, const ForwardGeometry& geom, int64_t batch,
                       int64_t top, int64_t left, float* row_stats, const InputNorm* norm) {
  constexpr int64_t kTile = kPixelNP * Vec::kWidth;
  const int64_t row_len = geom.wp + kTile;  // Slack: a tile's loads may run past the row.
  const int64_t k_size = geom.kh * geom.kw * geom.cg, out_c = geom.groups * geom.og;
  std::vector<int64_t> offsets(k_size);
  for (int64_t i = 0, k = 0; i < geom.kh; ++i)
    for (int64_t j = 0; j < geom.kw; ++j)
      for (int64_t c = 0; c < geom.cg; ++c, ++k)
        offsets[k] = (i * geom.dh * geom.c + c) * row_len + j * geom.dw;
  // Row chunks of an image where the batch is too small to keep the threads busy.
  const int64_t chunks = ChunksToFill(pool, batch, 2, geom.ho);
  auto item = [&](int64_t it) {
    const int64_t b = it / chunks, chunk = it % chunks;
    const int64_t r0 = geom.ho * chunk / chunks, r1 = geom.ho * (chunk + 1) / chunks;
    // Padded input rows [r0 sh, (r1 - 1) sh + (kh - 1) dh] transposed.
    const int64_t first = r0 * geom.sh;
    const int64_t rows = (r1 - 1 - r0) * geom.sh + (geom.kh - 1) * geom.dh + 1;
    thread_local std::vector<float> t;
    t.assign(rows * geom.c * row_len, 0.0f);
    const float* x = x_data + b * geom.h * geom.w * geom.c;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t iy = first + r - top;
      if (iy < 0 || iy >= geom.h) continue;
      for (int64_t q = std::max<int64_t>(0, left); q < std::min(geom.wp, geom.w + left); ++q) {
        const float* px = x + (iy * geom.w + q - left) * geom.c;
        for (int64_t c = 0; c < geom.c; ++c)
          t[(r * geom.c + c) * row_len + q] = norm ? norm->At(px[c], c) : px[c];
      }
    }
    alignas(64) float sx[kTile];
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t grp = 0; grp < geom.groups; ++grp) {
        const float* xt = t.data() + ((r - r0) * geom.sh * geom.c + grp * geom.cg) * row_len;
        for (int64_t p0 = 0; p0 < geom.wo; p0 += kTile) {
          for (int v = 0; v < kPixelNP; ++v) {
            V acc = Vec::zero();
            for (int64_t k = 0; k < k_size; ++k)
              acc = Vec::add(acc, Vec::load(xt + offsets[k] + p0 + v * Vec::kWidth));
            Vec::store(sx + v * Vec::kWidth, acc);
          }
          const int64_t pixels = std::min(kTile, geom.wo - p0);
          float* y_row = y_data + ((b * geom.ho + r) * geom.wo + p0) * out_c + grp * geom.og;
          for (int64_t n0 = 0; n0 < geom.og; n0 += kPixelMR)
            ForwardPixelTileAnyMR(int(std::min<int64_t>(kPixelMR, geom.og - n0)), xt + p0,
                                  offsets.data(), k_size, w_data + grp * k_size * geom.opad + n0,
                                  geom.opad, sx, sf + grp * geom.opad + n0, y_row + n0, out_c,
                                  pixels);
        }
        if (row_stats && grp + 1 == geom.groups)
          RowStatistics(y_data + (b * geom.ho + r) * geom.wo * out_c, geom.wo, out_c,
                        row_stats + (b * geom.ho + r) * 3 * out_c);
      }
  };
  ParallelFor(pool, batch * chunks, item);
}

// The forward with the output channels in the lanes (ForwardTile), an image or a chunk of its
// rows at a time: the chunk's padded input rows copied once (the kernels read the zero padding
// in place) and each input pixel's channels summed once per group (a vector at a time, then
// across the lanes), so that a patch's sum SX is kh*kw of those per pixel, taps in order. Both
// depend on the pixel alone, so the outputs do not depend on the batch or the chunking.
void ForwardChannelLanes(ffi::ThreadPool& pool, const float* x_data, const float* w_data,
                         const float* sf, float* y_data, const ForwardGeometry& geom,
                         int64_t batch, int64_t top, int64_t left, float* row_stats,
                         const InputNorm* norm) {
  const int64_t k_size = geom.kh * geom.kw * geom.cg, out_c = geom.groups * geom.og;
  const int64_t row_floats = geom.wp * geom.c;
  std::vector<int64_t> offsets(k_size);
  for (int64_t i = 0, k = 0; i < geom.kh; ++i)
    for (int64_t j = 0; j < geom.kw; ++j)
      for (int64_t c = 0; c < geom.cg; ++c, ++k)
        offsets[k] = i * geom.dh * row_floats + j * geom.dw * geom.c + c;
  // Enough chunks to keep the threads busy (at batch 1 several per thread: a helper that
  // starts late leaves the caller a chunk more, a large share of a layer that takes tens of
  // microseconds), and few enough output rows per chunk that its copy (about kChunkFloats) stays
  // in the core's second-level cache.
  constexpr int64_t kChunkFloats = 1 << 16;
  const int64_t rows_per_chunk =
      std::max<int64_t>(1, kChunkFloats / (row_floats * std::max<int64_t>(1, geom.sh)));
  const int64_t chunks =
      std::max(ChunksToFill(pool, batch, kChunksPerThread, geom.ho),
               std::min(geom.ho, (geom.ho + rows_per_chunk - 1) / rows_per_chunk));
  const int64_t x_step = geom.sw * geom.c, tile_n = 2 * Vec::kWidth;
  const auto tail = Vec::mask(geom.cg % Vec::kWidth == 0 ? Vec::kWidth : geom.cg % Vec::kWidth);
  auto item = [&](int64_t it) {
    const int64_t b = it / chunks, chunk = it % chunks;
    const int64_t r0 = geom.ho * chunk / chunks, r1 = geom.ho * (chunk + 1) / chunks;
    const int64_t rows = (r1 - 1 - r0) * geom.sh + (geom.kh - 1) * geom.dh + 1;
    thread_local std::vector<float> padded, pixel_sums, sx;
    padded.resize(rows * row_floats);
    pixel_sums.resize(geom.groups * rows * geom.wp);
    sx.resize(geom.wo);
    CopyPaddedRows(x_data + b * geom.h * geom.w * geom.c, geom.h, geom.w, geom.c,
                   r0 * geom.sh - top, rows, left, geom.wp, padded.data(), norm);
    // kSumPixels pixels at once, so that their chains of adds overlap.
    for (int64_t grp = 0; grp < geom.groups; ++grp)
      for (int64_t q0 = 0; q0 < rows * geom.wp; q0 += kSumPixels) {
        const int n = int(std::min<int64_t>(kSumPixels, rows * geom.wp - q0));
        const float* px = padded.data() + q0 * geom.c + grp * geom.cg;
        V acc[kSumPixels];
        for (int q = 0; q < kSumPixels; ++q) acc[q] = Vec::zero();
        int64_t c0 = 0;
        for (; c0 + Vec::kWidth <= geom.cg; c0 += Vec::kWidth)
          for (int q = 0; q < n; ++q) acc[q] = Vec::add(acc[q], Vec::load(px + q * geom.c + c0));
        if (c0 < geom.cg)
          for (int q = 0; q < n; ++q)
            acc[q] = Vec::add(acc[q], Vec::load(px + q * geom.c + c0, tail));
        for (int q = 0; q < n; ++q) pixel_sums[grp * rows * geom.wp + q0 + q] = Vec::sum(acc[q]);
      }
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t grp = 0; grp < geom.groups; ++grp) {
        const float* x_row = padded.data() + (r - r0) * geom.sh * row_floats + grp * geom.cg;
        const float* sums = pixel_sums.data() + (grp * rows + (r - r0) * geom.sh) * geom.wp;
        // Taps outermost: each pixel's chain of adds is its own, so they overlap.
        std::fill(sx.begin(), sx.end(), 0.0f);
        for (int64_t i = 0; i < geom.kh; ++i)
          for (int64_t j = 0; j < geom.kw; ++j) {
            const float* tap = sums + i * geom.dh * geom.wp + j * geom.dw;
            for (int64_t p = 0; p < geom.wo; ++p) sx[p] += tap[p * geom.sw];
          }
        for (int64_t n0 = 0; n0 < geom.og; n0 += tile_n) {
          const int64_t valid = std::min(tile_n, geom.og - n0);
          const float* w = w_data + grp * k_size * geom.opad + n0;
          const float* sf_ = sf + grp * geom.opad + n0;
          for (int64_t c0 = 0, mr; c0 < geom.wo; c0 += mr) {
            mr = geom.wo - c0 <= kMaxMR ? geom.wo - c0 : kMR;
            const float* x = x_row + c0 * x_step;
            float* y = y_data + ((b * geom.ho + r) * geom.wo + c0) * out_c + grp * geom.og + n0;
            if (valid > Vec::kWidth)
              ForwardTileAnyMR<2>(mr, x, x_step, offsets.data(), k_size, w, geom.opad,
                                  sx.data() + c0, sf_, y, out_c, valid);
            else
              ForwardTileAnyMR<1>(mr, x, x_step, offsets.data(), k_size, w, geom.opad,
                                  sx.data() + c0, sf_, y, out_c, valid);
          }
        }
        if (row_stats && grp + 1 == geom.groups)
          RowStatistics(y_data + (b * geom.ho + r) * geom.wo * out_c, geom.wo, out_c,
                        row_stats + (b * geom.ho + r) * 3 * out_c);
      }
  };
  ParallelFor(pool, batch * chunks, item);
}

// The forward, and with `mean` and `var` (else null) the batch statistics of its output; with
// `norm` (else null), of its input x put through it.
ffi::Error Forward(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32> xb, ffi::Buffer<ffi::F32> wt,
                   float* y_data, ffi::Span<const int64_t> yd, int64_t kh, int64_t kw, int64_t sh,
                   int64_t sw, int64_t dh, int64_t dw, int64_t top, int64_t left, int64_t groups,
                   float* mean, float* var, const InputNorm* norm) {
  const auto xd = xb.dimensions(), wd = wt.dimensions();
  if (xd.size() != 4 || wd.size() != 3 || yd.size() != 4)
    return ffi::Error::InvalidArgument("adderjax_adder_forward: bad ranks");
  // A row of patches spans wp padded input columns.
  const int64_t wp = (yd[2] - 1) * sw + (kw - 1) * dw + 1;
  ForwardGeometry geom{xd[1], xd[2], wp, xd[3], yd[1], yd[2], groups, xd[3] / groups,
                    yd[3] / groups, wd[2], kh, kw, sh, sw, dh, dw};
  const int64_t batch = xd[0], k_size = wd[1];
  if (k_size != kh * kw * geom.cg || wd[0] != groups || geom.opad % Vec::kWidth)
    return ffi::Error::InvalidArgument("adderjax_adder_forward: bad filter layout");
  const float* x_data = xb.typed_data();
  const float* w_data = wt.typed_data();
  // SF: each filter's sum, in k order.
  std::vector<float> sf(groups * geom.opad, 0.0f);
  for (int64_t grp = 0; grp < groups; ++grp)
    for (int64_t k = 0; k < k_size; ++k)
      for (int64_t n = 0; n < geom.opad; ++n)
        sf[grp * geom.opad + n] += w_data[(grp * k_size + k) * geom.opad + n];
  const int64_t out_c = yd[3], rows = batch * geom.ho;
  thread_local std::vector<float> row_stats;
  if (mean) row_stats.resize(rows * 3 * out_c);
  float* stats = mean ? row_stats.data() : nullptr;
  // Pixels in the lanes where the channels would leave lanes idle (AVX-512, 4 and 8 channels:
  // 1.55x and 1.15x faster), and at a full vector of channels where the batch is split into row
  // chunks, whose copies and patch sums the channel-lanes forward repeats (ResNet-20 at batch
  // 1: 1.05x the latency); over whole images it is faster (32x32, 16 -> 16: 0.80x the time).
  const bool row_chunks = ChunksToFill(pool, batch, kChunksPerThread, geom.ho) > 1;
  if (kPixelLanes && sw == 1 && geom.wo >= kPixelNP * Vec::kWidth &&
      (geom.og < Vec::kWidth || (geom.og == Vec::kWidth && row_chunks)))
    ForwardPixelLanes(pool, x_data, w_data, sf.data(), y_data, geom, batch, top, left, stats,
                      norm);
  else
    ForwardChannelLanes(pool, x_data, w_data, sf.data(), y_data, geom, batch, top, left, stats,
                        norm);
  if (mean) CombineRows(stats, rows, geom.wo, out_c, mean, var);
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xb, ffi::Buffer<ffi::F32> wt,
                       ffi::ResultBuffer<ffi::F32> y, int64_t kh, int64_t kw, int64_t sh,
                       int64_t sw, int64_t dh, int64_t dw, int64_t top, int64_t left,
                       int64_t groups) {
  return Forward(pool, xb, wt, y->typed_data(), y->dimensions(), kh, kw, sh, sw, dh, dw, top,
                 left, groups, nullptr, nullptr, nullptr);
}

// The forward with its output's statistics; x goes through the BatchNorm and ReLU that
// in_mean, in_var, in_scale and in_bias describe first, where they are not f32[0].
ffi::Error ForwardStatsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xb,
                            ffi::Buffer<ffi::F32> wt, ffi::Buffer<ffi::F32> in_mean,
                            ffi::Buffer<ffi::F32> in_var, ffi::Buffer<ffi::F32> in_scale,
                            ffi::Buffer<ffi::F32> in_bias, ffi::ResultBuffer<ffi::F32> y,
                            ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> var,
                            int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t dh,
                            int64_t dw, int64_t top, int64_t left, int64_t groups,
                            float epsilon) {
  const auto yd = y->dimensions(), xd = xb.dimensions();
  if (yd.size() != 4 || xd.size() != 4 || yd[0] * yd[1] * yd[2] == 0 ||
      mean->element_count() != size_t(yd[3]) || var->element_count() != size_t(yd[3]))
    return ffi::Error::InvalidArgument("adderjax_adder_forward_stats: bad result shapes");
  const auto norm = MakeInputNorm(in_mean, in_var, in_scale, in_bias, xd[3], epsilon);
  if (!norm.ok)
    return ffi::Error::InvalidArgument("adderjax_adder_forward_stats: bad input statistics");
  return Forward(pool, xb, wt, y->typed_data(), yd, kh, kw, sh, sw, dh, dw, top, left, groups,
                 mean->typed_data(), var->typed_data(), norm.get());
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdderjaxAdderForwardStats, ForwardStatsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // wt
                                  .Arg<ffi::Buffer<ffi::F32>>()  // in_mean, or f32[0]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // in_var, or f32[0]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // in_scale, or f32[0]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // in_bias, or f32[0]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Ret<ffi::Buffer<ffi::F32>>()  // mean
                                  .Ret<ffi::Buffer<ffi::F32>>()  // var
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("dh")
                                  .Attr<int64_t>("dw")
                                  .Attr<int64_t>("top")
                                  .Attr<int64_t>("left")
                                  .Attr<int64_t>("groups")
                                  .Attr<float>("epsilon"));

extern "C" int AdderjaxVectorWidth() { return Vec::kWidth; }
