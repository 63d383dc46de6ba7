"""Attention at inference on every CPU, with one semantics whichever implementation runs.

    attention(q, k, v, key_mask, causal)   (B, T, H, D) queries over (B, S, Hkv, D) keys and values: the vision
                                           tower's (bidirectional, key mask) and the decoder's prefill (causal,
                                           grouped-query)
    masked_attention(q, k, v, attn_mask)   head-major (B, H, T, hd) with a (B, 1, T, S) mask within causal: the
                                           decoder's prefill of padded or packed prompts
    softmax_(scores)                       row softmax in place (-inf = masked)
    kernel_used(dtype, head_dim)           which implementation attention() takes here (`smolvlm doctor`)

Semantics everywhere: softmax(q k^T / sqrt(D)) v in q's dtype; query head h reads kv head h // (H / Hkv); a causal
query i sits at position S - T + i; **a query (or softmax row) that sees no key gets zeros** (PyTorch alone would
give NaN on some paths, the C++ kernels give 0: both are made to give 0).

Which implementation runs (the C++ kernels are those of the extension built for cpu.level()):
    bf16     csrc/attention.cpp's AVX-512 BF16 kernel (head dim 64), else bf16 matmuls around softmax_
             (matmul_attention, blocked_attention), or SDPA when gradients are wanted
    float32  csrc/attention_f32.cpp's float32 kernel for causal attention at the levels in F32_KERNEL_ISAS (where it
             beats torch's float32 SDPA, which is flash attention on CPU), else SDPA with enable_gqa
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from smolvlm.errors import SmolVLMError
from smolvlm.runtime import cpu, kernels

# Builds whose float32 kernel beats torch's float32 SDPA on causal grouped-query attention (the decoder's prefill);
# on bidirectional attention (the vision tower's 1024 patches) SDPA is as fast or faster, so it keeps that.
# "generic" is portable C++: kept out.
F32_KERNEL_ISAS: frozenset[str] = frozenset({"avx2", "avx512", "avx512_bf16"})
# Builds whose float32 softmax_ beats torch.softmax (plus its fully-masked-row fix-up).
F32_SOFTMAX_ISAS: frozenset[str] = frozenset({"avx2", "avx512", "avx512_bf16"})

# Heads per matmul-softmax-matmul in matmul_attention: two heads' scores (2 x 1024 x 1024 bf16, 4 MB) stay in
# cache between the three steps; all twelve at once (25 MB) do not.
HEADS_PER_CHUNK = 2
# Query rows per matmul-softmax-matmul in blocked_attention: bounds the scores to (H/Hkv x 512) x S per step.
PREFILL_QUERY_BLOCK = 512

_EXTENSIONS: dict[str, object] = {}  # level -> the extension whose kernels match it (None: PyTorch only)


def _extension():
    """The compiled kernels for the level the runtime uses, or None. A build for another level (kernels.py
    building one -march=native module) is not used: SMOLVLM_CPU must be able to take the kernels down."""
    level = cpu.level()
    if level not in _EXTENSIONS:
        per_level = bool(inspect.signature(kernels.extension).parameters)
        ext = kernels.extension(level) if per_level else kernels.extension()
        if ext is not None and (not hasattr(ext, "attention_isa") or ext.attention_isa() != level):
            ext = None  # an older build without the float32 kernels, or one for a higher level
        _EXTENSIONS[level] = ext
    return _EXTENSIONS[level]


def _kernel(dtype: torch.dtype, head_dim: int, causal: bool):
    """The C++ attention function for this dtype, head dim and kind here, or None."""
    ext = _extension()
    if ext is None:
        return None
    if dtype == torch.bfloat16 and ext.attention_supported(head_dim):
        return ext.attention_bf16
    if dtype == torch.float32 and causal and ext.attention_isa() in F32_KERNEL_ISAS \
            and ext.attention_f32_supported(head_dim):
        return ext.attention_f32
    return None


def kernel_used(dtype: torch.dtype, head_dim: int, causal: bool | None = None) -> str:
    """Which implementation attention() takes at inference for this dtype and head dim on this CPU (at the level
    SMOLVLM_CPU leaves): "c++ <isa>", "pytorch matmul" (bf16) or "pytorch sdpa"; for causal=None, both kinds
    ("c++ avx2 (causal), pytorch sdpa (bidirectional)") where they differ."""
    def one(kind: bool) -> str:
        if _kernel(dtype, head_dim, kind) is not None:
            return f"c++ {_extension().attention_isa()}"
        return "pytorch matmul" if dtype == torch.bfloat16 else "pytorch sdpa"

    if causal is not None:
        return one(causal)
    both = one(True), one(False)
    return both[0] if both[0] == both[1] else f"{both[0]} (causal), {both[1]} (bidirectional)"


def _wants_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _check(q, k, v, key_mask, causal) -> None:
    """One clear line for inputs attention() cannot take."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise SmolVLMError(f"attention: q must be (B, T, H, D) and k, v (B, S, Hkv, D) of one shape; got q "
                           f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    (b, t, h, d), (bk, s, hkv, dk) = q.shape, k.shape
    if b != bk or d != dk or hkv == 0 or h % hkv:
        raise SmolVLMError(f"attention: q {tuple(q.shape)} does not fit k, v {tuple(k.shape)} (same batch and head "
                           "dim, query heads a multiple of kv heads)")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise SmolVLMError(f"attention: q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if key_mask is not None and (key_mask.dtype != torch.bool or tuple(key_mask.shape) != (b, s)):
        raise SmolVLMError(f"attention: key_mask must be bool (B, S) = {(b, s)}; got {key_mask.dtype} "
                           f"{tuple(key_mask.shape)}")
    if causal and t > s:
        raise SmolVLMError(f"attention: causal needs at least as many keys as queries; got {t} queries, {s} keys")


def _allowed(b: int, t: int, s: int, key_mask: torch.Tensor | None, causal: bool, device) -> torch.Tensor | None:
    """(B, 1, T, S) bool of the keys each query may see, or None when it sees them all."""
    allowed = None if key_mask is None else key_mask[:, None, None, :].expand(b, 1, t, s)
    if causal:
        tri = torch.arange(s, device=device)[None, :] <= torch.arange(s - t, s, device=device)[:, None]  # (T, S)
        allowed = tri.expand(b, 1, t, s) if allowed is None else allowed & tri
    return allowed


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
              causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v. q (B, T, H, D); k, v (B, S, Hkv, D), bf16 or float32 (strided views are fine:
    the kernels want only the last dim contiguous); key_mask (B, S) bool, True = may be attended; causal: query i
    sits at position S - T + i and sees keys up to it. Returns (B, T, H, D) contiguous in q's dtype; a query that
    sees no key gets zeros."""
    _check(q, k, v, key_mask, causal)
    b, t, h, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    kernel = _kernel(q.dtype, d, causal)
    if kernel is not None and max(q.stride(-1), k.stride(-1), v.stride(-1)) == 1 and not _wants_grad(q, k, v):
        return kernel(q, k, v, key_mask, causal, d**-0.5)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D), (B, Hkv, S, D)
    if q.dtype == torch.bfloat16 and not _wants_grad(q, k, v):
        if causal:
            y = blocked_attention(qh, kh, vh, _allowed(b, t, s, key_mask, causal, q.device) if key_mask is not None
                                  else None)
        elif h == hkv:
            # one copy into head-major order: the matmuls would otherwise copy each strided slice per chunk
            mask = None if key_mask is None else key_mask[:, None, None, :]
            y = matmul_attention(qh.contiguous(), kh.contiguous(), vh.contiguous(), mask)
        else:
            y = _sdpa(qh, kh, vh, _allowed(b, t, s, key_mask, False, q.device), False)
    else:
        plain_causal = causal and key_mask is None and t == s  # SDPA's is_causal is aligned top-left
        allowed = None if plain_causal else _allowed(b, t, s, key_mask, causal, q.device)
        y = _sdpa(qh, kh, vh, allowed, plain_causal)
    return y.transpose(1, 2).contiguous()


def _sdpa(q, k, v, allowed: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    """SDPA on (B, H, T, D) and (B, Hkv, S, D), with the rows that see no key set to zeros (the math backend
    would give NaN there)."""
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=is_causal,
                                       enable_gqa=q.shape[1] != k.shape[1])
    if allowed is not None:
        y = y.masked_fill(~allowed.any(-1, keepdim=True), 0)  # (B, 1, T, 1)
    return y


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     attn_mask: torch.Tensor | None) -> torch.Tensor:
    """The decoder's prefill: T new queries over S = past + T keys. q (B, H, T, hd); k, v (B, Hkv, S, hd);
    attn_mask (B, 1, T, S) bool that lets no query see a later position (padding, packed turns), or None for plain
    causal. Returns (B, H, T, hd); a query that sees no key gets zeros."""
    if q.dim() != 4 or k.dim() != 4:
        raise SmolVLMError(f"masked_attention: q must be (B, H, T, hd) and k, v (B, Hkv, S, hd); got q "
                           f"{tuple(q.shape)}, k {tuple(k.shape)}")
    b, _, t, _ = q.shape
    s = k.shape[2]
    if attn_mask is None:
        return attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)
    _check(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True)
    if attn_mask.dtype != torch.bool or tuple(attn_mask.shape) != (b, 1, t, s):
        raise SmolVLMError(f"masked_attention: attn_mask must be bool (B, 1, T, S) = {(b, 1, t, s)}; got "
                           f"{attn_mask.dtype} {tuple(attn_mask.shape)}")
    if q.dtype == torch.bfloat16 and not _wants_grad(q, k, v):
        return blocked_attention(q, k, v, attn_mask)
    return _sdpa(q, k, v, attn_mask, False)


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None):
    """softmax(q k^T / sqrt(hd)) v as bf16 matmuls, a few heads at a time (see HEADS_PER_CHUNK). q, k, v
    (N, H, P, hd); attn_mask (N, 1, 1, P) bool, True on keys that may be attended. Returns (N, H, P, hd)."""
    q = q * q.shape[-1] ** -0.5
    out = []
    for h in range(0, q.shape[1], HEADS_PER_CHUNK):
        hs = slice(h, h + HEADS_PER_CHUNK)
        scores = torch.matmul(q[:, hs], k[:, hs].transpose(-1, -2))  # (N, c, P, P)
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        out.append(torch.matmul(softmax_(scores), v[:, hs]))
    return torch.cat(out, dim=1)


def blocked_attention(q, k, v, attn_mask):
    """Causal attention of T new queries over S = past + T keys as matmuls around softmax_ (bf16 inference, where
    the CPU SDPA kernel is slower). The query heads sharing a kv head are stacked as rows (no repeat of k, v);
    queries go in blocks, each over the keys up to its last position only, so attn_mask must not let a query see
    a later position. q (B, H, T, hd); k, v (B, Hkv, S, hd); attn_mask (B, 1, T, S) bool or None (plain causal).
    Returns (B, H, T, hd)."""
    b, h, t, hd = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g, past = h // hkv, s - t
    q = (q * hd**-0.5).reshape(b, hkv, g, t, hd)
    y = torch.empty_like(q)
    for t0 in range(0, t, PREFILL_QUERY_BLOCK):
        t1 = min(t, t0 + PREFILL_QUERY_BLOCK)
        keys, tb = past + t1, t1 - t0  # later keys are all masked for these queries
        rows = q[:, :, :, t0:t1].reshape(b, hkv, g * tb, hd)
        scores = torch.matmul(rows, k[:, :, :keys].transpose(-1, -2))  # (B, Hkv, g tb, keys)
        if attn_mask is None:
            allowed = torch.arange(keys, device=q.device)[None, :] \
                <= torch.arange(past + t0, past + t1, device=q.device)[:, None]  # (tb, keys)
        else:
            allowed = attn_mask[:, :, None, t0:t1, :keys]  # (B, 1, 1, tb, keys)
        scores.view(b, hkv, g, tb, keys).masked_fill_(~allowed, float("-inf"))
        y[:, :, :, t0:t1] = torch.matmul(softmax_(scores), v[:, :, :keys]).view(b, hkv, g, tb, hd)
    return y.view(b, h, t, hd)


def softmax_(scores: torch.Tensor) -> torch.Tensor:
    """Row softmax over the last dim of bf16 or float32 scores (-inf = masked), in place; returns scores. A row
    with every entry -inf becomes zeros. Both the C++ kernels and PyTorch sum in float32."""
    ext = _extension()
    if ext is not None and scores.is_contiguous() and not _wants_grad(scores):
        if scores.dtype == torch.bfloat16 and ext.softmax_supported():
            ext.softmax_bf16_(scores)
            return scores
        if scores.dtype == torch.float32 and ext.attention_isa() in F32_SOFTMAX_ISAS:
            ext.softmax_f32_(scores)
            return scores
    dead = scores.amax(-1, keepdim=True) == float("-inf")  # rows torch.softmax would fill with NaN
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32 if scores.dtype == torch.bfloat16 else None)
    return scores.copy_(probs.masked_fill_(dead, 0))
