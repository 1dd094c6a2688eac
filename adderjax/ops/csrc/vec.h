// The SIMD layer of adderjax's native float kernels (adder_forward_cpu.cc,
// adder_input_grad_cpu.cc, adder_weight_grad_cpu.cc): one Vec per instruction set, chosen at
// compile time from the CPU's macros (the library is built per machine with -march=native), the
// dispatch of a tile's height, and the copy of padded rows that the forward (input rows) and the
// input gradient (rows of G) read in place of XLA padding them.
//
// A vector is 16 floats with AVX-512 (32 registers), 8 with AVX2 (16 registers). The inner
// loops' adds and subtracts go through accumulate() and difference(): with AVX2 they are
// multiply-adds by one, which round the same, because on Zen 3 vaddps, vsubps, vmaxps and
// vminps share two pipes and the multiply-adds have two others (benchmarks/pipes.py).

#ifndef ADDERJAX_OPS_CSRC_VEC_H_
#define ADDERJAX_OPS_CSRC_VEC_H_

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "batch_norm.h"

namespace adderjax {

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
  // clip(a, -1, 1) with `one` = set1(1), NaN for a NaN as XLA's clamp gives: vmaxps and
  // vminps return their second operand where either is NaN, so a goes second.
  static T clip_unit(T a, T one) {
    return _mm512_min_ps(one, _mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), one), a));
  }
  // The same for an `a` that is not NaN, in one instruction where AVX-512 DQ has it (vrangeps:
  // the smaller magnitude of a and 1, a's sign). A NaN `a` gives +-1 (seen on Sapphire Rapids),
  // so the callers check first (kClipDropsNan).
#if defined(__AVX512DQ__)
  static constexpr bool kClipDropsNan = true;
  static T clip_unit_not_nan(T a, T one) { return _mm512_range_ps(a, one, 0b0010); }
#else
  static constexpr bool kClipDropsNan = false;
  static T clip_unit_not_nan(T a, T one) { return clip_unit(a, one); }
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
  static constexpr bool kClipDropsNan = false;
  static T clip_unit_not_nan(T a, T one) { return clip_unit(a, one); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  // The inner loops' adds and subtracts as multiply-adds by one (see the top of this file).
  // `one` must come from opaque_one(): GCC folds a literal 1.
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
// Calls f(std::integral_constant<int, R>()) for R = rows, 1 <= rows <= kMaxRows: a tile's
// height is a template argument (its loops unrolled, its accumulators in registers) chosen at
// run time.
template <int kMaxRows, int R = 1, typename F>
inline void WithTileRows(int rows, F&& f) {
  if constexpr (R <= kMaxRows) {
    if (rows == R) {
      f(std::integral_constant<int, R>());
      return;
    }
    WithTileRows<kMaxRows, R + 1>(rows, f);
  }
}

// norm.Apply (relu((y - mean) * mul + bias) for `pixels` pixels of `c` channels), the same bits
// (sub, fma, and max(0, z), which keeps a NaN z as Relu does), with the channels'
// parameters held in registers: GCC's vectorisation of Apply reloads them for every pixel and
// took 1.2-1.3x the time of the weight gradient it fed at 16 channels. Up to 8 vectors of
// channels, a whole number of vectors; Apply itself otherwise.
template <int NV>
inline void ApplyInputNormVectors(const InputNorm& norm, const float* y, int64_t pixels,
                                  float* out) {
  constexpr int64_t c = NV * Vec::kWidth;
  V mean[NV], mul[NV], bias[NV];
  for (int v = 0; v < NV; ++v) {
    mean[v] = Vec::load(norm.mean.data() + v * Vec::kWidth);
    mul[v] = Vec::load(norm.mul.data() + v * Vec::kWidth);
    bias[v] = Vec::load(norm.bias.data() + v * Vec::kWidth);
  }
  const V zero = Vec::zero();
  for (int64_t p = 0; p < pixels; ++p)
    for (int v = 0; v < NV; ++v) {
      const V z = Vec::fmadd(Vec::sub(Vec::load(y + p * c + v * Vec::kWidth), mean[v]), mul[v],
                             bias[v]);
      Vec::store(out + p * c + v * Vec::kWidth, Vec::max(zero, z));
    }
}

inline void ApplyInputNorm(const InputNorm& norm, const float* y, int64_t pixels, int64_t c,
                           float* out) {
  if (c > 0 && c % Vec::kWidth == 0 && c / Vec::kWidth <= 8)
    WithTileRows<8>(int(c / Vec::kWidth), [&](auto vectors) {
      ApplyInputNormVectors<decltype(vectors)::value>(norm, y, pixels, out);
    });
  else
    norm.Apply(y, pixels, c, out);
}

// Copies rows row0 + i (i < rows) of an image x (h, width, c) into (rows, wp, c), column q
// holding x's column q - left: zeros outside x (rows and columns), columns past wp cropped.
// With `norm`, x's values go through it (the padding stays zero).
inline void CopyPaddedRows(const float* x, int64_t h, int64_t width, int64_t c, int64_t row0,
                           int64_t rows, int64_t left, int64_t wp, float* out,
                           const InputNorm* norm = nullptr) {
  const int64_t q0 = std::clamp<int64_t>(left, 0, wp);
  const int64_t q1 = std::clamp<int64_t>(left + width, q0, wp);
  for (int64_t i = 0; i < rows; ++i) {
    float* o = out + i * wp * c;
    const int64_t r = row0 + i;
    if (r < 0 || r >= h) {
      std::fill_n(o, wp * c, 0.0f);
      continue;
    }
    std::fill_n(o, q0 * c, 0.0f);
    if (norm)
      ApplyInputNorm(*norm, x + (r * width + q0 - left) * c, q1 - q0, c, o + q0 * c);
    else
      std::copy_n(x + (r * width + q0 - left) * c, (q1 - q0) * c, o + q0 * c);
    std::fill_n(o + q1 * c, (wp - q1) * c, 0.0f);
  }
}

}  // namespace adderjax

#endif  // ADDERJAX_OPS_CSRC_VEC_H_
