// Softmax over the last dimension, in place: attention probabilities at inference (the vision tower's, the
// decoder's prefill). -inf marks a masked key; a row with every key masked becomes zeros.
//
//   softmax_bf16_  AVX-512 BF16 builds only (softmax_supported()); the others declare it unsupported.
//   softmax_f32_   every build: attention_f32.cpp's float32 row softmax (AVX-512F, AVX2 + FMA or portable C++).
//
// Why bf16: ATen's bf16 softmax takes ~0.7 ms for two heads' 1024 x 1024 scores here (50 ms of a 0.62 s tile); this
// takes ~0.35 ms: one pass for the max, one for exp and sum into a float row buffer, one to scale and round.
// exp is 2^n * p(f) with a degree-6 polynomial on |f| <= ln2/2 (relative error ~1e-7, far below bf16's 4e-3).
// Without AVX-512 BF16 the caller uses PyTorch for bf16 (softmax_supported() is false).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

namespace {

inline __m512 exp_ps(__m512 x) {  // e^x, x <= 0
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_GE_OQ);  // below: 0 (masked keys too)
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

}  // namespace

bool softmax_supported() { return true; }

void softmax_bf16_(at::Tensor scores) {
  TORCH_CHECK(scores.scalar_type() == at::kBFloat16 && scores.is_contiguous(), "softmax_: contiguous bf16 only");
  const int64_t C = scores.size(-1), rows = scores.numel() / C;
  const int64_t full = C / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (C - full)) - 1);  // the last C % 16 columns
  uint16_t* base = reinterpret_cast<uint16_t*>(scores.data_ptr());
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> e(full + 16);
    for (int64_t r = begin; r < end; ++r) {
      uint16_t* row = base + r * C;
      __m512 mx = _mm512_set1_ps(-INFINITY);
      for (int64_t i = 0; i < full; i += 16) mx = _mm512_max_ps(mx, load_bf16(row + i));
      const __m512 last = load_bf16_tail(row + full, tail);  // -inf past the row's end
      mx = _mm512_max_ps(mx, last);
      const float m = _mm512_reduce_max_ps(mx);
      if (m == -INFINITY) {  // every key masked: zeros, as the callers' masked rows expect
        std::fill(row, row + C, 0);
        continue;
      }
      const __m512 mv = _mm512_set1_ps(m);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t i = 0; i < full; i += 16) {
        const __m512 v = exp_ps(_mm512_sub_ps(load_bf16(row + i), mv));
        _mm512_storeu_ps(e.data() + i, v);
        sum = _mm512_add_ps(sum, v);
      }
      const __m512 v = exp_ps(_mm512_sub_ps(last, mv));  // 0 past the end
      _mm512_storeu_ps(e.data() + full, v);
      sum = _mm512_add_ps(sum, v);
      const float inv = 1.f / _mm512_reduce_add_ps(sum);
      const __m512 iv = _mm512_set1_ps(inv);
      int64_t i = 0;
      for (; i + 32 <= C; i += 32) {
        const __m512 lo = _mm512_mul_ps(_mm512_loadu_ps(e.data() + i), iv);
        const __m512 hi = _mm512_mul_ps(_mm512_loadu_ps(e.data() + i + 16), iv);
        _mm512_storeu_si512(row + i, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
      }
      for (; i < C; ++i) row[i] = c10::BFloat16(e[i] * inv).x;
    }
  });
}

#else

bool softmax_supported() { return false; }

void softmax_bf16_(at::Tensor) { TORCH_CHECK(false, "softmax_: built without AVX-512 BF16"); }

#endif

// attention_f32.cpp: rows x cols contiguous floats, each row -> its softmax (zeros when every entry is -inf)
void softmax_rows_f32(float* data, int64_t rows, int64_t cols);

void softmax_f32_(at::Tensor scores) {
  TORCH_CHECK(scores.scalar_type() == at::kFloat && scores.is_contiguous(), "softmax_: contiguous float32 only");
  if (scores.numel() == 0) return;
  const int64_t C = scores.size(-1);
  softmax_rows_f32(scores.data_ptr<float>(), scores.numel() / C, C);
}

// this file's Python bindings (decode_step.cpp's module calls it)
void smolvlm_bind_softmax(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("softmax_supported", &softmax_supported);
  m.def("softmax_bf16_", &softmax_bf16_, py::call_guard<py::gil_scoped_release>());
  m.def("softmax_f32_", &softmax_f32_, py::call_guard<py::gil_scoped_release>());
}
