// BatchNorm in training mode with its activation, as XLA FFI handlers: the batch statistics,
// the normalisation, the residual add and the ReLU in two passes over the activation, and the
// backward in two more (adderjax/ops/batch_norm.py).
//
// Forward, over the rows n of y (N, C) (every axis but the channels flattened):
//   mean, var = the batch mean and biased variance of y per channel
//   a = relu((y - mean) * (scale * rsqrt(var + eps)) + bias [+ residual])
// The statistics are summed around a shift (each channel's first value), so that an adder
// layer's offset (a mean near -sum |w|, thousands, over a spread of a few units) does not
// cancel the variance away: var = E[(y - s)^2] - E[y - s]^2. Rows are summed in chunks of
// kChunkRows in float, the chunks in double and in order, so the result does not depend on the
// number of threads.
// AdderjaxBatchNormApply is the forward's second pass alone, for statistics summed elsewhere
// (the adder forward's epilogue: adderjax/ops/adder_batch_norm.py); its backward is the same.
// Backward, with z the ReLU's input (a > 0 where z > 0) and dz = da where a > 0, else 0 (where
// there is no residual, z is computed again from y instead of reading a: one pass less over an
// activation in each of the two passes, and bit for bit the forward's z, both being one fma):
//   dbias = sum dz, dscale = sum dz * xhat, xhat = (y - mean) * rsqrt(var + eps)
//   dy = scale * rsqrt(var + eps) * (dz - dbias / N - xhat * dscale / N),  dresidual = dz.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "batch_norm.h"
#include "parallel_for.h"

namespace ffi = xla::ffi;
using adderjax::NormMul;
using adderjax::ParallelFor;
using adderjax::Relu;
using adderjax::ReluInput;

namespace {

constexpr int64_t kChunkRows = 256;

// Per-channel sums over the rows of each chunk: fn(n0, n1, sums1, sums2) adds the terms of rows
// [n0, n1) to the chunk's float sums; the chunks are then added in double, in order.
template <typename Fn>
void ChannelSums(ffi::ThreadPool& pool, int64_t rows, int64_t c, const Fn& fn,
                 std::vector<double>& total1, std::vector<double>& total2) {
  const int64_t chunks = (rows + kChunkRows - 1) / kChunkRows;
  std::vector<float> partial(chunks * 2 * c, 0.0f);
  ParallelFor(pool, chunks, [&](int64_t chunk) {
    float* s1 = partial.data() + chunk * 2 * c;
    float* s2 = s1 + c;
    fn(chunk * kChunkRows, std::min(rows, (chunk + 1) * kChunkRows), s1, s2);
  });
  total1.assign(c, 0.0);
  total2.assign(c, 0.0);
  for (int64_t chunk = 0; chunk < chunks; ++chunk)
    for (int64_t k = 0; k < c; ++k) {
      total1[k] += partial[chunk * 2 * c + k];
      total2[k] += partial[chunk * 2 * c + c + k];
    }
}

// A pass over the rows, shared out in chunks of kChunkRows: fn(n0, n1) for rows [n0, n1).
template <typename Fn>
void EachChunk(ffi::ThreadPool& pool, int64_t rows, const Fn& fn) {
  const int64_t chunks = (rows + kChunkRows - 1) / kChunkRows;
  ParallelFor(pool, chunks, [&](int64_t chunk) {
    fn(chunk * kChunkRows, std::min(rows, (chunk + 1) * kChunkRows));
  });
}

// The output rows [n0, n1): (y - mean) * mul + bias (+ r), then the ReLU.
template <bool kResidual, bool kRelu>
void ApplyRows(const float* __restrict y, const float* __restrict r, const float* __restrict mean,
               const float* __restrict mul, const float* __restrict bias, int64_t c, int64_t n0,
               int64_t n1, float* __restrict out) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* __restrict yn = y + n * c;
    float* __restrict on = out + n * c;
#pragma GCC ivdep
    for (int64_t k = 0; k < c; ++k) {
      float z = ReluInput(yn[k], mean[k], mul[k], bias[k]);
      if constexpr (kResidual) z += r[n * c + k];
      if constexpr (kRelu) z = Relu(z);
      on[k] = z;
    }
  }
}

