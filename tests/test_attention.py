"""The C++ softmax (csrc/softmax.cpp), attention (csrc/attention.cpp) and the bf16 inference attention paths built on
them, against PyTorch."""

import pytest
import torch
import torch.nn.functional as F

from smolvlm.runtime import kernels
from smolvlm.models import decoder
from smolvlm.models.vision import VisionAttention, VisionConfig, matmul_attention
from smolvlm.runtime.quantize import fuse


@pytest.mark.parametrize("cols", [32, 1024, 874, 7, 1])
def test_softmax_matches_torch(cols):
    g = torch.Generator().manual_seed(cols)
    x = (torch.randn(3, 5, cols, generator=g) * 4).to(torch.bfloat16)
    x[0, 1, : cols // 2] = float("-inf")  # masked keys
    ref = torch.softmax(x.float(), dim=-1)
    out = kernels.softmax_(x.clone()).float()
    assert ((out - ref).abs() <= ref * 2**-7 + 1e-6).all()  # one bf16 rounding of each probability
    assert (out[0, 1, : cols // 2] == 0).all()
    assert torch.allclose(out.sum(-1), torch.ones(3, 5), atol=0.02)


def test_softmax_of_a_fully_masked_row_is_zero():
    x = torch.full((2, 64), float("-inf"), dtype=torch.bfloat16)
    x[1, 3] = 0.0
    out = kernels.softmax_(x)
    assert (out[0] == 0).all() and out[1, 3] == 1 and out[1].sum() == 1


def test_the_kernel_is_used_here():
    ext = kernels.extension()
    # CI machines have AVX-512 BF16 and a compiler
    assert ext is not None and ext.softmax_supported() and ext.attention_supported(64)


def reference_attention(q, k, v, mask):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)


@pytest.mark.parametrize("past", [0, 21])
@pytest.mark.parametrize("padded", [False, True])
def test_prefill_attention_matches_sdpa(monkeypatch, past, padded):
    monkeypatch.setattr(decoder, "PREFILL_QUERY_BLOCK", 16)  # several query blocks, the last one short
    g = torch.Generator().manual_seed(past + padded)
    b, h, hkv, t, hd = 2, 6, 2, 37, 16
    s = past + t
    q = torch.randn(b, h, t, hd, generator=g).to(torch.bfloat16)
    k = torch.randn(b, hkv, s, hd, generator=g).to(torch.bfloat16)
    v = torch.randn(b, hkv, s, hd, generator=g).to(torch.bfloat16)
    key_mask = torch.ones(b, s, dtype=torch.bool)
    if padded:
        key_mask[1, :9] = False  # left padding
    mask = decoder.build_attention_mask(key_mask, t, past)
    with torch.inference_mode():
        out = decoder.prefill_attention(q, k, v, mask).float()
    causal = torch.arange(s)[None, :] <= torch.arange(past, s)[:, None]
    ref = reference_attention(q, k, v, mask if mask is not None else causal)
    assert (mask is None) == (past == 0 and not padded)
    assert (out - ref).abs().max() < 0.03


def test_vision_matmul_attention_matches_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 32, generator=g).to(torch.bfloat16) for _ in range(3))
    mask = torch.ones(2, 1, 1, 64, dtype=torch.bool)
    mask[1, ..., 40:] = False  # padding patches of the second image
    out = matmul_attention(q, k, v, mask).float()
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    assert (out - ref).abs().max() < 0.03


