"""Llama-style decoder (SmolLM2): RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

token embeddings (B, T, D) -> N x [x + attn(norm(x)); x + mlp(norm(x))] -> norm -> (B, T, D)

Two options beyond SmolLM2 (smolvlm's architecture variants): `layer_repeats` K runs each block K times in
a row with the same weights (depth N*K from N blocks' parameters; the KV cache has N*K slots), and a
Decoder built with `cross_attention_every` k has a gated cross-attention block before blocks 0, k, 2k, ...
(models/cross_attention.py) through which visual tokens enter.

Module names follow Hugging Face's `LlamaModel`, so the state dict maps 1:1 onto `model.text_model.*`
of a SmolVLM checkpoint (or `model.*` of a SmolLM2 one).

Masks, one name each: `attention_mask` (B, T) is the processor's 1/0 per prompt token (Hugging Face's name, at the
VLM's interface); `key_mask` (B, S) marks which of the S positions the keys cover (cache included) are real, i.e.
the attention_mask grown by every generated token; `attn_mask` (B, 1, T, S) bool is what SDPA takes (True = may
attend), built from key_mask and causality by build_attention_mask.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


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


# https://github.com/huggingface/transformers/blob/main/src/transformers/models/llama/modeling_llama.py (LlamaRMSNorm)
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, hd) at [length, length+T) and return the filled part of the cache."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


@dataclass
class RealTokens:
    """Where the real (non-padding) tokens of a right-padded (B, T) batch are. A training pass given them runs the
    decoder's position-wise parts (norms, projections, MLP: most of its FLOPs) on the N real tokens only, as (N, D),
    and attention on the (B, T) grid, so padding costs attention alone; every real token's result is the padded
    pass's (the "unpad" of flash-attention's variable-length path)."""

    index: torch.Tensor  # (N,) flat positions in B*T
    batch: int
    length: int

    @classmethod
    def of(cls, mask: torch.Tensor) -> "RealTokens":
        """mask (B, T) bool, True on real tokens."""
        return cls(mask.flatten().nonzero().squeeze(1), mask.shape[0], mask.shape[1])

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...)"""
        return x.flatten(0, 1).index_select(0, self.index)

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, T, ...), zeros at padding"""
        out = x.new_zeros(self.batch * self.length, *x.shape[1:])
        return out.index_copy(0, self.index, x).view(self.batch, self.length, *x.shape[1:])


# https://github.com/huggingface/transformers/blob/main/src/transformers/models/llama/modeling_llama.py (LlamaAttention)
class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=False)

    def forward(self, x, cos, sin, attn_mask, cache: KVCache | None, slot: int,
                real: RealTokens | None = None) -> torch.Tensor:
        """x (B, T, D), or (N, D) with `real`; attn_mask (B, 1, T, S) bool or None (plain causal); slot: this
        application's place in the KV cache (block index x layer_repeats + repeat)."""
        hd = self.cfg.head_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, T, H hd), (B, T, Hkv hd) x 2
        if real is not None:  # (N, .) -> (B, T, .): attention runs on the grid
            q, k, v = real.scatter(q), real.scatter(k), real.scatter(v)
        b, t, _ = q.shape
        q = q.view(b, t, -1, hd).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(b, t, -1, hd).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(b, t, -1, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(slot, k, v)  # (B, Hkv, S, hd), S = filled + T: only the filled part
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and t > 1, enable_gqa=True
        )  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(b, t, -1)
        return self.o_proj(y if real is None else real.gather(y))


# https://github.com/huggingface/transformers/blob/main/src/transformers/models/llama/modeling_llama.py (LlamaMLP)
class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# https://github.com/huggingface/transformers/blob/main/src/transformers/models/llama/modeling_llama.py
# (LlamaDecoderLayer)
class DecoderBlock(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn_mask, cache, slot: int, real: RealTokens | None = None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache, slot, real)
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


# https://github.com/huggingface/transformers/blob/main/src/transformers/models/llama/modeling_llama.py (LlamaModel)
class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, cross_attention_every: int = 0, cross_block: type | None = None):
        """cross_attention_every k > 0: a `cross_block(cfg)` (models/cross_attention.py, passed in by the VLM) before
        blocks 0, k, 2k, ..."""
        super().__init__()
        self.cfg = cfg
        self.cross_attention_every = cross_attention_every
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.num_layers))
        if cross_attention_every:
            n_cross = -(-cfg.num_layers // cross_attention_every)
            self.cross_layers = nn.ModuleList(cross_block(cfg) for _ in range(n_cross))
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
        real: RealTokens | None = None,  # training: position-wise parts on the real tokens only (no cache/memory)
    ) -> torch.Tensor:
        if real is not None and (cache is not None or memory is not None):
            raise ValueError("RealTokens is for a training pass: no KV cache, no cross-attention memory")
        past_len = cache.length if cache is not None else 0
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
        x = inputs_embeds if real is None else real.gather(inputs_embeds)  # (B, T, D) or (N, D)
        repeats = self.cfg.layer_repeats
        for i, layer in enumerate(self.layers):
            if cross is not None and i % self.cross_attention_every == 0:
                k, v = cross[i // self.cross_attention_every]
                x = self.cross_layers[i // self.cross_attention_every](x, k, v, memory_mask)
            for r in range(repeats):
                x = layer(x, cos, sin, attn_mask, cache, i * repeats + r, real)
        if cache is not None:
            cache.length += inputs_embeds.shape[1]
        return self.norm(x) if real is None else real.scatter(self.norm(x))