// The output, (y - mean) * mul + bias (+ r), then the ReLU, over all rows.
void ApplyAll(ffi::ThreadPool& pool, const float* y, const float* r, const float* mean,
              const float* mul, const float* bias, int64_t c, int64_t rows, bool with_residual,
              bool relu, float* out) {
  const auto apply = with_residual ? (relu ? ApplyRows<true, true> : ApplyRows<true, false>)
                                   : (relu ? ApplyRows<false, true> : ApplyRows<false, false>);
  EachChunk(pool, rows, [&](int64_t n0, int64_t n1) {
    apply(y, r, mean, mul, bias, c, n0, n1, out);
  });
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> yb,
                       ffi::Buffer<ffi::F32> scale_b, ffi::Buffer<ffi::F32> bias_b,
                       ffi::Buffer<ffi::F32> residual_b, ffi::ResultBuffer<ffi::F32> out_b,
                       ffi::ResultBuffer<ffi::F32> mean_b, ffi::ResultBuffer<ffi::F32> var_b,
                       float epsilon, int64_t relu) {
  const auto yd = yb.dimensions();
  if (yd.size() == 0) return ffi::Error::InvalidArgument("adderjax_batch_norm_act: y has no axes");
  const int64_t c = yd.back(), rows = c ? int64_t(yb.element_count()) / c : 0;
  const bool with_residual = residual_b.element_count() != 0;
  if (scale_b.element_count() != size_t(c) || bias_b.element_count() != size_t(c) ||
      (with_residual && residual_b.element_count() != yb.element_count()) || rows == 0)
    return ffi::Error::InvalidArgument("adderjax_batch_norm_act: bad operand shapes");
  const float* y = yb.typed_data();
  std::vector<float> shift(y, y + c);
  std::vector<double> s1, s2;
  ChannelSums(pool, rows, c, [&](int64_t n0, int64_t n1, float* __restrict a1,
                                 float* __restrict a2) {
    const float* __restrict sh = shift.data();
    for (int64_t n = n0; n < n1; ++n) {
      const float* __restrict yn = y + n * c;
#pragma GCC ivdep
      for (int64_t k = 0; k < c; ++k) {
        const float d = yn[k] - sh[k];
        a1[k] += d;
        a2[k] += d * d;
      }
    }
  }, s1, s2);
  std::vector<float> mean(c), mul(c);
  const float* scale = scale_b.typed_data();
  for (int64_t k = 0; k < c; ++k) {
    const double m = s1[k] / double(rows);
    // Rounding can make it slightly negative; v < 0 ? 0 : v keeps a NaN, as jnp.maximum does.
    const double v = s2[k] / double(rows) - m * m, var = v < 0.0 ? 0.0 : v;
    mean[k] = float(double(shift[k]) + m);
    mean_b->typed_data()[k] = mean[k];
    var_b->typed_data()[k] = float(var);
    mul[k] = NormMul(scale[k], float(var), epsilon);
  }
  ApplyAll(pool, y, residual_b.typed_data(), mean.data(), mul.data(), bias_b.typed_data(), c,
           rows, with_residual, relu, out_b->typed_data());
  return ffi::Error::Success();
}

ffi::Error ApplyImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> yb, ffi::Buffer<ffi::F32> scale_b,
                     ffi::Buffer<ffi::F32> bias_b, ffi::Buffer<ffi::F32> residual_b,
                     ffi::Buffer<ffi::F32> mean_b, ffi::Buffer<ffi::F32> var_b,
                     ffi::ResultBuffer<ffi::F32> out_b, float epsilon, int64_t relu) {
  const auto yd = yb.dimensions();
  if (yd.size() == 0)
    return ffi::Error::InvalidArgument("adderjax_batch_norm_apply: y has no axes");
  const int64_t c = yd.back(), rows = c ? int64_t(yb.element_count()) / c : 0;
  const bool with_residual = residual_b.element_count() != 0;
  if (scale_b.element_count() != size_t(c) || bias_b.element_count() != size_t(c) ||
      mean_b.element_count() != size_t(c) || var_b.element_count() != size_t(c) ||
      (with_residual && residual_b.element_count() != yb.element_count()) || rows == 0)
    return ffi::Error::InvalidArgument("adderjax_batch_norm_apply: bad operand shapes");
  std::vector<float> mul(c);
  for (int64_t k = 0; k < c; ++k)
    mul[k] = NormMul(scale_b.typed_data()[k], var_b.typed_data()[k], epsilon);
  ApplyAll(pool, yb.typed_data(), residual_b.typed_data(), mean_b.typed_data(), mul.data(),
           bias_b.typed_data(), c, rows, with_residual, relu, out_b->typed_data());
  return ffi::Error::Success();
}

