// One decoding step of the Llama-style decoder (one new token per sequence) in a single call from Python.
//
// Why: at batch 1 the decoder's matmuls only read weights, and eager PyTorch spends ~7 ms per token on the
// ~40 small ops per layer around them (norms, RoPE, cache writes, SDPA setup, SiLU, residual adds: each a
// Python call plus a dispatch). Here everything between the matmuls is a plain loop over a few hundred numbers;
// the bf16 and int8 matmuls read their weights as one stream (gemv below, with AVX-512 BF16; else ATen's
// kernels), int4 stays ATen's weight-only kernel.
// The math is models/decoder.py's (tests/test_decode_step.py compares the two); only the rounding differs:
// RoPE, attention and SiLU x up run in float32 and round to bf16 once.
//
// Per layer:  h = rmsnorm(x)  ->  qkv = h Wqkv  ->  RoPE(q, k); k, v into the cache at `pos`
//             ->  attention of q over cache[0..pos]  ->  x += y Wo
//             ->  h = rmsnorm(x)  ->  [g, u] = h Wgu  ->  x += (silu(g) * u) Wdown

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define SMOLVLM_GEMV 1
#endif

namespace {

enum Kind : int64_t { kDense = 0, kInt8 = 1, kInt4 = 2 };

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

#ifdef SMOLVLM_GEMV
// y (B, N) bf16 = x (B, K) bf16 @ W^T (* scale per row for int8), for the few rows of a decoding step.
// Why: there a matmul only streams its weights from memory once, and ATen's bf16 and int8 kernels reach about
// 15 GB/s here where a plain read reaches 30 (measured, 2 threads, the 30 layers of SmolLM2-135M: bf16 15.8 ->
// 6.7 ms, int8 9.1 -> 3.8 ms). What does it: each thread walks its rows four at a time, first copying (int8:
// converting, exactly) the four rows into a small bf16 buffer -- one sequential stream, which the hardware
// prefetches well -- then dots every sequence's x with them in fp32 (AVX-512 BF16: exact products, fp32 sums).
constexpr int64_t kRows = 4, kMaxK = 4096, kMaxB = 16;

inline __m512bh int8_to_bf16(const int8_t* p) {  // 32 int8 -> 32 bf16 (exact: |v| <= 127 fits 8 bits)
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  const __m512 hi =
      _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
  return _mm512_cvtne2ps_pbh(hi, lo);
}

bool gemv_applies(const at::Tensor& x, const at::Tensor& w) {
  return x.scalar_type() == at::kBFloat16 && x.size(0) <= kMaxB && w.size(1) % 32 == 0 && w.size(1) <= kMaxK &&
         w.size(0) % kRows == 0 && w.is_contiguous();
}

at::Tensor gemv(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& scale, bool int8) {
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), K = x.size(1), N = w.size(0);
  const at::Tensor sf = int8 ? scale.to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor y = at::empty({B, N}, x.options());
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const float* sp = int8 ? sf.data_ptr<float>() : nullptr;
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  at::parallel_for(0, N / kRows, 16, [&](int64_t begin, int64_t end) {
    alignas(64) uint16_t rows[kRows * kMaxK];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n = blk * kRows;
      if (int8) {
        const int8_t* src = static_cast<const int8_t*>(w.data_ptr()) + n * K;
        for (int64_t i = 0; i < kRows * K; i += 32)
          _mm512_store_si512(rows + i, reinterpret_cast<__m512i>(int8_to_bf16(src + i)));
      } else {
        std::memcpy(rows, static_cast<const uint16_t*>(w.data_ptr()) + n * K, kRows * K * sizeof(uint16_t));
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

// A projection in one of the three storage kinds (see quantize.py: Int8Linear, Int4Linear, Fused).
struct Proj {
  int64_t kind;
  at::Tensor weight;  // dense: (N, K); int8: (N, K) int8; int4: tinygemm-packed
  at::Tensor scale;   // int8: (N,); int4: scales and zeros (K/g, N, 2); dense: undefined
  int64_t group_size;

  at::Tensor operator()(const at::Tensor& x) const {  // x (B, K) -> (B, N)
#ifdef SMOLVLM_GEMV
    if ((kind == kInt8 || weight.scalar_type() == at::kBFloat16) && gemv_applies(x, weight))
      return gemv(x, weight, scale, kind == kInt8);
#endif
    switch (kind) {
      case kDense: return at::linear(x, weight);
      case kInt8: return at::_weight_int8pack_mm(x, weight, scale);
      default: return at::_weight_int4pack_mm_for_cpu(x, weight, group_size, scale);
    }
  }
};

struct Layer {
  at::Tensor input_norm, post_norm;  // (D,) bf16
  Proj qkv, o, gate_up, down;
};

// sum_i a[i] * b[i] with b in bf16. Sixteen running sums (one AVX-512 register) so the compiler vectorizes
// the loop: a single float sum is a dependency chain it may not reorder.
inline float dot_bf16(const float* a, const uint16_t* b, int64_t n) {
  float part[16] = {0.f};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) part[j] += a[i + j] * bf16_to_float(b[i + j]);
  float d = 0.f;
  for (; i < n; ++i) d += a[i] * bf16_to_float(b[i]);
  for (int j = 0; j < 16; ++j) d += part[j];
  return d;
}

inline const uint16_t* bits(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); }
inline uint16_t* mbits(at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); }

// out[b] = x[b] / rms(x[b]) * w, the way F.rms_norm does it for bf16 (float32 inside, one rounding)
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, float eps) {
  const int64_t B = x.size(0), D = x.size(1);
  at::Tensor out = at::empty_like(x);
  const uint16_t* xp = bits(x);
  const uint16_t* wp = bits(w);
  uint16_t* op = mbits(out);
  for (int64_t b = 0; b < B; ++b) {
    float ss = 0.f;
    for (int64_t i = 0; i < D; ++i) {
      float v = bf16_to_float(xp[b * D + i]);
      ss += v * v;
    }
    const float r = 1.f / std::sqrt(ss / D + eps);
    for (int64_t i = 0; i < D; ++i) op[b * D + i] = float_to_bf16(bf16_to_float(xp[b * D + i]) * r * bf16_to_float(wp[i]));
  }
  return out;
}

