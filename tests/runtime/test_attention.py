"""runtime/attention.py on every path it can take (the C++ kernels of each ISA level, PyTorch's SDPA, the bf16
matmul paths), each against a float64 reference with one semantics: a query that sees no key gets zeros."""

import pytest
import torch

from conftest import CPU_CEILING
from smolvlm.errors import SmolVLMError
from smolvlm.runtime import attention as attn
from smolvlm.runtime import cpu

TOL = {torch.float32: 2e-5, torch.bfloat16: 0.03}  # float32 vs float64; bf16 inputs, one bf16 rounding out


def reference(q, k, v, key_mask=None, causal=False):
    """float64 softmax(q k^T / sqrt(D)) v: q (B, T, H, D), k, v (B, S, Hkv, D) -> (B, T, H, D); zeros where a
    query sees no key."""
    b, t, h, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))
    k, v = k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1)
    scores = q @ k.transpose(-1, -2) / d**0.5
    allowed = torch.ones(b, 1, t, s, dtype=torch.bool)
    if key_mask is not None:
        allowed &= key_mask[:, None, None, :]
    if causal:
        allowed &= torch.arange(s)[None, :] <= torch.arange(s - t, s)[:, None]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0)
    return (probs @ v).transpose(1, 2)


def inputs(b, t, s, h, hkv, d, dtype, seed, layout):
    """q (B, T, H, D), k, v (B, S, Hkv, D) as the callers pass them: "fused" = views of one (B, P, 3, H, D)
    projection (vision), "cache" = transposed views of a (B, Hkv, S + 9, D) KV cache (prefill), "contiguous"."""
    g = torch.Generator().manual_seed(seed)
    # float32: sharp softmaxes (scores ~ N(0, 4^2)); bf16: the bf16 matmul path rounds the scores, so milder ones
    scale = 2.0 if dtype == torch.float32 else 1.0
    if layout == "fused":
        assert h == hkv and t == s
        qkv = (torch.randn(b, t, 3, h, d, generator=g) * scale).to(dtype)
        return qkv.unbind(2)
    q = (torch.randn(b, t, h, d, generator=g) * scale).to(dtype)
    if layout == "cache":
        cache = (torch.randn(2, b, hkv, s + 9, d, generator=g) * scale).to(dtype)
        return q, cache[0, :, :, :s].transpose(1, 2), cache[1, :, :, :s].transpose(1, 2)
    k, v = (torch.randn(2, b, s, hkv, d, generator=g) * scale).to(dtype)
    return q, k, v


# (T, S, H, Hkv, causal, layout): 1..1024 keys, bidirectional and causal with past keys, grouped-query, strided
CASES = [
    (1, 1, 2, 2, False, "fused"),
    (7, 7, 3, 3, False, "fused"),
    (65, 65, 2, 2, False, "fused"),
    (1024, 1024, 2, 2, False, "fused"),
    (100, 100, 4, 2, False, "contiguous"),
    (1, 1, 3, 1, True, "cache"),
    (37, 37, 6, 2, True, "cache"),
    (150, 171, 6, 2, True, "cache"),
    (6, 76, 9, 3, True, "cache"),
    (3, 1024, 2, 1, True, "contiguous"),
]


def spy_kernels(monkeypatch):
    """Counts the calls into the C++ attention kernels of the extension attention.py uses here."""
    calls = []
    ext = attn._extension()
    if ext is not None:
        for name in ("attention_bf16", "attention_f32"):
            real = getattr(ext, name)
            monkeypatch.setattr(ext, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    return calls


def check_attention(monkeypatch, dtype, d, case, masked):
    t, s, h, hkv, causal, layout = case
    q, k, v = inputs(2, t, s, h, hkv, d, dtype, seed=t + s + h, layout=layout)
    key_mask = None
    if masked:
        key_mask = torch.rand(2, s, generator=torch.Generator().manual_seed(s)) > 0.3
        key_mask[1, : s // 2 + 1] = False  # left padding: with causal, early queries see no key at all
    calls = spy_kernels(monkeypatch)
    with torch.inference_mode():
        out = attn.attention(q, k, v, key_mask, causal)
    assert out.shape == (2, t, h, d) and out.dtype == dtype and out.is_contiguous()
    ref = reference(q, k, v, key_mask, causal)
    assert (out.double() - ref).abs().max() < TOL[dtype]
    # the C++ kernel runs exactly where kernel_used says it does
    assert bool(calls) == attn.kernel_used(dtype, d, causal).startswith("c++")


@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-S{}-H{}/{}-{}-{}".format(*c[:4], "causal" if c[4]
                                                                                     else "bidir", c[5]))
