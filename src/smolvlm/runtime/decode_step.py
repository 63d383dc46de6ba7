"""The decoder's decoding step (one new token per sequence) as one C++ call: csrc/decode_step.cpp.

Eager PyTorch spends ~7 ms per token on the small ops between the decoder's matmuls (docs/speed.md), and ATen's
matrix-vector kernels read weights at about half the memory's speed; the C++ step does the small ops in plain
loops and streams the weights through its own matmul (csrc/gemv.cpp). It is one of the C++ kernels (kernels.py:
compiled per ISA level on first use); without a compiler (or with SMOLVLM_DECODE_STEP=0), decoding stays on the
eager path (same results within rounding).

Activations (hidden states, norm weights, KV cache) are bf16 or float32, one dtype for the whole step (the norm
weights' dtype). Projection kinds, and the weight dtypes each accepts with either activation dtype:
    0 dense  weight (N, K) bf16 or float32 (float32 activations with bf16 weights: converted on the fly)
    1 int8   weight (N, K) int8, scale (N,) bf16 or float32                    (quantize.Int8Linear)
    2 int4   weight (N, K/2) uint8, even input in the low nibble; scale (N, K/g, 2) bf16 or float32 holding
             (scale, zero): W = (q - 8) * scale + zero                          (quantize.Int4Linear's sz)
    3 int4   the same in ATen's layout, for bf16 activations with native bf16  (quantize.aten_int4)
    4, 5     int4 / int8 storage times x held as two int8s per input (integer dot products), for float32 activations
             (quantize.kernel_kind; csrc/gemv_q8.cpp)
`ext.project(x, kind, weight, scale, group)` runs one of them by itself (x (B, K) -> (B, N) in x's dtype).

    step = for_decoder(model.text_model, model.lm_head)  # on a model runtime.prepare made fast; None where
                                                         # it does not apply. runtime.modules.FastDecoder runs
                                                         # every one-token call of the decoder through it
"""

from __future__ import annotations

import os

import torch
from torch import nn

from smolvlm.runtime import kernels

ACT_DTYPES = (torch.bfloat16, torch.float32)  # the step's activation dtypes (and a dense weight's)


def _projection(m, act_dtype: torch.dtype) -> tuple[int, torch.Tensor, torch.Tensor, int] | None:
    """(kind, weight, scale, group size) of a projection the C++ step can run, else None. int4 with bf16
    activations on a CPU with native bf16 is kind 3, ATen's layout of the same weights (its kernel is faster there)."""
    from smolvlm.runtime.quantize import Fused, Int4Linear, Int8Linear, aten_int4, aten_int4_applies, kernel_kind

    empty = torch.empty(0)
    int4 = isinstance(m, Int4Linear) or (isinstance(m, Fused) and m.kind == "int4")
    if int4 and aten_int4_applies(act_dtype, m.sz):
        return 3, *aten_int4(m.weight, m.sz, m.derived), m.group_size
    if isinstance(m, Fused):
        if m.kind == "float":
            return (0, m.weight, empty, 0) if m.bias is None and m.weight.dtype in ACT_DTYPES else None
        if m.kind == "int8":
            return kernel_kind("int8", act_dtype), m.weight, m.scale, 0
        return kernel_kind("int4", act_dtype), m.weight, m.sz, m.group_size
    if isinstance(m, nn.Linear):  # nn.Linear or runtime.modules.FastLinear
        return (0, m.weight, empty, 0) if m.bias is None and m.weight.dtype in ACT_DTYPES else None
    if isinstance(m, Int8Linear):
        return kernel_kind("int8", act_dtype), m.weight, m.weight_scale, 0
    if isinstance(m, Int4Linear):
        return kernel_kind("int4", act_dtype), m.weight, m.sz, m.group_size
    return None


def _fused(parent: nn.Module):
    """parent's Fused projections: the `fused` attribute of runtime/modules.py's classes (None on a plain module)."""
    return getattr(parent, "fused", None)


