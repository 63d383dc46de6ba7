// The arguments both attention kernels take (attention.cpp: bf16, attention_f32.cpp: float32), checked once.
#pragma once

#include <torch/extension.h>

#include <optional>

namespace smolvlm {

struct AttentionArgs {
  int64_t B, T, H, S, Hkv;  // q (B, T, H, D), k and v (B, S, Hkv, D)
  at::Tensor mask;          // (B, S) bool, contiguous; undefined: every key counts
};

// q, k, v of `dtype` with head dim `dim`, contiguous in it; H a multiple of Hkv; causal needs T <= S.
inline AttentionArgs attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const std::optional<at::Tensor>& key_mask, bool causal, int64_t dim,
                                    at::ScalarType dtype, const char* dtype_error) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && k.sizes() == v.sizes(), "attention: q (B, T, H, D), k, v (B, S, Hkv, D)");
  TORCH_CHECK(q.scalar_type() == dtype && k.scalar_type() == dtype && v.scalar_type() == dtype, dtype_error);
  TORCH_CHECK(q.size(3) == dim && k.size(3) == dim && q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "attention: head dim ", dim, ", contiguous");
  AttentionArgs a{q.size(0), q.size(1), q.size(2), k.size(1), k.size(2), at::Tensor()};
  TORCH_CHECK(k.size(0) == a.B && a.Hkv > 0 && a.H % a.Hkv == 0,
              "attention: batch sizes differ or H is not a multiple of Hkv");
  TORCH_CHECK(!causal || a.T <= a.S, "attention: causal needs at least as many keys as queries");
  if (key_mask.has_value() && key_mask->defined()) {
    a.mask = key_mask->to(at::kBool).contiguous();
    TORCH_CHECK(a.mask.dim() == 2 && a.mask.size(0) == a.B && a.mask.size(1) == a.S, "attention: key_mask (B, S)");
  }
  return a;
}

}  // namespace smolvlm
