"""runtime.prepare(model) against the plain model of models/: the Fast* classes keep the state dict, step aside
under autograd, LoRA and dtype changes, and give the plain model's results at every CPU level this machine can
run (SMOLVLM_CPU lowers the level; a level this CPU lacks is skipped), step by step through generation."""

import pytest
import torch
import torch.nn.functional as F

from conftest import CPU_CEILING, levels_up_to_ceiling, skip_above_ceiling
from reference import prompt_ids
from smolvlm.generation import ImageEmbeddingCache, SamplingParams, generate_ids
from smolvlm.models import vlm as vlm_module
from smolvlm.models.decoder import KVCache
from smolvlm.models.vlm import VLM, preset
from smolvlm.runtime import cpu, modules
from smolvlm.runtime.prepare import prepare

LEVELS = list(cpu.LEVELS)


def tiny(seed=0, dtype=torch.float32) -> VLM:
    torch.manual_seed(seed)
    model = VLM(preset("tiny")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.to(dtype)


@pytest.fixture(params=LEVELS)
def level(request, monkeypatch):
    """Each ISA level in turn, forced with SMOLVLM_CPU; levels above this CPU's are skipped."""
    name = request.param
    skip_above_ceiling(name)
    monkeypatch.setenv(cpu.ENV, name)
    assert cpu.level() == name
    return name


def step_logits(model, ids, follow, pixels=None) -> torch.Tensor:
    """Prefill ids (1, T) (with images), then feed `follow` (N,) one token at a time: every step's logits (N, V)
    in float32, the first one the prefill's."""
    with torch.inference_mode():
        cache = KVCache(model.cfg.text, 1, ids.shape[1] + len(follow), model.dtype)
        out = [model(ids, pixel_values=pixels, cache=cache, last_only=True)[0, -1]]
        for tok in follow[:-1]:
            out.append(model(tok.view(1, 1), cache=cache, last_only=True)[0, -1])
    return torch.stack(out).float()


def test_prepare_swaps_classes_and_keeps_state_dict_and_logits():
    plain, fast = tiny(), tiny()
    before = {k: v.clone() for k, v in fast.state_dict().items()}
    prepare(fast)
    after = fast.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    block = fast.text_model.layers[0]
    assert type(block.self_attn) is modules.FastAttention and type(block.mlp) is modules.FastMLP
    assert type(fast.text_model) is modules.FastDecoder and type(fast.lm_head) is modules.FastLinear
    assert type(fast.vision_model.encoder["layers"][0].self_attn) is modules.FastVisionAttention
    assert block.self_attn.fused.intact(block.self_attn) and not block.self_attn.fused.usable(block.self_attn)
    ids, pixels = prompt_ids([2]), torch.randn(1, 2, 3, 32, 32)
    with torch.no_grad():
        assert (fast(ids, pixel_values=pixels) - plain(ids, pixel_values=pixels)).abs().max() < 1e-5
    assert prepare(fast) is fast  # again: harmless


def test_prepared_model_still_trains_through_its_own_parameters():
    model = prepare(tiny())
    q = model.text_model.layers[0].self_attn.q_proj
    loss = model(prompt_ids([1]), pixel_values=torch.randn(1, 1, 3, 32, 32)).logsumexp(-1).mean()
    loss.backward()
    assert q.weight.grad is not None and q.weight.grad.abs().sum() > 0
    with torch.no_grad():  # an optimizer step (in place) moves the fused weight along with it
        q.weight -= 0.1 * q.weight.grad
    fused = model.text_model.layers[0].self_attn.fused
    assert torch.equal(fused.weight[: q.weight.shape[0]], q.weight)


def test_lora_wrapping_disables_fusion_and_is_used():
    from smolvlm.lora import LoRAConfig, add_lora

    model = prepare(tiny())
    ids, pixels = prompt_ids([1]), torch.randn(1, 1, 3, 32, 32)
    add_lora(model, LoRAConfig(rank=2, targets=["q_proj", "v_proj", "up_proj"]))
    for m in model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B.weight, std=0.5)
    with torch.no_grad():
        with_lora = model(ids, pixel_values=pixels)
        attn = model.text_model.layers[0].self_attn
        assert not attn.fused.intact(attn)
        for m in model.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.weight.zero_()
        without = model(ids, pixel_values=pixels)
    assert (with_lora - without).abs().max() > 1e-3  # the adapters are really in the computation


