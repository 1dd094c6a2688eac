// Native CPU kernels of the integer adder layers (adderjax.quant), as XLA FFI handlers.
//
// They sum -sum_k |a_k - W_k| over each patch in int32, exactly, with the codes a (made here,
// below) and the filters W (packed by adderjax/ops/cpu_native_int.py) chosen so that the
// difference of two lanes is the layer's |a_q - m w_q| (m = 2 for unsigned inputs, 1 for
// signed ones):
//
//   uint8 lanes (bits <= 8): vpsadbw sums |a - b| over 8 unsigned bytes into a 64-bit lane,
//     32 pairs per AVX2 instruction (64 with AVX-512 BW). Unsigned inputs: a in [0, 255],
//     W = 2w for w >= 0 and 0 for w < 0, where |a - 2w| = a - 2w = |a - 0| + (-2w): the
//     per-channel constant C_o = sum_{w_k < 0} -2 w_k is added after the sums. Signed inputs:
//     a + 128 against w + 128 (C_o = 0), the padding being the shifted code of 0.0, 128.
//   int16 lanes (|a - m w| < 2^15: bits <= 14 unsigned, 15 signed): max - min of signed 16-bit
//     lanes, widened by vpmaddwd against ones into int32 lanes at each step.
//
// Like the float forward (adder_forward_cpu.cc), an SGEMM micro-kernel: a tile of MR output
// pixels by NV vectors of output channels held in accumulators while the fan-in K = kh*kw*C streams
// through it, 8 bytes (a chunk) at a time. Each 64-bit lane of a vector belongs to one output
// channel (4 per AVX2 vector, 8 per AVX-512 one): a pixel's chunk, broadcast to every lane,
// against a vector of the filters' chunks adds that chunk's |a - w| to 4 (8) channels at once,
// so the sums need no horizontal reduction, only a pack of the lanes at the end. The filters
// come packed as (V, chunks, N, chunk): V vectors of N channels (each group padded to whole
// vectors with zero channels), the fan-in zero-padded to whole chunks.
//
// The codes are made here, not in XLA: each work item (a band of up to 8 output rows of an
// image, or a part of their columns where the batch is small) rounds the input window its
// patches read into a scratch buffer, once per scale group (clip(round_half_even(x * mult_g),
// lo, hi), XLA's arithmetic, the multipliers computed by XLA; the padding is the code of 0.0),
// so that no code tensor goes through memory and each input row is rounded about once per
// group. Where the channels fill whole chunks (C a multiple of 8 bytes) a chunk never straddles
// two taps and the tiles read the scratch in place (implicit im2col: chunk q of a patch at
// offsets[q] from its first element); otherwise (an RGB input, odd features) the patches are
// copied out of it first, a zero-padded row of chunks per pixel.
//
// The filters come sorted by scale group (group_sizes), each group against its own codes; a
// tile is one or two vectors of one group. Each lane's sums go to their output channel's place
// in y (channels), so y is in the layer's own order. The scaled handlers write float32 y =
// float(acc) * scale_o + correction_o + bias_o (a fused multiply-add, then the bias: the
// roundings of XLA's fusion of the same expression), so that the int32 sums are never written
// out either. Work items are shared out over XLA's intra-op threads.
//
// Layouts: x (B, H, W, C) float32, not padded; quantizer (G + 2,) float32: each group's
// multiplier, then the lowest and the highest code; w (V, chunks, N, chunk); constant, and for
// the scaled handlers scale, correction, bias: (V * N,), padded like the filters; y (B, Ho, Wo,
// O). Attributes: the geometry, the padding before the first row and column (top, left), the
// shift added to every code (128 for signed codes in uint8 lanes, else 0), the group sizes, and
// channels (V * N,): the output channel of each lane, -1 for the padding.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using adderjax::ChunksToFill;
using adderjax::ParallelFor;

