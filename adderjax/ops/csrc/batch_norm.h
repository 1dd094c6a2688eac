// BatchNorm's normalisation and ReLU, element by element, shared by its own kernels
// (batch_norm_cpu.cc) and by the adder kernels that apply it to their input as they copy it
// (adder_forward_cpu.cc, adder_input_grad_cpu.cc, adder_weight_grad_cpu.cc): both must give the
// same bits, so that a layer reading its input before the BatchNorm computes what it would read
// after it.

#ifndef ADDERJAX_OPS_CSRC_BATCH_NORM_H_
#define ADDERJAX_OPS_CSRC_BATCH_NORM_H_

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace adderjax {

// The normalisation's factor scale * rsqrt(var + eps), as nnx.BatchNorm computes it (in float).
inline float NormMul(float scale, float var, float epsilon) {
  return scale / std::sqrt(var + epsilon);
}

// The ReLU's input without the residual, (y - mean) * mul + bias, as one fma. BatchNorm's
// backward computes both again where it takes the ReLU's mask from y, and must get the
// forward's bits.
inline float ReluInput(float y, float mean, float mul, float bias) {
  return std::fma(y - mean, mul, bias);
}

// The ReLU as jax.nn.relu computes it: z < 0 ? 0 : z keeps a NaN.
inline float Relu(float z) { return z < 0.0f ? 0.0f : z; }

// The BatchNorm (batch statistics) and ReLU a layer's input goes through before the layer reads
// it, per channel: a = relu((y - mean) * mul + bias).
struct InputNorm {
  std::vector<float> mean, mul, bias;

  InputNorm(const float* mean_, const float* var, const float* scale, const float* bias_,
            int64_t c, float epsilon)
      : mean(mean_, mean_ + c), mul(c), bias(bias_, bias_ + c) {
    for (int64_t k = 0; k < c; ++k) mul[k] = NormMul(scale[k], var[k], epsilon);
  }

  // a for `pixels` pixels of `c` channels (all of them, from channel 0) into out.
  void Apply(const float* __restrict y, int64_t pixels, int64_t c, float* __restrict out) const {
    const float* __restrict m = mean.data();
    const float* __restrict f = mul.data();
    const float* __restrict b = bias.data();
    for (int64_t p = 0; p < pixels; ++p) {
#pragma GCC ivdep
      for (int64_t k = 0; k < c; ++k)
        out[p * c + k] = Relu(ReluInput(y[p * c + k], m[k], f[k], b[k]));
    }
  }

  // a for channel k of one pixel.
  float At(float y, int64_t k) const { return Relu(ReluInput(y, mean[k], mul[k], bias[k])); }
};

// A handler's optional InputNorm, from its four buffers (XLA FFI buffers of float32): none where
// all four are empty, not ok where they are not all of c elements.
struct OptionalInputNorm {
  bool ok = true;
  std::optional<InputNorm> norm;
  const InputNorm* get() const { return norm ? &*norm : nullptr; }
};

template <typename Buffer>
OptionalInputNorm MakeInputNorm(const Buffer& mean, const Buffer& var, const Buffer& scale,
                                const Buffer& bias, int64_t c, float epsilon) {
  OptionalInputNorm result;
  const size_t n = mean.element_count();
  if (n == 0 && var.element_count() == 0 && scale.element_count() == 0 &&
      bias.element_count() == 0)
    return result;
  if (n != size_t(c) || var.element_count() != n || scale.element_count() != n ||
      bias.element_count() != n) {
    result.ok = false;
    return result;
  }
  result.norm.emplace(mean.typed_data(), var.typed_data(), scale.typed_data(), bias.typed_data(),
                      c, epsilon);
  return result;
}

}  // namespace adderjax

#endif  // ADDERJAX_OPS_CSRC_BATCH_NORM_H_
