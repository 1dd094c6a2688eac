// The native input gradient of the adder convolution (full precision), an XLA FFI handler.
//
// Any stride, gathered (no scatter, no atomics):
//   dX[y, x, c] = sum_{i, j, o} G[oy, ox, o] * clip(F[i, j, c, o] - X[y, x, c], -1, 1)
//   oy = (y + top - i dh) / sh,  ox = (x + left - j dw) / sw
// over the taps where both divisions are exact and (oy, ox) is an output. A row y keeps the taps
// i whose oy is one; its pixels are split into sw column phases x = px + sw n, which share the
// taps j and read consecutive columns of G, so a tile of a phase is a GEMM-like tile over its
// list of taps, its input values held in registers. The rows of G an item reads are copied into
// a buffer with g_left zero columns before and zeros after (CopyPaddedRows), so that every
// column a phase reads exists. At stride 1 there is one phase with every tap j. With AVX2 a
// tile whose inputs are all small sums clip(F, X - 1, X + 1) - X instead (InputGradBoundsTile).
//
// Tile sizes: kInputGradMR = 8 pixels x 1 vector, or 6 x 2 vectors, of input channels; with
// AVX2 the bounds tiles, kInputGradBoundsMR = 4 x 1 or 2 x 2.
//
// Layout (prepared by adderjax/ops/cpu_native.py): x (B, H, W, C);
// g (B, Ho, Wo, G*Og), read as wg = g_left + (W - 1 + left) / sw + 1 columns, g_left zero
// columns before its first (cropped or padded with zeros after its last); wt (G, kh, kw, Og,
// Cpad), Cpad a multiple of the vector width (zero columns); dx (B, H, W, C).

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
using adderjax::ApplyInputNorm;
using adderjax::InputNorm;
using adderjax::MakeInputNorm;
using adderjax::ParallelFor;
using adderjax::V;
using adderjax::Vec;
using adderjax::WithTileRows;

