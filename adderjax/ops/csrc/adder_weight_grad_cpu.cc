// The native weight gradient of the adder convolution (full precision), an XLA FFI handler.
//
// Any stride and dilation:
//   dW[i, j, c, o] = sum_{b, y, x} G[y, x, o] * (Xp[y sh + i dh, x sw + j dw, c] - F[i, j, c, o])
// (Xp: the input with its zero padding), as sum G Xp (fused multiply-adds) less F sum G, summed
// an image at a time. A tile is output channels (G broadcast) by (filter column, channel vector)
// pairs, reduced over the pixels; chunks of the batch (and, for small batches, blocks of the
// tiles) are shared out over XLA's intra-op threads.
//
// Tile sizes: kWeightGradMR = 8 (AVX-512) or 4 (AVX2) output channels x 3 vectors of input
// channels.
//
// Layout (prepared by adderjax/ops/cpu_native.py): x (B, H, W, C); g (B, Ho, Wo, G*Og); wt and
// dwt (G, kh, kw, Og, Cpad).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel_for.h"
#include "vec.h"

namespace ffi = xla::ffi;
using adderjax::ChunksToFill;
using adderjax::ApplyInputNorm;
using adderjax::InputNorm;
using adderjax::MakeInputNorm;
using adderjax::ParallelFor;
using adderjax::V;
using adderjax::Vec;
using adderjax::WithTileRows;

