// Kinds 4 and 5 of project(): int4 / int8 weights (stored as kinds 2 / 1) times activations held as two int8s.
//
// Why: with float32 activations (CPUs without native bf16) the float kernels of gemv.cpp spend their time turning
// weights into floats (an int4 weight costs a widening, a conversion and an FMA), not reading memory. With x in
// integers, integer dot products consume 32 weights per instruction (AVX2 maddubs: u8 x s8 -> s16 pairs), as
// llama.cpp does with its Q8 activations.
// What changes: per block of 32 inputs, v = x * (127 / max|x|), q1 = round(v), q2 = round((v - q1) * 254) (half
// to even, both in [-127, 127]), so x ~ d (q1 + q2 / 254) with d = max|x| / 127: ~16 bits of x per block (one
// 8-bit pass, as llama.cpp, costs SmolLM2-135M int4 ~8 points of top-1 agreement with float32; this one none).
// The sums are 254 (W.q1) + (W.q2) in int32 (exact), times d / 254 in float. The weights stay exact; int4's zero
// points use the exact float sums of x. tests/runtime/test_gemv.py builds the same sums in PyTorch.
//   kind 4 (int4)  needs K % 64 == 0 and g % 32 == 0, else it runs as kind 2
//   kind 5 (int8)  needs K % 32 == 0, else it runs as kind 1
// More rows than kMaxB run gemv.cpp's many-rows path (float). Every level runs the same integer sums (the generic
// level in plain loops), so the result does not depend on the CPU beyond float summation order.
//
// int4 layout (gemv.cpp): byte j of a row holds inputs 2j (low nibble) and 2j+1 (high). 32 bytes = 64 inputs = two
// blocks of 32: their low nibbles are the 32 even inputs, the high ones the 32 odd inputs, so x is stored per 64
// inputs as its 32 even values, then its 32 odd ones. The dot of a block pair comes out as 8 int32 lanes, lanes 0-3
// summing block 0 and lanes 4-7 block 1; each lane is scaled by (its block's weight scale) * (d / 254) in float.

#include "common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace smolvlm {
namespace {

constexpr int64_t kRows = 4, kBlock = 32;

// x (B, K) per block: q1, q2 (B, K) int8 (int4 order: per 64 inputs, even then odd), d (B, K/32), and for int4
// the exact float sums per weight group xs (B, K/g)
struct Q8 {
  std::vector<int8_t> q1, q2;
  std::vector<float> d, xs;
};

constexpr int kFineSteps = 254;  // q2's steps per step of q1
constexpr float kFine = kFineSteps;

// one block of 32 -> q1, q2 (see the top); returns d. The AVX2 version gives the same bits.
inline float quantize_block(const float* x, int8_t* q1, int8_t* q2) {
#if defined(SMOLVLM_AVX2)
  const __m256 sign = _mm256_set1_ps(-0.f), fine = _mm256_set1_ps(kFine);
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  __m256 v[4], m = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(x + 8 * i), m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i]));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
  const __m256 id = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  __m256i a[4], b[4];
  for (int i = 0; i < 4; ++i) {
    const __m256 t = _mm256_mul_ps(v[i], id), r = _mm256_round_ps(t, kNearest);
    a[i] = _mm256_cvtps_epi32(r);
    b[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(t, r), fine), kNearest));
  }
  // packs work within 128-bit lanes: the bytes come out as 0-3 8-11 16-19 24-27 4-7 12-15 20-23 28-31 (4 each)
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  auto pack = [&](const __m256i* n, int8_t* q) {
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]), _mm256_packs_epi32(n[2], n[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_permutevar8x32_epi32(p, order));
  };
  pack(a, q1);
  pack(b, q2);
  return amax / 127.f;
#else
  float amax = 0.f;
  for (int64_t k = 0; k < kBlock; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float id = amax > 0.f ? 127.f / amax : 0.f;
  for (int64_t k = 0; k < kBlock; ++k) {
    const float t = x[k] * id, r = std::nearbyint(t);
    q1[k] = static_cast<int8_t>(r);
    q2[k] = static_cast<int8_t>(std::nearbyint((t - r) * kFine));
  }
  return amax / 127.f;
#endif
}