def test_dtype_change_after_prepare_falls_back_to_the_plain_projections():
    model = prepare(tiny()).to(torch.bfloat16)
    ref = tiny().to(torch.bfloat16)
    attn = model.text_model.layers[0].self_attn
    assert not attn.fused.intact(attn)  # .to() made new weights: the fused float32 copy is stale, not used
    ids, pixels = prompt_ids([1]), torch.randn(1, 1, 3, 32, 32)
    with torch.no_grad():
        got, want = model(ids, pixel_values=pixels).float(), ref(ids, pixel_values=pixels).float()
    # the bf16 weights, not the stale float32 copy: within bf16 rounding of the plain bf16 model
    assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999


def test_every_level_decodes_a_long_cache_like_the_plain_model(level):
    model, plain = prepare(tiny()), tiny()
    n = 392  # a cache far longer than the other tests' prompts
    ids = torch.randint(0, 49000, (1, n), generator=torch.Generator().manual_seed(0))
    follow = torch.randint(0, 49000, (6,), generator=torch.Generator().manual_seed(1))
    got, ref = step_logits(model, ids, follow), step_logits(plain, ids, follow)
    assert (got - ref).abs().max() < 1e-4, level


def test_every_level_generates_the_plain_models_tokens_at_every_step(level):
    """float32: the same greedy tokens, and every step's log-probability, as the plain model."""
    model, plain = prepare(tiny()), tiny()
    ids, pixels = prompt_ids([1]), torch.randn(1, 1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    got = [(int(t[0]), float(lp[0])) for t, lp, _ in generate_ids(model, ids, None, params, set(), pixel_values=pixels)]
    ref = [(int(t[0]), float(lp[0])) for t, lp, _ in generate_ids(plain, ids, None, params, set(), pixel_values=pixels)]
    assert [t for t, _ in got] == [t for t, _ in ref]
    assert max(abs(a - b) for (_, a), (_, b) in zip(got, ref, strict=True)) < 1e-4


def test_bf16_fast_path_follows_the_plain_model_at_every_step(level):
    """bf16 (native or emulated): teacher-forced, every step's logits within bf16 rounding of the plain bf16
    model's, and the fast model's top token is the plain one wherever the plain model is not near a tie."""
    model, plain = prepare(tiny(dtype=torch.bfloat16)), tiny(dtype=torch.bfloat16)
    ids, pixels = prompt_ids([1]), torch.randn(1, 1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    follow = torch.randint(0, 49000, (10,), generator=torch.Generator().manual_seed(4))
    got, ref = step_logits(model, ids, follow, pixels), step_logits(plain, ids, follow, pixels)
    cos = F.cosine_similarity(got, ref, dim=-1)
    assert cos.min() > 0.999, (level, cos)
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.05 * ref.abs().max()
    assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])


