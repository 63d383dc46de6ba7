"""Reference objects made with transformers for the tests: tiny random SmolVLM checkpoints and
prompt layouts."""

from pathlib import Path

import torch

IMG = 49190
TOKENS_PER_TILE = 4

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


def prompt_ids(n_tiles_per_image: list[int], text_before=(11126, 42), text_after=(9519, 9531, 42)):
    """Token ids with one block of <image> tokens per image (the layout is the processor's business)."""
    ids = list(text_before)
    for n in n_tiles_per_image:
        ids += [49189] + [IMG] * (TOKENS_PER_TILE * n) + [49189, 198]
    return torch.tensor([ids + list(text_after)])