void quantize_x(const float* x, int64_t B, int64_t K, bool int4, int64_t g, Q8& r) {
  r.q1.resize(B * K);
  r.q2.resize(B * K);
  r.d.resize(B * (K / kBlock));
  if (int4) r.xs.assign(B * (K / g), 0.f);
  int8_t n1[64], n2[64];
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = x + b * K;
    int8_t *q1 = r.q1.data() + b * K, *q2 = r.q2.data() + b * K;
    float* db = r.d.data() + b * (K / kBlock);
    if (!int4) {
      for (int64_t blk = 0; blk < K / kBlock; ++blk)
        db[blk] = quantize_block(xb + blk * kBlock, q1 + blk * kBlock, q2 + blk * kBlock);
      continue;
    }
    for (int64_t p = 0; p < K / 64; ++p) {  // per 64 inputs: the even ones, then the odd ones
      db[2 * p] = quantize_block(xb + 64 * p, n1, n2);
      db[2 * p + 1] = quantize_block(xb + 64 * p + 32, n1 + 32, n2 + 32);
      for (int64_t j = 0; j < 32; ++j) {
        q1[64 * p + j] = n1[2 * j], q1[64 * p + 32 + j] = n1[2 * j + 1];
        q2[64 * p + j] = n2[2 * j], q2[64 * p + 32 + j] = n2[2 * j + 1];
      }
    }
    for (int64_t k = 0; k < K; ++k) r.xs[b * (K / g) + k / g] += xb[k];
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Plain loops (the generic level, and project_generic everywhere); r rows of the 4-row block. dq: d / 254 per block.

template <typename S>
void int4_rows_plain(const uint8_t* w, const S* sz, int64_t K, int64_t g, int64_t r, const int8_t* q1,
                     const int8_t* q2, const float* dq, const float* xs, float* out) {
  const int64_t G = K / g;
  for (int64_t i = 0; i < r; ++i) {
    const uint8_t* wr = w + i * (K / 2);
    float y = 0.f;
    for (int64_t p = 0; p < K / 64; ++p)
      for (int64_t h = 0; h < 2; ++h) {  // block 2p + h: bytes 32p + 16h .. +16
        int32_t s1 = 0, s2 = 0;
        for (int64_t j = 0; j < 16; ++j) {
          const int32_t lo = wr[32 * p + 16 * h + j] & 15, hi = wr[32 * p + 16 * h + j] >> 4;
          const int64_t e = 64 * p + 16 * h + j, o = e + 32;  // its even and odd inputs
          s1 += lo * q1[e] + hi * q1[o];
          s2 += lo * q2[e] + hi * q2[o];
        }
        const int64_t blk = 2 * p + h;
        y += static_cast<float>(kFineSteps * s1 + s2) * (scalar(sz[(i * G + blk * kBlock / g) * 2]) * dq[blk]);
      }
    for (int64_t grp = 0; grp < G; ++grp) {
      const float s = scalar(sz[(i * G + grp) * 2]), z = scalar(sz[(i * G + grp) * 2 + 1]);
      y += (z - 8.f * s) * xs[grp];
    }
    out[i] = y;
  }
}

void int8_rows_plain(const int8_t* w, int64_t K, int64_t r, const int8_t* q1, const int8_t* q2, const float* dq,
                     float* out) {
  for (int64_t i = 0; i < r; ++i) {
    float y = 0.f;
    for (int64_t blk = 0; blk < K / kBlock; ++blk) {
      int32_t s1 = 0, s2 = 0;
      for (int64_t k = blk * kBlock; k < (blk + 1) * kBlock; ++k)
        s1 += w[i * K + k] * q1[k], s2 += w[i * K + k] * q2[k];
      y += static_cast<float>(kFineSteps * s1 + s2) * dq[blk];
    }
    out[i] = y;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// AVX2 (also run by the AVX-512 levels)

#if defined(SMOLVLM_AVX2)
// bytes ahead of the rows being read that the loops ask the memory for: the hardware prefetcher alone leaves the
// 2-thread streams well below the memory's speed (benchmarks/bench_vs_llamacpp.py moves ~25%)
constexpr int64_t kAhead = 4096;

inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p) + kAhead, _MM_HINT_T0); }

inline __m128 load4(const float* p) { return _mm_loadu_ps(p); }
inline __m128 load4(const uint16_t* p) {  // 4 bf16 -> 4 floats
  return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))), 16));
}

inline __m256i load32(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// 64 int4 inputs (32 bytes v) times x's two int8 parts (x1, x2: the even inputs' 32 bytes, then the odd ones')
// -> 8 int32 lanes of 254 (W.q1) + (W.q2): lanes 0-3 block 0, 4-7 block 1
inline __m256i int4_dot(__m256i v, const __m256i* x1, const __m256i* x2) {
  const __m256i m = _mm256_set1_epi8(15);
  const __m256i lo = _mm256_and_si256(v, m), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
  const __m256i s1 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, x1[0]), _mm256_maddubs_epi16(hi, x1[1]));
  const __m256i s2 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, x2[0]), _mm256_maddubs_epi16(hi, x2[1]));
  return _mm256_add_epi32(_mm256_madd_epi16(s1, _mm256_set1_epi16(kFineSteps)),
                          _mm256_madd_epi16(s2, _mm256_set1_epi16(1)));
}

