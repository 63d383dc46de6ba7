"""The C++ decode step (csrc/decode_step.cpp) against the eager decoder it replaces: same logits within bf16
rounding for bf16, int8 and int4 weights, over a left-padded batch; built once per set of weights; not used
where it does not apply; used by generation."""

import pytest
import torch

from smolvlm.runtime import decode_step, kernels
from smolvlm.generation import SamplingParams, generate_ids
from smolvlm.lora import LoRAConfig, add_lora
from smolvlm.models.decoder import KVCache
from smolvlm.models.vlm import VLM, preset
from smolvlm.runtime.quantize import prepare_for_inference


def tiny_bf16(mode=None) -> VLM:
    torch.manual_seed(0)
    model = VLM(preset("tiny")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return prepare_for_inference(model.to(torch.bfloat16), mode)


def decode_logits(model, prompt, mask, follow, use_step: bool) -> torch.Tensor:
    """Prefill `prompt` (B, T) left-padded as `mask` says, then feed `follow` (N, B) one token at a time:
    the logits (N, B, V) of every step."""
    b, t = prompt.shape
    with torch.inference_mode():
        cache = KVCache(model.cfg.text, b, t + len(follow), model.dtype)
        cache.decode_step = decode_step.for_decoder(model.text_model, model.lm_head) if use_step else None
        assert (cache.decode_step is not None) == use_step
        model(prompt, attention_mask=mask, cache=cache, last_only=True)
        out = []
        for tok in follow:
            mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype)], dim=1)
            out.append(model(tok[:, None], attention_mask=mask, cache=cache, last_only=True)[:, -1].float())
    return torch.stack(out)


def test_the_extension_builds_here():
    # CI machines have a C++ compiler: the fast step must not silently fall back to eager there
    assert kernels.extension() is not None


@pytest.mark.parametrize("mode", [None, "int8", "int4"])
def test_decode_step_matches_eager_on_a_padded_batch(mode):
    model = tiny_bf16(mode)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 49000, (2, 40), generator=g)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :13] = 0  # the second sequence is 13 tokens shorter: left padding
    follow = torch.randint(0, 49000, (12, 2), generator=g)
    eager = decode_logits(model, prompt, mask, follow, use_step=False)
    fast = decode_logits(model, prompt, mask, follow, use_step=True)
    cos = torch.nn.functional.cosine_similarity(eager, fast, dim=-1)
    assert cos.min() > 0.9995, cos.min()
    # bf16 rounding apart only: a few bf16 steps of the logits' scale
    assert (eager - fast).abs().max() < 0.05 * eager.abs().max()


@pytest.mark.parametrize("kind", ["bf16", "int8"])
@pytest.mark.parametrize("b, k, n", [(1, 64, 40), (3, 96, 8), (16, 32, 4), (17, 64, 40), (2, 48, 40), (1, 64, 42)])
def test_projection_matches_aten(kind, b, k, n):
    """The step's own matmul (a streaming GEMV for a few rows, K a multiple of 32, N of 4) and its ATen fallback
    for every other shape: both equal ATen's result within one bf16 rounding of the output."""
    from smolvlm.runtime.quantize import Int8Linear

    g = torch.Generator().manual_seed(b * 1000 + k + n)
    x = torch.randn(b, k, generator=g).to(torch.bfloat16)
    w = torch.randn(n, k, generator=g)
    if kind == "int8":
        lin = Int8Linear.from_float(w, torch.bfloat16)
        args = (1, lin.weight, lin.weight_scale, 0)
        ref = torch.ops.aten._weight_int8pack_mm(x, lin.weight, lin.weight_scale).float()
        exact = x.float() @ lin.dequantize().t()
    else:
        args = (0, w.to(torch.bfloat16), torch.empty(0), 0)
        ref = torch.nn.functional.linear(x, args[1]).float()
        exact = x.float() @ args[1].float().t()
    out = kernels.extension().project(x, *args).float()
    assert out.shape == (b, n)
    tol = exact.abs() * 2**-7 + 1e-3 * exact.abs().max()  # one bf16 rounding of each output, plus fp32 sums
    assert ((out - exact).abs() <= tol).all()
    assert ((ref - exact).abs() <= tol).all()


def test_the_steps_logits_are_the_lm_heads():
    for mode in (None, "int8"):
        model = tiny_bf16(mode)
        step = decode_step.for_decoder(model.text_model, model.lm_head)
        h = torch.randn(3, 1, model.cfg.text.hidden_size).to(torch.bfloat16)
        with torch.inference_mode():
            ref, out = model.lm_head(h).float(), step.logits(h).float()
        assert out.shape == ref.shape == (3, 1, model.cfg.text.vocab_size)
        assert (out - ref).abs().max() <= 0.02 * ref.abs().max()


def test_padding_is_ignored():
    """A padded sequence's logits do not depend on what sits in its padding."""
    model = tiny_bf16()
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, 49000, (2, 20), generator=g)
    other = prompt.clone()
    other[1, :7] = torch.randint(0, 49000, (7,), generator=g)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :7] = 0
    follow = torch.randint(0, 49000, (5, 2), generator=g)
    a = decode_logits(model, prompt, mask, follow, use_step=True)
    b = decode_logits(model, other, mask, follow, use_step=True)
    assert torch.equal(a[:, 1], b[:, 1])


def test_built_once_per_weights_and_only_where_it_applies():
    model = tiny_bf16()
    step = decode_step.for_decoder(model.text_model)
    assert step is not None and decode_step.for_decoder(model.text_model) is step
    # float32 (the exact reference path) and unfused projections stay eager
    assert decode_step.for_decoder(prepare_for_inference(VLM(preset("tiny")).eval()).text_model) is None
    assert decode_step.for_decoder(VLM(preset("tiny")).to(torch.bfloat16).text_model) is None
    # LoRA wraps the projections: the step's weights are no longer the model's
    add_lora(model, LoRAConfig(rank=2, targets=["q_proj", "v_proj"]))
    assert decode_step.for_decoder(model.text_model) is None


def test_generation_runs_its_steps_through_it(monkeypatch):
    model = tiny_bf16("int8")
    calls = []
    run = decode_step.DecodeStep.run
    monkeypatch.setattr(decode_step.DecodeStep, "run", lambda self, *a: calls.append(1) or run(self, *a))
    ids = torch.randint(0, 49000, (1, 9), generator=torch.Generator().manual_seed(3))
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    fast = [int(t) for t, _, _ in generate_ids(model, ids, None, params, set())]
    assert len(calls) == 5  # every token after the first (which comes from the prefill)
    monkeypatch.setenv("SMOLVLM_DECODE_STEP", "0")
    eager = [int(t) for t, _, _ in generate_ids(model, ids, None, params, set())]
    assert len(calls) == 5 and len(eager) == len(fast) == 6  # (logits: compared teacher-forced above)
