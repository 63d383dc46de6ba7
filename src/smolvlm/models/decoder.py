"""Llama-style decoder (SmolLM2): RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

token embeddings (B, T, D) -> N x [x + attn(norm(x)); x + mlp(norm(x))] -> norm -> (B, T, D)

Two options beyond SmolLM2 (smolvlm's architecture variants): `layer_repeats` K runs each block K times in
a row with the same weights (depth N*K from N blocks' parameters; the KV cache has N*K slots), and a
Decoder built with `cross_attention_every` k has a gated cross-attention block before blocks 0, k, 2k, ...
(models/cross_attention.py) through which visual tokens enter.

Module names follow Hugging Face's `LlamaModel`, so the state dict maps 1:1 onto `model.text_model.*`
of a SmolVLM checkpoint (or `model.*` of a SmolLM2 one).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from smolvlm.runtime import kernels


@dataclass
class DecoderConfig:
    vocab_size: int = 49280
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    layer_repeats: int = 1  # each block runs this many times in a row, weights shared

    @property
    def depth(self) -> int:
        """Blocks applied per forward pass (and KV cache slots)."""
        return self.num_layers * self.layer_repeats


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and not torch.is_grad_enabled():
            # inference: one fused op (also float32 inside); at most one bf16 rounding apart from below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # normalise in float32 for stability, scale in the input dtype (as Llama does)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """position_ids (B, T) -> cos, sin (B, T, head_dim), computed in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, hd); rotate pairs (i, i + hd/2), the "rotate half" layout of HF Llama."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Preallocated keys and values of every layer. `length` positions are filled; a forward pass
    writes its T new positions after them and then advances `length`."""

    def __init__(self, cfg: DecoderConfig, batch_size: int, max_len: int, dtype: torch.dtype):
        shape = (cfg.depth, batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.max_len = max_len
        self.length = 0
        # cross-attention models: each cross layer's memory keys and values (B, Hkv, M, hd) and the memory
        # mask (B, M), computed once at prefill and reused by every decoding step
        self.cross: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.cross_mask: torch.Tensor | None = None
        # decode_step.DecodeStep: one-token steps run all layers in one C++ call (set by generation.py)
        self.decode_step = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, hd) at [length, length+T) and return the filled part of the cache."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=False)

    def forward(self, x, cos, sin, attn_mask, cache: KVCache | None, slot: int) -> torch.Tensor:
        """slot: this application's place in the KV cache (block index x layer_repeats + repeat)."""
        b, t, _ = x.shape
        hd, h, hkv = self.cfg.head_dim, self.cfg.num_heads, self.cfg.num_kv_heads
        fused = self.__dict__.get("_fused")  # quantize.fuse: one matmul for q, k, v at inference
        if fused is not None and fused.usable(self):
            qkv = fused(x)  # (B, T, (H + 2 Hkv) hd)
            qk, v = qkv.split([(h + hkv) * hd, hkv * hd], dim=-1)
            # rotate q and k together: one RoPE over H + Hkv heads instead of two
            qk = apply_rope(qk.view(b, t, h + hkv, hd).transpose(1, 2), cos, sin)  # (B, H + Hkv, T, hd)
            q, k = qk.split([h, hkv], dim=1)
            v = v.view(b, t, hkv, hd).transpose(1, 2)
        else:
            q = self.q_proj(x).view(b, t, -1, hd).transpose(1, 2)  # (B, H, T, hd)
            k = self.k_proj(x).view(b, t, -1, hd).transpose(1, 2)  # (B, Hkv, T, hd)
            v = self.v_proj(x).view(b, t, -1, hd).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(slot, k, v)  # (B, Hkv, S, hd), S = filled + T: only the filled part
        if t == 1 and not torch.is_grad_enabled():
            # one query per sequence (decoding): the H / Hkv query heads that share a kv head become that
            # head's query rows, so attention runs on (B, Hkv, H/Hkv, hd) with no repeat of k and v
            # (the CPU SDPA kernel beats two bf16 matmuls at every cache length, measured on 1 and 2 threads:
            # 30 layers over 900 cached positions, 4.0 vs 5.9 ms per token on 2 threads; docs/speed.md)
            q = q.reshape(b, hkv, h // hkv, hd)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, Hkv, H/Hkv, hd)
            return self.o_proj(y.reshape(b, 1, h * hd))
        if q.dtype == torch.bfloat16 and not torch.is_grad_enabled():
            if attn_mask is None:  # plain causal: one C++ pass (csrc/attention.cpp), q, k, v read where they are
                y = kernels.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
                if y is not None:  # (B, T, H, hd)
                    return self.o_proj(y.view(b, t, h * hd))
            y = prefill_attention(q, k, v, attn_mask)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and t > 1, enable_gqa=True
            )
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


# Query rows per matmul-softmax-matmul in prefill_attention: bounds the scores to (H/Hkv x 512) x S per step.
PREFILL_QUERY_BLOCK = 512


