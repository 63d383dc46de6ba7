// The projections of a decoding step: y (B, N) = x (B, K) @ W^T for a few rows (B <= 16), streaming W once.
//
// Kinds (the `kind` argument of project(), decode_step.py's _projection):
//   0 dense  weight (N, K) bf16 or float32                    scale: unused (empty)
//   1 int8   weight (N, K) int8                               scale (N,) bf16 or float32: W = q * scale[n]
//   2 int4   weight (N, K/2) uint8, input 2j in the low       scale (N, K/g, 2) bf16 or float32, per group of g
//            nibble of byte j, input 2j+1 in the high one     inputs (scale, zero): W = (q - 8) * scale + zero
//   3 int4   the same values in ATen's packed layout (weight (N, K/2) uint8 from _convert_weight_to_int4pack_for_cpu,
//   (ATen)   scale (K/g, N, 2) bf16): bf16 x only, through at::_weight_int4pack_mm_for_cpu; where bf16 is native
//            its kernel streams int4 faster than ours (quantize.aten_int4 makes the layout, decode_step.py picks it)
//   4 int4, 5 int8: kinds 2 / 1's storage times x held as two int8s per input, integer dot products
//            (gemv_q8.cpp; quantize.kernel_kind picks them for float32 activations)
// x is (B, K) bf16 or float32; y comes back in x's dtype. Kinds 0-2 work with either x dtype at every level.
//
// Why: at a few rows a matmul only streams its weights from memory once, and ATen's kernels read them at about
// half the memory's speed (its bf16 and int8 kernels) or cannot take the weights as stored (bf16 weights with
// float32 activations; the portable int4 layout). How, per level:
//   avx512_bf16, x bf16, W bf16 / int8: each thread copies (int8: converts, exactly) four rows into a small bf16
//     buffer -- one sequential stream the hardware prefetches well -- then dots every x with them by
//     AVX-512 BF16 (exact products, fp32 sums).
//   everything else: x converted to float once; each thread walks its rows four at a time, converting the weights
//     to float in registers (bf16: a shift; int8: sign extension; int4: nibble masks) and summing with fp32 FMAs
//     (AVX-512 / AVX2 registers, or plain arrays of 8 the compiler vectorizes at the generic level). int4 folds
//     its zero points in afterwards: sum_k W x = sum_groups scale * (sum q x) + (zero - 8 scale) * (sum x), so the
//     inner loop is one FMA per weight; x is reordered per group (even inputs, then odd) to match the nibbles.
// More rows than kMaxB: at::linear (int8: ATen's int8 kernel), in float32 on dequantized weights where the dtypes
// differ.

#include "common.h"

#include <ATen/Parallel.h>

#include <vector>

namespace smolvlm {
namespace {

constexpr int64_t kRows = 4, kMaxB = 16;

// ---------------------------------------------------------------------------------------------------------------
// Float vectors of L lanes: load (float, bf16, int8 -> float), nibbles, FMA, horizontal sum.

#if defined(SMOLVLM_AVX512)
struct V16 {
  using R = __m512;
  static constexpr int L = 16;
  static R zero() { return _mm512_setzero_ps(); }
  static R set1(float v) { return _mm512_set1_ps(v); }
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static R load(const uint16_t* p) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  }
  static R load(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static void nibbles(const uint8_t* p, R& lo, R& hi) {  // L bytes -> their low and their high nibbles
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), m = _mm_set1_epi8(15);
    lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, m)));
    hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), m)));
  }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(R a) { return _mm512_reduce_add_ps(a); }
};
#endif

#if defined(SMOLVLM_AVX2)
struct V8 {
  using R = __m256;
  static constexpr int L = 8;
  static R zero() { return _mm256_setzero_ps(); }
  static R set1(float v) { return _mm256_set1_ps(v); }
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static R load(const uint16_t* p) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  }
  static R load(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static void nibbles(const uint8_t* p, R& lo, R& hi) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)), m = _mm_set1_epi8(15);
    lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(b, m)));
    hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), m)));
  }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(R a) { return hsum(a); }
};
#endif

