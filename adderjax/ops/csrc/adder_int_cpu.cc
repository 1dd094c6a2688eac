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
// Like the float forward (adder_cpu.cc), an SGEMM micro-kernel: a tile of MR output pixels by
// NV vectors of output channels held in accumulators while the fan-in K = kh*kw*C streams
// through it, 8 bytes (a chunk) at a time. Each 64-bit lane of a vector belongs to one output
// channel (4 per AVX2 vector, 8 per AVX-512 one): a pixel's chunk, broadcast to every lane,
// against a vector of the filters' chunks adds that chunk's |a - w| to 4 (8) channels at once,
// so the sums need no horizontal reduction, only a pack of the lanes at the end. The filters
// come packed as (V, chunks, N, chunk): V vectors of N channels (each group padded to whole
// vectors with zero channels), the fan-in zero-padded to whole chunks.
//
// The codes are made here, not in XLA: each work item (an image's output row, or a part of it
// where the batch is small) rounds the input window its patches read, kh rows, into a scratch
// buffer per scale group (clip(round_half_even(x * mult_g), lo, hi), XLA's arithmetic, the
// multipliers computed by XLA; the padding is the code of 0.0), so that no code tensor goes
// through memory. Where the channels fill whole chunks (C a multiple of 8 bytes) a chunk never
// straddles two taps and the tiles read the scratch in place (implicit im2col: chunk q of a
// patch at offsets[q] from its first element); otherwise (an RGB input, odd features) the
// patches are copied out of it first, a zero-padded row of chunks per pixel.
//
// Output channels come sorted by scale group (group_sizes), each group against its own codes;
// y keeps that order. The scaled handlers write float32 y = float(acc) * scale_o +
// correction_o + bias_o (a fused multiply-add, then the bias: the roundings of XLA's fusion of
// the same expression), so that the int32 sums are never written out either. Work items are
// shared out over XLA's intra-op threads.
//
// Layouts: x (B, H, W, C) float32, not padded; quantizer (G + 2,) float32: each group's
// multiplier, then the lowest and the highest code; w (V, chunks, N, chunk); constant, and for
// the scaled handlers scale, correction, bias: (V * N,), padded like the filters; y (B, Ho, Wo,
// O). Attributes: the geometry, the padding before the first row and column (top, left), and
// the shift added to every code (128 for signed codes in uint8 lanes, else 0).

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

// A vector of output channels' results: one per 64-bit lane of an accumulator.
struct ChannelVec {
  using I = __m256i;
  using F = __m256;
  static constexpr int kChannels = 8;
  // The sum of each 64-bit lane's two int32 halves, one channel per int32.
  static I pack(__m512i acc) {
    return _mm512_cvtepi64_epi32(_mm512_add_epi32(acc, _mm512_srli_epi64(acc, 32)));
  }
  static I loadi(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const I*>(p)); }
  static void storei(int32_t* p, I v) { _mm256_storeu_si256(reinterpret_cast<I*>(p), v); }
  static I negate_sum(I a, I b) { return _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_add_epi32(a, b)); }
  static F to_float(I a) { return _mm256_cvtepi32_ps(a); }
  static F loadf(const float* p) { return _mm256_loadu_ps(p); }
  static void storef(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
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
  static constexpr int kChannels = 4;
  static I pack(__m256i acc) {
    const __m256i sums = _mm256_add_epi32(acc, _mm256_srli_epi64(acc, 32));
    return _mm256_castsi256_si128(
        _mm256_permutevar8x32_epi32(sums, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6)));
  }
  static I loadi(const int32_t* p) { return _mm_loadu_si128(reinterpret_cast<const I*>(p)); }
  static void storei(int32_t* p, I v) { _mm_storeu_si128(reinterpret_cast<I*>(p), v); }
  static I negate_sum(I a, I b) { return _mm_sub_epi32(_mm_setzero_si128(), _mm_add_epi32(a, b)); }
  static F to_float(I a) { return _mm_cvtepi32_ps(a); }
  static F loadf(const float* p) { return _mm_loadu_ps(p); }
  static void storef(float* p, F v) { _mm_storeu_ps(p, v); }
  static F fmadd(F a, F b, F c) { return _mm_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm_add_ps(a, b); }
};
#else
#error "adderjax's native integer kernels need AVX2 or AVX-512"
#endif

