"""The model against transformers' SmolVLMForConditionalGeneration on tiny random checkpoints:
logits within 1e-4 in float32, identical greedy tokens, cache/no-cache equality, batching."""

import pytest
import torch

from reference import prompt_ids
from smolvlm.generation import SamplingParams, generate_ids
from smolvlm.io.checkpoint import model_from_state
from smolvlm.io.hf_config import config_from_hf, hf_key_to_ours
from smolvlm.models.connector import pixel_shuffle
from smolvlm.models.vlm import VLM, preset


def ours_from_hf(hf_model) -> VLM:
    cfg = config_from_hf(hf_model.config.to_dict())
    state = {hf_key_to_ours(k, False): v.clone() for k, v in hf_model.state_dict().items()}
    state = {k: v for k, v in state.items() if k is not None}
    return model_from_state(cfg, state, "test")


@pytest.fixture(scope="module")
def pair(tiny_hf_checkpoint):
    _, hf = tiny_hf_checkpoint
    return hf, ours_from_hf(hf)


def test_pixel_shuffle_matches_transformers(tiny_hf_checkpoint):
    _, hf = tiny_hf_checkpoint
    x = torch.randn(3, 64, 5)
    assert torch.equal(pixel_shuffle(x, 2), hf.model.connector.pixel_shuffle(x, 2))
    assert torch.equal(pixel_shuffle(x, 4), hf.model.connector.pixel_shuffle(x, 4))


def test_logits_match_transformers_text_only(pair):
    hf, ours = pair
    ids = torch.randint(0, 49152, (2, 17))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = ours(ids)
    assert (got - ref).abs().max() < 1e-4


def test_logits_match_transformers_with_images(pair):
    hf, ours = pair
    torch.manual_seed(1)
    ids = prompt_ids([3, 1])
    pixels = torch.randn(1, 4, 3, 32, 32)  # image 1: 3 tiles; image 2: 1 tile
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels).logits
        got = ours(ids, pixel_values=pixels)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() < 1e-4


def test_padded_images_and_pixel_mask_match_transformers(pair):
    """A batch whose second prompt has fewer images (all-zero padding images) and an image whose
    pixels are partly padding (pixel_attention_mask), as the processor makes them."""
    hf, ours = pair
    torch.manual_seed(2)
    pixels = torch.randn(2, 2, 3, 32, 32)
    pixels[1, 1] = 0  # padding image
    mask = torch.ones(2, 2, 32, 32, dtype=torch.bool)
    mask[0, 1, :, 20:] = False  # right part of this image is padding
    pixels[0, 1, :, :, 20:] = 0
    mask[1, 1] = False
    ids = torch.cat([prompt_ids([1, 1]), prompt_ids([1], text_after=(9519, 9531, 42, 5, 6, 7, 8, 9, 10, 11))])
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, pixel_attention_mask=mask).logits
        got = ours(ids, pixel_values=pixels, pixel_attention_mask=mask)
    assert (got - ref).abs().max() < 1e-4


def test_greedy_tokens_match_transformers_generate(pair):
    hf, ours = pair
    torch.manual_seed(3)
    ids = prompt_ids([2])
    pixels = torch.randn(1, 2, 3, 32, 32)
    n = 32
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, pixel_values=pixels, do_sample=False, max_new_tokens=n,
                          min_new_tokens=n)[0, ids.shape[1]:].tolist()
    got = [int(t[0]) for t, _, _ in generate_ids(
        ours, ids, None, SamplingParams(max_new_tokens=n, ignore_eos=True), set(), pixel_values=pixels)]
    assert len(got) == n
    assert got == ref


def test_generation_with_and_without_cache_identical(pair):
    _, ours = pair
    torch.manual_seed(4)
    ids = prompt_ids([1])
    pixels = torch.randn(1, 1, 3, 32, 32)
    runs = []
    for use_cache in (True, False):
        params = SamplingParams(max_new_tokens=24, ignore_eos=True, use_cache=use_cache)
        steps = list(generate_ids(ours, ids, None, params, set(), pixel_values=pixels))
        runs.append(([int(t[0]) for t, _, _ in steps], torch.stack([lp for _, lp, _ in steps])))
    assert runs[0][0] == runs[1][0]
    assert torch.allclose(runs[0][1], runs[1][1], atol=1e-4)


def test_left_padded_batch_matches_single_prompts(pair):
    _, ours = pair
    a = torch.tensor([[11126, 42, 905, 28, 732, 314, 260, 3575, 282]])
    b = torch.tensor([[19556, 905, 28]])
    batch = torch.tensor([a[0].tolist(), [2] * 6 + b[0].tolist()])
    mask = torch.tensor([[1] * 9, [0] * 6 + [1] * 3])
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    batched = [t.tolist() for t, _, _ in generate_ids(ours, batch, mask, params, set())]
    single_a = [int(t[0]) for t, _, _ in generate_ids(ours, a, None, params, set())]
    single_b = [int(t[0]) for t, _, _ in generate_ids(ours, b, None, params, set())]
    assert [s[0] for s in batched] == single_a
    assert [s[1] for s in batched] == single_b


def test_sampling_is_seeded_and_respects_top_k(pair):
    _, ours = pair
    ids = torch.tensor([[11126, 42, 905]])

    def run(seed, top_k=0):
        p = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=top_k, seed=seed, ignore_eos=True)
        return [int(t[0]) for t, _, _ in generate_ids(ours, ids, None, p, set())]

    assert run(7) == run(7)
    assert run(7) != run(8)
    # top_k=1 is greedy whatever the temperature
    greedy = [int(t[0]) for t, _, _ in generate_ids(ours, ids, None, SamplingParams(10, ignore_eos=True), set())]
    assert run(9, top_k=1) == greedy


def test_prompt_longer_than_context_is_a_clear_error(pair):
    from smolvlm.errors import SmolVLMError

    _, ours = pair
    ids = torch.zeros(1, ours.cfg.text.max_position_embeddings + 1, dtype=torch.long)
    with pytest.raises(SmolVLMError, match="context"):
        next(generate_ids(ours, ids, None, SamplingParams(4), set()))


def test_presets_have_smolvlm_shapes():
    n = sum(p.numel() for p in VLM(preset("tiny")).parameters())
    assert n > 0
    with torch.device("meta"):
        m256 = VLM(preset("smolvlm-256m"))
        m500 = VLM(preset("smolvlm-500m"))
    p256 = sum(p.numel() for p in m256.parameters())
    p500 = sum(p.numel() for p in m500.parameters())
    assert 250e6 < p256 < 260e6  # SmolVLM-256M: 256.5M with its untied head
    assert 500e6 < p500 < 510e6
    assert preset("smolvlm-256m").image_seq_len == 64