// The generic level: eight floats in an array; every op is a fixed-length loop the compiler turns into the
// baseline's vector instructions (SSE2, NEON). Exact, slower.
struct VG {
  struct R {
    float v[8];
  };
  static constexpr int L = 8;
  static R zero() { return R{{0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}}; }
  static R set1(float a) { return R{{a, a, a, a, a, a, a, a}}; }
  template <typename W>
  static R load(const W* p) {
    R r;
    for (int i = 0; i < 8; ++i) r.v[i] = to_float(p[i]);
    return r;
  }
  static void nibbles(const uint8_t* p, R& lo, R& hi) {
    for (int i = 0; i < 8; ++i) {
      lo.v[i] = static_cast<float>(p[i] & 15);
      hi.v[i] = static_cast<float>(p[i] >> 4);
    }
  }
  static R fma(R a, R b, R c) {
    for (int i = 0; i < 8; ++i) c.v[i] += a.v[i] * b.v[i];
    return c;
  }
  static float sum(R a) {
    float s = 0.f;
    for (int i = 0; i < 8; ++i) s += a.v[i];
    return s;
  }
  static float to_float(float v) { return v; }
  static float to_float(uint16_t v) { return bf16_to_float(v); }
  static float to_float(int8_t v) { return static_cast<float>(v); }
};

// ---------------------------------------------------------------------------------------------------------------
// dense / int8: rows [n0, n0 + r) of W (row stride K) dotted with x (K floats) -> out[0..r)

template <class V, typename W>
void dot_rows(const W* w, int64_t K, int64_t r, const float* x, float* out) {
  // a row at a time, four sums each: reading four rows side by side streamed the weights much slower
  // (docs/speed.md)
  using R = typename V::R;
  constexpr int L = V::L;
  const int64_t kv = K / L * L, k4 = K / (4 * L) * (4 * L);
  for (int64_t i = 0; i < r; ++i) {
    const W* wi = w + i * K;
    R a0 = V::zero(), a1 = V::zero(), a2 = V::zero(), a3 = V::zero();
    int64_t k = 0;
    for (; k < k4; k += 4 * L) {
      a0 = V::fma(V::load(wi + k), V::load(x + k), a0);
      a1 = V::fma(V::load(wi + k + L), V::load(x + k + L), a1);
      a2 = V::fma(V::load(wi + k + 2 * L), V::load(x + k + 2 * L), a2);
      a3 = V::fma(V::load(wi + k + 3 * L), V::load(x + k + 3 * L), a3);
    }
    for (; k < kv; k += L) a0 = V::fma(V::load(wi + k), V::load(x + k), a0);
    float y = (V::sum(a0) + V::sum(a1)) + (V::sum(a2) + V::sum(a3));
    for (; k < K; ++k) y += scalar(wi[k]) * x[k];
    out[i] = y;
  }
}

// int4: rows [n0, n0 + r) (q: their K/2 bytes each, sz: their K/g (scale, zero) pairs) with x reordered per
// group (xr: g/2 even inputs, then g/2 odd) and its group sums xs (K/g)
template <class V, typename S>
void dot_rows_int4(const uint8_t* q, const S* sz, int64_t K, int64_t g, int64_t r, const float* xr,
                   const float* xs, float* out) {
  using R = typename V::R;
  constexpr int L = V::L;
  const int64_t G = K / g, half = g / 2;
  if (half % L == 0) {
    R acc[kRows];
    float offset[kRows];
    for (int64_t i = 0; i < kRows; ++i) acc[i] = V::zero(), offset[i] = 0.f;
    for (int64_t grp = 0; grp < G; ++grp) {
      const float* xe = xr + grp * g;
      R t[kRows] = {V::zero(), V::zero(), V::zero(), V::zero()};
      for (int64_t j = 0; j < half; j += L) {
        const R a = V::load(xe + j), b = V::load(xe + half + j);
        for (int64_t i = 0; i < kRows; ++i) {
          if (i >= r) break;
          R lo, hi;
          V::nibbles(q + i * (K / 2) + grp * half + j, lo, hi);
          t[i] = V::fma(hi, b, V::fma(lo, a, t[i]));
        }
      }
      for (int64_t i = 0; i < kRows; ++i) {
        if (i >= r) break;
        const float s = scalar(sz[(i * G + grp) * 2]), z = scalar(sz[(i * G + grp) * 2 + 1]);
        acc[i] = V::fma(t[i], V::set1(s), acc[i]);
        offset[i] += (z - 8.f * s) * xs[grp];
      }
    }
    for (int64_t i = 0; i < r; ++i) out[i] = V::sum(acc[i]) + offset[i];
    return;
  }
  for (int64_t i = 0; i < r; ++i) {  // group sizes the vectors do not divide: plain loops
    float y = 0.f;
    for (int64_t grp = 0; grp < G; ++grp) {
      const uint8_t* qg = q + i * (K / 2) + grp * half;
      const float* xe = xr + grp * g;
      float t = 0.f;
      for (int64_t j = 0; j < half; ++j) t += (qg[j] & 15) * xe[j] + (qg[j] >> 4) * xe[half + j];
      const float s = scalar(sz[(i * G + grp) * 2]), z = scalar(sz[(i * G + grp) * 2 + 1]);
      y += s * t + (z - 8.f * s) * xs[grp];
    }
    out[i] = y;
  }
}

