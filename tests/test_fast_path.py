"""The inference fast path against the plain one: fused q/k/v and gate/up (state dict unchanged, LoRA
and training untouched), decode attention over the filled cache, bf16 matmul attention in the vision
tower, oneDNN's packed linears there, batched tiles, the per-model cache of image embeddings."""

import pytest
import torch
import torch.nn.functional as F

from reference import prompt_ids
from smolvlm.generation import SamplingParams, encode_images_cached, generate_ids
from smolvlm.models import vision as vision_module
from smolvlm.models import vlm as vlm_module
from smolvlm.models.decoder import KVCache
from smolvlm.models.vlm import VLM, preset
from smolvlm.runtime.quantize import prepare_for_inference


def tiny(seed=0, dtype=torch.float32) -> VLM:
    torch.manual_seed(seed)
    model = VLM(preset("tiny")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.to(dtype)


def test_fusion_keeps_state_dict_and_logits():
    plain, fused = tiny(), tiny()
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    prepare_for_inference(fused)
    after = fused.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    attn = fused.text_model.layers[0].self_attn
    assert attn.__dict__["_fused"].intact(attn) and not attn.__dict__["_fused"].usable(attn)  # grad mode
    ids, pixels = prompt_ids([2]), torch.randn(1, 2, 3, 32, 32)
    with torch.no_grad():
        assert (fused(ids, pixel_values=pixels) - plain(ids, pixel_values=pixels)).abs().max() < 1e-5


def test_fused_model_still_trains_through_its_own_parameters():
    model = prepare_for_inference(tiny())
    q = model.text_model.layers[0].self_attn.q_proj
    ids = prompt_ids([1])
    loss = model(ids, pixel_values=torch.randn(1, 1, 3, 32, 32)).logsumexp(-1).mean()
    loss.backward()
    assert q.weight.grad is not None and q.weight.grad.abs().sum() > 0
    # an optimizer step (in place) moves the fused weight along with it
    with torch.no_grad():
        q.weight -= 0.1 * q.weight.grad
    fused = model.text_model.layers[0].self_attn.__dict__["_fused"]
    assert torch.equal(fused.weight[: q.weight.shape[0]], q.weight)


def test_lora_wrapping_disables_fusion_and_is_used():
    from smolvlm.lora import LoRAConfig, add_lora

    model = prepare_for_inference(tiny())
    ids = prompt_ids([1])
    pixels = torch.randn(1, 1, 3, 32, 32)
    add_lora(model, LoRAConfig(rank=2, targets=["q_proj", "v_proj", "up_proj"]))
    for m in model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B.weight, std=0.5)
    with torch.no_grad():
        with_lora = model(ids, pixel_values=pixels)
        attn = model.text_model.layers[0].self_attn
        assert not attn.__dict__["_fused"].intact(attn)
        for m in model.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.weight.zero_()
        without = model(ids, pixel_values=pixels)
    assert (with_lora - without).abs().max() > 1e-3  # the adapters are really in the computation


def test_dtype_change_after_fusion_falls_back_correctly():
    model = prepare_for_inference(tiny())
    ref = tiny().to(torch.bfloat16)
    model = model.to(torch.bfloat16)
    ids = prompt_ids([1])
    pixels = torch.randn(1, 1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(ids, pixel_values=pixels), ref(ids, pixel_values=pixels))


def test_fused_decode_over_a_long_cache_matches_plain():
    model = prepare_for_inference(tiny())
    plain = tiny()
    n = 392  # a cache far longer than the other tests' prompts
    ids = torch.randint(0, 49000, (1, n))
    with torch.inference_mode():
        caches = [KVCache(m.cfg.text, 1, n + 1, m.dtype) for m in (model, plain)]
        for m, c in zip((model, plain), caches, strict=True):
            m(ids, cache=c)
        nxt = torch.tensor([[5]])
        got = model(nxt, cache=caches[0])
        ref = plain(nxt, cache=caches[1])
    assert (got - ref).abs().max() < 1e-4


def test_bf16_vision_fast_path_and_batched_tiles_close_to_plain(monkeypatch):
    model = tiny(dtype=torch.bfloat16)
    pixels = torch.randn(1, 7, 3, 32, 32)
    ref = model.encode_images(pixels).detach()  # grad mode: SDPA and F.gelu, one batch
    with torch.inference_mode():
        monkeypatch.setattr(vlm_module, "VISION_BATCH", 3)
        monkeypatch.setattr(vision_module, "HEADS_PER_CHUNK", 1)  # several chunks even with the tiny preset's heads
        got = model.encode_images(pixels)  # chunked matmul attention, oneDNN linear + GELU, tiles 3 at a time
    assert got.shape == ref.shape
    assert F.cosine_similarity(got.float().flatten(), ref.float().flatten(), dim=0) > 0.999