namespace {

#if defined(__AVX512BW__)
struct IntVec {
  using T = __m512i;
  static constexpr int kBytes = 64;
  static constexpr int kRegisters = 32;
  static T zero() { return _mm512_setzero_si512(); }
  static T load(const void* p) { return _mm512_loadu_si512(p); }
  static T broadcast8(const void* p) {
    int64_t v;
    std::memcpy(&v, p, 8);
    return _mm512_set1_epi64(v);
  }
  static T add32(T a, T b) { return _mm512_add_epi32(a, b); }
  static T sad_u8(T a, T b) { return _mm512_sad_epu8(a, b); }
  static T absdiff_widen_i16(T a, T b, T ones) {
    return _mm512_madd_epi16(_mm512_sub_epi16(_mm512_max_epi16(a, b), _mm512_min_epi16(a, b)),
                             ones);
  }
  static T ones16() { return _mm512_set1_epi16(1); }
};

// The results of one vector of output channels (one per 64-bit lane of an accumulator), and
// of a pair of vectors, as int32 or float32 lanes in channel order.
struct ChannelVec {
  using I = __m256i;
  using F = __m256;
  static constexpr int kLanes = 8;
  // The sum of each 64-bit lane's two int32 halves, one channel per int32.
  static I pack(__m512i acc) {
    return _mm512_cvtepi64_epi32(_mm512_add_epi32(acc, _mm512_srli_epi64(acc, 32)));
  }
  static I loadi(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const I*>(p)); }
  static void storei(int32_t* p, I v) { _mm256_storeu_si256(reinterpret_cast<I*>(p), v); }
  static I sub(I a, I b) { return _mm256_sub_epi32(a, b); }
  static F to_float(I a) { return _mm256_cvtepi32_ps(a); }
  static F loadf(const float* p) { return _mm256_loadu_ps(p); }
  static void storef(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
};

struct PairVec {
  using I = __m512i;
  using F = __m512;
  static constexpr int kLanes = 16;
  // The first vector's channels, then the second's: the odd int32 lanes of the second's sums
  // blended into the first's, then put in order.
  static I pack(__m512i a0, __m512i a1) {
    const __m512i s0 = _mm512_add_epi32(a0, _mm512_srli_epi64(a0, 32));
    const __m512i s1 = _mm512_add_epi32(a1, _mm512_slli_epi64(a1, 32));
    return _mm512_permutexvar_epi32(
        _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15),
        _mm512_mask_blend_epi32(0xAAAA, s0, s1));
  }
  static I loadi(const int32_t* p) { return _mm512_loadu_si512(p); }
  static void storei(int32_t* p, I v) { _mm512_storeu_si512(p, v); }
  static I sub(I a, I b) { return _mm512_sub_epi32(a, b); }
  static F to_float(I a) { return _mm512_cvtepi32_ps(a); }
  static F loadf(const float* p) { return _mm512_loadu_ps(p); }
  static void storef(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
};
#elif defined(__AVX2__)
struct IntVec {
  using T = __m256i;
  static constexpr int kBytes = 32;
  static constexpr int kRegisters = 16;
  static T zero() { return _mm256_setzero_si256(); }
  static T load(const void* p) { return _mm256_loadu_si256(static_cast<const T*>(p)); }
  static T broadcast8(const void* p) {
    int64_t v;
    std::memcpy(&v, p, 8);
    return _mm256_set1_epi64x(v);
  }
  static T add32(T a, T b) { return _mm256_add_epi32(a, b); }
  static T sad_u8(T a, T b) { return _mm256_sad_epu8(a, b); }
  static T absdiff_widen_i16(T a, T b, T ones) {
    return _mm256_madd_epi16(_mm256_sub_epi16(_mm256_max_epi16(a, b), _mm256_min_epi16(a, b)),
                             ones);
  }
  static T ones16() { return _mm256_set1_epi16(1); }
};

struct ChannelVec {
  using I = __m128i;
  using F = __m128;
  static constexpr int kLanes = 4;
  static I pack(__m256i acc) {
    const __m256i sums = _mm256_add_epi32(acc, _mm256_srli_epi64(acc, 32));
    return _mm256_castsi256_si128(
        _mm256_permutevar8x32_epi32(sums, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6)));
  }
  static I loadi(const int32_t* p) { return _mm_loadu_si128(reinterpret_cast<const I*>(p)); }
  static void storei(int32_t* p, I v) { _mm_storeu_si128(reinterpret_cast<I*>(p), v); }
  static I sub(I a, I b) { return _mm_sub_epi32(a, b); }
  static F to_float(I a) { return _mm_cvtepi32_ps(a); }
  static F loadf(const float* p) { return _mm_loadu_ps(p); }
  static void storef(float* p, F v) { _mm_storeu_ps(p, v); }
  static F fmadd(F a, F b, F c) { return _mm_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm_add_ps(a, b); }
};