def prefill_attention(q, k, v, attn_mask):
    """Causal attention of T new queries over S = past + T keys as bf16 matmuls (inference, T > 1): the CPU
    SDPA kernel takes 9.4 ms per layer for an 874-token SmolVLM prompt here, this ~3 ms (docs/speed.md).
    The query heads sharing a kv head are stacked as rows (no repeat of k, v); queries go in blocks, each
    over the keys up to its last position only, so attn_mask must not let a query see a later position (every
    mask here is causal: build_attention_mask, train.branch_attention_mask). q (B, H, T, hd); k, v
    (B, Hkv, S, hd); attn_mask (B, 1, T, S) bool or None (plain causal). Returns (B, H, T, hd)."""
    b, h, t, hd = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g, past = h // hkv, s - t
    q = (q * hd**-0.5).view(b, hkv, g, t, hd)
    y = torch.empty_like(q)
    for t0 in range(0, t, PREFILL_QUERY_BLOCK):
        t1 = min(t, t0 + PREFILL_QUERY_BLOCK)
        keys, tb = past + t1, t1 - t0  # later keys are all masked for these queries
        rows = q[:, :, :, t0:t1].reshape(b, hkv, g * tb, hd)
        scores = torch.matmul(rows, k[:, :, :keys].transpose(-1, -2))  # (B, Hkv, g tb, keys)
        if attn_mask is None:
            allowed = torch.arange(keys)[None, :] <= torch.arange(past + t0, past + t1)[:, None]  # (tb, keys)
        else:
            allowed = attn_mask[:, :, None, t0:t1, :keys]  # (B, 1, 1, tb, keys)
        scores.view(b, hkv, g, tb, keys).masked_fill_(~allowed, float("-inf"))
        y[:, :, :, t0:t1] = torch.matmul(kernels.softmax_(scores), v[:, :, :keys]).view(b, hkv, g, tb, hd)
    return y.view(b, h, t, hd)


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.__dict__.get("_fused")  # quantize.fuse: one matmul for gate and up at inference
        if fused is not None and fused.usable(self):
            gate, up = fused(x).chunk(2, dim=-1)  # (B, T, I) each
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn_mask, cache, slot: int):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache, slot)
        return x + self.mlp(self.post_attention_layernorm(x))


def build_attention_mask(key_mask: torch.Tensor | None, q_len: int, past_len: int) -> torch.Tensor | None:
    """Causal + padding mask (B, 1, T, S) of booleans (True = may attend), or None when plain causal
    attention over an unpadded batch will do. key_mask (B, S) marks real (non-pad) positions."""
    if key_mask is None or bool(key_mask.all()):
        if past_len == 0 or q_len == 1:
            return None  # SDPA's is_causal (prefill) or no mask at all (one new token sees everything)
        key_mask = torch.ones(1, past_len + q_len, dtype=torch.bool)
    s = key_mask.shape[1]
    q_pos = torch.arange(past_len, past_len + q_len, device=key_mask.device)
    causal = torch.arange(s, device=key_mask.device)[None, :] <= q_pos[:, None]  # (T, S)
    mask = causal[None] & key_mask[:, None, :].bool()  # (B, T, S)
    # a padding query may see no real key at all; let it see itself so softmax stays finite
    mask |= torch.arange(s, device=key_mask.device)[None, None, :] == q_pos[None, :, None]
    return mask[:, None]


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, cross_attention_every: int = 0):
        super().__init__()
        self.cfg = cfg
        self.cross_attention_every = cross_attention_every
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.num_layers))
        if cross_attention_every:
            from smolvlm.models.cross_attention import GatedCrossAttentionBlock  # it builds on this module

            n_cross = -(-cfg.num_layers // cross_attention_every)  # before blocks 0, k, 2k, ...
            self.cross_layers = nn.ModuleList(GatedCrossAttentionBlock(cfg) for _ in range(n_cross))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        inputs_embeds: torch.Tensor,  # (B, T, D)
        position_ids: torch.Tensor,  # (B, T)
        key_mask: torch.Tensor | None = None,  # (B, S) real positions over cache + new tokens
        cache: KVCache | None = None,
        memory: torch.Tensor | None = None,  # (B, M, D) visual tokens for the cross-attention layers
        memory_mask: torch.Tensor | None = None,  # (B, M) bool, True on real visual tokens
        attn_mask: torch.Tensor | None = None,  # (B, 1, T, S) bool: keys each query sees, a subset of causal
    ) -> torch.Tensor:
        past_len = cache.length if cache is not None else 0
        if cache is not None and cache.decode_step is not None and inputs_embeds.shape[1] == 1 and attn_mask is None:
            return self.decode_step(inputs_embeds, position_ids, key_mask, cache)
        if attn_mask is None:
            attn_mask = build_attention_mask(key_mask, inputs_embeds.shape[1], past_len)
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, inputs_embeds.dtype)
        cross = None  # per cross layer (k, v) of the memory; None: a text-only pass skips the cross layers
        if memory is not None:
            cross = [block.cross_attn.memory_kv(memory) for block in self.cross_layers]
            if cache is not None:
                cache.cross, cache.cross_mask = cross, memory_mask
        elif cache is not None and cache.cross is not None:
            cross, memory_mask = cache.cross, cache.cross_mask
        x = inputs_embeds
        repeats = self.cfg.layer_repeats
        for i, layer in enumerate(self.layers):
            if cross is not None and i % self.cross_attention_every == 0:
                k, v = cross[i // self.cross_attention_every]
                x = self.cross_layers[i // self.cross_attention_every](x, k, v, memory_mask)
            for r in range(repeats):
                x = layer(x, cos, sin, attn_mask, cache, i * repeats + r)
        if cache is not None:
            cache.length += inputs_embeds.shape[1]
        return self.norm(x)

    def decode_step(self, inputs_embeds, position_ids, key_mask, cache: KVCache) -> torch.Tensor:
        """One new token per sequence through every layer in one C++ call (decode_step.py): the loop above,
        minus ~7 ms of small eager ops per token. (B, 1, D) -> (B, 1, D)."""
        if cache.length >= cache.max_len:
            raise ValueError(f"KV cache full: {cache.length + 1} positions needed, {cache.max_len} allocated")
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, inputs_embeds.dtype)
        if key_mask is not None and bool(key_mask.all()):
            key_mask = None  # no padding: every cached key counts
        x = cache.decode_step.run(inputs_embeds[:, 0], cache.k, cache.v, cache.length, cos[:, 0], sin[:, 0],
                                  key_mask)
        cache.length += 1
        return self.norm(x[:, None])