namespace {

// Floor and ceiling of a / b for b > 0 and any a.
inline int64_t FloorDiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
inline int64_t CeilDiv(int64_t a, int64_t b) { return -FloorDiv(-a, b); }

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
ADDERJAX_TILE void WeightGradTile(const float* x, int64_t x_row, int64_t width, int64_t c,
                                  int64_t sw, int64_t left, int64_t y0, int64_t y1, int64_t p0,
                                  int64_t p1, int64_t wo, const float* g, int64_t g_row,
                                  int64_t g_col, const WeightGradColumns& cols, float* s,
                                  int64_t s_o) {
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
        const float* xs = xr + (p * sw - left) * c;
        for (; p < ends[1]; ++p, gs += g_col, xs += sw * c) {
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
          const bool read = inside || (at >= 0 && at < width);
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
void WeightGradTileAnyMR(int mr, const float* x, int64_t x_row, int64_t width, int64_t c,
                         int64_t sw, int64_t left, int64_t y0, int64_t y1, int64_t p0,
                         int64_t p1, int64_t wo, const float* g, int64_t g_row, int64_t g_col,
                         const WeightGradColumns& cols, float* s, int64_t s_o) {
  WithTileRows<kWeightGradMR>(mr, [&](auto rows) {
    constexpr int R = decltype(rows)::value;
    WeightGradTile<R, NV>(x, x_row, width, c, sw, left, y0, y1, p0, p1, wo, g, g_row, g_col, cols,
                          s, s_o);
  });
}

// The weight gradient; with `norm` (else null), x is read through it (InputNorm): each image goes
// through it into a copy that the tiles read.
ffi::Error WeightGrad(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32> xb, ffi::Buffer<ffi::F32> gb,
                      ffi::Buffer<ffi::F32> wt, ffi::ResultBuffer<ffi::F32> dwt, int64_t sh,
                      int64_t sw, int64_t dh, int64_t dw, int64_t top, int64_t left,
                      int64_t groups, const InputNorm* norm) {
  const auto xd = xb.dimensions(), gd = gb.dimensions(), wd = wt.dimensions();
  if (xd.size() != 4 || gd.size() != 4 || wd.size() != 5)
    return ffi::Error::InvalidArgument("adderjax_adder_weight_grad: bad ranks");
  const int64_t batch = xd[0], h = xd[1], width = xd[2], c = xd[3], cg = c / groups;
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
  // The batch in chunks (summed in a fixed order at the end), each chunk's images one at a time
  // through all the tiles, so that an image's input and cotangent are read from the cache by
  // every tile; where the batch is too small to keep the threads busy, the tiles are shared out
  // in blocks too.
  const int64_t chunks = ChunksToFill(pool, 1, 2, batch);
  const int64_t blocks = std::min(tiles, ChunksToFill(pool, chunks, 2, tiles));
  std::vector<float> partial((chunks - 1) * size);
  std::vector<float> sum_g(chunks * out_c, 0.0f);
  auto sums = [&](int64_t chunk) { return chunk == 0 ? out : partial.data() + (chunk - 1) * size; };
  // Each tile's output channels, columns and sums, worked out once.
  struct Tile {
    int64_t grp, o0;
    int mr;
    const WeightGradColumns* cols;
    int64_t p0, p1;  // Output columns whose reads all fall inside the input, for its columns.
    int64_t s_offset;
  };
  std::vector<Tile> tile_list(tiles);
  for (int64_t t = 0; t < tiles; ++t) {
    Tile& tile = tile_list[t];
    tile.grp = t / (o_tiles * column_groups.size());
    tile.o0 = (t / column_groups.size()) % o_tiles * kWeightGradMR;
    tile.mr = int(std::min<int64_t>(kWeightGradMR, og - tile.o0));
    tile.cols = &column_groups[t % column_groups.size()];
    std::tie(tile.p0, tile.p1) = InsideRange(width, sw, left, tile.cols->column[0],
                                             tile.cols->column[tile.cols->count - 1], wo);
    tile.s_offset = (tile.grp * kh * kw * og + tile.o0) * cpad;
  }
  static constexpr decltype(&WeightGradTileAnyMR<1>) kTiles[kWeightGradNV] = {
      WeightGradTileAnyMR<1>, WeightGradTileAnyMR<2>, WeightGradTileAnyMR<3>};
  auto item = [&](int64_t it) {
    const int64_t chunk = it / blocks, block = it % blocks;
    const int64_t t0 = tiles * block / blocks, t1 = tiles * (block + 1) / blocks;
    const int64_t b0 = batch * chunk / chunks, b1 = batch * (chunk + 1) / chunks;
    for (int64_t t = t0; t < t1; ++t) {
      const Tile& tile = tile_list[t];
      float* s = sums(chunk) + tile.s_offset;
      for (int64_t i = 0; i < kh; ++i)
        for (int v = 0; v < tile.cols->count; ++v)
          for (int m = 0; m < tile.mr; ++m)
            std::fill_n(s + i * kw * og * cpad + tile.cols->s_offset[v] + m * cpad, Vec::kWidth,
                        0.0f);
    }
    for (int64_t b = b0; b < b1; ++b) {
      const float* image = x_data + b * h * width * c;
      if (norm) {
        thread_local std::vector<float> normalized;
        normalized.resize(h * width * c);
        ApplyInputNorm(*norm, image, h * width, c, normalized.data());
        image = normalized.data();
      }
      for (int64_t t = t0; t < t1; ++t) {
        const Tile& tile = tile_list[t];
        float* s = sums(chunk) + tile.s_offset;
        const float* g = g_data + b * ho * wo * out_c + tile.grp * og + tile.o0;
        for (int64_t i = 0; i < kh; ++i) {
          const auto [y0, y1] = InsideRange(h, sh, top, i * dh, i * dh, ho);
          // Row y reads input row y * sh + i*dh - top; rows outside read zeros and add nothing.
          const float* x = image + (i * dh - top) * width * c + tile.grp * cg;
          kTiles[tile.cols->count - 1](tile.mr, x, sh * width * c, width, c, sw, left, y0, y1,
                                       tile.p0, tile.p1, wo, g, wo * out_c, out_c, *tile.cols,
                                       s + i * kw * og * cpad, cpad);
        }
        if (tile.cols == &column_groups[0]) {  // This tile's share of sum G, an image at a time.
          V acc = Vec::zero();
          const auto mask = Vec::mask(tile.mr);
          for (int64_t p = 0; p < ho * wo; ++p)
            acc = Vec::add(acc, Vec::load(g + p * out_c, mask));
          float* sg = sum_g.data() + chunk * out_c + tile.grp * og + tile.o0;
          Vec::store(sg, Vec::add(Vec::load(sg, mask), acc), mask);
        }
      }
    }
  };
  ParallelFor(pool, chunks * blocks, item);
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

ffi::Error WeightGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xb,
                          ffi::Buffer<ffi::F32> gb, ffi::Buffer<ffi::F32> wt,
                          ffi::ResultBuffer<ffi::F32> dwt, int64_t sh, int64_t sw, int64_t dh,
                          int64_t dw, int64_t top, int64_t left, int64_t groups) {
  return WeightGrad(pool, xb, gb, wt, dwt, sh, sw, dh, dw, top, left, groups, nullptr);
}

// x read through the BatchNorm and ReLU that in_mean, in_var, in_scale and in_bias describe.
ffi::Error WeightGradNormedImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xb,
                                ffi::Buffer<ffi::F32> gb, ffi::Buffer<ffi::F32> wt,
                                ffi::Buffer<ffi::F32> in_mean, ffi::Buffer<ffi::F32> in_var,
                                ffi::Buffer<ffi::F32> in_scale, ffi::Buffer<ffi::F32> in_bias,
                                ffi::ResultBuffer<ffi::F32> dwt, int64_t sh, int64_t sw,
                                int64_t dh, int64_t dw, int64_t top, int64_t left,
                                int64_t groups, float epsilon) {
  const auto xd = xb.dimensions();
  const auto norm = MakeInputNorm(in_mean, in_var, in_scale, in_bias,
                                  xd.size() == 4 ? xd[3] : 0, epsilon);
  if (!norm.ok || !norm.get())
    return ffi::Error::InvalidArgument("adderjax_adder_weight_grad_normed: bad input statistics");
  return WeightGrad(pool, xb, gb, wt, dwt, sh, sw, dh, dw, top, left, groups, norm.get());
}

}  // namespace

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

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdderjaxAdderWeightGradNormed, WeightGradNormedImpl,
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
                                  .Attr<int64_t>("groups")
                                  .Attr<float>("epsilon"));