// Where the backward finds the ReLU's mask: none (no ReLU), the output a > 0, or z > 0 with z
// computed again from y (no residual).
enum class Mask { kNone, kFromOutput, kFromInput };

// dz: the cotangent of the output through the ReLU, for element i of channel k.
struct ReluGrad {
  const float* __restrict a;
  const float* __restrict y;
  const float* __restrict mean;
  const float* __restrict mul;  // The forward's scale * rsqrt(var + eps).
  const float* __restrict bias;
  template <Mask kMask>
  float Masked(int64_t i, int64_t k, float da) const {
    if constexpr (kMask == Mask::kFromOutput) return a[i] > 0.0f ? da : 0.0f;
    if constexpr (kMask == Mask::kFromInput)
      return ReluInput(y[i], mean[k], mul[k], bias[k]) > 0.0f ? da : 0.0f;
    return da;
  }
};

// The two sums of the backward over rows [n0, n1): sum dz and sum dz (y - mean).
template <Mask kMask>
void GradSums(const float* __restrict da, const float* __restrict y, const ReluGrad& relu,
              const float* __restrict mean, int64_t c, int64_t n0, int64_t n1,
              float* __restrict s1, float* __restrict s2) {
  for (int64_t n = n0; n < n1; ++n) {
#pragma GCC ivdep
    for (int64_t k = 0; k < c; ++k) {
      const int64_t i = n * c + k;
      const float g = relu.Masked<kMask>(i, k, da[i]);
      s1[k] += g;
      s2[k] += g * (y[i] - mean[k]);
    }
  }
}