struct PairVec {
  using I = __m256i;
  using F = __m256;
  static constexpr int kLanes = 8;
  static I pack(__m256i a0, __m256i a1) {
    const __m256i s0 = _mm256_add_epi32(a0, _mm256_srli_epi64(a0, 32));
    const __m256i s1 = _mm256_add_epi32(a1, _mm256_slli_epi64(a1, 32));
    return _mm256_permutevar8x32_epi32(_mm256_blend_epi32(s0, s1, 0xAA),
                                       _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
  }
  static I loadi(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const I*>(p)); }
  static void storei(int32_t* p, I v) { _mm256_storeu_si256(reinterpret_cast<I*>(p), v); }
  static I sub(I a, I b) { return _mm256_sub_epi32(a, b); }
  static F to_float(I a) { return _mm256_cvtepi32_ps(a); }
  static F loadf(const float* p) { return _mm256_loadu_ps(p); }
  static void storef(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
};
#else
#error "adderjax's native integer kernels need AVX2 or AVX-512"
#endif

using IV = IntVec::T;
constexpr int kChannels = ChannelVec::kLanes;

// The lanes: what a vector of codes holds and how a pair of vectors adds to the sums. A
// chunk is the 8 bytes of the fan-in that one 64-bit lane of a vector covers.
struct U8Lanes {
  using Elem = uint8_t;
  static constexpr ffi::DataType kType = ffi::DataType::U8;
  static IV step(IV a, IV b, IV) { return IntVec::sad_u8(a, b); }
};

struct I16Lanes {
  using Elem = int16_t;
  static constexpr ffi::DataType kType = ffi::DataType::S16;
  static IV step(IV a, IV b, IV ones) { return IntVec::absdiff_widen_i16(a, b, ones); }
};

// Tiles: MR pixels by NV vectors of kChannels output channels. Registers: MR * NV
// accumulators, NV filter vectors, the broadcast chunk of a pixel (and the ones of vpmaddwd).
#if defined(ADDERJAX_INT_MR2)  // For measurements: other tile heights.
constexpr int kMR2 = ADDERJAX_INT_MR2;
#else
constexpr int kMR2 = IntVec::kRegisters == 32 ? 8 : 4;
#endif
constexpr int kMR1 = 8;
constexpr int kMaxMR = 8;
template <int NV>
constexpr int kMaxPixels = NV == 2 ? kMR2 : kMR1;

constexpr int64_t kChunkBytes = 8;

// Where a tile's sums go: int32 -(sum + constant), or float32 scaled and shifted, each lane
// to its channel's place in y (channels: the output channel of each padded lane, -1 for the
// padding). The per-channel arrays are padded like the filters (each group to whole vectors).
template <bool kScaled>
struct Epilogue {
  const int32_t* neg_constant;  // -constant
  const float* scale;  // kScaled only: each channel's step, correction and bias.
  const float* correction;
  const float* bias;
  const int64_t* channels;
  using Out = std::conditional_t<kScaled, float, int32_t>;

