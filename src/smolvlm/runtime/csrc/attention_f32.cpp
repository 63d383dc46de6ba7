// Float32 attention in one pass per block of query rows: attention.cpp's semantics and blocking (its top says
// what the arguments are), at every level. Also softmax.cpp's float32 row softmax (softmax_rows_f32).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "attention_args.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

// float32 kernel: the same blocking with fp32 everywhere. q k^T and p v are FMAs on fp32 (k repacked once per kv
// head as [key block][dim][keys], so one load holds one dim of a vector of keys; v is read where it is), the
// softmax is fp32 with a polynomial exp (relative error ~1e-7): nothing is rounded below fp32. Same arguments and
// semantics as attention_bf16.

namespace {
namespace f32 {

// Vec: kW float lanes and the few operations the kernel needs, one definition per instruction set
#if defined(__AVX512F__)
constexpr int kW = 16;
struct Vec {
  __m512 v;
  static Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static Vec set1(float x) { return {_mm512_set1_ps(x)}; }
  static Vec zero() { return {_mm512_setzero_ps()}; }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  friend Vec fma(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }  // a b + c
  friend Vec max(Vec a, Vec b) { return {_mm512_max_ps(a.v, b.v)}; }
  friend Vec add(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
  friend Vec mul(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
  float reduce_max() const { return _mm512_reduce_max_ps(v); }
  float reduce_add() const { return _mm512_reduce_add_ps(v); }
};
// 2^t for t <= 0 (-inf included): 2^n p(f), n = round(t), |f| <= 1/2, p of degree 6 (relative error ~1e-7);
// 0 below -126 (denormal results are dropped: they cannot change a sum that is at least 1)
inline Vec exp2_nonpositive(Vec t) {
  const __mmask16 live = _mm512_cmp_ps_mask(t.v, _mm512_set1_ps(-126.f), _CMP_GE_OQ);
  const __m512 x = _mm512_max_ps(t.v, _mm512_set1_ps(-126.f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24022650695910071f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69314718055994531f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return {_mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n))};
}
constexpr const char* kIsa = "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kW = 8;
struct Vec {
  __m256 v;
  static Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static Vec set1(float x) { return {_mm256_set1_ps(x)}; }
  static Vec zero() { return {_mm256_setzero_ps()}; }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  friend Vec fma(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  friend Vec max(Vec a, Vec b) { return {_mm256_max_ps(a.v, b.v)}; }
  friend Vec add(Vec a, Vec b) { return {_mm256_add_ps(a.v, b.v)}; }
  friend Vec mul(Vec a, Vec b) { return {_mm256_mul_ps(a.v, b.v)}; }
  float reduce_max() const {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  }
  float reduce_add() const {
    __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_add_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_add_ss(m, _mm_movehdup_ps(m)));
  }
};
inline Vec exp2_nonpositive(Vec t) {  // as above; 2^n built in the exponent bits (no scalef in AVX2)
  const __m256 live = _mm256_cmp_ps(t.v, _mm256_set1_ps(-126.f), _CMP_GE_OQ);
  const __m256 x = _mm256_max_ps(t.v, _mm256_set1_ps(-126.f));
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 p = _mm256_set1_ps(1.5403530393381606e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291076284772e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108664821580e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.24022650695910071f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.69314718055994531f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return {_mm256_and_ps(live, _mm256_mul_ps(p, _mm256_castsi256_ps(e)))};
}
constexpr const char* kIsa = "avx2";
#else
// portable: arrays the compiler vectorizes for the baseline (SSE2, NEON)
constexpr int kW = 8;
struct Vec {
  float v[kW];
  static Vec load(const float* p) {
    Vec r;
    std::memcpy(r.v, p, sizeof r.v);
    return r;
  }
  static Vec set1(float x) {
    Vec r;
    std::fill(r.v, r.v + kW, x);
    return r;
  }
  static Vec zero() { return set1(0.f); }
  void store(float* p) const { std::memcpy(p, v, sizeof v); }
  friend Vec fma(Vec a, Vec b, Vec c) {
    for (int i = 0; i < kW; ++i) c.v[i] += a.v[i] * b.v[i];
    return c;
  }
  friend Vec max(Vec a, Vec b) {
    for (int i = 0; i < kW; ++i) a.v[i] = std::max(a.v[i], b.v[i]);
    return a;
  }
  friend Vec add(Vec a, Vec b) {
    for (int i = 0; i < kW; ++i) a.v[i] += b.v[i];
    return a;
  }
  friend Vec mul(Vec a, Vec b) {
    for (int i = 0; i < kW; ++i) a.v[i] *= b.v[i];
    return a;
  }
  float reduce_max() const { return *std::max_element(v, v + kW); }
  float reduce_add() const {
    float s = 0.f;
    for (float x : v) s += x;
    return s;
  }
};
inline Vec exp2_nonpositive(Vec t) {
  for (float& x : t.v) x = x < -126.f ? 0.f : std::exp2(x);
  return t;
}
constexpr const char* kIsa = "generic";
#endif

constexpr int64_t kDim = 64;          // head dim
constexpr int64_t kKeys = 2 * kW;     // keys per packed k block: two vectors of scores
constexpr int64_t kChunk = 2 * kW;    // output dims per p v pass: two vectors
constexpr int kRows = 6;              // query rows per micro-kernel: 6 x 2 accumulators (12 of AVX2's 16 ymm)
constexpr int64_t kRowsPerTask = 48;  // query rows per parallel task

// k of one (b, kv head) as [key block][dim][kKeys keys]; keys past S are zeros
void pack_k(const float* k, int64_t k_stride, int64_t S, int64_t S_pad, float* kp) {
  std::fill(kp, kp + S_pad * kDim, 0.f);
  for (int64_t j = 0; j < S; ++j) {
    const float* kr = k + j * k_stride;
    float* block = kp + (j / kKeys) * kDim * kKeys + (j % kKeys);
    for (int64_t d = 0; d < kDim; ++d) block[d * kKeys] = kr[d];
  }
}

// s[r][0..width) = q_r . k_j (unscaled) for kRows rows, width a multiple of kKeys
void scores(const float* const q[kRows], const float* kp, int64_t width, int64_t s_stride, float* s) {
  for (int64_t kb = 0; kb < width / kKeys; ++kb) {
    Vec acc[kRows][2];
    for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = Vec::zero();
    const float* block = kp + kb * kDim * kKeys;
    for (int64_t d = 0; d < kDim; ++d) {
      const Vec k0 = Vec::load(block + d * kKeys), k1 = Vec::load(block + d * kKeys + kW);
      for (int r = 0; r < kRows; ++r) {
        const Vec qd = Vec::set1(q[r][d]);
        acc[r][0] = fma(qd, k0, acc[r][0]);
        acc[r][1] = fma(qd, k1, acc[r][1]);
      }
    }
    for (int r = 0; r < kRows; ++r) {
      acc[r][0].store(s + r * s_stride + kb * kKeys);
      acc[r][1].store(s + r * s_stride + kb * kKeys + kW);
    }
  }
}

inline float exp2_scalar(float t) { return t < -126.f ? 0.f : std::exp2(t); }  // the tail of a row

// one row in place: s[j] -> exp((s[j] - max) * scale) over the keys it may see (j < limit, unmasked), 0 elsewhere
// (up to width); returns 1 / sum (0 when it sees no key)
float softmax_row(float* s, const uint8_t* mask, int64_t limit, int64_t width, float scale) {
  for (int64_t j = limit; j < width; ++j) s[j] = -INFINITY;  // later keys (causal) and the padding of the block
  if (mask != nullptr)
    for (int64_t j = 0; j < limit; ++j)
      if (!mask[j]) s[j] = -INFINITY;
  const int64_t full = width / kW * kW;
  Vec mx = Vec::set1(-INFINITY);
  for (int64_t j = 0; j < full; j += kW) mx = max(mx, Vec::load(s + j));
  float m = mx.reduce_max();
  for (int64_t j = full; j < width; ++j) m = std::max(m, s[j]);
  if (m == -INFINITY) {
    std::fill(s, s + width, 0.f);
    return 0.f;
  }
  const float k = scale * 1.44269504088896341f;  // e^(x scale) = 2^(x scale log2 e)
  const Vec kv = Vec::set1(k), mk = Vec::set1(-m * k);
  Vec sum = Vec::zero();
  for (int64_t j = 0; j < full; j += kW) {
    const Vec e = exp2_nonpositive(fma(Vec::load(s + j), kv, mk));  // -inf -> 0
    e.store(s + j);
    sum = add(sum, e);
  }
  float total = sum.reduce_add();
  for (int64_t j = full; j < width; ++j) {
    s[j] = exp2_scalar(s[j] * k - m * k);
    total += s[j];
  }
  return 1.f / total;
}

// out_r = inv_r * sum_{j < keys} e[r][j] v_j for kRows rows; rows with out[r] == nullptr are not stored
void weighted_sum(const float* e, int64_t e_stride, int64_t keys, const float* v, int64_t v_stride,
                  const float inv[kRows], float* const out[kRows]) {
  for (int64_t c = 0; c < kDim; c += kChunk) {
    Vec acc[kRows][2];
    for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = Vec::zero();
    for (int64_t j = 0; j < keys; ++j) {
      const Vec v0 = Vec::load(v + j * v_stride + c), v1 = Vec::load(v + j * v_stride + c + kW);
      for (int r = 0; r < kRows; ++r) {
        const Vec p = Vec::set1(e[r * e_stride + j]);
        acc[r][0] = fma(p, v0, acc[r][0]);
        acc[r][1] = fma(p, v1, acc[r][1]);
      }
    }
    for (int r = 0; r < kRows; ++r) {
      if (out[r] == nullptr) continue;
      const Vec iv = Vec::set1(inv[r]);
      mul(acc[r][0], iv).store(out[r] + c);
      mul(acc[r][1], iv).store(out[r] + c + kW);
    }
  }
}

}  // namespace f32
}  // namespace

// softmax.cpp's float32 softmax: these rows through the attention kernel's softmax (one exp, one semantics)
void softmax_rows_f32(float* data, int64_t rows, int64_t cols) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* row = data + r * cols;
      const float inv = f32::softmax_row(row, nullptr, cols, cols, 1.f);
      if (inv == 0.f) continue;  // every key masked: already zeros
      const f32::Vec iv = f32::Vec::set1(inv);
      const int64_t full = cols / f32::kW * f32::kW;
      for (int64_t j = 0; j < full; j += f32::kW) mul(f32::Vec::load(row + j), iv).store(row + j);
      for (int64_t j = full; j < cols; ++j) row[j] *= inv;
    }
  });
}

