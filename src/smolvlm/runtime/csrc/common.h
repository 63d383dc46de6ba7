// What every kernel file shares: the ISA level this build holds, bf16 <-> float, and the GEMV's entry point.
//
// kernels.py compiles the csrc files once per level with only that level's flags (never -march=native):
//   generic       -O3 only (x86-64 / aarch64 baseline)       SMOLVLM_LEVEL "generic"
//   avx2          -mavx2 -mfma -mf16c                       SMOLVLM_AVX2
//   avx512        + -mavx512f -mavx512bw -mavx512vl -mavx512dq  SMOLVLM_AVX2, SMOLVLM_AVX512
//   avx512_bf16   + -mavx512bf16                            SMOLVLM_AVX2, SMOLVLM_AVX512, SMOLVLM_AVX512BF16
#pragma once

#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define SMOLVLM_AVX2 1
#endif
#if defined(SMOLVLM_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__)
#define SMOLVLM_AVX512 1
#endif
#if defined(SMOLVLM_AVX512) && defined(__AVX512BF16__)
#define SMOLVLM_AVX512BF16 1
#endif
#if defined(SMOLVLM_AVX2)
#include <immintrin.h>
#endif

#if defined(SMOLVLM_AVX512BF16)
#define SMOLVLM_LEVEL "avx512_bf16"
#elif defined(SMOLVLM_AVX512)
#define SMOLVLM_LEVEL "avx512"
#elif defined(SMOLVLM_AVX2)
#define SMOLVLM_LEVEL "avx2"
#else
#define SMOLVLM_LEVEL "generic"
#endif

namespace smolvlm {

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as c10::BFloat16 does
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return 0x7fc0;
  u += 0x7fff + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}

// The activation types the decode step runs in: bf16 (stored as its bits) and float32. ld/st convert to and
// from the float the math runs in; st rounds (bf16) where eager PyTorch would round.
template <typename T>
struct Act;
template <>
struct Act<uint16_t> {
  static constexpr at::ScalarType type = at::kBFloat16;
  static float ld(uint16_t v) { return bf16_to_float(v); }
  static uint16_t st(float v) { return float_to_bf16(v); }
};
template <>
struct Act<float> {
  static constexpr at::ScalarType type = at::kFloat;
  static float ld(float v) { return v; }
  static float st(float v) { return v; }
};

// one stored number (float32, bf16 bits, int8) as a float
inline float scalar(float v) { return v; }
inline float scalar(uint16_t v) { return bf16_to_float(v); }
inline float scalar(int8_t v) { return static_cast<float>(v); }

#if defined(SMOLVLM_AVX2)
inline float hsum(__m256 a) {  // the sum of 8 floats
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

template <typename T>
inline T* data(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

// Projection kinds (gemv.cpp documents them; 4 and 5: gemv_q8.cpp).
enum Kind : int64_t { kDense = 0, kInt8 = 1, kInt4 = 2, kInt4Aten = 3, kInt4Q8 = 4, kInt8Q8 = 5 };

// y (B, N) = x (B, K) @ W^T in x's dtype (bf16 or float32), W of `kind` (gemv.cpp).
at::Tensor project(const at::Tensor& x, int64_t kind, const at::Tensor& weight, const at::Tensor& scale,
                   int64_t group_size);

// kinds 4 / 5 (gemv_q8.cpp): whether x's K and the group size let them run, and the product itself
bool q8_applies(const at::Tensor& x, int64_t kind, int64_t group_size);
at::Tensor project_q8(const at::Tensor& x, int64_t kind, const at::Tensor& w, const at::Tensor& scale,
                      int64_t group_size, bool plain);

}  // namespace smolvlm