  // The lanes [c, c + CV::kLanes) of a pixel (y: the pixel's outputs) from their sums;
  // in_order: they are channels channels[c], channels[c] + 1, ... (one store).
  template <class CV>
  void store(typename CV::I sums, int64_t c, Out* y, bool in_order) const {
    const typename CV::I acc = CV::sub(CV::loadi(neg_constant + c), sums);
    alignas(64) Out out[CV::kLanes];
    Out* target = in_order ? y + channels[c] : out;
    if constexpr (kScaled) {
      // The rounding of XLA's y = acc * step + correction + bias, whose fusion contracts the
      // product and the first sum into a fused multiply-add.
      const typename CV::F v =
          CV::fmadd(CV::to_float(acc), CV::loadf(scale + c), CV::loadf(correction + c));
      CV::storef(target, CV::add(v, CV::loadf(bias + c)));
    } else {
      CV::storei(target, acc);
    }
    if (!in_order)
      for (int i = 0; i < CV::kLanes; ++i)
        if (channels[c + i] >= 0) y[channels[c + i]] = out[i];
  }
};

// MR pixels by NV vectors of channels of one group: pixel m has its chunk q at a + m * a_step
// + offsets[q]; w: per vector, the chunks in order, each kChannels chunks of the channels; c:
// the first vector's first lane; in_order: see Epilogue::store.
template <class L, int MR, int NV, bool kScaled>
inline void Tile(const typename L::Elem* a, int64_t a_step, const int64_t* offsets,
                 int64_t chunks, const typename L::Elem* w, int64_t w_vector,
                 const Epilogue<kScaled>& epilogue, int64_t c,
                 typename Epilogue<kScaled>::Out* y, int64_t y_step, bool in_order) {
  const IV ones = IntVec::ones16();
  IV acc[MR][NV];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[m][v] = IntVec::zero();
  constexpr int64_t kVectorElems = IntVec::kBytes / sizeof(typename L::Elem);
  for (int64_t q = 0; q < chunks; ++q) {
    IV b[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) b[v] = IntVec::load(w + v * w_vector + q * kVectorElems);
    const int64_t offset = offsets[q];
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const IV am = IntVec::broadcast8(a + offset + m * a_step);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[m][v] = IntVec::add32(acc[m][v], L::step(am, b[v], ones));
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    if constexpr (NV == 2)
      epilogue.template store<PairVec>(PairVec::pack(acc[m][0], acc[m][1]), c, y + m * y_step,
                                       in_order);
    else
      epilogue.template store<ChannelVec>(ChannelVec::pack(acc[m][0]), c, y + m * y_step,
                                          in_order);
  }
}

template <class L, int NV, bool kScaled>
void TileAnyMR(int mr, const typename L::Elem* a, int64_t a_step, const int64_t* offsets,
               int64_t chunks, const typename L::Elem* w, int64_t w_vector,
               const Epilogue<kScaled>& epilogue, int64_t c, typename Epilogue<kScaled>::Out* y,
               int64_t y_step, bool in_order) {
#define ADDERJAX_MR_CASE(R)                                                                    \
  case R:                                                                                      \
    if constexpr (R <= kMaxPixels<NV>)                                                         \
      Tile<L, R, NV, kScaled>(a, a_step, offsets, chunks, w, w_vector, epilogue, c, y, y_step, \
                              in_order);                                                    \
    return;
  switch (mr) {
    ADDERJAX_MR_CASE(1) ADDERJAX_MR_CASE(2) ADDERJAX_MR_CASE(3) ADDERJAX_MR_CASE(4)
    ADDERJAX_MR_CASE(5) ADDERJAX_MR_CASE(6) ADDERJAX_MR_CASE(7) ADDERJAX_MR_CASE(8)
  }
#undef ADDERJAX_MR_CASE
}

// The activation codes of n floats, as XLA computes them (adderjax.quant.quantize_activations):
// clip(round_half_even(x * mult), lo, hi), plus `shift` (128 for signed codes in uint8 lanes).
// The vector loop clips before it rounds (the bounds are integers, so the order does not
// matter; a NaN becomes lo either way) and rounds in the conversion (MXCSR's default mode,
// round half to even).
template <class Elem>
void Quantize(const float* x, int64_t n, float mult, float lo, float hi, int32_t shift,
              Elem* out) {
  const __m256 m = _mm256_set1_ps(mult), l = _mm256_set1_ps(lo), h = _mm256_set1_ps(hi);
  const __m256i s = _mm256_set1_epi32(shift);
  auto codes = [&](const float* p) {
    const __m256 clipped = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_loadu_ps(p), m), l), h);
    return _mm256_add_epi32(_mm256_cvtps_epi32(clipped), s);
  };
  int64_t k = 0;
  if constexpr (sizeof(Elem) == 1) {
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (; k + 32 <= n; k += 32) {
      const __m256i w01 = _mm256_packs_epi32(codes(x + k), codes(x + k + 8));
      const __m256i w23 = _mm256_packs_epi32(codes(x + k + 16), codes(x + k + 24));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k),
                          _mm256_permutevar8x32_epi32(_mm256_packus_epi16(w01, w23), order));
    }
  }
  for (; k + 8 <= n; k += 8) {
    const __m256i v = codes(x + k);
    const __m128i lo4 = _mm256_castsi256_si128(v), hi4 = _mm256_extracti128_si256(v, 1);
    if constexpr (sizeof(Elem) == 1) {
      const __m128i w = _mm_packus_epi32(lo4, hi4);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + k), _mm_packus_epi16(w, w));
    } else {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), _mm_packs_epi32(lo4, hi4));
    }
  }
  for (; k < n; ++k) {
    const float r = std::nearbyint(x[k] * mult);  // Half to even in the default rounding mode.
    out[k] = Elem(int32_t(std::min(std::max(r, lo), hi)) + shift);
  }
}

struct Geometry {
  int64_t kh, kw, sh, sw, dh, dw, top, left, shift;
};

