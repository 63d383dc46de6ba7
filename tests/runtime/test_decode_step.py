"""The C++ decode step (csrc/decode_step.cpp) against the plain eager decoder it replaces, at every ISA level this
CPU can run: float32 (greedy tokens identical, logits within float32 sums) and bf16 (logits within bf16 rounding),
with dense, int8 and int4 projections (and a float32 model streaming bf16 weights), over a left-padded batch;
built once per set of weights; not used where it does not apply."""

import pytest
import torch

from conftest import skip_above_ceiling
from smolvlm.lora import LoRAConfig, add_lora
from smolvlm.models.decoder import KVCache, rope_cos_sin
from smolvlm.models.vlm import VLM, preset
from smolvlm.runtime import cpu, decode_step, kernels
from smolvlm.runtime.prepare import prepare
from smolvlm.runtime.quantize import quantize_model


def at_level(monkeypatch, level: str) -> None:
    """Run the rest of the test on `level`'s kernels (SMOLVLM_CPU); skip a level this CPU lacks."""
    skip_above_ceiling(level)
    monkeypatch.setenv("SMOLVLM_CPU", level)
    ext = kernels.extension()
    assert ext is not None and ext.level() == level, f"the {level} kernels were not built: {kernels.status()}"


def plain_tiny(dtype: torch.dtype, mode: str | None = None, bf16_exact: bool = False) -> VLM:
    """The plain model of models/ (quantized layers if `mode`): the eager reference."""
    torch.manual_seed(0)
    model = VLM(preset("tiny")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
            if bf16_exact:
                p.copy_(p.to(torch.bfloat16).float())
    model = model.to(dtype)
    return quantize_model(model, mode) if mode else model


def tiny(dtype: torch.dtype, mode: str | None = None, bf16_exact: bool = False) -> tuple[VLM, VLM]:
    """(plain, prepared) with the same weights."""
    return plain_tiny(dtype, mode, bf16_exact), prepare(plain_tiny(dtype, mode, bf16_exact))


def batch(seed: int, steps: int = 12):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 49000, (2, 40), generator=g)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :13] = 0  # the second sequence is 13 tokens shorter: left padding
    return prompt, mask, torch.randint(0, 49000, (steps, 2), generator=g)


@torch.inference_mode()
def decode(model, prompt, mask, follow, step=None, greedy: bool = False):
    """Prefill `prompt` (B, T) eagerly, then `len(follow)` one-token steps, eager (step None) or through
    step.run + step.logits. Feeds `follow` (N, B), or with greedy each step's argmax. Returns the logits
    (N, B, V) float32 and the tokens fed (N, B)."""
    b, t = prompt.shape
    cfg = model.cfg.text
    cache = KVCache(cfg, b, t + len(follow), model.dtype)
    logits = model(prompt, attention_mask=mask, cache=cache, last_only=True)[:, -1]
    out, fed = [], []
    for i in range(len(follow)):
        tok = logits.argmax(-1) if greedy else follow[i]
        fed.append(tok)
        mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype)], dim=1)
        if step is None:
            logits = model(tok[:, None], attention_mask=mask, cache=cache, last_only=True)[:, -1]
        else:
            x = model.embed(tok[:, None])  # (B, 1, D)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -1:]
            cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, x.dtype)
            key_mask = None if bool(mask.all()) else mask.bool()
            h = step.run(x[:, 0], cache.k, cache.v, cache.length, cos[:, 0], sin[:, 0], key_mask)
            cache.length += 1
            logits = step.logits(model.text_model.norm(h[:, None]))[:, -1]
        out.append(logits.float())
    return torch.stack(out), torch.stack(fed)


def test_this_cpus_level_is_built():
    # CI machines have a C++ compiler: the fast step must not silently fall back to eager there
    ext = kernels.extension()
    assert ext is not None, f"no C++ kernels for {cpu.level()}: {kernels.status()}"
    assert ext.level() == cpu.level()


@pytest.mark.parametrize("level", cpu.LEVELS)
@pytest.mark.parametrize("mode", [None, "int8", "int4"])
def test_float32_step_matches_eager_tokens_and_logits(monkeypatch, level, mode):
    at_level(monkeypatch, level)
    plain, model = tiny(torch.float32, mode)
    step = decode_step.for_decoder(model.text_model, model.lm_head)
    assert step is not None
    prompt, mask, follow = batch(1)
    eager, eager_tokens = decode(plain, prompt, mask, follow, greedy=True)
    fast, fast_tokens = decode(model, prompt, mask, follow, step, greedy=True)
    assert torch.equal(eager_tokens, fast_tokens)
    # and through the prepared model itself (FastDecoder runs the step for one-token calls)
    through_model, model_tokens = decode(model, prompt, mask, follow, greedy=True)
    assert torch.equal(eager_tokens, model_tokens)
    for got in (fast, through_model):
        # float32 sums in another order only (int8 / int4: x held as two int8s in both, csrc/gemv_q8.cpp: another
        # order can move an input by one step of 1 / 32258 of its block's max)
        assert (eager - got).abs().max() < 1e-4 * eager.abs().max()


