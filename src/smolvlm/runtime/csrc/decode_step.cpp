// One decoding step of the Llama-style decoder (one new token per sequence) in a single call from Python.
//
// Why: at batch 1 the decoder's matmuls only read weights, and eager PyTorch spends ~7 ms per token on the
// ~40 small ops per layer around them (norms, RoPE, cache writes, SDPA setup, SiLU, residual adds: each a
// Python call plus a dispatch). Here everything between the matmuls is a plain loop over a few hundred numbers,
// and the matmuls stream their weights once (gemv.cpp: project()).
// The math is models/decoder.py's (tests/runtime/test_decode_step.py compares the two); only the rounding differs:
// RoPE, attention and SiLU x up run in float32 and round to the activation dtype once.
//
// Activations (x, norm weights, KV cache, cos/sin are read as float) are bf16 or float32: the step is a template
// over the two (Act<T> in common.h: loads, stores, roundings). Projection kinds and the weight dtypes each takes
// with either activation dtype (gemv.cpp has the layouts):
//   0 dense  weight (N, K) bf16 or float32 (a float32 model may keep bf16 weights: converted on the fly)
//   1 int8   weight (N, K) int8, scale (N,) bf16 / float32
//   2 int4   weight (N, K/2) uint8 (two inputs per byte, even one low), scale (N, K/g, 2) bf16 / float32
//   3 int4 in ATen's layout (bf16 only), 4 / 5: int4 / int8 storage times x rounded to 8 bits (gemv_q8.cpp)
//
// Per layer:  h = rmsnorm(x)  ->  qkv = h Wqkv  ->  RoPE(q, k); k, v into the cache at `pos`
//             ->  attention of q over cache[0..pos]  ->  x += y Wo
//             ->  h = rmsnorm(x)  ->  [g, u] = h Wgu  ->  x += (silu(g) * u) Wdown

#include "common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace smolvlm {
namespace {

// A projection in one of the storage kinds (see the top; quantize.py: Int8Linear, Int4Linear, Fused)
struct Proj {
  int64_t kind;
  at::Tensor weight;
  at::Tensor scale;  // int8: (N,); int4: (N, K/g, 2); dense: empty
  int64_t group_size;

  at::Tensor operator()(const at::Tensor& x) const { return project(x, kind, weight, scale, group_size); }
};

struct Layer {
  at::Tensor input_norm, post_norm;  // (D,) in the activation dtype
  Proj qkv, o, gate_up, down;
};

// sum_i a[i] * b[i]. Sixteen running sums so the compiler vectorizes the loop: a single float sum is a dependency
// chain it may not reorder.
template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  float part[16] = {0.f};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) part[j] += a[i + j] * Act<T>::ld(b[i + j]);
  float d = 0.f;
  for (; i < n; ++i) d += a[i] * Act<T>::ld(b[i]);
  for (int j = 0; j < 16; ++j) d += part[j];
  return d;
}

// out[b] = x[b] / rms(x[b]) * w, the way F.rms_norm does it (float32 inside, one rounding)
template <typename T>
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, float eps) {
  const int64_t B = x.size(0), D = x.size(1);
  at::Tensor out = at::empty_like(x);
  const T* xp = data<T>(x);
  const T* wp = data<T>(w);
  T* op = data<T>(out);
  for (int64_t b = 0; b < B; ++b) {
    float ss = 0.f;
    for (int64_t i = 0; i < D; ++i) {
      const float v = Act<T>::ld(xp[b * D + i]);
      ss += v * v;
    }
    const float r = 1.f / std::sqrt(ss / D + eps);
    for (int64_t i = 0; i < D; ++i) op[b * D + i] = Act<T>::st(Act<T>::ld(xp[b * D + i]) * r * Act<T>::ld(wp[i]));
  }
  return out;
}

// x += y in the activation dtype (the residual stream is rounded there, as in eager)
template <typename T>
void add_into(at::Tensor& x, const at::Tensor& y) {
  const int64_t n = x.numel();
  T* xp = data<T>(x);
  const T* yp = data<T>(y);
  for (int64_t i = 0; i < n; ++i) xp[i] = Act<T>::st(Act<T>::ld(xp[i]) + Act<T>::ld(yp[i]));
}