// Patches copied out (when the channels do not fill whole chunks) at most this many bytes
// per item, so that they stay in L1/L2 beside the filters; an item's rows at most kMaxBand,
// and its input windows (all groups) at most kWindowBytes.
constexpr int64_t kPatchBytes = 24 * 1024;
constexpr int64_t kMaxBand = 8;
constexpr int64_t kWindowBytes = 192 * 1024;

// The copy of an item's patches out of its windows (when the channels do not fill whole
// chunks): every pixel's taps, in order, a zero-padded row of `patch` codes per pixel.
struct PatchGeometry {
  int64_t groups, window_elems, rows, pixels, kh, kw, sh, sw, dh, dw, wq, c, patch;
};

// Bytes the copy may read past a window's end.
constexpr int64_t kCopySlack = 64;

template <class Elem>
void CopyPatches(const Elem* __restrict window, Elem* __restrict patches,
                 const PatchGeometry& geometry) {
  // Locals, not the struct's fields: the byte stores below may alias any memory, so the
  // compiler would reload every field after each of them.
  const int64_t groups = geometry.groups, window_elems = geometry.window_elems;
  const int64_t rows = geometry.rows, pixels = geometry.pixels, kh = geometry.kh;
  const int64_t sh = geometry.sh, sw = geometry.sw, dh = geometry.dh, dw = geometry.dw;
  const int64_t wq = geometry.wq, c = geometry.c, patch = geometry.patch;
  // A tap row's kw * c codes are contiguous in the window unless the kernel is dilated, and a
  // patch's runs are contiguous in it. A run is copied 8 bytes at a time, the tail included
  // (the runs after it overwrite what it writes past its end), while at least 8 bytes of runs
  // follow it, so that the patch's bytes past the fan-in stay zero.
  const int64_t runs = dw == 1 ? 1 : geometry.kw;
  const int64_t run = (dw == 1 ? geometry.kw * c : c) * int64_t(sizeof(Elem));
  const int64_t patch_bytes = kh * runs * run;
  const auto* source = reinterpret_cast<const uint8_t*>(window);
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t rr = 0; rr < rows; ++rr)
      for (int64_t p = 0; p < pixels; ++p) {
        auto* to = reinterpret_cast<uint8_t*>(patches + ((g * rows + rr) * pixels + p) * patch);
        int64_t left = patch_bytes;
        for (int64_t i = 0; i < kh; ++i)
          for (int64_t j = 0; j < runs; ++j, to += run, left -= run) {
            const uint8_t* from =
                source + (g * window_elems + ((rr * sh + i * dh) * wq + p * sw + j * dw) * c) *
                             int64_t(sizeof(Elem));
            if (left - run >= 8) {
              for (int64_t k = 0; k < run; k += 8) std::memcpy(to + k, from + k, 8);
            } else {
              for (int64_t k = 0; k < run; ++k) to[k] = from[k];
            }
          }
      }
}