namespace {

// An input-gradient tap as offsets from a tile's base: into the filters (tap (i, j)), into G
// (the output row and column its first pixel feeds) and into SG (G summed over a group's
// output channels, one value per output pixel and group).
struct InputGradTap {
  int64_t w, g, s;
};

// One tile of the input gradient: MR pixels x NV vectors of input channels, summed over the
// taps the tile's pixels feed through (the same for all of them; pixel m's output is
// g_step further along G than pixel m-1's). kNotNan: no F - X can be NaN (finite filters and
// inputs), so the clip may take Vec::clip_unit_not_nan.
template <int MR, int NV, bool kNotNan>
ADDERJAX_TILE void InputGradTile(const float* x, int64_t x_step, int64_t valid, const float* g,
                                 int64_t g_step, const float* w, int64_t w_row,
                                 const InputGradTap* taps, int64_t n_taps, int64_t og,
                                 float* dx) {
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
          V d = Vec::difference(wv[v], xv[m][v], one);
          if constexpr (kNotNan)
            d = Vec::clip_unit_not_nan(d, hi);
          else
            d = Vec::clip_unit(d, hi);
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
ADDERJAX_TILE bool InputGradBoundsTile(const float* x, int64_t x_step, int64_t valid,
                                       const float* g, int64_t g_step, const float* sg,
                                       int64_t sg_step, const float* w, int64_t w_row,
                                       const InputGradTap* taps, int64_t n_taps, int64_t og,
                                       float* dx) {
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

// Whether the mr x NV vectors of a tile's inputs (valid channels) are all finite.
template <int NV>
bool InputsAreFinite(int mr, const float* x, int64_t x_step, int64_t valid) {
  V bits = Vec::zero();
  for (int m = 0; m < mr; ++m)
    for (int v = 0; v < NV; ++v)
      bits = Vec::or_nonfinite(
          bits, Vec::load(x + m * x_step + v * Vec::kWidth, Vec::mask(valid - v * Vec::kWidth)));
  return !Vec::any_bits(bits);
}

template <int NV>
void InputGradTileAnyMR(int mr, bool bounds, bool filters_finite, const float* x,
                        int64_t x_step, int64_t valid, const float* g, int64_t g_step,
                        const float* sg, int64_t sg_step, const float* w, int64_t w_row,
                        const InputGradTap* taps, int64_t n_taps, int64_t og, float* dx) {
  if constexpr (kClipByBounds) {
    bool done = false;
    if (bounds)
      WithTileRows<kInputGradBoundsMR<NV>>(mr, [&](auto rows) {
        constexpr int R = decltype(rows)::value;
        done = InputGradBoundsTile<R, NV>(x, x_step, valid, g, g_step, sg, sg_step, w, w_row, taps,
                                          n_taps, og, dx);
      });
    if (done) return;
  }
  WithTileRows<kInputGradMR<NV>>(mr, [&](auto rows) {
    constexpr int R = decltype(rows)::value;
    if constexpr (Vec::kClipDropsNan) {
      // Checked per tile: a NaN or infinite input costs only its own tiles the faster clip.
      if (filters_finite && InputsAreFinite<NV>(mr, x, x_step, valid)) {
        InputGradTile<R, NV, true>(x, x_step, valid, g, g_step, w, w_row, taps, n_taps, og, dx);
        return;
      }
    }
    InputGradTile<R, NV, false>(x, x_step, valid, g, g_step, w, w_row, taps, n_taps, og, dx);
  });
}

// SG for the bounds tiles: G (rows, wo, groups * og) summed over each group's channels, in
// order, a vector at a time, into (rows, wg, groups) with G's columns at g_left + p (zeros in
// the other columns). Returns false where a sum is not finite (an infinite or NaN cotangent, or
// an overflow), and the caller then takes the direct tiles for the whole call.
bool SumOutputChannels(ffi::ThreadPool& pool, const float* g, int64_t rows, int64_t wo,
                       int64_t wg, int64_t g_left, int64_t groups, int64_t og, float* sg) {
  std::atomic<bool> finite{true};
  const auto tail = Vec::mask(og % Vec::kWidth);
  const int64_t columns = std::min(wo, wg - g_left);
  ParallelFor(pool, rows, [&](int64_t r) {
    const float* gr = g + r * wo * groups * og;
    float* sr = sg + r * wg * groups;
    std::fill_n(sr, wg * groups, 0.0f);
    bool ok = true;
    for (int64_t p = 0; p < columns * groups; ++p) {
      V acc = Vec::zero();
      int64_t o = 0;
      for (; o + Vec::kWidth <= og; o += Vec::kWidth)
        acc = Vec::add(acc, Vec::load(gr + p * og + o));
      if (o < og) acc = Vec::add(acc, Vec::load(gr + p * og + o, tail));
      const float sum = Vec::sum(acc);
      sr[g_left * groups + p] = sum;
      ok &= std::isfinite(sum);
    }
    if (!ok) finite.store(false);
  });
  return finite.load();
}

// The input gradient; with `norm` (else null), x is read through it (InputNorm): each item's
// input rows go through it into a copy that its tiles read.
ffi::Error InputGrad(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> gb,
                     ffi::Buffer<ffi::F32> wt, ffi::ResultBuffer<ffi::F32> dx, int64_t sh,
                     int64_t sw, int64_t dh, int64_t dw, int64_t top, int64_t left,
                     int64_t g_left, int64_t groups, const InputNorm* norm) {
  const auto xd = x.dimensions(), gd = gb.dimensions(), wd = wt.dimensions();
  if (xd.size() != 4 || gd.size() != 4 || wd.size() != 5)
    return ffi::Error::InvalidArgument("adderjax_adder_input_grad: bad ranks");
  const int64_t batch = xd[0], h = xd[1], width = xd[2], c = xd[3];
  const int64_t kh = wd[1], kw = wd[2], og = wd[3], cpad = wd[4], cg = c / groups;
  const int64_t ho = gd[1], wo = gd[2], out_c = gd[3];
  if (sh < 1 || sw < 1 || left < 0 || g_left < 0 || gd[0] != batch || wd[0] != groups ||
      out_c != groups * og || cpad % Vec::kWidth || cpad < cg)
    return ffi::Error::InvalidArgument("adderjax_adder_input_grad: bad operand layout");
  // Column phases: the pixels x = px + sw n (n = 0, 1, ...) all feed through the same taps j,
  // those with sw | px + left - j dw, pixel n to output column n + q, q = (px + left - j dw) / sw,
  // which is column n + q + g_left of G (zeros outside the output).
  const int64_t wg = g_left + (width - 1 + left) / sw + 1;  // G's columns as read, padded.
  const int64_t phases = std::min(sw, width);
  std::vector<std::vector<std::pair<int64_t, int64_t>>> column_taps(phases);  // (j, q + g_left)
  for (int64_t px = 0; px < phases; ++px) {
    const int64_t last = (width - 1 - px) / sw;
    for (int64_t j = 0; j < kw; ++j) {
      const int64_t a = px + left - j * dw;
      if (a % sw) continue;
      const int64_t column = a / sw + g_left;
      if (column < 0 || column + last >= wg)
        return ffi::Error::InvalidArgument("adderjax_adder_input_grad: g_left is too small");
      column_taps[px].emplace_back(j, column);
    }
  }
  const float* x_data = x.typed_data();
  const float* g_data = gb.typed_data();
  const float* w_data = wt.typed_data();
  float* dx_data = dx->typed_data();
  // Where the build's fast clip drops NaNs: whether every filter is finite, so that only a tile's
  // own non-finite inputs can make an F - X NaN (NaN - x, or inf - inf).
  const bool filters_finite =
      Vec::kClipDropsNan && std::all_of(w_data, w_data + groups * kh * kw * og * cpad,
                                         [](float v) { return std::isfinite(v); });
  std::vector<float> sg;
  bool bounds = false;
  if constexpr (kClipByBounds) {
    sg.resize(batch * ho * wg * groups);
    bounds = SumOutputChannels(pool, g_data, batch * ho, wo, wg, g_left, groups, og, sg.data());
  }
  // An image (or, for small batches, a chunk of its rows) per item, its rows in order, so that
  // the rows of G that neighbouring input rows share are read from the cache.
  const int64_t chunks = ChunksToFill(pool, batch, 2, h);
  // Input row r with G's rows from oy0 on in g_rows (padded: CopyPaddedRows), and x's rows from
  // x_r0 on in x_rows.
  auto row = [&](int64_t b, int64_t r, const float* g_rows, int64_t oy0, const float* x_rows,
                 int64_t x_r0, std::vector<InputGradTap>& taps) {
    for (int64_t px = 0; px < phases; ++px) {
      // Row r feeds output row (r + top - i dh) / sh through tap i where that is exact and an
      // output row.
      taps.clear();
      for (int64_t i = 0; i < kh; ++i) {
        const int64_t a = r + top - i * dh;
        if (a < 0 || a % sh || a / sh >= ho) continue;
        for (const auto& [j, column] : column_taps[px]) {
          const int64_t g_pixel = (a / sh - oy0) * wg + column;
          const int64_t s_pixel = (b * ho + a / sh) * wg + column;
          taps.push_back({(i * kw + j) * og * cpad, g_pixel * out_c, s_pixel * groups});
        }
      }
      const int64_t n_taps = int64_t(taps.size()), pixels = (width - 1 - px) / sw + 1;
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
            const int64_t at = ((b * h + r) * width + px + sw * n0) * c + grp * cg + c0;
            const float* xs = x_rows + ((r - x_r0) * width + px + sw * n0) * c + grp * cg + c0;
            const float* gs = g_rows + n0 * out_c + grp * og;
            const float* ss = sg.data() + n0 * groups + grp;
            if (two)
              InputGradTileAnyMR<2>(mr, bounds, filters_finite, xs, sw * c, valid, gs,
                                    out_c, ss, groups, wgrp, cpad, taps.data(), n_taps, og,
                                    dx_data + at);
            else
              InputGradTileAnyMR<1>(mr, bounds, filters_finite, xs, sw * c, valid, gs,
                                    out_c, ss, groups, wgrp, cpad, taps.data(), n_taps, og,
                                    dx_data + at);
          }
          c0 += tile_c;
        }
      }
    }
  };
  ParallelFor(pool, batch * chunks, [&](int64_t item) {
    const int64_t b = item / chunks, chunk = item % chunks;
    const int64_t r0 = h * chunk / chunks, r1 = h * (chunk + 1) / chunks;
    // The output rows that input rows [r0, r1) feed: (r + top - i dh) / sh in [0, ho).
    const int64_t first = r0 + top - (kh - 1) * dh, last = r1 - 1 + top;
    const int64_t oy0 = first <= 0 ? 0 : (first + sh - 1) / sh;
    const int64_t oy1 = last < 0 ? 0 : std::min(ho, last / sh + 1);
    thread_local std::vector<float> g_rows;
    g_rows.resize(std::max<int64_t>(0, oy1 - oy0) * wg * out_c);
    if (oy1 > oy0)
      CopyPaddedRows(g_data + b * ho * wo * out_c, ho, wo, out_c, oy0, oy1 - oy0, g_left, wg,
                     g_rows.data());
    const float* x_rows = x_data + b * h * width * c;
    int64_t x_r0 = 0;
    if (norm) {
      thread_local std::vector<float> normalized;
      normalized.resize((r1 - r0) * width * c);
      ApplyInputNorm(*norm, x_rows + r0 * width * c, (r1 - r0) * width, c, normalized.data());
      x_rows = normalized.data();
      x_r0 = r0;
    }
    std::vector<InputGradTap> taps;
    taps.reserve(kh * kw);
    for (int64_t r = r0; r < r1; ++r) row(b, r, g_rows.data(), oy0, x_rows, x_r0, taps);
  });
  return ffi::Error::Success();
}