template <typename T>
void to_float(const at::Tensor& x, float* out) {
  const T* p = data<T>(x);
  for (int64_t i = 0; i < x.numel(); ++i) out[i] = Act<T>::ld(p[i]);
}

template <class V, typename T>
at::Tensor stream(const at::Tensor& x, int64_t kind, const at::Tensor& w, const at::Tensor& scale, int64_t g) {
  const int64_t B = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({B, N}, x.options());
  T* yp = data<T>(y);
  std::vector<float> xf(B * K);
  to_float<T>(x, xf.data());
  std::vector<float> xs;
  if (kind == kInt4) {  // reorder each group (even inputs, then odd: the nibbles' order) and sum it
    std::vector<float> xr(B * K);
    xs.assign(B * (K / g), 0.f);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t k = 0; k < K; ++k) {
        const int64_t grp = k / g, j = k % g;
        xr[b * K + grp * g + (j % 2) * (g / 2) + j / 2] = xf[b * K + k];
        xs[b * (K / g) + grp] += xf[b * K + k];
      }
    xf.swap(xr);
  }
  const bool scale_bf16 = scale.defined() && scale.numel() && scale.scalar_type() == at::kBFloat16;
  at::parallel_for(0, (N + kRows - 1) / kRows, 8, [&](int64_t begin, int64_t end) {
    float out[kRows];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n = blk * kRows, r = std::min(kRows, N - n);
      for (int64_t b = 0; b < B; ++b) {
        const float* xb = xf.data() + b * K;
        if (kind == kDense) {
          if (w.scalar_type() == at::kFloat)
            dot_rows<V>(data<float>(w) + n * K, K, r, xb, out);
          else
            dot_rows<V>(data<uint16_t>(w) + n * K, K, r, xb, out);
        } else if (kind == kInt8) {
          dot_rows<V>(data<int8_t>(w) + n * K, K, r, xb, out);
          for (int64_t i = 0; i < r; ++i)
            out[i] *= scale_bf16 ? bf16_to_float(data<uint16_t>(scale)[n + i]) : data<float>(scale)[n + i];
        } else {
          const int64_t G = K / g;
          const float* xsb = xs.data() + b * G;
          if (scale_bf16)
            dot_rows_int4<V>(data<uint8_t>(w) + n * (K / 2), data<uint16_t>(scale) + n * G * 2, K, g, r, xb, xsb,
                             out);
          else
            dot_rows_int4<V>(data<uint8_t>(w) + n * (K / 2), data<float>(scale) + n * G * 2, K, g, r, xb, xsb,
                             out);
        }
        for (int64_t i = 0; i < r; ++i) yp[b * N + n + i] = Act<T>::st(out[i]);
      }
    }
  });
  return y;
}

#if defined(SMOLVLM_AVX512BF16)
// bf16 x with bf16 / int8 weights: AVX-512 BF16 dot products on rows copied into a bf16 buffer (see the top)
constexpr int64_t kMaxK = 4096;

inline __m512bh int8_to_bf16(const int8_t* p) {  // 32 int8 -> 32 bf16 (exact: |v| <= 127 fits 8 bits)
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  const __m512 hi =
      _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
  return _mm512_cvtne2ps_pbh(hi, lo);
}