def test_vision_fast_path_and_batched_tiles_close_to_plain(level, monkeypatch):
    monkeypatch.setattr(vlm_module, "VISION_BATCH", 3)  # 7 tiles go 3 at a time
    pixels = torch.randn(1, 7, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    for dtype in (torch.float32, torch.bfloat16):
        plain, model = tiny(dtype=dtype), prepare(tiny(dtype=dtype))
        with torch.inference_mode():
            ref, got = plain.encode_images(pixels), model.encode_images(pixels)
        assert got.shape == ref.shape == (7, *ref.shape[1:])
        if dtype == torch.float32:
            assert (got - ref).abs().max() < 1e-4, level
        else:
            assert F.cosine_similarity(got.float().flatten(), ref.float().flatten(), dim=0) > 0.999, level


def test_packed_onednn_linear_only_where_bf16_is_native(monkeypatch):
    if not modules.ONEDNN_LINEAR:
        pytest.skip("this torch has no oneDNN linear")
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 96).to(torch.bfloat16)
    x = torch.randn(3, 50, 64, dtype=torch.bfloat16)
    packed = modules.PackedWeight()
    with torch.no_grad():
        monkeypatch.setenv(cpu.ENV, "avx2")  # no native bf16: oneDNN's bf16 packing must not be touched
        modules.packed_linear(x, layer, packed)
        assert packed.packed is None
        monkeypatch.setenv(cpu.ENV, CPU_CEILING)  # the run's own level
        if not cpu.native_bf16():
            pytest.skip(f"this CPU has no native bf16 (level {cpu.level()}): the packed path is not used here")
        for gelu in (False, True):
            ref = F.linear(x.float(), layer.weight.float(), layer.bias.float())
            ref = F.gelu(ref, approximate="tanh") if gelu else ref
            got = modules.packed_linear(x, layer, packed, gelu=gelu)
            assert got.dtype == torch.bfloat16 and got.shape == (3, 50, 96)
            assert (got.float() - ref).abs().max() < 0.02 * ref.abs().max()
        first = packed.packed
        assert first is not None
        modules.packed_linear(x, layer, packed)
        assert packed.packed is first  # an unchanged weight is packed once
        layer.weight.mul_(-1)  # an in-place update (as an optimizer step): the packed copy must follow
        flipped = modules.packed_linear(x, layer, packed).float()
        ref = F.linear(x.float(), layer.weight.float(), layer.bias.float())
        assert (flipped - ref).abs().max() < 0.02 * ref.abs().max()
        layer.weight = torch.nn.Parameter(torch.zeros_like(layer.weight))  # reassignment too
        assert torch.equal(modules.packed_linear(x, layer, packed), layer.bias.expand(3, 50, 96))
    with torch.inference_mode():  # weights made under inference mode have no version counter
        made_here = torch.nn.Linear(64, 96).to(torch.bfloat16)
        got = modules.packed_linear(x, made_here, modules.PackedWeight()).float()
        ref = F.linear(x.float(), made_here.weight.float(), made_here.bias.float())
        assert (got - ref).abs().max() < 0.02 * ref.abs().max()


def test_packed_onednn_linear_in_float32_from_avx2_up(monkeypatch):
    if not modules.ONEDNN_LINEAR or not cpu.is_x86():
        pytest.skip("float32 packing is used on x86 with oneDNN only")
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 96)
    x = torch.randn(3, 50, 64)
    with torch.no_grad():
        for level in levels_up_to_ceiling():
            monkeypatch.setenv(cpu.ENV, level)
            for gelu in (False, True):
                packed = modules.PackedWeight()
                ref = F.linear(x, layer.weight, layer.bias)
                ref = F.gelu(ref, approximate="tanh") if gelu else ref
                got = modules.packed_linear(x, layer, packed, gelu=gelu)
                assert (packed.packed is not None) == (level != "generic"), level
                assert got.dtype == torch.float32 and got.shape == (3, 50, 96)
                assert (got - ref).abs().max() < 1e-5 * ref.abs().max(), (level, gelu)
    with torch.enable_grad():  # training keeps ATen's matmul (autograd)
        packed = modules.PackedWeight()
        modules.packed_linear(x, layer, packed)
        assert packed.packed is None