template <class L, bool kScaled>
ffi::Error IntegerAdderImpl(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32> xb,
                            ffi::Buffer<ffi::F32> quantizer, ffi::AnyBuffer wt,
                            ffi::Buffer<ffi::S32> constant, const Epilogue<kScaled>& epi_in,
                            ffi::Result<ffi::AnyBuffer> y, const Geometry& geo,
                            ffi::Span<const int64_t> group_sizes,
                            ffi::Span<const int64_t> channels) {
  const int64_t kh = geo.kh, kw = geo.kw, sh = geo.sh, sw = geo.sw, dh = geo.dh, dw = geo.dw;
  using Elem = typename L::Elem;
  using Out = typename Epilogue<kScaled>::Out;
  constexpr int64_t kChunk = kChunkBytes / sizeof(Elem);  // Elements per chunk.
  const auto xd = xb.dimensions(), wd = wt.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument("adderjax_integer_adder: bad ranks");
  if (wt.element_type() != L::kType ||
      y->element_type() != (kScaled ? ffi::DataType::F32 : ffi::DataType::S32))
    return ffi::Error::InvalidArgument("adderjax_integer_adder: bad dtypes");
  const int64_t groups = int64_t(group_sizes.size()), batch = xd[0], h = xd[1], w = xd[2];
  const int64_t c = xd[3];
  if (int64_t(quantizer.element_count()) != groups + 2)
    return ffi::Error::InvalidArgument("adderjax_integer_adder: a multiplier for each group");
  const int64_t vectors = wd[0], chunks = wd[1], out_c = yd[3], ho = yd[1], wo = yd[2];
  const int64_t k_size = kh * kw * c;
  // The group of each vector of filters.
  std::vector<int64_t> vector_group;
  int64_t channel_total = 0;
  for (int64_t g = 0; g < groups; ++g) {
    channel_total += group_sizes[g];
    vector_group.insert(vector_group.end(), (group_sizes[g] + kChannels - 1) / kChannels, g);
  }
  if (channel_total != out_c || int64_t(vector_group.size()) != vectors ||
      wd[2] != kChannels || wd[3] != kChunk || yd[0] != batch || chunks * kChunk < k_size ||
      chunks * kChunk >= k_size + kChunk ||
      int64_t(constant.element_count()) != vectors * kChannels ||
      int64_t(channels.size()) != vectors * kChannels)
    return ffi::Error::InvalidArgument("adderjax_integer_adder: bad operand layout");
  for (int64_t ch : channels)
    if (ch < -1 || ch >= out_c)
      return ffi::Error::InvalidArgument("adderjax_integer_adder: bad channels");
  const float* x_data = xb.typed_data();
  const float* q_data = quantizer.typed_data();  // Each group's multiplier, then lo and hi.
  const Elem* w_data = static_cast<const Elem*>(wt.untyped_data());
  Out* y_data = static_cast<Out*>(y->untyped_data());
  std::vector<int32_t> neg_constant(constant.element_count());
  for (size_t i = 0; i < neg_constant.size(); ++i) neg_constant[i] = -constant.typed_data()[i];
  Epilogue<kScaled> epilogue = epi_in;
  epilogue.neg_constant = neg_constant.data();
  epilogue.channels = channels.begin();
  const int64_t w_vector = chunks * kChannels * kChunk;
  // The passes of tiles: pairs of vectors of one group (sharing each pixel's broadcast
  // chunk), and the vector a group has left over.
  struct Pass {
    int64_t v, nv;
    bool in_order;  // Its lanes are consecutive channels.
  };
  std::vector<Pass> passes;
  for (int64_t v = 0; v < vectors;) {
    const int64_t nv = v + 1 < vectors && vector_group[v + 1] == vector_group[v] ? 2 : 1;
    const int64_t* ch = channels.begin() + v * kChannels;
    bool in_order = ch[0] >= 0;
    for (int64_t i = 1; i < nv * kChannels; ++i) in_order = in_order && ch[i] == ch[0] + i;
    passes.push_back({v, nv, in_order});
    v += nv;
  }
  // Items: an image's band of rows, or a part of its columns, so that the batch keeps the
  // threads busy; rows in bands of up to kMaxBand, so that each input row is quantized about
  // once, not kh times.
  const bool in_place = c % kChunk == 0;
  const int64_t patch = chunks * kChunk;
  const int64_t row_patch_bytes = groups * wo * patch * int64_t(sizeof(Elem));
  int64_t bands = std::max((ho + kMaxBand - 1) / kMaxBand, ChunksToFill(pool, batch, 2, ho));
  int64_t band = (ho + bands - 1) / bands;
  const int64_t window_row_bytes = groups * ((wo - 1) * sw + (kw - 1) * dw + 1) * c *
                                   int64_t(sizeof(Elem));
  while (band > 1 && (((band - 1) * sh + (kh - 1) * dh + 1) * window_row_bytes > kWindowBytes ||
                      (!in_place && band * row_patch_bytes > kPatchBytes)))
    --band;
  bands = (ho + band - 1) / band;
  const int64_t by_size =
      in_place ? wo
               : std::max<int64_t>(kMaxMR, kPatchBytes / (groups * band * patch *
                                                          int64_t(sizeof(Elem))));
  const int64_t wanted = ChunksToFill(pool, batch * bands, 2, (wo + kMaxMR - 1) / kMaxMR);
  const int64_t parts = std::max((wo + by_size - 1) / by_size, wanted);
  const int64_t span = ((wo + parts - 1) / parts + kMaxMR - 1) / kMaxMR * kMaxMR;
  const int64_t spans = (wo + span - 1) / span;
  // Each item quantizes the input window its patches read, hq rows of wq columns (the padding
  // is the code of 0.0), into a scratch buffer, once per group; where the channels fill whole
  // chunks the tiles read it in place (chunk q of a patch at offsets[q] from its first
  // element), otherwise the patches are copied out of it, a row of `patch` lanes per pixel.
  const int64_t wq = (span - 1) * sw + (kw - 1) * dw + 1;
  const int64_t hq = (band - 1) * sh + (kh - 1) * dh + 1;
  const int64_t window_elems = hq * wq * c;
  std::vector<int64_t> offsets(chunks);
  for (int64_t q = 0; q < chunks; ++q) {
    const int64_t k = q * kChunk, i = k / (kw * c), j = k / c % kw;
    offsets[q] = in_place ? (i * dh * wq + j * dw) * c + k % c : k;
  }
  const float lo = q_data[groups], hi = q_data[groups + 1];
  const Elem pad = Elem(geo.shift);  // The code of 0.0 (clip(0) + shift).
  auto item = [&](int64_t it) {
    const int64_t b = it / (bands * spans), r0 = it / spans % bands * band;
    const int64_t rows = std::min(band, ho - r0);
    const int64_t p0 = it % spans * span, pixels = std::min(span, wo - p0);
    // The thread's scratch, by plain pointers below: each use of a thread_local in a shared
    // library is a call (__tls_get_addr).
    thread_local std::vector<Elem> window_buffer, patch_buffer;
    window_buffer.resize(groups * window_elems + kCopySlack);
    Elem* const window = window_buffer.data();
    const int64_t x0 = p0 * sw - geo.left;  // The window's first input column.
    const int64_t c0 = std::clamp<int64_t>(-x0, 0, wq), c1 = std::clamp<int64_t>(w - x0, c0, wq);
    const int64_t used_rows = (rows - 1) * sh + (kh - 1) * dh + 1;
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t i = 0; i < used_rows; ++i) {
        Elem* row = window + g * window_elems + i * wq * c;
        const int64_t iy = r0 * sh + i - geo.top;
        if (iy < 0 || iy >= h) {
          std::fill_n(row, wq * c, pad);
          continue;
        }
        std::fill_n(row, c0 * c, pad);
        Quantize(x_data + ((b * h + iy) * w + x0 + c0) * c, (c1 - c0) * c, q_data[g], lo, hi,
                 int32_t(geo.shift), row + c0 * c);
        std::fill(row + c1 * c, row + wq * c, pad);
      }
    }
    // Where the pixel (row rr of the band, column m) of vector v reads: data + group_stride
    // * group + rr * row_stride + m * a_step.
    const Elem* data = window;
    int64_t group_stride = window_elems, row_stride = sh * wq * c, a_step = sw * c;
    if (!in_place) {
      group_stride = rows * pixels * patch;
      row_stride = pixels * patch;
      a_step = patch;
      patch_buffer.assign(groups * group_stride, Elem(0));
      CopyPatches(window, patch_buffer.data(), PatchGeometry{groups, window_elems, rows, pixels,
                                                             kh, kw, sh, sw, dh, dw, wq, c,
                                                             patch});
      data = patch_buffer.data();
    }
    for (const Pass& pass : passes) {
      const Elem* wv = w_data + pass.v * w_vector;
      const int64_t mr_max = pass.nv == 2 ? kMaxPixels<2> : kMaxPixels<1>;
      for (int64_t rr = 0; rr < rows; ++rr) {
        Out* y_row = y_data + ((b * ho + r0 + rr) * wo + p0) * out_c;
        const Elem* a_row = data + vector_group[pass.v] * group_stride + rr * row_stride;
        for (int64_t m = 0; m < pixels; m += mr_max) {
          const int mr = int(std::min<int64_t>(mr_max, pixels - m));
          const Elem* a = a_row + m * a_step;
          Out* ym = y_row + m * out_c;
          const int64_t lane = pass.v * kChannels;
          if (pass.nv == 2)
            TileAnyMR<L, 2, kScaled>(mr, a, a_step, offsets.data(), chunks, wv, w_vector,
                                     epilogue, lane, ym, out_c, pass.in_order);
          else
            TileAnyMR<L, 1, kScaled>(mr, a, a_step, offsets.data(), chunks, wv, w_vector,
                                     epilogue, lane, ym, out_c, pass.in_order);
        }
      }
    }
  };
  ParallelFor(pool, batch * bands * spans, item);
  return ffi::Error::Success();
}