bool dpbf16_applies(const at::Tensor& x, int64_t kind, const at::Tensor& w) {
  return x.scalar_type() == at::kBFloat16 && (kind == kInt8 || (kind == kDense && w.scalar_type() == at::kBFloat16)) &&
         w.size(1) % 32 == 0 && w.size(1) <= kMaxK && w.size(0) % kRows == 0;
}

at::Tensor gemv_dpbf16(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, bool int8) {
  const int64_t B = x.size(0), K = x.size(1), N = w.size(0);
  const at::Tensor sf = int8 ? scale.to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor y = at::empty({B, N}, x.options());
  const uint16_t* xp = data<uint16_t>(x);
  const float* sp = int8 ? sf.data_ptr<float>() : nullptr;
  uint16_t* yp = data<uint16_t>(y);
  at::parallel_for(0, N / kRows, 16, [&](int64_t begin, int64_t end) {
    alignas(64) uint16_t rows[kRows * kMaxK];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n = blk * kRows;
      if (int8) {
        const int8_t* src = data<int8_t>(w) + n * K;
        for (int64_t i = 0; i < kRows * K; i += 32)
          _mm512_store_si512(rows + i, reinterpret_cast<__m512i>(int8_to_bf16(src + i)));
      } else {
        std::memcpy(rows, data<uint16_t>(w) + n * K, kRows * K * sizeof(uint16_t));
      }
      for (int64_t b = 0; b < B; ++b) {
        const uint16_t* xr = xp + b * K;
        __m512 acc[kRows] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t k = 0; k < K; k += 32) {
          const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(xr + k));
          for (int64_t r = 0; r < kRows; ++r)
            acc[r] = _mm512_dpbf16_ps(acc[r], xv, reinterpret_cast<__m512bh>(_mm512_load_si512(rows + r * K + k)));
        }
        for (int64_t r = 0; r < kRows; ++r) {
          const float v = _mm512_reduce_add_ps(acc[r]);
          yp[b * N + n + r] = float_to_bf16(int8 ? v * sp[n + r] : v);
        }
      }
    }
  });
  return y;
}
#endif

template <class V>
at::Tensor stream_any(const at::Tensor& x, int64_t kind, const at::Tensor& w, const at::Tensor& scale, int64_t g) {
  return x.scalar_type() == at::kFloat ? stream<V, float>(x, kind, w, scale, g)
                                       : stream<V, uint16_t>(x, kind, w, scale, g);
}

// W as a dense (N, K) tensor of `dtype` (the many-rows path)
at::Tensor dequantize(int64_t kind, const at::Tensor& w, const at::Tensor& scale, int64_t g, at::ScalarType dtype) {
  if (kind == kDense) return w.to(dtype);
  if (kind == kInt8) return (w.to(at::kFloat) * scale.to(at::kFloat).unsqueeze(1)).to(dtype);
  const int64_t N = w.size(0), K = w.size(1) * 2;
  const at::Tensor q = at::stack({at::bitwise_and(w, 15), at::bitwise_right_shift(w, 4)}, -1).view({N, K / g, g});
  const at::Tensor sz = scale.to(at::kFloat);
  return ((q.to(at::kFloat) - 8) * sz.select(2, 0).unsqueeze(2) + sz.select(2, 1).unsqueeze(2)).view({N, K}).to(dtype);
}

}  // namespace