// one int4 row with groups of 32: per block pair, (scale, zero) of both groups are 4 adjacent values s0 z0 s1 z1.
// dx: per pair 8 floats (d0 / 254 x4, d1 / 254 x4); xz: per pair (-8 xs0, xs0, -8 xs1, xs1), so the zero terms
// are one FMA a pair. A row at a time (as int8_row): faster than reading several rows side by side
template <typename S>
float int4_row_g32(const uint8_t* w, const S* sz, int64_t K, const int8_t* q1, const int8_t* q2, const float* dx,
                   const float* xz) {
  const __m256i pick = _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2);
  __m256 acc = _mm256_setzero_ps();
  __m128 off = _mm_setzero_ps();
  for (int64_t p = 0; p < K / 64; ++p) {
    const __m256i x1[2] = {load32(q1 + 64 * p), load32(q1 + 64 * p + 32)};
    const __m256i x2[2] = {load32(q2 + 64 * p), load32(q2 + 64 * p + 32)};
    prefetch(w + 32 * p);
    const __m256i s32 = int4_dot(load32(w + 32 * p), x1, x2);
    const __m128 pair = load4(sz + 4 * p);  // s0 z0 s1 z1
    const __m256 sw = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(pair), pick);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), _mm256_mul_ps(sw, _mm256_loadu_ps(dx + 8 * p)), acc);
    off = _mm_fmadd_ps(pair, _mm_loadu_ps(xz + 4 * p), off);
  }
  off = _mm_add_ps(off, _mm_movehl_ps(off, off));
  return hsum(acc) + _mm_cvtss_f32(_mm_add_ss(off, _mm_movehdup_ps(off)));
}

// int4 rows, any g that is a multiple of 32: the pair's scales set one by one, the zero terms per group after
template <typename S>
void int4_rows_any(const uint8_t* w, const S* sz, int64_t K, int64_t g, int64_t r, const int8_t* q1,
                   const int8_t* q2, const float* dx, const float* xs, float* out) {
  const int64_t P = K / 64, G = K / g;
  for (int64_t i = 0; i < r; ++i) {
    const uint8_t* wr = w + i * (K / 2);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t p = 0; p < P; ++p) {
      const __m256i x1[2] = {load32(q1 + 64 * p), load32(q1 + 64 * p + 32)};
      const __m256i x2[2] = {load32(q2 + 64 * p), load32(q2 + 64 * p + 32)};
      prefetch(wr + 32 * p);
      const __m256i s32 = int4_dot(load32(wr + 32 * p), x1, x2);
      const float s0 = scalar(sz[(i * G + 64 * p / g) * 2]), s1 = scalar(sz[(i * G + (64 * p + 32) / g) * 2]);
      const __m256 sw = _mm256_setr_m128(_mm_set1_ps(s0), _mm_set1_ps(s1));
      acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), _mm256_mul_ps(sw, _mm256_loadu_ps(dx + 8 * p)), acc);
    }
    float y = hsum(acc);
    for (int64_t grp = 0; grp < G; ++grp)
      y += (scalar(sz[(i * G + grp) * 2 + 1]) - 8.f * scalar(sz[(i * G + grp) * 2])) * xs[grp];
    out[i] = y;
  }
}

// one int8 row: per block, |w| (u8) times x's parts with w's sign (s8) -> s16 pairs -> int32 lanes of
// 254 (W.q1) + (W.q2), scaled by the block's d / 254. A row at a time, two blocks per step into two sums: reading
// four rows side by side streamed the head much slower (docs/speed.md)
inline float int8_row(const int8_t* w, int64_t K, const int8_t* q1, const int8_t* q2, const float* dq) {
  const __m256i ones = _mm256_set1_epi16(1), fine = _mm256_set1_epi16(kFineSteps);
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  auto block = [&](int64_t blk, __m256& a) {
    const __m256i x1 = load32(q1 + blk * kBlock), x2 = load32(q2 + blk * kBlock);
    const __m256i v = load32(w + blk * kBlock), m = _mm256_abs_epi8(v);
    const __m256i s1 = _mm256_madd_epi16(_mm256_maddubs_epi16(m, _mm256_sign_epi8(x1, v)), fine);
    const __m256i s2 = _mm256_madd_epi16(_mm256_maddubs_epi16(m, _mm256_sign_epi8(x2, v)), ones);
    a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(s1, s2)), _mm256_broadcast_ss(dq + blk), a);
  };
  const int64_t NB = K / kBlock;
  int64_t blk = 0;
  for (; blk + 2 <= NB; blk += 2) {
    prefetch(w + blk * kBlock);  // one 64-byte line per two blocks
    block(blk, acc[0]);
    block(blk + 1, acc[1]);
  }
  if (blk < NB) block(blk, acc[0]);
  return hsum(_mm256_add_ps(acc[0], acc[1]));
}
#endif

