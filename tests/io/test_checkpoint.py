"""Checkpoints: load what transformers saves, save what transformers loads, assemble from parts."""

import json

import pytest
import torch

from reference import make_hf_smolvlm, prompt_ids
from smolvlm.errors import SmolVLMError
from smolvlm.io import assemble, load, save


def hf_logits(hf_model, ids, pixels=None):
    with torch.no_grad():
        return hf_model(input_ids=ids, pixel_values=pixels).logits


def test_load_transformers_folder_gives_same_logits(tiny_hf_checkpoint):
    folder, hf = tiny_hf_checkpoint
    model, processor = load(folder, dtype="float32")
    ids, pixels = prompt_ids([2]), torch.randn(1, 2, 3, 32, 32)
    with torch.no_grad():
        got = model(ids, pixel_values=pixels)
    assert (got - hf_logits(hf, ids, pixels)).abs().max() < 1e-4
    assert processor.image_seq_len == 4 and processor.image_token_id == 49190


@pytest.mark.parametrize("tie", [False, True])
def test_save_then_transformers_loads_same_logits(tmp_path, smolvlm_tokenizer_dir, tie):
    from transformers import AutoTokenizer, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    hf = make_hf_smolvlm(tmp_path / "src", smolvlm_tokenizer_dir, seed=5, tie=tie)
    model, processor = load(tmp_path / "src")
    save(model, processor, tmp_path / "out")
    reloaded = SmolVLMForConditionalGeneration.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids, pixels = prompt_ids([1, 2]), torch.randn(1, 3, 3, 32, 32)
    with torch.no_grad():
        ours = model(ids, pixel_values=pixels)
    assert (hf_logits(reloaded, ids, pixels) - ours).abs().max() < 1e-4
    assert (hf_logits(hf, ids, pixels) - ours).abs().max() < 1e-4
    # the processor files load in transformers too
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.convert_tokens_to_ids("<image>") == 49190
    ip = SmolVLMImageProcessorPil.from_pretrained(tmp_path / "out")
    assert ip.max_image_size["longest_edge"] == 32


def test_sharded_save_roundtrip(tmp_path, tiny_hf_checkpoint):
    folder, _ = tiny_hf_checkpoint
    model, processor = load(folder)
    save(model, processor, tmp_path / "sharded", max_shard_bytes=2_000_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again, _ = load(tmp_path / "sharded")
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)


def test_bfloat16_load_is_bfloat16_and_close(tiny_hf_checkpoint):
    folder, hf = tiny_hf_checkpoint
    model, _ = load(folder, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ids = prompt_ids([1])
    pixels = torch.randn(1, 1, 3, 32, 32)
    with torch.no_grad():
        got = model(ids, pixel_values=pixels).float()
    ref = hf_logits(hf, ids, pixels)
    assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.99


def test_save_refuses_to_overwrite_a_non_checkpoint_folder(tmp_path, tiny_hf_checkpoint):
    model, processor = load(tiny_hf_checkpoint[0])
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SmolVLMError, match="not a checkpoint"):
        save(model, processor, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "no config.json"),
        (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "config.json").write_text('{"model_type": "bert"}'), "unsupported model_type"),
    ],
)
def test_bad_folders_are_clear_errors(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(SmolVLMError, match=message):
        load(tmp_path)


def test_missing_weights_are_a_clear_error(tmp_path, tiny_hf_checkpoint):
    import shutil

    src, _ = tiny_hf_checkpoint
    shutil.copytree(src, tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").unlink()
    with pytest.raises(SmolVLMError, match="no \\*.safetensors"):
        load(tmp_path / "ck")


def test_unknown_dtype_and_unknown_model(tmp_path):
    with pytest.raises(SmolVLMError, match="unknown dtype"):
        load(tmp_path, dtype="float64")
    with pytest.raises(SmolVLMError, match="not found"):
        load(str(tmp_path / "nowhere"))


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(SmolVLMError, match="hub"):
        load("HuggingFaceTB/SmolVLM-256M-Instruct")


def test_assemble_siglip_and_gguf_decoder_loads_in_transformers(tmp_path, gguf_path):
    """A SmolVLM from a (tiny, random) SigLIP checkpoint and the real SmolLM2-135M GGUF: the image
    tokens join the vocabulary, and transformers loads the result with the same logits."""
    from transformers import SiglipVisionConfig, SiglipVisionModel, SmolVLMForConditionalGeneration

    torch.manual_seed(0)
    siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                  num_attention_heads=2, image_size=64, patch_size=16))
    siglip.save_pretrained(tmp_path / "siglip")
    model, processor = assemble(tmp_path / "siglip", gguf_path, scale_factor=2)
    assert model.cfg.text.vocab_size == 49280 and model.cfg.image_token_id == 49190
    assert processor.tokenizer.token_to_id("<end_of_utterance>") == 49279
    vision_sd = siglip.state_dict()
    assert torch.equal(model.vision_model.encoder["layers"][1].mlp.fc2.weight,
                       vision_sd["encoder.layers.1.mlp.fc2.weight"])
    save(model, processor, tmp_path / "vlm")
    hf = SmolVLMForConditionalGeneration.from_pretrained(tmp_path / "vlm", dtype=torch.float32).eval()
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}])
    from PIL import Image

    inputs = processor(text, images=[[Image.new("RGB", (100, 60), (200, 30, 30))]])
    with torch.no_grad():
        ours = model(inputs["input_ids"], pixel_values=inputs["pixel_values"],
                     pixel_attention_mask=inputs["pixel_attention_mask"])
        ref = hf(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                 pixel_attention_mask=inputs["pixel_attention_mask"]).logits
    assert (ours - ref).abs().max() < 1e-3
