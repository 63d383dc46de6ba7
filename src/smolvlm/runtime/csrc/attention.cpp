// Attention softmax(q k^T * scale) v in one pass per block of query rows: the vision tower's (bidirectional) and
// the decoder's prefill (causal, grouped-query) at inference. Two kernels, one semantics (runtime/attention.py
// picks between them and PyTorch):
//
//   attention_bf16  bf16 in and out, AVX-512 BF16 only (the other builds declare it unsupported).
//   attention_f32   float32 in and out, at every level: AVX-512F (16 lanes), AVX2 + FMA (8 lanes) or portable C++
//                   (attention_f32.cpp).
//
// bf16 kernel:
// Why: as three ATen calls (q k^T, softmax, p v, a few heads at a time) a 1024-patch layer writes and rereads
// 24 MB of scores, and oneDNN's q k^T (inner dimension 64) runs at ~350 GFLOP/s of this CPU's ~430. Here six
// query rows at a time go through their keys with the scores in an L1-sized float buffer: q k^T and p v are
// AVX-512 BF16 dot products (exact bf16 products, fp32 sums) on k and v repacked once per kv head into pairs of
// bf16 (the instruction's operand layout), the softmax is exact in fp32 and only the probabilities are rounded
// to bf16 (as the ATen path rounds them), each output row is scaled by its 1/sum in fp32 and rounded once.
//
//   q (B, T, H, D), k and v (B, S, Hkv, D), bf16, last dimension contiguous (views of the fused qkv projection
//   or of the KV cache: no copies); query head h reads kv head h / (H / Hkv).
//   key_mask (B, S) bool or undefined (True = may be attended); causal: query i sits at position S - T + i and
//   sees keys up to it. -> out (B, T, H, D) contiguous bf16. A query with no key to see gets zeros.
//   D must be 64 (SigLIP-base, SmolLM2); callers check attention_supported(D) and otherwise use PyTorch.

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

#if defined(__AVX512F__) && defined(__AVX512BF16__)

namespace {

constexpr int64_t kDim = 64;          // head dim: 32 pairs of bf16, 4 zmm of fp32 outputs
constexpr int64_t kPairs = kDim / 2;  // q k^T steps
constexpr int64_t kKeys = 64;         // keys per packed k block: 4 zmm of fp32 scores
constexpr int kRows = 6;              // query rows per micro-kernel: 6 x 4 accumulators of 32 zmm registers
constexpr int64_t kRowsPerTask = 48;  // query rows per parallel task

inline uint32_t pair_at(const uint16_t* p) {  // two adjacent bf16 as one 32-bit word
  uint32_t w;
  std::memcpy(&w, p, 4);
  return w;
}

// k of one (b, kv head) as [key block][dim pair][64 keys] words; v as [key pair][dim] words (keys 2j and 2j+1 of a
// dim side by side). Keys past S are zeros (their probabilities are zero too).
void pack_kv(const uint16_t* k, int64_t k_stride, const uint16_t* v, int64_t v_stride, int64_t S, int64_t S_pad,
             uint32_t* kp, uint32_t* vp) {
  std::fill(kp, kp + S_pad * kPairs, 0u);
  for (int64_t j = 0; j < S; ++j) {
    const uint16_t* kr = k + j * k_stride;
    uint32_t* block = kp + (j / kKeys) * kPairs * kKeys + (j % kKeys);
    for (int64_t p = 0; p < kPairs; ++p) block[p * kKeys] = pair_at(kr + 2 * p);
  }
  for (int64_t j = 0; j < S_pad / 2; ++j) {
    const int64_t j0 = 2 * j, j1 = 2 * j + 1;
    const uint16_t* v0 = j0 < S ? v + j0 * v_stride : nullptr;
    const uint16_t* v1 = j1 < S ? v + j1 * v_stride : nullptr;
    uint16_t* out = reinterpret_cast<uint16_t*>(vp + j * kDim);
    for (int64_t d = 0; d < kDim; ++d) {
      out[2 * d] = v0 ? v0[d] : 0;
      out[2 * d + 1] = v1 ? v1[d] : 0;
    }
  }
}

// s[r][0..width) = q_r . k_j for kRows query rows (fp32, unscaled), width a multiple of kKeys; row_max[r] = max
// over the keys the row may see (j < limit[r])
void scores(const uint16_t* const q[kRows], const uint32_t* kp, int64_t width, const int64_t limit[kRows],
            int64_t s_stride, float* s, float row_max[kRows]) {
  __m512 mx[kRows];
  for (int r = 0; r < kRows; ++r) mx[r] = _mm512_set1_ps(-INFINITY);
  for (int64_t kb = 0; kb < width / kKeys; ++kb) {
    __m512 acc[kRows][4];
    for (int r = 0; r < kRows; ++r)
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
    const uint32_t* block = kp + kb * kPairs * kKeys;
    for (int64_t p = 0; p < kPairs; ++p) {
      __m512bh kv[4];
      for (int c = 0; c < 4; ++c)
        kv[c] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(block + p * kKeys + 16 * c));
      for (int r = 0; r < kRows; ++r) {
        const __m512bh qp = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(pair_at(q[r] + 2 * p))));
        for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], qp, kv[c]);
      }
    }
    for (int c = 0; c < 4; ++c) {
      const int64_t first = kb * kKeys + 16 * c;
      for (int r = 0; r < kRows; ++r) {
        _mm512_storeu_ps(s + r * s_stride + first, acc[r][c]);
        const int64_t n = std::clamp<int64_t>(limit[r] - first, 0, 16);
        mx[r] = _mm512_mask_max_ps(mx[r], static_cast<__mmask16>((1u << n) - 1), mx[r], acc[r][c]);
      }
    }
  }
  for (int r = 0; r < kRows; ++r) row_max[r] = _mm512_reduce_max_ps(mx[r]);
}