class DecodeStep {
 public:
  DecodeStep(std::vector<std::vector<at::Tensor>> tensors, std::vector<int64_t> kinds, int64_t group_size,
             int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps)
      : H_(num_heads), Hkv_(num_kv_heads), hd_(head_dim), eps_(static_cast<float>(eps)) {
    // per layer: input_norm, post_norm, then (weight, scale) for qkv, o, gate_up, down; kinds: 4 per layer
    TORCH_CHECK(kinds.size() == tensors.size() * 4, "decode_step: 4 projection kinds per layer");
    TORCH_CHECK(!tensors.empty() && head_dim <= 512 && num_heads % num_kv_heads == 0, "decode_step: bad shape");
    for (size_t l = 0; l < tensors.size(); ++l) {
      const auto& t = tensors[l];
      TORCH_CHECK(t.size() == 10, "decode_step: 10 tensors per layer");
      auto proj = [&](int k) { return Proj{kinds[l * 4 + k], t[2 + 2 * k], t[3 + 2 * k], group_size}; };
      layers_.push_back(Layer{t[0].contiguous(), t[1].contiguous(), proj(0), proj(1), proj(2), proj(3)});
    }
    dtype_ = layers_[0].input_norm.scalar_type();  // the activation dtype
    TORCH_CHECK(dtype_ == at::kBFloat16 || dtype_ == at::kFloat, "decode_step: activations must be bf16 or float32");
    for (const Layer& L : layers_)
      TORCH_CHECK(L.input_norm.scalar_type() == dtype_ && L.post_norm.scalar_type() == dtype_,
                  "decode_step: every norm weight must have the activation dtype");
  }

  // x (B, D): the new tokens' embeddings; k_cache, v_cache (L, B, Hkv, S, hd); both in the activation dtype;
  // pos: the slot the new tokens take (positions 0..pos-1 are filled); cos, sin (B, hd) RoPE tables of the new
  // positions; key_mask: (B, pos + 1) bool (false = padding) or undefined when every key is real.
  // Returns the last layer's output (B, D), before the final norm.
  at::Tensor run(at::Tensor x, at::Tensor k_cache, at::Tensor v_cache, int64_t pos, at::Tensor cos,
                 at::Tensor sin, c10::optional<at::Tensor> key_mask) {
    TORCH_CHECK(x.scalar_type() == dtype_ && x.dim() == 2, "decode_step: x must be (B, D) in the weights' dtype ",
                dtype_);
    TORCH_CHECK(k_cache.scalar_type() == dtype_ && v_cache.scalar_type() == dtype_,
                "decode_step: the KV cache must have the activation dtype");
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "decode_step: the cache must be contiguous");
    TORCH_CHECK(pos < k_cache.size(3), "decode_step: KV cache full");
    if (dtype_ == at::kFloat) return run_as<float>(x, k_cache, v_cache, pos, cos, sin, key_mask);
    return run_as<uint16_t>(x, k_cache, v_cache, pos, cos, sin, key_mask);
  }

 private:
  template <typename T>
  at::Tensor run_as(at::Tensor x, at::Tensor& k_cache, at::Tensor& v_cache, int64_t pos, const at::Tensor& cos,
                    const at::Tensor& sin, const c10::optional<at::Tensor>& key_mask) {
    using A = Act<T>;
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
      at::Tensor qkv = L.qkv(rms_norm<T>(x, L.input_norm, eps_)).contiguous();  // (B, (H + 2 Hkv) hd)
      T* kc = data<T>(k_cache) + l * B * Hkv * S * hd;  // this layer's (B, Hkv, S, hd)
      T* vc = data<T>(v_cache) + l * B * Hkv * S * hd;
      const T* qp = data<T>(qkv);
      // RoPE ("rotate half": pairs i, i + hd/2) on q into a float buffer, on k into the cache; v as is
      std::vector<float> q(B * H * hd);
      for (int64_t b = 0; b < B; ++b) {
        const T* row = qp + b * (H + 2 * Hkv) * hd;
        const float* c = cp + b * hd;
        const float* s = sp + b * hd;
        for (int64_t h = 0; h < H + Hkv; ++h) {
          const T* in = row + h * hd;
          float rot[512];
          for (int64_t i = 0; i < hd; ++i) {
            const float xi = A::ld(in[i]);
            const float partner = i < half ? -A::ld(in[i + half]) : A::ld(in[i - half]);
            // eager rounds q and k to the activation dtype after RoPE: so do we, so the cache holds the same values
            rot[i] = A::ld(A::st(xi * c[i] + partner * s[i]));
          }
          if (h < H) {
            std::memcpy(&q[(b * H + h) * hd], rot, hd * sizeof(float));
          } else {
            T* dst = kc + ((b * Hkv + (h - H)) * S + pos) * hd;
            for (int64_t i = 0; i < hd; ++i) dst[i] = A::st(rot[i]);
          }
        }
        for (int64_t g = 0; g < Hkv; ++g)
          std::memcpy(vc + ((b * Hkv + g) * S + pos) * hd, row + (H + Hkv + g) * hd, hd * sizeof(T));
      }
      // attention: each (sequence, query head) over its kv head's filled cache
      at::Tensor y = at::empty({B, H * hd}, x.options());
      T* yp = data<T>(y);
      at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> p(len);
        std::vector<float> acc(hd);
        for (int64_t bh = begin; bh < end; ++bh) {
          const int64_t b = bh / H, h = bh % H, g = h / group;
          const float* qv = &q[bh * hd];
          const T* kb = kc + (b * Hkv + g) * S * hd;
          const T* vb = vc + (b * Hkv + g) * S * hd;
          float mx = -INFINITY;
          for (int64_t t = 0; t < len; ++t) {
            if (mp && !mp[b * len + t]) {
              p[t] = -INFINITY;
              continue;
            }
            p[t] = dot(qv, kb + t * hd, hd) * scale;
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
            const T* vt = vb + t * hd;
            for (int64_t i = 0; i < hd; ++i) acc[i] += w * A::ld(vt[i]);
          }
          const float inv = sum > 0.f ? 1.f / sum : 0.f;
          for (int64_t i = 0; i < hd; ++i) yp[bh * hd + i] = A::st(acc[i] * inv);
        }
      });
      add_into<T>(x, L.o(y));
      at::Tensor gu = L.gate_up(rms_norm<T>(x, L.post_norm, eps_)).contiguous();  // (B, 2 I)
      const int64_t I = gu.size(1) / 2;
      at::Tensor a = at::empty({B, I}, x.options());
      const T* gp = data<T>(gu);
      T* ap = data<T>(a);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < I; ++i) {
          const float gv = A::ld(gp[b * 2 * I + i]), uv = A::ld(gp[b * 2 * I + I + i]);
          ap[b * I + i] = A::st(gv / (1.f + std::exp(-gv)) * uv);
        }
      add_into<T>(x, L.down(a));
    }
    return x;
  }

  std::vector<Layer> layers_;
  int64_t H_, Hkv_, hd_;
  float eps_;
  at::ScalarType dtype_;
};

}  // namespace