@pytest.mark.parametrize("level", cpu.LEVELS)
@pytest.mark.parametrize("mode", [None, "int8", "int4"])
def test_bf16_step_matches_eager_logits(monkeypatch, level, mode):
    at_level(monkeypatch, level)
    plain, model = tiny(torch.bfloat16, mode)
    step = decode_step.for_decoder(model.text_model, model.lm_head)
    assert step is not None
    prompt, mask, follow = batch(2)
    eager, _ = decode(plain, prompt, mask, follow)
    fast, _ = decode(model, prompt, mask, follow, step)
    cos = torch.nn.functional.cosine_similarity(eager, fast, dim=-1)
    assert cos.min() > 0.9995, cos.min()
    # bf16 rounding apart only: a few bf16 steps of the logits' scale
    assert (eager - fast).abs().max() < 0.05 * eager.abs().max()


@pytest.mark.parametrize("level", cpu.LEVELS)
def test_float32_model_with_bf16_decoder_weights(monkeypatch, level):
    """A float32 model whose decoder weights are exact in bf16 (a bf16 checkpoint loaded as float32) is prepared
    with them stored in bf16: the step runs float32 activations on weights converted on the fly, and gives the
    plain float32 model's tokens."""
    at_level(monkeypatch, level)
    plain, model = tiny(torch.float32, bf16_exact=True)
    block = model.text_model.layers[0]
    assert block.mlp.down_proj.weight.dtype == block.self_attn.fused.weight.dtype == torch.bfloat16
    assert plain.text_model.layers[0].mlp.down_proj.weight.dtype == torch.float32
    step = decode_step.for_decoder(model.text_model, model.lm_head)
    assert step is not None
    prompt, mask, follow = batch(3)
    eager, eager_tokens = decode(plain, prompt, mask, follow, greedy=True)
    fast, fast_tokens = decode(model, prompt, mask, follow, step, greedy=True)
    assert torch.equal(eager_tokens, fast_tokens)
    assert (eager - fast).abs().max() < 1e-4 * eager.abs().max()
    prefill_plain = plain(prompt, attention_mask=mask).float()  # the prefill converts the stored weights too
    with torch.inference_mode():
        prefill_fast = model(prompt, attention_mask=mask).float()
    assert (prefill_plain - prefill_fast).abs().max() < 1e-4 * prefill_plain.abs().max()


def test_the_steps_logits_are_the_lm_heads():
    for dtype, mode in ((torch.bfloat16, None), (torch.bfloat16, "int8"), (torch.float32, None)):
        plain, model = tiny(dtype, mode)
        step = decode_step.for_decoder(model.text_model, model.lm_head)
        h = torch.randn(3, 1, model.cfg.text.hidden_size).to(dtype)
        with torch.inference_mode():
            ref, out = plain.lm_head(h).float(), step.logits(h)
        assert out.dtype == dtype and out.shape == (3, 1, model.cfg.text.vocab_size)
        assert (out.float() - ref).abs().max() <= 0.02 * ref.abs().max()


def test_padding_is_ignored():
    """A padded sequence's logits do not depend on what sits in its padding."""
    _, model = tiny(torch.bfloat16)
    step = decode_step.for_decoder(model.text_model, model.lm_head)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, 49000, (2, 20), generator=g)
    other = prompt.clone()
    other[1, :7] = torch.randint(0, 49000, (7,), generator=g)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :7] = 0
    follow = torch.randint(0, 49000, (5, 2), generator=g)
    a, _ = decode(model, prompt, mask, follow, step)
    b, _ = decode(model, other, mask, follow, step)
    assert torch.equal(a[:, 1], b[:, 1])


def test_built_once_per_weights_and_only_where_it_applies(monkeypatch):
    _, model = tiny(torch.bfloat16)
    step = model.text_model.current_step()
    assert step is not None and model.text_model.current_step() is step  # the same weights: the same step
    assert decode_step.for_decoder(tiny(torch.float32)[1].text_model) is not None
    # float16 activations and a plain (unprepared, so unfused) decoder stay eager
    assert decode_step.for_decoder(prepare(VLM(preset("tiny")).eval().half()).text_model) is None
    assert decode_step.for_decoder(VLM(preset("tiny")).to(torch.bfloat16).text_model) is None
    monkeypatch.setenv("SMOLVLM_DECODE_STEP", "0")  # the switch to compare against eager
    assert model.text_model.current_step() is None
    monkeypatch.delenv("SMOLVLM_DECODE_STEP")
    with torch.no_grad():  # new weights (an assignment): a new step reading them
        block = model.text_model.layers[0]
        block.mlp.down_proj.weight = torch.nn.Parameter(block.mlp.down_proj.weight.clone())
    rebuilt = model.text_model.current_step()
    assert rebuilt is not None and rebuilt is not step
    # LoRA wraps the projections: the step's weights are no longer the model's
    add_lora(model, LoRAConfig(rank=2, targets=["q_proj", "v_proj"]))
    assert model.text_model.current_step() is None


def test_the_step_refuses_activations_of_another_dtype():
    _, model = tiny(torch.float32)
    step = decode_step.for_decoder(model.text_model)
    cfg = model.cfg.text
    cache = KVCache(cfg, 1, 4, torch.float32)
    x = torch.zeros(1, cfg.hidden_size, dtype=torch.bfloat16)
    cos = sin = torch.zeros(1, cfg.head_dim)
    with pytest.raises(RuntimeError, match="x must be"):
        step.run(x, cache.k, cache.v, 0, cos, sin, None)
