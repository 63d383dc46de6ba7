"""The C++ softmax (csrc/softmax.cpp) and the bf16 inference attention paths built on it, against PyTorch."""

import pytest
import torch
import torch.nn.functional as F

from smolvlm import kernels
from smolvlm.models import decoder
from smolvlm.models.vision import matmul_attention


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
    assert ext is not None and ext.softmax_supported()  # CI machines have AVX-512 BF16 and a compiler


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