ffi::Error InputGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> gb,
                         ffi::Buffer<ffi::F32> wt, ffi::ResultBuffer<ffi::F32> dx, int64_t sh,
                         int64_t sw, int64_t dh, int64_t dw, int64_t top, int64_t left,
                         int64_t g_left, int64_t groups) {
  return InputGrad(pool, x, gb, wt, dx, sh, sw, dh, dw, top, left, g_left, groups, nullptr);
}

// x read through the BatchNorm and ReLU that in_mean, in_var, in_scale and in_bias describe.
ffi::Error InputGradNormedImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                               ffi::Buffer<ffi::F32> gb, ffi::Buffer<ffi::F32> wt,
                               ffi::Buffer<ffi::F32> in_mean, ffi::Buffer<ffi::F32> in_var,
                               ffi::Buffer<ffi::F32> in_scale, ffi::Buffer<ffi::F32> in_bias,
                               ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw,
                               int64_t dh, int64_t dw, int64_t top, int64_t left, int64_t g_left,
                               int64_t groups, float epsilon) {
  const auto xd = x.dimensions();
  const auto norm = MakeInputNorm(in_mean, in_var, in_scale, in_bias,
                                  xd.size() == 4 ? xd[3] : 0, epsilon);
  if (!norm.ok || !norm.get())
    return ffi::Error::InvalidArgument("adderjax_adder_input_grad_normed: bad input statistics");
  return InputGrad(pool, x, gb, wt, dx, sh, sw, dh, dw, top, left, g_left, groups, norm.get());
}

}  // namespace

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

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdderjaxAdderInputGradNormed, InputGradNormedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g
                                  .Arg<ffi::Buffer<ffi::F32>>()  // wt
                                  .Arg<ffi::Buffer<ffi::F32>>()  // in_mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // in_var
                                  .Arg<ffi::Buffer<ffi::F32>>()  // in_scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // in_bias
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("dh")
                                  .Attr<int64_t>("dw")
                                  .Attr<int64_t>("top")
                                  .Attr<int64_t>("left")
                                  .Attr<int64_t>("g_left")
                                  .Attr<int64_t>("groups")
                                  .Attr<float>("epsilon"));