template <class L>
ffi::Error SumsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> quantizer,
                    ffi::AnyBuffer wt, ffi::Buffer<ffi::S32> constant,
                    ffi::Result<ffi::AnyBuffer> y, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                    int64_t dh, int64_t dw, int64_t top, int64_t left, int64_t shift,
                    ffi::Span<const int64_t> group_sizes, ffi::Span<const int64_t> channels) {
  return IntegerAdderImpl<L, false>(pool, x, quantizer, wt, constant, Epilogue<false>{}, y,
                                    Geometry{kh, kw, sh, sw, dh, dw, top, left, shift},
                                    group_sizes, channels);
}

template <class L>
ffi::Error ScaledImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                      ffi::Buffer<ffi::F32> quantizer, ffi::AnyBuffer wt,
                      ffi::Buffer<ffi::S32> constant, ffi::Buffer<ffi::F32> scale,
                      ffi::Buffer<ffi::F32> correction, ffi::Buffer<ffi::F32> bias,
                      ffi::Result<ffi::AnyBuffer> y, int64_t kh, int64_t kw, int64_t sh,
                      int64_t sw, int64_t dh, int64_t dw, int64_t top, int64_t left, int64_t shift,
                      ffi::Span<const int64_t> group_sizes, ffi::Span<const int64_t> channels) {
  const int64_t padded = int64_t(constant.element_count());
  if (int64_t(scale.element_count()) != padded || int64_t(correction.element_count()) != padded ||
      int64_t(bias.element_count()) != padded)
    return ffi::Error::InvalidArgument("adderjax_integer_adder: bad epilogue operands");
  Epilogue<true> epilogue{nullptr, scale.typed_data(), correction.typed_data(),
                          bias.typed_data()};
  return IntegerAdderImpl<L, true>(pool, x, quantizer, wt, constant, epilogue, y,
                                   Geometry{kh, kw, sh, sw, dh, dw, top, left, shift},
                                   group_sizes, channels);
}

}  // namespace