using IV = IntVec::T;
constexpr int kChannels = ChannelVec::kChannels;

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

// Where a tile's sums go: int32 -(sum + constant), or float32 scaled and shifted. The
// per-channel arrays are padded like the filters (each group to whole vectors).
template <bool kScaled>
struct Epilogue {
  const int32_t* constant;
  const float* scale;  // kScaled only: each channel's step, correction and bias.
  const float* correction;
  const float* bias;
  using Out = std::conditional_t<kScaled, float, int32_t>;

  // The channels [o, o + valid) of a pixel from its sums; `c` indexes the padded arrays.
  void store(ChannelVec::I sums, int64_t c, Out* y, int valid) const {
    using CV = ChannelVec;
    const CV::I acc = CV::negate_sum(sums, CV::loadi(constant + c));
    alignas(32) Out out[kChannels];
    Out* target = valid == kChannels ? y : out;
    if constexpr (kScaled) {
      // The rounding of XLA's y = acc * step + correction + bias, whose fusion contracts the
      // product and the first sum into a fused multiply-add.
      const CV::F v = CV::fmadd(CV::to_float(acc), CV::loadf(scale + c), CV::loadf(correction + c));
      CV::storef(target, CV::add(v, CV::loadf(bias + c)));
    } else {
      CV::storei(target, acc);
    }
    if (valid != kChannels) std::copy_n(out, valid, y);
  }
};

// MR pixels (a + m * a_step + offsets[q] is pixel m's chunk q) by NV vectors of channels
// (w: per vector, the chunks in order, each kChannels chunks of the channels).
template <class L, int MR, int NV, bool kScaled>
inline void Tile(const typename L::Elem* a, int64_t a_step, const int64_t* offsets,
                 int64_t chunks, const typename L::Elem* w, int64_t w_vector,
                 const Epilogue<kScaled>& epilogue, int64_t c, typename Epilogue<kScaled>::Out* y,
                 int64_t y_step, int valid) {
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
    const typename L::Elem* aq = a + offsets[q];
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const IV am = IntVec::broadcast8(aq + m * a_step);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[m][v] = IntVec::add32(acc[m][v], L::step(am, b[v], ones));
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      const int left = valid - v * kChannels;
      if (left > 0)
        epilogue.store(ChannelVec::pack(acc[m][v]), c + v * kChannels, y + m * y_step + v * kChannels,
                       std::min(left, kChannels));
    }
}

template <class L, int NV, bool kScaled>
void TileAnyMR(int mr, const typename L::Elem* a, int64_t a_step, const int64_t* offsets,
               int64_t chunks, const typename L::Elem* w, int64_t w_vector,
               const Epilogue<kScaled>& epilogue, int64_t c, typename Epilogue<kScaled>::Out* y,
               int64_t y_step, int valid) {
#define ADDERJAX_MR_CASE(R)                                                                   \
  case R:                                                                                     \
    if constexpr (R <= kMaxPixels<NV>)                                                        \
      Tile<L, R, NV, kScaled>(a, a_step, offsets, chunks, w, w_vector, epilogue, c, y, y_step, \
                              valid);                                                         \
    return;
  switch (mr) {
    ADDERJAX_MR_CASE(1) ADDERJAX_MR_CASE(2) ADDERJAX_MR_CASE(3) ADDERJAX_MR_CASE(4)
    ADDERJAX_MR_CASE(5) ADDERJAX_MR_CASE(6) ADDERJAX_MR_CASE(7) ADDERJAX_MR_CASE(8)
  }
#undef ADDERJAX_MR_CASE
}

// The activation codes of n floats, as XLA computes them (adderjax.quant.quantize_activations):
// clip(round_half_even(x * mult), lo, hi), plus `shift` (128 for signed codes in uint8 lanes).
template <class Elem>
void Quantize(const float* x, int64_t n, float mult, float lo, float hi, int32_t shift,
              Elem* out) {
  const __m256 m = _mm256_set1_ps(mult), l = _mm256_set1_ps(lo), h = _mm256_set1_ps(hi);
  const __m256i s = _mm256_set1_epi32(shift);
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k), m),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i v = _mm256_add_epi32(
        _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(r, l), h)), s);
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
// per item, so that they stay in L1/L2 beside the filters.
constexpr int64_t kPatchBytes = 24 * 1024;