namespace {
void check(const at::Tensor& x_in, int64_t kind, const at::Tensor& w, const at::Tensor& scale, int64_t group_size) {
  TORCH_CHECK(x_in.dim() == 2, "project: x must be (B, K)");
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 || x_in.scalar_type() == at::kFloat,
              "project: x must be bfloat16 or float32");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "project: the weight must be a contiguous (N, K) tensor");
  const int64_t K = x_in.size(1), N = w.size(0);
  switch (kind) {
    case kDense:
      TORCH_CHECK(w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kFloat,
                  "project: a dense weight must be bfloat16 or float32");
      TORCH_CHECK(w.size(1) == K, "project: weight (N, K) does not match x (B, K)");
      break;
    case kInt8:
    case kInt8Q8:
      TORCH_CHECK(w.scalar_type() == at::kChar && w.size(1) == K, "project: int8 weight must be (N, K) int8");
      TORCH_CHECK(scale.numel() == N && scale.is_contiguous() &&
                      (scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kBFloat16),
                  "project: int8 scale must be (N,) float32 or bfloat16");
      break;
    case kInt4:
    case kInt4Q8:
      TORCH_CHECK(w.scalar_type() == at::kByte && w.size(1) * 2 == K, "project: int4 weight must be (N, K/2) uint8");
      TORCH_CHECK(group_size > 0 && group_size % 2 == 0 && K % group_size == 0,
                  "project: int4 group size must be even and divide K");
      TORCH_CHECK(scale.dim() == 3 && scale.size(0) == N && scale.size(1) == K / group_size && scale.size(2) == 2 &&
                      scale.is_contiguous() &&
                      (scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kBFloat16),
                  "project: int4 scale must be (N, K/g, 2) float32 or bfloat16 (scale, zero)");
      break;
    case kInt4Aten:
      TORCH_CHECK(x_in.scalar_type() == at::kBFloat16, "project: ATen-packed int4 takes bfloat16 x");
      TORCH_CHECK(w.scalar_type() == at::kByte && w.size(1) * 2 == K, "project: ATen int4 weight must be (N, K/2) uint8");
      TORCH_CHECK(group_size > 0 && K % group_size == 0 && scale.dim() == 3 && scale.size(0) == K / group_size &&
                      scale.size(1) == N && scale.size(2) == 2 && scale.scalar_type() == at::kBFloat16,
                  "project: ATen int4 scale must be (K/g, N, 2) bfloat16");
      break;
    default:
      TORCH_CHECK(false, "project: unknown kind ", kind,
                  " (0 dense, 1 int8, 2 int4, 3 ATen int4, 4 int4 x int8s, 5 int8 x int8s)");
  }
}
}  // namespace

at::Tensor project(const at::Tensor& x_in, int64_t kind, const at::Tensor& w, const at::Tensor& scale,
                   int64_t group_size) {
  check(x_in, kind, w, scale, group_size);
  const at::Tensor x = x_in.contiguous();
  if (kind == kInt4Aten) return at::_weight_int4pack_mm_for_cpu(x, w, group_size, scale);
  if (kind == kInt4Q8 || kind == kInt8Q8) {
    if (x.size(0) <= kMaxB && q8_applies(x, kind, group_size)) return project_q8(x, kind, w, scale, group_size, false);
    kind = kind == kInt4Q8 ? kInt4 : kInt8;  // the shapes it cannot take: the float path of the same storage
  }
  if (x.size(0) > kMaxB) {
    if (kind == kInt8 && scale.scalar_type() == x.scalar_type()) return at::_weight_int8pack_mm(x, w, scale);
    if (kind == kDense && w.scalar_type() == x.scalar_type()) return at::linear(x, w);
    // otherwise the product in float32: a dequantized weight rounded to bf16 would lose more than the output's
    // one rounding
    return at::linear(x.to(at::kFloat), dequantize(kind, w, scale, group_size, at::kFloat)).to(x.scalar_type());
  }
#if defined(SMOLVLM_AVX512BF16)
  if (dpbf16_applies(x, kind, w)) return gemv_dpbf16(x, w, scale, kind == kInt8);
#endif
#if defined(SMOLVLM_AVX512)
  return stream_any<V16>(x, kind, w, scale, group_size);
#elif defined(SMOLVLM_AVX2)
  return stream_any<V8>(x, kind, w, scale, group_size);
#else
  return stream_any<VG>(x, kind, w, scale, group_size);
#endif
}

// The plain C++ version of every kind, whatever the level (tests compare the level's own path with it).
at::Tensor project_generic(const at::Tensor& x_in, int64_t kind, const at::Tensor& w, const at::Tensor& scale,
                           int64_t group_size) {
  check(x_in, kind, w, scale, group_size);
  const at::Tensor x = x_in.contiguous();
  TORCH_CHECK(x.size(0) <= kMaxB, "project_generic: x must be (B, K) with B <= 16");
  TORCH_CHECK(kind != kInt4Aten, "project_generic: ATen-packed int4 has no plain C++ path");
  if (kind == kInt4Q8 || kind == kInt8Q8) {
    if (q8_applies(x, kind, group_size)) return project_q8(x, kind, w, scale, group_size, true);
    kind = kind == kInt4Q8 ? kInt4 : kInt8;
  }
  return stream_any<VG>(x, kind, w, scale, group_size);
}

}  // namespace smolvlm
