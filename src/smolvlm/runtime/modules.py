"""The fast CPU versions of models/' modules, swapped in by runtime.prepare (never by training).

Each Fast* class subclasses the plain module it replaces and keeps its submodules and parameters, so the state
dict, saving, `.to()` and LoRA wrapping see the plain model; what it adds are real attributes of its own:

    FastVisionAttention  q, k, v as one matmul (`fused`), attention in one pass (runtime/attention.py),
                         out_proj through a pre-packed oneDNN weight where the CPU has native bf16
    FastVisionMLP        fc1 + GELU and fc2 through pre-packed oneDNN weights (bf16, native bf16 only)
    FastRMSNorm          one fused op at inference
    FastAttention        q, k, v as one matmul, one RoPE over q and k, attention by runtime/attention.py
    FastMLP              gate and up as one matmul
    FastDecoder          one-token steps through every layer in one C++ call (runtime/decode_step.py)
    FastLinear           the output head: few rows through the C++ weight-streaming matmul

A fast path runs only at inference (no autograd) and only while the weights it fused or packed are still the
module's own (after LoRA wrapping, a dtype change or a reassignment, the plain forward runs instead).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smolvlm.models.decoder import MLP, Attention, Decoder, KVCache, RMSNorm, apply_rope, rope_cos_sin
from smolvlm.models.vision import VisionAttention, VisionMLP
from smolvlm.runtime import attention, cpu, decode_step
from smolvlm.runtime.quantize import Fused, dense_linear

# oneDNN's linear with a weight packed once into its blocked layout (the vision tower's large-row matmuls). bf16:
# its packing raises on CPUs without AVX-512 (BW/VL/DQ) and is emulated (slow) without native bf16, so only where
# bf16 is native; float32: on x86 from AVX2 up, where it beats ATen's matmul (docs/speed.md)
ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise") \
    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
PACK_ROWS = 1024  # the row count oneDNN packs for: one 512-px tile of 16-px patches (any count works)


class PackedWeight:
    """oneDNN's blocked copy of a weight, made again when the weight is replaced or updated in place."""

    def __init__(self):
        self.key, self.packed = None, None

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        key = (weight.data_ptr(), 0 if weight.is_inference() else weight._version)
        if key != self.key:
            self.key, self.packed = key, torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)
        return self.packed


def onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if not ONEDNN_LINEAR or torch.is_grad_enabled() or x.dtype != weight.dtype:
        return False
    if x.dtype == torch.bfloat16:
        return cpu.native_bf16()
    return x.dtype == torch.float32 and cpu.is_x86() and cpu.at_least("avx2")


def packed_linear(x: torch.Tensor, layer, packed: PackedWeight, gelu: bool = False) -> torch.Tensor:
    """layer(x) (then tanh-GELU if asked) for an nn.Linear or a float Fused: through the packed oneDNN weight where
    that applies, else the layer itself. The GELU runs in oneDNN's epilogue from AVX-512 up; with AVX2 alone its
    epilogue is slower than ATen's GELU after the matmul."""
    weight = layer.weight
    if onednn_applies(x, weight):
        epilogue = gelu and cpu.at_least("avx512")
        y = torch.ops.mkldnn._linear_pointwise(x, packed.get(weight), layer.bias, "gelu" if epilogue else "none", [],
                                               "tanh" if epilogue else "")
        return F.gelu(y, approximate="tanh") if gelu and not epilogue else y
    y = layer(x)
    return F.gelu(y, approximate="tanh") if gelu else y


def _fuse(parent: nn.Module, names: tuple[str, ...]) -> Fused | None:
    try:
        return Fused(parent, names)
    except ValueError:  # e.g. LoRA-wrapped projections: they stay separate
        return None


class FastVisionAttention(VisionAttention):
    fused: Fused | None  # q, k, v: one (3 D, D) matmul; the projections' weights are views of its rows
    packed_qkv: PackedWeight
    packed_out: PackedWeight

    @classmethod
    def adopt(cls, m: VisionAttention) -> FastVisionAttention:
        m.__class__ = cls
        m.fused = _fuse(m, ("q_proj", "k_proj", "v_proj"))
        m.packed_qkv, m.packed_out = PackedWeight(), PackedWeight()
        return m

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        if self.fused is None or not self.fused.usable(self):
            return super().forward(x, attn_mask)
        n, p, d = x.shape
        qkv = packed_linear(x, self.fused, self.packed_qkv).view(n, p, 3, self.num_heads, self.head_dim)
        key_mask = None if attn_mask is None else attn_mask.view(n, p)
        # q, k, v read where they lie in the fused output: (N, P, H, hd) views
        y = attention.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], key_mask)  # (N, P, H, hd)
        return packed_linear(y.view(n, p, d), self.out_proj, self.packed_out)


class FastVisionMLP(VisionMLP):
    packed_fc1: PackedWeight
    packed_fc2: PackedWeight

    @classmethod
    def adopt(cls, m: VisionMLP) -> FastVisionMLP:
        m.__class__ = cls
        m.packed_fc1, m.packed_fc2 = PackedWeight(), PackedWeight()
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return super().forward(x)
        # the GELU runs in the fc1 matmul's epilogue where oneDNN applies
        return packed_linear(packed_linear(x, self.fc1, self.packed_fc1, gelu=True), self.fc2, self.packed_fc2)