template <class L, bool kScaled>
ffi::Error IntegerAdderImpl(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32> xb,
                            ffi::Buffer<ffi::F32> quantizer, ffi::AnyBuffer wt,
                            ffi::Buffer<ffi::S32> constant, const Epilogue<kScaled>& epi_in,
                            ffi::Result<ffi::AnyBuffer> y, const Geometry& geo,
                            ffi::Span<const int64_t> group_sizes) {
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
  std::vector<int64_t> group_start(groups + 1, 0), vector_start(groups + 1, 0);
  for (int64_t g = 0; g < groups; ++g) {
    group_start[g + 1] = group_start[g] + group_sizes[g];
    vector_start[g + 1] = vector_start[g] + (group_sizes[g] + kChannels - 1) / kChannels;
  }
  if (group_start[groups] != out_c ||
      vector_start[groups] != vectors || wd[2] != kChannels || wd[3] != kChunk ||
      yd[0] != batch || chunks * kChunk < k_size || chunks * kChunk >= k_size + kChunk ||
      int64_t(constant.element_count()) != vectors * kChannels)
    return ffi::Error::InvalidArgument("adderjax_integer_adder: bad operand layout");
  const float* x_data = xb.typed_data();
  const float* q_data = quantizer.typed_data();  // Each group's multiplier, then lo and hi.
  const Elem* w_data = static_cast<const Elem*>(wt.untyped_data());
  Out* y_data = static_cast<Out*>(y->untyped_data());
  Epilogue<kScaled> epilogue = epi_in;
  epilogue.constant = constant.typed_data();
  const int64_t w_vector = chunks * kChannels * kChunk;
  // Pixels per item: a multiple of the tile, the copied patches within kPatchBytes, and the
  // rows cut into parts where the batch alone cannot keep the threads busy.
  const bool in_place = c % kChunk == 0;
  const int64_t patch = chunks * kChunk;
  const int64_t by_size =
      in_place ? wo : std::max<int64_t>(kMaxMR, kPatchBytes / int64_t(patch * sizeof(Elem)));
  const int64_t wanted = ChunksToFill(pool, batch * ho, 2, (wo + kMaxMR - 1) / kMaxMR);
  const int64_t parts = std::max((wo + by_size - 1) / by_size, wanted);
  const int64_t span = ((wo + parts - 1) / parts + kMaxMR - 1) / kMaxMR * kMaxMR;
  const int64_t spans = (wo + span - 1) / span;
  // Each item quantizes the input window its patches read, kh rows of wq columns (the
  // padding is the code of 0.0), into a scratch buffer per group; where the channels fill
  // whole chunks the tiles read it in place (chunk q of a patch at offsets[q] from its first
  // element), otherwise the patches are copied out of it, a row of `patch` lanes per pixel.
  const int64_t wq = (span - 1) * sw + (kw - 1) * dw + 1;
  std::vector<int64_t> offsets(chunks);
  for (int64_t q = 0; q < chunks; ++q) {
    const int64_t k = q * kChunk, i = k / (kw * c), j = k / c % kw;
    offsets[q] = in_place ? (i * wq + j * dw) * c + k % c : k;
  }
  const float lo = q_data[groups], hi = q_data[groups + 1];
  const Elem pad = Elem(geo.shift);  // The code of 0.0 (clip(0) + shift).
  auto item = [&](int64_t it) {
    const int64_t b = it / (ho * spans), r = it / spans % ho;
    const int64_t p0 = it % spans * span, pixels = std::min(span, wo - p0);
    thread_local std::vector<Elem> window, patches;
    window.resize(kh * wq * c);
    Out* y_row = y_data + ((b * ho + r) * wo + p0) * out_c;
    const int64_t x0 = p0 * sw - geo.left;  // The window's first input column.
    const int64_t c0 = std::clamp<int64_t>(-x0, 0, wq), c1 = std::clamp<int64_t>(w - x0, c0, wq);
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t i = 0; i < kh; ++i) {
        Elem* row = window.data() + i * wq * c;
        const int64_t iy = r * sh + i * dh - geo.top;
        if (iy < 0 || iy >= h) {
          std::fill_n(row, wq * c, pad);
          continue;
        }
        std::fill_n(row, c0 * c, pad);
        Quantize(x_data + ((b * h + iy) * w + x0 + c0) * c, (c1 - c0) * c, q_data[g], lo, hi,
                 int32_t(geo.shift), row + c0 * c);
        std::fill(row + c1 * c, row + wq * c, pad);
      }
      const Elem* a = window.data();
      int64_t a_step = sw * c;
      if (!in_place) {
        patches.assign(pixels * patch, Elem(0));
        for (int64_t p = 0; p < pixels; ++p)
          for (int64_t i = 0; i < kh; ++i)
            for (int64_t j = 0; j < kw; ++j)
              std::copy_n(window.data() + (i * wq + p * sw + j * dw) * c, c,
                          patches.data() + p * patch + (i * kw + j) * c);
        a = patches.data();
        a_step = patch;
      }
      for (int64_t v = vector_start[g]; v < vector_start[g + 1];) {
        const int nv = vector_start[g + 1] - v >= 2 ? 2 : 1;
        const int64_t o = group_start[g] + (v - vector_start[g]) * kChannels;
        const int valid = int(std::min<int64_t>(nv * kChannels, group_start[g + 1] - o));
        const Elem* wv = w_data + v * w_vector;
        const int64_t mr_max = nv == 2 ? kMaxPixels<2> : kMaxPixels<1>;
        for (int64_t m = 0; m < pixels; m += mr_max) {
          const int mr = int(std::min<int64_t>(mr_max, pixels - m));
          if (nv == 2)
            TileAnyMR<L, 2, kScaled>(mr, a + m * a_step, a_step, offsets.data(), chunks, wv,
                                     w_vector, epilogue, v * kChannels, y_row + m * out_c + o,
                                     out_c, valid);
          else
            TileAnyMR<L, 1, kScaled>(mr, a + m * a_step, a_step, offsets.data(), chunks, wv,
                                     w_vector, epilogue, v * kChannels, y_row + m * out_c + o,
                                     out_c, valid);
        }
        v += nv;
      }
    }
  };
  ParallelFor(pool, batch * ho * spans, item);
  return ffi::Error::Success();
}