template <typename T, typename S>
at::Tensor run(const at::Tensor& x, int64_t kind, const at::Tensor& w, const at::Tensor& scale, int64_t g,
               bool plain) {
  const int64_t B = x.size(0), K = x.size(1), N = w.size(0), NB = K / kBlock;
  const bool int4 = kind == kInt4Q8;
  // buffers kept per calling thread (a decoding step makes ~120 of these calls a token); the workers below read
  // them through the plain pointers taken after they are filled (a thread_local name is per thread)
  thread_local std::vector<float> xf, dx, xz;
  thread_local Q8 xq;
  const float* xp = data<float>(x);
  if constexpr (!std::is_same_v<T, float>) {
    xf.resize(B * K);
    for (int64_t i = 0; i < B * K; ++i) xf[i] = Act<T>::ld(data<T>(x)[i]);
    xp = xf.data();
  }
  quantize_x(xp, B, K, int4, g, xq);
  for (float& d : xq.d) d /= kFine;  // the sums come as 254 (W.q1) + (W.q2): one factor for both parts
  // per pair of blocks, the vector forms the AVX2 int4 loops read: d twice four times, the zero-term multipliers
  if (int4) {
    dx.resize(B * NB * 4);
    for (int64_t i = 0; i < B * NB; ++i) std::fill_n(dx.begin() + 4 * i, 4, xq.d[i]);
    if (g == kBlock) {
      xz.resize(B * NB * 2);
      for (int64_t i = 0; i < B * NB; ++i) xz[2 * i] = -8.f * xq.xs[i], xz[2 * i + 1] = xq.xs[i];
    }
  }
  const int8_t *q1p = xq.q1.data(), *q2p = xq.q2.data();
  const float *dp = xq.d.data(), *xsp = xq.xs.data(), *dxp = dx.data(), *xzp = xz.data();
  at::Tensor y = at::empty({B, N}, x.options());
  T* yp = data<T>(y);
  const S* sp = scale.numel() ? data<S>(scale) : nullptr;
  at::parallel_for(0, (N + kRows - 1) / kRows, 8, [&](int64_t begin, int64_t end) {
    float out[kRows];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n = blk * kRows, r = std::min(kRows, N - n);
      for (int64_t b = 0; b < B; ++b) {
        const int8_t *q1 = q1p + b * K, *q2 = q2p + b * K;
        const float* db = dp + b * NB;
        if (int4) {
          const uint8_t* wn = data<uint8_t>(w) + n * (K / 2);
          const S* szn = sp + n * (K / g) * 2;
          const float* xs = xsp + b * (K / g);
#if defined(SMOLVLM_AVX2)
          if (!plain && g == kBlock)
            for (int64_t i = 0; i < r; ++i)
              out[i] = int4_row_g32<S>(wn + i * (K / 2), szn + i * NB * 2, K, q1, q2, dxp + b * NB * 4,
                                       xzp + b * NB * 2);
          else if (!plain)
            int4_rows_any<S>(wn, szn, K, g, r, q1, q2, dxp + b * NB * 4, xs, out);
          else
#endif
            int4_rows_plain<S>(wn, szn, K, g, r, q1, q2, db, xs, out);
        } else {
          const int8_t* wn = data<int8_t>(w) + n * K;
#if defined(SMOLVLM_AVX2)
          if (!plain)
            for (int64_t i = 0; i < r; ++i) out[i] = int8_row(wn + i * K, K, q1, q2, db);
          else
#endif
            int8_rows_plain(wn, K, r, q1, q2, db, out);
          for (int64_t i = 0; i < r; ++i) out[i] *= scalar(sp[n + i]);
        }
        for (int64_t i = 0; i < r; ++i) yp[b * N + n + i] = Act<T>::st(out[i]);
      }
    }
  });
  return y;
}

}  // namespace

bool q8_applies(const at::Tensor& x, int64_t kind, int64_t group_size) {
  const int64_t K = x.size(1);
  return kind == kInt4Q8 ? K % 64 == 0 && group_size % kBlock == 0 : K % kBlock == 0;
}

// x (B <= kMaxB, K) float32 or bf16, checked by gemv.cpp's project(); `plain`: the plain loops whatever the level
at::Tensor project_q8(const at::Tensor& x, int64_t kind, const at::Tensor& w, const at::Tensor& scale,
                      int64_t group_size, bool plain) {
  const bool xf = x.scalar_type() == at::kFloat, sf = scale.scalar_type() == at::kFloat;
  if (xf) return sf ? run<float, float>(x, kind, w, scale, group_size, plain)
                    : run<float, uint16_t>(x, kind, w, scale, group_size, plain);
  return sf ? run<uint16_t, float>(x, kind, w, scale, group_size, plain)
            : run<uint16_t, uint16_t>(x, kind, w, scale, group_size, plain);
}

}  // namespace smolvlm