// x += y in bf16 (the residual stream stays bf16, as in eager)
void add_into(at::Tensor& x, const at::Tensor& y) {
  const int64_t n = x.numel();
  uint16_t* xp = mbits(x);
  const uint16_t* yp = bits(y);
  for (int64_t i = 0; i < n; ++i) xp[i] = float_to_bf16(bf16_to_float(xp[i]) + bf16_to_float(yp[i]));
}

class DecodeStep {
 public:
  DecodeStep(std::vector<std::vector<at::Tensor>> tensors, std::vector<int64_t> kinds, int64_t group_size,
             int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps)
      : H_(num_heads), Hkv_(num_kv_heads), hd_(head_dim), eps_(static_cast<float>(eps)) {
    // per layer: input_norm, post_norm, then (weight, scale) for qkv, o, gate_up, down; kinds: 4 per layer
    TORCH_CHECK(kinds.size() == tensors.size() * 4, "decode_step: 4 projection kinds per layer");
    for (size_t l = 0; l < tensors.size(); ++l) {
      const auto& t = tensors[l];
      TORCH_CHECK(t.size() == 10, "decode_step: 10 tensors per layer");
      auto proj = [&](int k) { return Proj{kinds[l * 4 + k], t[2 + 2 * k], t[3 + 2 * k], group_size}; };
      layers_.push_back(Layer{t[0], t[1], proj(0), proj(1), proj(2), proj(3)});
    }
  }