template <class L>
ffi::Error SumsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> quantizer,
                    ffi::AnyBuffer wt, ffi::Buffer<ffi::S32> constant,
                    ffi::Result<ffi::AnyBuffer> y, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                    int64_t dh, int64_t dw, int64_t top, int64_t left, int64_t shift,
                    ffi::Span<const int64_t> group_sizes) {
  return IntegerAdderImpl<L, false>(pool, x, quantizer, wt, constant, Epilogue<false>{}, y,
                                    Geometry{kh, kw, sh, sw, dh, dw, top, left, shift},
                                    group_sizes);
}

template <class L>
ffi::Error ScaledImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                      ffi::Buffer<ffi::F32> quantizer, ffi::AnyBuffer wt,
                      ffi::Buffer<ffi::S32> constant, ffi::Buffer<ffi::F32> scale,
                      ffi::Buffer<ffi::F32> correction, ffi::Buffer<ffi::F32> bias,
                      ffi::Result<ffi::AnyBuffer> y, int64_t kh, int64_t kw, int64_t sh,
                      int64_t sw, int64_t dh, int64_t dw, int64_t top, int64_t left, int64_t shift,
                      ffi::Span<const int64_t> group_sizes) {
  const int64_t padded = int64_t(constant.element_count());
  if (int64_t(scale.element_count()) != padded || int64_t(correction.element_count()) != padded ||
      int64_t(bias.element_count()) != padded)
    return ffi::Error::InvalidArgument("adderjax_integer_adder: bad epilogue operands");
  Epilogue<true> epilogue{nullptr, scale.typed_data(), correction.typed_data(),
                          bias.typed_data()};
  return IntegerAdderImpl<L, true>(pool, x, quantizer, wt, constant, epilogue, y,
                                   Geometry{kh, kw, sh, sw, dh, dw, top, left, shift},
                                   group_sizes);
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
      .Attr<ffi::Span<const int64_t>>("group_sizes")

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