#define ADDERJAX_GEOMETRY_ATTRS                \
  .Attr<int64_t>("kh")                         \
      .Attr<int64_t>("kw")                     \
      .Attr<int64_t>("sh")                     \
      .Attr<int64_t>("sw")                     \
      .Attr<int64_t>("dh")                     \
      .Attr<int64_t>("dw")                     \
      .Attr<int64_t>("top")                    \
      .Attr<int64_t>("left")                   \
      .Attr<int64_t>("shift")                  \
      .Attr<ffi::Span<const int64_t>>("group_sizes") \
      .Attr<ffi::Span<const int64_t>>("channels")

#define ADDERJAX_SUMS_HANDLER(NAME, IMPL)                              \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, IMPL,                            \
                                ffi::Ffi::Bind()                       \
                                    .Ctx<ffi::ThreadPool>()            \
                                    .Arg<ffi::Buffer<ffi::F32>>()      \
                                    .Arg<ffi::Buffer<ffi::F32>>()      \
                                    .Arg<ffi::AnyBuffer>()             \
                                    .Arg<ffi::Buffer<ffi::S32>>()      \
                                    .Ret<ffi::AnyBuffer>()             \
                                        ADDERJAX_GEOMETRY_ATTRS);

#define ADDERJAX_SCALED_HANDLER(NAME, IMPL)                            \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, IMPL,                            \
                                ffi::Ffi::Bind()                       \
                                    .Ctx<ffi::ThreadPool>()            \
                                    .Arg<ffi::Buffer<ffi::F32>>()      \
                                    .Arg<ffi::Buffer<ffi::F32>>()      \
                                    .Arg<ffi::AnyBuffer>()             \
                                    .Arg<ffi::Buffer<ffi::S32>>()      \
                                    .Arg<ffi::Buffer<ffi::F32>>()      \
                                    .Arg<ffi::Buffer<ffi::F32>>()      \
                                    .Arg<ffi::Buffer<ffi::F32>>()      \
                                    .Ret<ffi::AnyBuffer>()             \
                                        ADDERJAX_GEOMETRY_ATTRS);

ADDERJAX_SUMS_HANDLER(AdderjaxIntegerSumsU8, SumsImpl<U8Lanes>)
ADDERJAX_SUMS_HANDLER(AdderjaxIntegerSumsI16, SumsImpl<I16Lanes>)
ADDERJAX_SCALED_HANDLER(AdderjaxIntegerScaledU8, ScaledImpl<U8Lanes>)
ADDERJAX_SCALED_HANDLER(AdderjaxIntegerScaledI16, ScaledImpl<I16Lanes>)

// The output channels of a vector of packed filters.
extern "C" int AdderjaxIntegerChannelsPerVector() { return kChannels; }