  // x (B, D) bf16: the new tokens' embeddings; k_cache, v_cache (L, B, Hkv, S, hd) bf16; pos: the slot the
  // new tokens take (positions 0..pos-1 are filled); cos, sin (B, hd) RoPE tables of the new positions;
  // key_mask: (B, pos + 1) bool (false = padding) or undefined when every key is real.
  // Returns the last layer's output (B, D), before the final norm.
  at::Tensor run(at::Tensor x, at::Tensor k_cache, at::Tensor v_cache, int64_t pos, at::Tensor cos,
                 at::Tensor sin, c10::optional<at::Tensor> key_mask) {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2, "decode_step: x must be (B, D) bf16");
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "decode_step: the cache must be contiguous");
    TORCH_CHECK(pos < k_cache.size(3), "decode_step: KV cache full");
    x = x.contiguous().clone();
    const int64_t B = x.size(0), S = k_cache.size(3), hd = hd_, H = H_, Hkv = Hkv_;
    at::Tensor cf = cos.to(at::kFloat).contiguous(), sf = sin.to(at::kFloat).contiguous();
    at::Tensor mask;
    if (key_mask.has_value()) mask = key_mask->to(at::kBool).contiguous();
    const bool* mp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
    const float* cp = cf.data_ptr<float>();
    const float* sp = sf.data_ptr<float>();
    const float scale = 1.f / std::sqrt(static_cast<float>(hd));
    const int64_t half = hd / 2, group = H / Hkv, len = pos + 1;

    for (size_t l = 0; l < layers_.size(); ++l) {
      const Layer& L = layers_[l];
      at::Tensor qkv = L.qkv(rms_norm(x, L.input_norm, eps_)).contiguous();  // (B, (H + 2 Hkv) hd)
      uint16_t* kc = mbits(k_cache) + l * B * Hkv * S * hd;  // this layer's (B, Hkv, S, hd)
      uint16_t* vc = mbits(v_cache) + l * B * Hkv * S * hd;
      const uint16_t* qp = bits(qkv);
      // RoPE ("rotate half": pairs i, i + hd/2) on q into a float buffer, on k into the cache; v as is
      std::vector<float> q(B * H * hd);
      for (int64_t b = 0; b < B; ++b) {
        const uint16_t* row = qp + b * (H + 2 * Hkv) * hd;
        const float* c = cp + b * hd;
        const float* s = sp + b * hd;
        for (int64_t h = 0; h < H + Hkv; ++h) {
          const uint16_t* in = row + h * hd;
          float rot[512];
          for (int64_t i = 0; i < hd; ++i) {
            const float xi = bf16_to_float(in[i]);
            const float partner = i < half ? -bf16_to_float(in[i + half]) : bf16_to_float(in[i - half]);
            // eager rounds q and k to bf16 after RoPE: so do we, so the cache holds the same kind of values
            rot[i] = bf16_to_float(float_to_bf16(xi * c[i] + partner * s[i]));
          }
          if (h < H) {
            std::memcpy(&q[(b * H + h) * hd], rot, hd * sizeof(float));
          } else {
            uint16_t* dst = kc + ((b * Hkv + (h - H)) * S + pos) * hd;
            for (int64_t i = 0; i < hd; ++i) dst[i] = float_to_bf16(rot[i]);
          }
        }
        for (int64_t g = 0; g < Hkv; ++g)
          std::memcpy(vc + ((b * Hkv + g) * S + pos) * hd, row + (H + Hkv + g) * hd, hd * sizeof(uint16_t));
      }
      // attention: each (sequence, query head) over its kv head's filled cache
      at::Tensor y = at::empty({B, H * hd}, x.options());
      uint16_t* yp = mbits(y);
      at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> p(len);
        std::vector<float> acc(hd);
        for (int64_t bh = begin; bh < end; ++bh) {
          const int64_t b = bh / H, h = bh % H, g = h / group;
          const float* qv = &q[bh * hd];
          const uint16_t* kb = kc + (b * Hkv + g) * S * hd;
          const uint16_t* vb = vc + (b * Hkv + g) * S * hd;
          float mx = -INFINITY;
          for (int64_t t = 0; t < len; ++t) {
            if (mp && !mp[b * len + t]) {
              p[t] = -INFINITY;
              continue;
            }
            p[t] = dot_bf16(qv, kb + t * hd, hd) * scale;
            mx = std::max(mx, p[t]);
          }
          float sum = 0.f;
          for (int64_t t = 0; t < len; ++t) {
            p[t] = p[t] == -INFINITY ? 0.f : std::exp(p[t] - mx);
            sum += p[t];
          }
          std::fill(acc.begin(), acc.end(), 0.f);
          for (int64_t t = 0; t < len; ++t) {
            if (p[t] == 0.f) continue;
            const float w = p[t];
            const uint16_t* vt = vb + t * hd;
            for (int64_t i = 0; i < hd; ++i) acc[i] += w * bf16_to_float(vt[i]);
          }
          const float inv = sum > 0.f ? 1.f / sum : 0.f;
          for (int64_t i = 0; i < hd; ++i) yp[bh * hd + i] = float_to_bf16(acc[i] * inv);
        }
      });
      add_into(x, L.o(y));
      at::Tensor gu = L.gate_up(rms_norm(x, L.post_norm, eps_)).contiguous();  // (B, 2 I)
      const int64_t I = gu.size(1) / 2;
      at::Tensor a = at::empty({B, I}, x.options());
      const uint16_t* gp = bits(gu);
      uint16_t* ap = mbits(a);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < I; ++i) {
          const float gv = bf16_to_float(gp[b * 2 * I + i]), uv = bf16_to_float(gp[b * 2 * I + I + i]);
          ap[b * I + i] = float_to_bf16(gv / (1.f + std::exp(-gv)) * uv);
        }
      add_into(x, L.down(a));
    }
    return x;
  }

 private:
  std::vector<Layer> layers_;
  int64_t H_, Hkv_, hd_;
  float eps_;
};

}  // namespace

// one projection by itself (the model's lm_head after the step): x (B, K) -> (B, N)
at::Tensor project(const at::Tensor& x, int64_t kind, at::Tensor weight, at::Tensor scale, int64_t group_size) {
  return Proj{kind, weight, scale, group_size}(x);
}

// softmax.cpp
bool softmax_supported();
void softmax_bf16_(at::Tensor scores);
// attention.cpp
bool attention_supported(int64_t head_dim);
at::Tensor attention_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& key_mask, bool causal, double scale);

// the Python bindings of every kernel (kernels.py builds the csrc files into one module)
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("project", &project, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("softmax_supported", &softmax_supported);
  m.def("softmax_bf16_", &softmax_bf16_, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("attention_supported", &attention_supported);
  m.def("attention_bf16", &attention_bf16, pybind11::call_guard<pybind11::gil_scoped_release>());
  pybind11::class_<DecodeStep>(m, "DecodeStep")
      .def(pybind11::init<std::vector<std::vector<at::Tensor>>, std::vector<int64_t>, int64_t, int64_t, int64_t,
                          int64_t, double>())
      .def("run", &DecodeStep::run, pybind11::call_guard<pybind11::gil_scoped_release>());
}