// 2^t for t <= 0 (finite): 2^n * p(f), n = round(t), |f| <= 1/2, p the degree-4 Taylor polynomial of 2^f
// (relative error < 5e-5: the result is rounded to bf16, whose step is 4e-3); 0 for t below -126 (scalef)
inline __m512 exp2_nonpositive(__m512 t) {
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(0.0096181291f);  // ln2^4 / 24
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.0555041087f));  // ln2^3 / 6
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2402265070f));  // ln2^2 / 2
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931471806f));  // ln2
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// one row: e = exp((s - max) * scale) over the keys it may see (j < limit, unmasked), 0 elsewhere, as bf16 into
// e_row[0..width); returns 1 / sum(e) (0 when it sees no key). `max` is the row's max over j < limit (from
// scores()); with a key mask it is recomputed over the unmasked keys.
float softmax_row(const float* s, const uint8_t* mask, int64_t limit, int64_t width, float scale, float max,
                  uint16_t* e_row) {
  auto keep = [&](int64_t i) -> __mmask16 {  // lanes of keys i..i+15 the row sees
    const int64_t n = std::clamp<int64_t>(limit - i, 0, 16);
    __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
    if (mask != nullptr && m) {
      const __m128i bytes = _mm_maskz_loadu_epi8(m, mask + i);
      m &= _mm_test_epi8_mask(bytes, bytes);
    }
    return m;
  };
  if (mask != nullptr) {
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t i = 0; i < limit; i += 16) mx = _mm512_mask_max_ps(mx, keep(i), mx, _mm512_loadu_ps(s + i));
    max = _mm512_reduce_max_ps(mx);
  }
  if (max == -INFINITY) {
    std::fill(e_row, e_row + width, 0);
    return 0.f;
  }
  // e = 2^t, t = (s - max) * scale * log2(e) <= 0, 32 keys per step: both halves rounded to bf16 at once
  const float k = scale * 1.44269504088896341f;
  const __m512 kv = _mm512_set1_ps(k), mkv = _mm512_set1_ps(max * k);
  __m512 sum = _mm512_setzero_ps();
  auto exp2 = [&](const float* at, __mmask16 lanes) {
    const __m512 e = exp2_nonpositive(_mm512_fmsub_ps(_mm512_loadu_ps(at), kv, mkv));
    return lanes == 0xffff ? e : _mm512_maskz_mov_ps(lanes, e);
  };
  const int64_t full = mask == nullptr ? limit / 32 * 32 : 0;  // 32 keys the row sees, no mask to apply
  for (int64_t i = 0; i < width; i += 32) {
    const bool plain = i < full;
    const __m512 lo = exp2(s + i, plain ? 0xffff : keep(i)), hi = exp2(s + i + 16, plain ? 0xffff : keep(i + 16));
    sum = _mm512_add_ps(sum, _mm512_add_ps(lo, hi));  // of the float e: their bf16 roundings average out
    _mm512_storeu_si512(e_row + i, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
  }
  return 1.f / _mm512_reduce_add_ps(sum);
}

// out_r = inv_r * sum_j e[r][j] v_j over j < width for kRows rows; rows with out[r] == nullptr are not stored
void weighted_sum(const uint16_t* e, int64_t e_stride, int64_t width, const uint32_t* vp, const float inv[kRows],
                  uint16_t* const out[kRows]) {
  __m512 acc[kRows][4];
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < width / 2; ++j) {
    __m512bh vv[4];
    for (int c = 0; c < 4; ++c) vv[c] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(vp + j * kDim + 16 * c));
    for (int r = 0; r < kRows; ++r) {
      const int ep_bits = static_cast<int>(pair_at(e + r * e_stride + 2 * j));
      const __m512bh ep = reinterpret_cast<__m512bh>(_mm512_set1_epi32(ep_bits));
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], ep, vv[c]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    if (out[r] == nullptr) continue;
    const __m512 iv = _mm512_set1_ps(inv[r]);
    for (int c = 0; c < 4; c += 2) {
      const __m512 lo = _mm512_mul_ps(acc[r][c], iv), hi = _mm512_mul_ps(acc[r][c + 1], iv);
      _mm512_storeu_si512(out[r] + 16 * c, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
    }
  }
}

}  // namespace