bool attention_f32_supported(int64_t head_dim) { return head_dim == f32::kDim; }

std::string attention_isa() {  // the instruction set this build's kernels use
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  return "avx512_bf16";
#else
  return f32::kIsa;
#endif
}

at::Tensor attention_f32(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const std::optional<at::Tensor>& key_mask, bool causal, double scale) {
  using f32::kDim, f32::kKeys, f32::kRows, f32::kRowsPerTask;  // not the bf16 kernel's constants
  const smolvlm::AttentionArgs a =
      smolvlm::attention_args(q, k, v, key_mask, causal, kDim, at::kFloat, "attention_f32: float32 only");
  const int64_t B = a.B, T = a.T, H = a.H, S = a.S, Hkv = a.Hkv;
  const at::Tensor& mask = a.mask;
  const int64_t S_pad = (S + kKeys - 1) / kKeys * kKeys, group = H / Hkv;
  at::Tensor out = at::empty({B, T, H, kDim}, q.options().memory_format(at::MemoryFormat::Contiguous));
  if (B == 0 || T == 0 || H == 0) return out;
  if (S == 0) return out.zero_();

  std::vector<float> kp(B * Hkv * S_pad * kDim);
  const float* qd = q.data_ptr<float>();
  const float* kd = k.data_ptr<float>();
  const float* vd = v.data_ptr<float>();
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh)
      f32::pack_k(kd + (bh / Hkv) * k.stride(0) + (bh % Hkv) * k.stride(2), k.stride(1), S, S_pad,
             kp.data() + bh * S_pad * kDim);
  });

  const int64_t blocks = (T + kRowsPerTask - 1) / kRowsPerTask;
  float* od = out.data_ptr<float>();
  const uint8_t* md = mask.defined() ? reinterpret_cast<const uint8_t*>(mask.data_ptr()) : nullptr;
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, B * H * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(kRows * S_pad);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, b = bh / H, h = bh % H, kvh = h / group;
      // causal: alternate early (short) and late (long) row blocks, so each thread's range mixes both
      const int64_t nth = task % blocks, block = !causal ? nth : nth % 2 == 0 ? nth / 2 : blocks - 1 - nth / 2;
      const float* kph = kp.data() + (b * Hkv + kvh) * S_pad * kDim;
      const float* vh = vd + b * v.stride(0) + kvh * v.stride(2);
      const uint8_t* mrow = md ? md + b * S : nullptr;
      const int64_t row_end = std::min(T, (block + 1) * kRowsPerTask);
      for (int64_t i0 = block * kRowsPerTask; i0 < row_end; i0 += kRows) {
        const float* qr[kRows];
        float* orow[kRows];
        int64_t limit[kRows];
        float inv[kRows];
        for (int r = 0; r < kRows; ++r) {
          const int64_t i = std::min(i0 + r, row_end - 1);  // past the end: recompute the last row, store nothing
          qr[r] = qd + b * q.stride(0) + i * q.stride(1) + h * q.stride(2);
          orow[r] = i0 + r < row_end ? od + ((b * T + i) * H + h) * kDim : nullptr;
          limit[r] = causal ? S - T + i + 1 : S;
        }
        const int64_t keys = limit[kRows - 1];  // the last row sees the most
        const int64_t width = (keys + kKeys - 1) / kKeys * kKeys;
        f32::scores(qr, kph, width, S_pad, s.data());
        for (int r = 0; r < kRows; ++r)
          inv[r] = f32::softmax_row(s.data() + r * S_pad, mrow, limit[r], width, fscale);
        f32::weighted_sum(s.data(), S_pad, keys, vh, v.stride(1), inv, orow);
      }
    }
  });
  return out;
}