class FastRMSNorm(RMSNorm):
    @classmethod
    def adopt(cls, m: RMSNorm) -> FastRMSNorm:
        m.__class__ = cls
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.dtype != self.weight.dtype:
            return super().forward(x)
        # one op, float32 inside; at most one rounding of the input dtype apart from the plain form
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class FastAttention(Attention):
    fused: Fused | None  # q, k, v: one ((H + 2 Hkv) hd, D) matmul

    @classmethod
    def adopt(cls, m: Attention) -> FastAttention:
        m.__class__ = cls
        m.fused = _fuse(m, ("q_proj", "k_proj", "v_proj"))
        return m

    def forward(self, x, cos, sin, attn_mask, cache: KVCache | None, slot: int, real=None) -> torch.Tensor:
        if self.fused is None or not self.fused.usable(self) or real is not None:
            return super().forward(x, cos, sin, attn_mask, cache, slot, real)
        b, t, _ = x.shape
        hd, h, hkv = self.cfg.head_dim, self.cfg.num_heads, self.cfg.num_kv_heads
        qk, v = self.fused(x).split([(h + hkv) * hd, hkv * hd], dim=-1)  # (B, T, (H + Hkv) hd), (B, T, Hkv hd)
        # one RoPE over q and k together
        qk = apply_rope(qk.view(b, t, h + hkv, hd).transpose(1, 2), cos, sin)  # (B, H + Hkv, T, hd)
        q, k = qk.split([h, hkv], dim=1)
        v = v.view(b, t, hkv, hd).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(slot, k, v)  # (B, Hkv, S, hd): the filled part only
        if t == 1:
            # one query per sequence: the H / Hkv query heads sharing a kv head become its query rows, so the
            # attention runs on (B, Hkv, H/Hkv, hd) with no repeat of k and v
            y = F.scaled_dot_product_attention(q.reshape(b, hkv, h // hkv, hd), k, v, attn_mask=attn_mask)
            return self.o_proj(y.reshape(b, 1, h * hd))
        if attn_mask is None:  # plain causal: q, k, v read where they lie
            y = attention.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
            return self.o_proj(y.view(b, t, h * hd))  # y (B, T, H, hd)
        y = attention.masked_attention(q, k, v, attn_mask)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, h * hd))


class FastMLP(MLP):
    fused: Fused | None  # gate and up: one (2 I, D) matmul

    @classmethod
    def adopt(cls, m: MLP) -> FastMLP:
        m.__class__ = cls
        m.fused = _fuse(m, ("gate_proj", "up_proj"))
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is None or not self.fused.usable(self):
            return super().forward(x)
        gate, up = self.fused(x).chunk(2, dim=-1)  # (B, T, I) each
        return self.down_proj(F.silu(gate) * up)


class FastDecoder(Decoder):
    """One new token per sequence (a decoding step) runs through every layer in one C++ call where the step
    applies (runtime/decode_step.py: fused bf16 / float32 / int8 / int4 projections, no LoRA, no shared or
    cross-attention layers); everything else runs the plain loop over the Fast* layers."""

    built_step: decode_step.DecodeStep | None  # the step last built (for_decoder keeps it while it applies)
    step_cache: KVCache | None  # the KV cache the step was last checked for: weights are checked once per cache

    @classmethod
    def adopt(cls, m: Decoder) -> FastDecoder:
        m.__class__ = cls
        m.built_step, m.step_cache = None, None
        return m

    def current_step(self, cache: KVCache | None = None) -> decode_step.DecodeStep | None:
        """The C++ step for the decoder's weights as they are (None where it does not apply); checked again for
        each new KV cache (a generation), not at every token."""
        if cache is None or cache is not self.step_cache:
            self.built_step = decode_step.for_decoder(self, current=self.built_step)
            self.step_cache = cache
        return self.built_step

    def forward(self, inputs_embeds, position_ids, key_mask=None, cache: KVCache | None = None, memory=None,
                memory_mask=None, attn_mask=None, real=None) -> torch.Tensor:
        if cache is not None and inputs_embeds.shape[1] == 1 and attn_mask is None and memory is None \
                and cache.cross is None and not torch.is_grad_enabled():
            step = self.current_step(cache)
            if step is not None:
                return self.step(step, inputs_embeds, position_ids, key_mask, cache)
        return super().forward(inputs_embeds, position_ids, key_mask, cache, memory, memory_mask, attn_mask, real)

    def step(self, step: decode_step.DecodeStep, inputs_embeds, position_ids, key_mask, cache: KVCache):
        """(B, 1, D) -> (B, 1, D): the plain loop's result for one token, minus its ~40 small ops per layer."""
        if cache.length >= cache.max_len:
            raise ValueError(f"KV cache full: {cache.length + 1} positions needed, {cache.max_len} allocated")
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, inputs_embeds.dtype)
        if key_mask is not None and bool(key_mask.all()):
            key_mask = None  # no padding: every cached key counts
        x = step.run(inputs_embeds[:, 0], cache.k, cache.v, cache.length, cos[:, 0], sin[:, 0], key_mask)
        cache.length += 1
        return self.norm(x[:, None])


class FastLinear(nn.Linear):
    """A decoder projection or the output head. Its weight may be bf16 under float32 activations (prepare.store_bf16:
    converted on the fly, float32 math), and a decoding step's few rows go through the C++ weight-streaming matmul
    (it reads the weights at the memory's speed where ATen's matrix-vector kernels reach about half of it)."""

    @classmethod
    def adopt(cls, m: nn.Linear) -> FastLinear:
        m.__class__ = cls
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense_linear(x, self.weight, self.bias)