def test_vision_tower_packs_its_linears_only_in_inference():
    if not modules.ONEDNN_LINEAR or not cpu.native_bf16():
        pytest.skip(f"packed oneDNN bf16 linears need native bf16 (this CPU's level: {cpu.level()})")
    model = prepare(tiny(dtype=torch.bfloat16))
    pixels = torch.randn(1, 2, 3, 32, 32)
    block = model.vision_model.encoder["layers"][0]
    model.encode_images(pixels).sum().backward()  # training: plain math, nothing packed
    assert block.mlp.packed_fc1.packed is None
    with torch.inference_mode():
        model.encode_images(pixels)
    for packed in (block.self_attn.packed_qkv, block.self_attn.packed_out, block.mlp.packed_fc1,
                   block.mlp.packed_fc2):
        assert packed.packed is not None


def test_image_embedding_cache_reuses_tiles_and_sees_weight_updates():
    model = tiny()
    calls = []
    original = model.encode_images
    model.encode_images = lambda px, mask=None: calls.append(px.shape[1]) or original(px, mask)
    a, b = torch.randn(1, 2, 3, 32, 32), torch.randn(1, 1, 3, 32, 32)
    cache = ImageEmbeddingCache()
    with torch.inference_mode():
        first = cache.encode(model, a, None)
        both = cache.encode(model, torch.cat([a, b], dim=1), None)  # the next chat turn
    assert calls == [2, 1]  # only the new tile went through the tower
    assert torch.equal(both[:2], first)
    assert (both - original(torch.cat([a, b], dim=1))).abs().max() < 1e-6
    with torch.no_grad():
        model.connector.modality_projection["proj"].weight.mul_(2)  # an optimizer step
    with torch.inference_mode():
        again = cache.encode(model, a, None)
    assert calls == [2, 1, 2] and (again - 2 * first).abs().max() < 1e-5


def test_the_image_cache_belongs_to_its_conversation_not_to_the_model(tiny_hf_checkpoint):
    """generate without a cache runs the vision tower every time and leaves nothing on the model; a chat session
    and the server's engine each own one, so a re-sent image costs a hash."""
    from PIL import Image

    from smolvlm.cli.chat import Chat
    from smolvlm.io import load
    from smolvlm.serve.engine import Engine

    model, processor = load(tiny_hf_checkpoint[0])
    calls = []
    original = model.encode_images
    model.encode_images = lambda px, mask=None: calls.append(px.shape[1]) or original(px, mask)
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}],
        add_generation_prompt=True)
    inputs = processor(text, images=[[image]])
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    for _ in range(2):
        list(generate_ids(model, inputs["input_ids"], None, params, set(), inputs["pixel_values"],
                          inputs.get("pixel_attention_mask")))
    assert len(calls) == 2 and not any(isinstance(v, ImageEmbeddingCache) for v in vars(model).values())
    engine = Engine(model, processor)
    engine.encode(text, [image])
    engine.encode(text, [image])
    assert len(calls) == 3  # the engine's second request reused the tiles
    session = Chat(model, processor, params)
    assert isinstance(session.image_cache, ImageEmbeddingCache) and session.image_cache is not engine.image_cache


def test_a_level_above_this_cpu_is_a_clear_error(monkeypatch):
    from smolvlm.errors import SmolVLMError

    monkeypatch.setenv(cpu.ENV, "no-such-level")
    with pytest.raises(SmolVLMError, match="not a level"):
        cpu.level()
    if cpu.detected_level() != "avx512_bf16":
        monkeypatch.setenv(cpu.ENV, "avx512_bf16")
        with pytest.raises(SmolVLMError, match="lacks"):
            cpu.level()


def test_dtype_auto_follows_the_level(monkeypatch):
    monkeypatch.setenv(cpu.ENV, "avx2")
    assert cpu.resolve_dtype("auto") == torch.float32
    monkeypatch.setenv(cpu.ENV, "generic")
    assert cpu.resolve_dtype("auto") == torch.float32
    if cpu.detected_level() == "avx512_bf16":
        monkeypatch.delenv(cpu.ENV)
        assert cpu.resolve_dtype("auto") == torch.bfloat16