def sdpa_reference(q, k, v, key_mask):  # (B, P, H, D) in and out, float32
    mask = None if key_mask is None else key_mask[:, None, None, :]
    q, k, v = (t.float().transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


@pytest.mark.parametrize("patches", [1, 7, 64, 65, 100, 1024])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_kernel_matches_sdpa(patches, masked):
    g = torch.Generator().manual_seed(patches)
    b, h = 2, 3
    qkv = torch.randn(b, patches, 3, h, 64, generator=g).to(torch.bfloat16)  # the fused projection's layout
    q, k, v = qkv.unbind(2)  # strided views, as the vision tower passes them
    key_mask = None
    if masked:
        key_mask = torch.rand(b, patches, generator=g) > 0.4
        key_mask[:, 0] = True
    out = kernels.attention(q, k, v, key_mask)
    assert out.shape == (b, patches, h, 64) and out.dtype == torch.bfloat16 and out.is_contiguous()
    assert (out.float() - sdpa_reference(q, k, v, key_mask)).abs().max() < 0.02


def test_attention_kernel_with_every_key_masked_gives_zeros():
    q, k, v = torch.randn(2, 70, 3, 2, 64).to(torch.bfloat16).unbind(2)
    key_mask = torch.ones(2, 70, dtype=torch.bool)
    key_mask[1] = False
    out = kernels.attention(q, k, v, key_mask).float()
    assert (out[1] == 0).all()
    assert (out[0] - sdpa_reference(q[:1], k[:1], v[:1], None)[0]).abs().max() < 0.02


def test_attention_kernel_declines_what_it_does_not_cover():
    q, k, v = torch.randn(1, 16, 3, 2, 32).to(torch.bfloat16).unbind(2)
    assert kernels.attention(q, k, v, None) is None  # head dim 32
    q, k, v = torch.randn(1, 16, 3, 2, 64).unbind(2)
    assert kernels.attention(q, k, v, None) is None  # float32: the exact reference path stays PyTorch's


def test_vision_attention_through_the_kernel_matches_the_plain_module(monkeypatch):
    used = []
    real = kernels.attention
    monkeypatch.setattr(kernels, "attention", lambda *a: used.append(real(*a)) or used[-1])
    cfg = VisionConfig(hidden_size=128, num_heads=2)  # head dim 64: the kernel applies
    attn = VisionAttention(cfg).to(torch.bfloat16)
    x = torch.randn(2, 50, 128).to(torch.bfloat16)
    mask = torch.ones(2, 1, 1, 50, dtype=torch.bool)
    mask[1, ..., 30:] = False
    with torch.inference_mode():
        plain = attn(x, mask).float()  # not fused: q, k, v projections, then matmul_attention
        assert fuse(attn, ("q_proj", "k_proj", "v_proj")) is not None
        fused = attn(x, mask).float()  # the fused projection into csrc/attention.cpp
    assert len(used) == 1 and used[0] is not None
    assert (fused - plain).abs().max() < 0.03


@pytest.mark.parametrize("t, past", [(1, 0), (37, 0), (100, 0), (150, 21), (6, 70)])
def test_causal_grouped_attention_kernel_matches_sdpa(t, past):
    g = torch.Generator().manual_seed(t + past)
    b, h, hkv, s = 2, 6, 2, past + t
    q = torch.randn(b, h, t, 64, generator=g).to(torch.bfloat16)
    cache_k = torch.randn(b, hkv, s + 9, 64, generator=g).to(torch.bfloat16)  # a cache with empty slots after s
    cache_v = torch.randn(b, hkv, s + 9, 64, generator=g).to(torch.bfloat16)
    k, v = cache_k[:, :, :s], cache_v[:, :, :s]
    out = kernels.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)  # views
    causal = torch.arange(s)[None, :] <= torch.arange(past, s)[:, None]
    ref = reference_attention(q, k, v, causal).transpose(1, 2)
    assert (out.float() - ref).abs().max() < 0.02


def test_decoder_prefill_through_the_kernel_matches_the_matmul_path(monkeypatch):
    cfg = decoder.DecoderConfig(hidden_size=192, intermediate_size=256, num_layers=2, num_heads=3, num_kv_heads=1,
                                vocab_size=300)  # head dim 64: the kernel applies
    model = decoder.Decoder(cfg).to(torch.bfloat16)
    x = torch.randn(1, 75, 192).to(torch.bfloat16)
    positions = torch.arange(75)[None]
    with torch.inference_mode():
        through_kernel = model(x, positions).float()
        monkeypatch.setattr(kernels, "attention", lambda *a, **kw: None)  # as where the kernel is not built
        through_matmuls = model(x, positions).float()
    assert (through_kernel - through_matmuls).abs().max() < 0.05
    assert not torch.equal(through_kernel, through_matmuls)  # the two paths really differ (rounding)