at::Tensor project_generic(const at::Tensor& x, int64_t kind, const at::Tensor& weight, const at::Tensor& scale,
                           int64_t group_size);

}  // namespace smolvlm

// softmax.cpp
bool softmax_supported();
void softmax_bf16_(at::Tensor scores);
// attention.cpp
bool attention_supported(int64_t head_dim);
at::Tensor attention_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& key_mask, bool causal, double scale);
// A kernel file may bind its own functions: it defines smolvlm_bind_<file>(m), which then replaces the default
// bindings below (weak: a file without one links as before).
extern void smolvlm_bind_softmax(pybind11::module_& m) __attribute__((weak));
extern void smolvlm_bind_attention(pybind11::module_& m) __attribute__((weak));

// the Python bindings of every kernel (kernels.py builds the csrc files into one module per ISA level)
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("level", [] { return std::string(SMOLVLM_LEVEL); }, "the ISA level this build holds (common.h)");
  // one projection by itself (the model's lm_head after the step; quantized layers' few-row calls)
  m.def("project", &smolvlm::project, py::call_guard<py::gil_scoped_release>());
  m.def("project_generic", &smolvlm::project_generic, py::call_guard<py::gil_scoped_release>());
  if (smolvlm_bind_softmax) {
    smolvlm_bind_softmax(m);
  } else {
    m.def("softmax_supported", &softmax_supported);
    m.def("softmax_bf16_", &softmax_bf16_, py::call_guard<py::gil_scoped_release>());
  }
  if (smolvlm_bind_attention) {
    smolvlm_bind_attention(m);
  } else {
    m.def("attention_supported", &attention_supported);
    m.def("attention_bf16", &attention_bf16, py::call_guard<py::gil_scoped_release>());
  }
  // module_local: every level's module registers its own DecodeStep (tests load several into one process)
  py::class_<smolvlm::DecodeStep>(m, "DecodeStep", py::module_local())
      .def(py::init<std::vector<std::vector<at::Tensor>>, std::vector<int64_t>, int64_t, int64_t, int64_t,
                    int64_t, double>())
      .def("run", &smolvlm::DecodeStep::run, py::call_guard<py::gil_scoped_release>());
}