@pytest.mark.parametrize("masked", [False, True], ids=["all-keys", "key-mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_attention_matches_the_reference(monkeypatch, dtype, case, masked):
    check_attention(monkeypatch, dtype, 64, case, masked)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", [CASES[2], CASES[4], CASES[7]], ids=["bidir", "bidir-gqa", "causal-gqa"])
def test_attention_with_a_head_dim_no_kernel_takes(monkeypatch, dtype, case):
    check_attention(monkeypatch, dtype, 32, case, masked=True)  # PyTorch: SDPA or the bf16 matmul paths


LEVELS = [pytest.param(lv, marks=pytest.mark.skipif(
    cpu.LEVELS.index(lv) > cpu.LEVELS.index(CPU_CEILING),
    reason=f"this run tops out at {CPU_CEILING} (this CPU, or SMOLVLM_CPU): {lv} cannot run here"))
    for lv in cpu.LEVELS]


@pytest.mark.parametrize("level", LEVELS)
def test_every_level_matches_the_reference(monkeypatch, level):
    monkeypatch.setenv(cpu.ENV, level)  # attention.py then takes that level's kernels (kernels.extension(level))
    assert cpu.level() == level
    for dtype in (torch.float32, torch.bfloat16):
        for case in (CASES[3], CASES[4], CASES[8]):
            check_attention(monkeypatch, dtype, 64, case, masked=True)
    ext = attn._extension()
    if ext is not None:  # the float32 kernel itself, bidirectional too (where the dispatch prefers SDPA)
        q, k, v = inputs(2, 100, 100, 4, 2, 64, torch.float32, seed=5, layout="contiguous")
        key_mask = torch.rand(2, 100, generator=torch.Generator().manual_seed(5)) > 0.3
        key_mask[1] = False
        out = ext.attention_f32(q, k, v, key_mask, False, 64**-0.5)
        assert (out.double() - reference(q, k, v, key_mask)).abs().max() < TOL[torch.float32]
        assert (out[1] == 0).all()
    x = torch.randn(4, 77) * 3
    x[1] = float("-inf")
    assert torch.allclose(attn.softmax_(x.clone()), torch.softmax(x, -1).nan_to_num(0), atol=1e-6)


@pytest.mark.parametrize("level", LEVELS)
def test_kernel_used_follows_the_level(monkeypatch, level):
    monkeypatch.setenv(cpu.ENV, level)
    ext = attn._extension()
    bf16 = attn.kernel_used(torch.bfloat16, 64)
    f32, f32_causal = attn.kernel_used(torch.float32, 64, causal=False), attn.kernel_used(torch.float32, 64, True)
    if ext is None:  # no compiler, or a build of another level: PyTorch everywhere
        assert (bf16, f32, f32_causal) == ("pytorch matmul", "pytorch sdpa", "pytorch sdpa")
        return
    assert ext.attention_isa() == level  # the build holds this level's code, no higher
    assert bf16 == ("c++ avx512_bf16" if level == "avx512_bf16" else "pytorch matmul")
    assert f32 == "pytorch sdpa"  # bidirectional float32: SDPA is as fast
    assert f32_causal == (f"c++ {level}" if level in attn.F32_KERNEL_ISAS else "pytorch sdpa")
    if f32_causal != f32:
        assert attn.kernel_used(torch.float32, 64) == f"{f32_causal} (causal), {f32} (bidirectional)"
    assert attn.kernel_used(torch.float32, 80, True) == "pytorch sdpa"  # head dims other than 64: PyTorch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_a_query_that_sees_no_key_gets_zeros(dtype):
    q, k, v = inputs(2, 70, 70, 2, 2, 64, dtype, seed=1, layout="fused")
    key_mask = torch.ones(2, 70, dtype=torch.bool)
    key_mask[1] = False
    with torch.inference_mode():
        out = attn.attention(q, k, v, key_mask)
        assert (out[1] == 0).all() and not out.isnan().any()
        assert (out[0].double() - reference(q[:1], k[:1], v[:1])[0]).abs().max() < TOL[dtype]
        # the SDPA path too (head dim 32: no kernel), causal with past keys
        q, k, v = inputs(1, 5, 12, 2, 1, 32, dtype, seed=2, layout="cache")
        mask = torch.ones(1, 12, dtype=torch.bool)
        mask[0, :9] = False  # queries at positions 7 and 8 see nothing
        out = attn.attention(q, k, v, mask, causal=True)
    assert (out[0, :2] == 0).all() and not out.isnan().any()
    assert (out.double() - reference(q, k, v, mask, True)).abs().max() < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("past", [0, 21])
@pytest.mark.parametrize("padded", [False, True])
def test_masked_attention_matches_the_reference(monkeypatch, dtype, past, padded):
    monkeypatch.setattr(attn, "PREFILL_QUERY_BLOCK", 16)  # several query blocks, the last one short
    b, h, hkv, t, hd = 2, 6, 2, 37, 64
    s = past + t
    q, k, v = inputs(b, t, s, h, hkv, hd, dtype, seed=past + padded, layout="cache")
    key_mask = torch.ones(b, s, dtype=torch.bool)
    if padded:
        key_mask[1, : past + 9] = False  # left padding: the first nine queries of sequence 1 see nothing
    causal = torch.arange(s)[None, :] <= torch.arange(past, s)[:, None]
    mask = (key_mask[:, None, None, :] & causal) if padded or past else None
    with torch.inference_mode():
        out = attn.masked_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
    assert out.shape == (b, h, t, hd) and out.dtype == dtype
    ref = reference(q, k, v, key_mask if padded else None, causal=True).transpose(1, 2)
    assert (out.double() - ref).abs().max() < TOL[dtype]
    if padded:
        assert (out[1, :, :9] == 0).all()


@pytest.mark.parametrize("cols", [1, 7, 32, 874, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_softmax_in_place_matches_torch(dtype, cols):
    g = torch.Generator().manual_seed(cols)
    x = (torch.randn(3, 5, cols, generator=g) * 4).to(dtype)
    x[0, 1, : cols // 2] = float("-inf")  # masked keys
    x[2, 3] = float("-inf")  # a row with every key masked
    ref = torch.softmax(x.double(), dim=-1).nan_to_num(0)
    y = x.clone()
    out = attn.softmax_(y)
    assert out is y  # in place
    tol = ref * 2**-8 + 1e-6 if dtype == torch.bfloat16 else ref * 1e-5 + 1e-7  # bf16: one rounding
    assert ((out.double() - ref).abs() <= tol).all()
    assert (out[2, 3] == 0).all() and (out[0, 1, : cols // 2] == 0).all()
    # strided scores go through PyTorch, with the same semantics
    z = x.transpose(0, 1).contiguous().transpose(0, 1)
    assert not z.is_contiguous() and attn.softmax_(z) is z
    assert ((z.double() - ref).abs() <= tol).all()


def test_attention_is_differentiable_when_gradients_are_wanted():
    q, k, v = (x.requires_grad_() for x in inputs(1, 9, 9, 4, 2, 64, torch.float32, seed=3, layout="contiguous"))
    out = attn.attention(q, k, v, causal=True)  # the kernels have no backward: PyTorch's SDPA
    out.sum().backward()
    assert q.grad is not None and k.grad.abs().sum() > 0
    assert (out.detach().double() - reference(q.detach(), k.detach(), v.detach(), causal=True)).abs().max() < 2e-5


@pytest.mark.parametrize("call, message", [
    (lambda q, k, v: attn.attention(q[0], k, v), "q must be"),
    (lambda q, k, v: attn.attention(q, k[:, :, :1], v), "q must be"),
    (lambda q, k, v: attn.attention(q[:, :, :3], k, v), "multiple of kv heads"),
    (lambda q, k, v: attn.attention(q, k.double(), v.double()), "one floating dtype"),
    (lambda q, k, v: attn.attention(q, k, v, torch.ones(1, 5, dtype=torch.bool)), "key_mask"),
    (lambda q, k, v: attn.attention(q, k[:, :2], v[:, :2], causal=True), "causal needs"),
    (lambda q, k, v: attn.masked_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           torch.ones(1, 1, 4, 4)), "attn_mask must be bool"),
])
def test_bad_input_is_one_clear_error(call, message):
    q, k, v = inputs(1, 4, 4, 4, 2, 64, torch.float32, seed=0, layout="contiguous")
    with pytest.raises(SmolVLMError, match=message):
        call(q, k, v)