bool attention_supported(int64_t head_dim) { return head_dim == kDim; }

at::Tensor attention_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& key_mask, bool causal, double scale) {
  const smolvlm::AttentionArgs a =
      smolvlm::attention_args(q, k, v, key_mask, causal, kDim, at::kBFloat16, "attention: bf16 only");
  const int64_t B = a.B, T = a.T, H = a.H, S = a.S, Hkv = a.Hkv;
  const at::Tensor& mask = a.mask;
  const int64_t S_pad = (S + kKeys - 1) / kKeys * kKeys, group = H / Hkv;
  at::Tensor out = at::empty({B, T, H, kDim}, q.options().memory_format(at::MemoryFormat::Contiguous));
  if (B == 0 || T == 0 || H == 0) return out;
  if (S == 0) return out.zero_();

  // packed k and v of every (b, kv head)
  std::vector<uint32_t> kp(B * Hkv * S_pad * kPairs), vp(B * Hkv * S_pad / 2 * kDim);
  const uint16_t* qd = reinterpret_cast<const uint16_t*>(q.data_ptr());
  const uint16_t* kd = reinterpret_cast<const uint16_t*>(k.data_ptr());
  const uint16_t* vd = reinterpret_cast<const uint16_t*>(v.data_ptr());
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hkv, h = bh % Hkv;
      pack_kv(kd + b * k.stride(0) + h * k.stride(2), k.stride(1), vd + b * v.stride(0) + h * v.stride(2), v.stride(1),
              S, S_pad, kp.data() + bh * S_pad * kPairs, vp.data() + bh * S_pad / 2 * kDim);
    }
  });

  const int64_t blocks = (T + kRowsPerTask - 1) / kRowsPerTask;
  uint16_t* od = reinterpret_cast<uint16_t*>(out.data_ptr());
  const uint8_t* md = mask.defined() ? reinterpret_cast<const uint8_t*>(mask.data_ptr()) : nullptr;
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, B * H * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(kRows * S_pad);
    std::vector<uint16_t> e(kRows * S_pad);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, b = bh / H, h = bh % H, kvh = b * Hkv + h / group;
      // causal: alternate early (short) and late (long) row blocks, so each thread's range mixes both
      const int64_t nth = task % blocks, block = !causal ? nth : nth % 2 == 0 ? nth / 2 : blocks - 1 - nth / 2;
      const uint32_t* kph = kp.data() + kvh * S_pad * kPairs;
      const uint32_t* vph = vp.data() + kvh * S_pad / 2 * kDim;
      const uint8_t* mrow = md ? md + b * S : nullptr;
      const int64_t row_end = std::min(T, (block + 1) * kRowsPerTask);
      for (int64_t i0 = block * kRowsPerTask; i0 < row_end; i0 += kRows) {
        const uint16_t* qr[kRows];
        uint16_t* orow[kRows];
        int64_t limit[kRows];
        float inv[kRows], row_max[kRows];
        for (int r = 0; r < kRows; ++r) {
          const int64_t i = std::min(i0 + r, row_end - 1);  // past the end: recompute the last row, store nothing
          qr[r] = qd + b * q.stride(0) + i * q.stride(1) + h * q.stride(2);
          orow[r] = i0 + r < row_end ? od + ((b * T + i) * H + h) * kDim : nullptr;
          limit[r] = causal ? S - T + i + 1 : S;
        }
        const int64_t width = (limit[kRows - 1] + kKeys - 1) / kKeys * kKeys;  // the last row sees the most
        scores(qr, kph, width, limit, S_pad, s.data(), row_max);
        for (int r = 0; r < kRows; ++r)
          inv[r] = softmax_row(s.data() + r * S_pad, mrow, limit[r], width, fscale, row_max[r], e.data() + r * S_pad);
        weighted_sum(e.data(), S_pad, width, vph, inv, orow);
      }
    }
  });
  return out;
}

#else

bool attention_supported(int64_t) { return false; }

at::Tensor attention_bf16(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                          bool, double) {
  TORCH_CHECK(false, "attention: built without AVX-512 BF16");
}

#endif

// attention_f32.cpp
std::string attention_isa();
bool attention_f32_supported(int64_t head_dim);
at::Tensor attention_f32(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const std::optional<at::Tensor>& key_mask, bool causal, double scale);

// both kernels' Python bindings (decode_step.cpp's module calls this)
void smolvlm_bind_attention(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("attention_isa", &attention_isa);
  m.def("attention_supported", &attention_supported);
  m.def("attention_bf16", &attention_bf16, py::call_guard<py::gil_scoped_release>());
  m.def("attention_f32_supported", &attention_f32_supported);
  m.def("attention_f32", &attention_f32, py::call_guard<py::gil_scoped_release>());
}