// dy (and dresidual = dz) over rows [n0, n1).
template <Mask kMask, bool kResidual>
void GradRows(const float* __restrict da, const float* __restrict y, const ReluGrad& relu,
              const float* __restrict mean, const float* __restrict rstd,
              const float* __restrict mul, const float* __restrict k_mean,
              const float* __restrict k_xhat, int64_t c, int64_t n0, int64_t n1,
              float* __restrict dy, float* __restrict dr) {
  for (int64_t n = n0; n < n1; ++n) {
#pragma GCC ivdep
    for (int64_t k = 0; k < c; ++k) {
      const int64_t i = n * c + k;
      const float g = relu.Masked<kMask>(i, k, da[i]);
      const float xhat = (y[i] - mean[k]) * rstd[k];
      dy[i] = mul[k] * (g - k_mean[k] - xhat * k_xhat[k]);
      if constexpr (kResidual) dr[i] = g;
    }
  }
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> da_b, ffi::Buffer<ffi::F32> yb,
                        ffi::Buffer<ffi::F32> a_b, ffi::Buffer<ffi::F32> scale_b,
                        ffi::Buffer<ffi::F32> bias_b, ffi::Buffer<ffi::F32> mean_b,
                        ffi::Buffer<ffi::F32> var_b, ffi::ResultBuffer<ffi::F32> dy_b,
                        ffi::ResultBuffer<ffi::F32> dscale_b, ffi::ResultBuffer<ffi::F32> dbias_b,
                        ffi::ResultBuffer<ffi::F32> dr_b, float epsilon, int64_t relu) {
  const auto yd = yb.dimensions();
  if (yd.size() == 0)
    return ffi::Error::InvalidArgument("adderjax_batch_norm_act_grad: y has no axes");
  const int64_t c = yd.back(), rows = c ? int64_t(yb.element_count()) / c : 0;
  const bool with_residual = dr_b->element_count() != 0;
  // a is f32[0] where the mask is to come from y (a ReLU and no residual).
  const Mask mask = !relu                     ? Mask::kNone
                    : a_b.element_count() == 0 ? Mask::kFromInput
                                               : Mask::kFromOutput;
  if (da_b.element_count() != yb.element_count() ||
      (mask == Mask::kFromOutput && a_b.element_count() != yb.element_count()) ||
      (mask == Mask::kFromInput && with_residual) || scale_b.element_count() != size_t(c) ||
      bias_b.element_count() != size_t(c) || mean_b.element_count() != size_t(c) ||
      var_b.element_count() != size_t(c) || rows == 0 ||
      (with_residual && dr_b->element_count() != yb.element_count()))
    return ffi::Error::InvalidArgument("adderjax_batch_norm_act_grad: bad operand shapes");
  const float* da = da_b.typed_data();
  const float* y = yb.typed_data();
  const float* mean = mean_b.typed_data();
  const float* var = var_b.typed_data();
  const float* scale = scale_b.typed_data();
  std::vector<float> rstd(c), forward_mul(c);
  for (int64_t k = 0; k < c; ++k) {
    rstd[k] = 1.0f / std::sqrt(var[k] + epsilon);
    forward_mul[k] = NormMul(scale[k], var[k], epsilon);
  }
  const ReluGrad relu_grad{a_b.typed_data(), y, mean, forward_mul.data(), bias_b.typed_data()};
  std::vector<double> sum_dz, sum_dz_centred;
  const auto sums = mask == Mask::kNone         ? GradSums<Mask::kNone>
                    : mask == Mask::kFromOutput ? GradSums<Mask::kFromOutput>
                                                : GradSums<Mask::kFromInput>;
  ChannelSums(pool, rows, c, [&](int64_t n0, int64_t n1, float* s1, float* s2) {
    sums(da, y, relu_grad, mean, c, n0, n1, s1, s2);
  }, sum_dz, sum_dz_centred);
  std::vector<float> k_mean(c), k_xhat(c), mul(c);
  for (int64_t k = 0; k < c; ++k) {
    const float dbias = float(sum_dz[k]);
    const float dscale = float(sum_dz_centred[k]) * rstd[k];
    dbias_b->typed_data()[k] = dbias;
    dscale_b->typed_data()[k] = dscale;
    k_mean[k] = dbias / float(rows);
    k_xhat[k] = dscale / float(rows);
    mul[k] = scale[k] * rstd[k];
  }
  const auto grad = with_residual
                        ? (mask == Mask::kNone ? GradRows<Mask::kNone, true>
                                               : GradRows<Mask::kFromOutput, true>)
                        : (mask == Mask::kNone         ? GradRows<Mask::kNone, false>
                           : mask == Mask::kFromOutput ? GradRows<Mask::kFromOutput, false>
                                                       : GradRows<Mask::kFromInput, false>);
  float* dy = dy_b->typed_data();
  float* dr = dr_b->typed_data();
  EachChunk(pool, rows, [&](int64_t n0, int64_t n1) {
    grad(da, y, relu_grad, mean, rstd.data(), mul.data(), k_mean.data(), k_xhat.data(), c, n0,
         n1, dy, dr);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdderjaxBatchNormAct, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // y
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // residual, or f32[0]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // a
                                  .Ret<ffi::Buffer<ffi::F32>>()  // mean
                                  .Ret<ffi::Buffer<ffi::F32>>()  // var
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdderjaxBatchNormActGrad, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // da
                                  .Arg<ffi::Buffer<ffi::F32>>()  // y
                                  .Arg<ffi::Buffer<ffi::F32>>()  // a, or f32[0]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // var
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dy
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dscale
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dbias
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dresidual, or f32[0]
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdderjaxBatchNormApply, ApplyImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // y
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // residual, or f32[0]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // var
                                  .Ret<ffi::Buffer<ffi::F32>>()  // a
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("relu"));
