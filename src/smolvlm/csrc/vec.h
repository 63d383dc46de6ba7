// AVX-512 helpers shared by softmax.cpp and attention.cpp (included only where __AVX512BF16__ is defined).
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>

namespace smolvlm_vec {

// e^x for x <= 0: 2^n * p(f) with a degree-6 polynomial on |f| <= ln2/2 (relative error ~1e-7, far below bf16's
// 4e-3); 0 below -87 (and for -inf: masked keys)
inline __m512 exp_ps(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));  // x log2(e)
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718055994531f));  // e^x = 2^n e^f
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}

inline __m512 load_bf16(const uint16_t* p) {  // 16 bf16 -> 16 float
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

inline __m512 load_bf16_tail(const uint16_t* p, __mmask16 keep) {  // the first lanes of `keep`; -inf elsewhere
  const __m256i raw = _mm256_maskz_loadu_epi16(keep, p);
  const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  return _mm512_mask_blend_ps(keep, _mm512_set1_ps(-INFINITY), v);
}

}  // namespace smolvlm_vec