def test_packed_onednn_linear_matches_f_linear_and_follows_weight_updates():
    if not vision_module.ONEDNN_LINEAR:
        pytest.skip("this torch has no oneDNN linear")
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 96).to(torch.bfloat16)
    x = torch.randn(3, 50, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        for gelu in (False, True):
            ref = F.linear(x.float(), layer.weight.float(), layer.bias.float())
            ref = F.gelu(ref, approximate="tanh") if gelu else ref
            got = vision_module.inference_linear(x, layer, gelu=gelu)
            assert got.dtype == torch.bfloat16 and got.shape == (3, 50, 96)
            assert (got.float() - ref).abs().max() < 0.02 * ref.abs().max()
        packed = layer.__dict__["_packed_weight"][1]
        vision_module.inference_linear(x, layer)
        assert layer.__dict__["_packed_weight"][1] is packed  # an unchanged weight is packed once
        layer.weight.mul_(-1)  # an in-place update (as an optimizer step): the packed copy must follow
        flipped = vision_module.inference_linear(x, layer).float()
        ref = F.linear(x.float(), layer.weight.float(), layer.bias.float())
        assert (flipped - ref).abs().max() < 0.02 * ref.abs().max()
        layer.weight = torch.nn.Parameter(torch.zeros_like(layer.weight))  # reassignment too
        assert torch.equal(vision_module.inference_linear(x, layer), layer.bias.expand(3, 50, 96))
    assert "_packed_weight" not in layer.state_dict() and set(layer.state_dict()) == {"weight", "bias"}
    with torch.inference_mode():  # weights made under inference mode have no version counter
        made_here = torch.nn.Linear(64, 96).to(torch.bfloat16)
        got = vision_module.inference_linear(x, made_here).float()
        ref = F.linear(x.float(), made_here.weight.float(), made_here.bias.float())
        assert (got - ref).abs().max() < 0.02 * ref.abs().max()


def test_vision_tower_uses_packed_linears_only_in_bf16_inference():
    if not vision_module.ONEDNN_LINEAR:
        pytest.skip("this torch has no oneDNN linear")
    model = tiny(dtype=torch.bfloat16)
    prepare_for_inference(model)
    pixels = torch.randn(1, 2, 3, 32, 32)
    block = model.vision_model.encoder["layers"][0]
    model.encode_images(pixels).sum().backward()  # training: plain modules, nothing packed
    assert "_packed_weight" not in block.mlp.fc1.__dict__
    with torch.inference_mode():
        model.encode_images(pixels)
    fused = block.self_attn.__dict__["_fused"]
    for owner in (fused, block.self_attn.out_proj, block.mlp.fc1, block.mlp.fc2):
        assert "_packed_weight" in owner.__dict__


def test_chunked_matmul_attention_matches_sdpa_with_padding_mask(monkeypatch):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8) for _ in range(3))  # 3 heads: chunks of 2 leave a partial last chunk
    mask = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    mask[1, ..., 6:] = False  # the second image's last 4 patches are padding
    monkeypatch.setattr(vision_module, "HEADS_PER_CHUNK", 2)
    got = vision_module.matmul_attention(q, k, v, mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (got - ref).abs().max() < 1e-5


def test_image_embedding_cache_reuses_tiles_and_sees_weight_updates():
    model = tiny()
    calls = []
    original = model.encode_images
    model.encode_images = lambda px, mask=None: calls.append(px.shape[1]) or original(px, mask)
    a, b = torch.randn(1, 2, 3, 32, 32), torch.randn(1, 1, 3, 32, 32)
    with torch.inference_mode():
        first = encode_images_cached(model, a, None)
        both = encode_images_cached(model, torch.cat([a, b], dim=1), None)  # the next chat turn
    assert calls == [2, 1]  # only the new tile went through the tower
    assert torch.equal(both[:2], first)
    assert (both - original(torch.cat([a, b], dim=1))).abs().max() < 1e-6
    with torch.no_grad():
        model.connector.modality_projection["proj"].weight.mul_(2)  # an optimizer step
    with torch.inference_mode():
        again = encode_images_cached(model, a, None)
    assert calls == [2, 1, 2] and (again - 2 * first).abs().max() < 1e-5


def test_fused_bf16_generation_close_to_plain():
    model = prepare_for_inference(tiny(dtype=torch.bfloat16))
    plain = tiny(dtype=torch.bfloat16)
    ids, pixels = prompt_ids([1]), torch.randn(1, 1, 3, 32, 32)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    got = [lp for _, lp, _ in generate_ids(model, ids, None, params, set(), pixel_values=pixels)]
    ref = [lp for _, lp, _ in generate_ids(plain, ids, None, params, set(), pixel_values=pixels)]
    assert abs(float(got[0][0]) - float(ref[0][0])) < 0.05