def _collect(decoder) -> tuple[list[list[torch.Tensor]], list[int], int] | None:
    """Per layer the tensors the C++ step reads (two norms, then weight and scale of qkv, o, gate_up, down),
    the projections' kinds and the int4 group size; None for a decoder it does not run (float16, LoRA, layer
    repeats, cross-attention, unfused projections)."""
    cfg = decoder.cfg
    if cfg.layer_repeats != 1 or getattr(decoder, "cross_attention_every", 0):
        return None
    dtype = decoder.norm.weight.dtype  # the activation dtype
    if dtype not in ACT_DTYPES or cfg.head_dim > 512:
        return None
    tensors, kinds, groups = [], [], set()
    for block in decoder.layers:
        attn, mlp = block.self_attn, block.mlp
        fused_qkv, fused_gu = _fused(attn), _fused(mlp)
        if fused_qkv is None or fused_gu is None or not (fused_qkv.intact(attn) and fused_gu.intact(mlp)):
            return None
        projs = [_projection(p, dtype) for p in (fused_qkv, attn.o_proj, fused_gu, mlp.down_proj)]
        if any(p is None for p in projs):
            return None
        layer = [block.input_layernorm.weight.detach(), block.post_attention_layernorm.weight.detach()]
        if any(t.dtype != dtype for t in layer):
            return None
        for kind, weight, scale, group in projs:
            layer += [weight.detach(), scale.detach()]
            kinds.append(kind)
            if kind in (2, 3, 4):  # the int4 kinds
                groups.add(group)
        tensors.append(layer)
    if len(groups) > 1:
        return None
    return tensors, kinds, groups.pop() if groups else 0


def _pointers(tensors: list[list[torch.Tensor]]) -> list[tuple[int, torch.dtype]]:
    return [(t.data_ptr(), t.dtype) for layer in tensors for t in layer]


def _head_pointers(lm_head: nn.Module | None) -> list[tuple[int, torch.dtype]]:
    return [] if lm_head is None else [(t.data_ptr(), t.dtype) for t in lm_head.state_dict().values()]


class DecodeStep:
    """The compiled step plus where the weights it reads sat when it was built (a moved weight: stale)."""

    def __init__(self, ext, decoder, tensors: list[list[torch.Tensor]], kinds: list[int], group_size: int,
                 lm_head: nn.Module | None):
        cfg = decoder.cfg
        self.ext = ext
        self.step = ext.DecodeStep(tensors, kinds, group_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                   cfg.rms_norm_eps)
        self.lm_head = lm_head
        # None: lm_head runs as a module
        self.head = _projection(lm_head, decoder.norm.weight.dtype) if lm_head is not None else None
        self.pointers = _pointers(tensors) + _head_pointers(lm_head)

    def run(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int, cos: torch.Tensor,
            sin: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, D) new tokens' embeddings -> the last layer's output (B, D), before the final norm; writes
        position `pos` of every layer's k, v cache (L, B, Hkv, S, hd). cos, sin (B, hd); key_mask (B, pos + 1)
        bool or None when no key is padding."""
        return self.step.run(x, k, v, pos, cos, sin, key_mask)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """lm_head on the last position's hidden state, (B, 1, D) -> (B, 1, V), through the step's matmul."""
        if self.head is None:
            return self.lm_head(h)
        kind, weight, scale, group = self.head
        x = h[:, 0] if h.dtype in ACT_DTYPES else h[:, 0].float()
        return self.ext.project(x, kind, weight, scale, group)[:, None]


def for_decoder(decoder, lm_head: nn.Module | None = None, current: DecodeStep | None = None) -> DecodeStep | None:
    """The decoder's C++ step, or None when it cannot run this decoder or SMOLVLM_DECODE_STEP=0 (to compare
    against the eager path). `current` (a step built before) is returned again while it still reads the decoder's
    weights with this level's kernels. With the model's lm_head, `logits` runs it through the step's matmul too."""
    if os.environ.get("SMOLVLM_DECODE_STEP", "1") == "0":
        return None
    collected = _collect(decoder)
    if collected is None:
        return None
    ext = kernels.extension()
    if ext is None:
        return None
    if current is not None and current.ext is ext and current.lm_head is lm_head \
            and current.pointers == _pointers(collected[0]) + _head_pointers(lm_head):
        return current
    return DecodeStep(ext, decoder, *collected, lm_head)
