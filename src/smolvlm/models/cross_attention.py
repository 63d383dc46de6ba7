"""Flamingo-style gated cross-attention: visual tokens enter the decoder through extra layers, not the sequence.

    x (B, T, D), memory k, v (B, Hkv, M, hd) ->
        x + tanh(attn_gate) * cross_attn(norm(x), memory)  ->  x + tanh(mlp_gate) * mlp(norm(x))

One such block goes before every k-th decoder block (Decoder builds them). Both gates start at 0, so at
initialisation the model is exactly its text-only decoder and training opens the gates gradually.
The memory's keys and values are computed once per request (at prefill) and kept in the KV cache.
"""

import torch
import torch.nn.functional as F
from torch import nn

from smolvlm.models.decoder import MLP, Attention, DecoderConfig, RMSNorm


class CrossAttention(Attention):
    """Self-attention's projections (q from the text, k and v from the visual memory), no rotary positions."""

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory (B, M, D) -> k, v (B, Hkv, M, hd); no positions (the visual tokens carry their own)."""
        b, m, _ = memory.shape
        k = self.k_proj(memory).view(b, m, -1, self.cfg.head_dim).transpose(1, 2)
        v = self.v_proj(memory).view(b, m, -1, self.cfg.head_dim).transpose(1, 2)
        return k, v

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, D); memory_mask (B, M) bool, True on real visual tokens (a prompt without images has
        none: its row attends to token 0 and the result is zeroed, which keeps softmax finite)."""
        b, t, _ = x.shape
        has_memory = memory_mask.any(dim=1)  # (B,)
        mask = memory_mask.clone()
        mask[:, 0] |= ~has_memory
        q = self.q_proj(x).view(b, t, -1, self.cfg.head_dim).transpose(1, 2)  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], enable_gqa=True)
        y = y * has_memory[:, None, None, None].to(y.dtype)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class GatedCrossAttentionBlock(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.cross_attn = CrossAttention(cfg)
        self.attn_gate = nn.Parameter(torch.zeros(()))  # tanh(0) = 0: closed at init
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.mlp_gate = nn.Parameter(torch.zeros(()))

    def forward(self, x, k, v, memory_mask) -> torch.Tensor:
        x = x + torch.tanh(self.attn_gate) * self.cross_attn(self.attn_norm(x), k, v, memory_mask)
        return x + torch.tanh(self.mlp_gate) * self.mlp(self.mlp_norm(x))
