"""A VLM from separate parts: a SigLIP vision encoder (a checkpoint, or a config for a fresh one) in front of a
Llama / SmolLM2 decoder, with SmolVLM's image tokens added to the decoder's tokenizer."""

from dataclasses import replace
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer

from smolvlm.errors import SmolVLMError
from smolvlm.io.checkpoint import load, parse_dtype, read_config, read_safetensors, resolve, safetensors_files
from smolvlm.io.hf_config import vision_config_from_hf
from smolvlm.models.cnn import CNNConfig
from smolvlm.models.vision import VisionConfig
from smolvlm.models.vlm import VLM, VLMConfig
from smolvlm.processing import ImageProcessingConfig, Processor
from smolvlm.special_tokens import IMAGE, smolvlm_added_tokens


def load_siglip_vision(path: str | Path, dtype: torch.dtype) -> tuple[VisionConfig, dict[str, torch.Tensor]]:
    """A SigLIP (or SiglipVision) checkpoint folder: its vision tower's config and tensors."""
    folder = resolve(str(path))
    hf = read_config(folder)
    vc = hf.get("vision_config", hf) if hf.get("model_type") in ("siglip", "smolvlm", "idefics3") else hf
    if hf.get("model_type") not in ("siglip", "siglip_vision_model", "smolvlm", "idefics3"):
        raise SmolVLMError(f"{folder} is a {hf.get('model_type')!r} checkpoint, not a SigLIP vision encoder")
    cfg = vision_config_from_hf(vc)
    keep = ("embeddings.", "encoder.", "post_layernorm.")

    def key_map(k: str) -> str | None:
        # SiglipModel / SmolVLM name the tower `(model.)vision_model.*`; a saved SiglipVisionModel has no prefix
        k = k.removeprefix("model.").removeprefix("vision_model.")
        return "vision_model." + k if k.startswith(keep) else None  # drops the pooling head and text tower

    return cfg, read_safetensors(safetensors_files(folder), key_map, dtype)


def add_image_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """A copy of a SmolLM2-style tokenizer with SmolVLM's tokens appended (vocabulary padded by 128,
    as SmolVLM pads SmolLM2's 49152 to 49280)."""
    tokenizer = Tokenizer.from_str(tokenizer.to_str())
    base = tokenizer.get_vocab_size()
    added = smolvlm_added_tokens(base, base + 128)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    return tokenizer


def vision_processor(text_processor: Processor, tokenizer: Tokenizer, image_config: ImageProcessingConfig,
                     image_seq_len: int) -> Processor:
    """A SmolVLM processor (SmolVLM's chat template) around a text model's tokenizer with image tokens."""
    return Processor(tokenizer, image_config=image_config, image_seq_len=image_seq_len, chat_template=None,
                     eos_token=text_processor.eos_token, pad_token=text_processor.pad_token)


def assemble(
    vision: str | Path | VisionConfig | CNNConfig,
    decoder: str | Path,
    scale_factor: int = 4,
    image_size: int | None = None,
    dtype: str | torch.dtype = "float32",
    seed: int = 0,
    connector: str = "pixel-shuffle",
    cross_attention_every: int = 2,
    contrastive: bool = False,
    image_positions: bool = False,
) -> tuple[VLM, Processor]:
    """A SmolVLM from parts: a SigLIP checkpoint (or a VisionConfig / CNNConfig for a fresh encoder), a Llama/SmolLM2
    decoder (folder or GGUF). SmolVLM's image tokens are appended to the vocabulary (embedding rows
    initialised to the mean embedding); the connector is freshly initialised."""
    dtype = parse_dtype(dtype)
    text_model, text_processor = load(decoder, dtype)
    if text_model.has_vision:
        raise SmolVLMError(f"{decoder} already has a vision encoder; pass a text-only decoder")
    if isinstance(vision, (VisionConfig, CNNConfig)):
        vision_cfg, vision_state = vision, None
    else:
        vision_cfg, vision_state = load_siglip_vision(vision, dtype)
    if image_size is not None:
        vision_cfg = replace(vision_cfg, image_size=image_size)

    tokenizer = add_image_tokens(text_processor.tokenizer)
    text_cfg = replace(text_model.cfg.text, vocab_size=tokenizer.get_vocab_size())
    cfg = VLMConfig(text=text_cfg, vision=vision_cfg, scale_factor=scale_factor,
                    image_token_id=tokenizer.token_to_id(IMAGE), connector=connector,
                    cross_attention_every=cross_attention_every, contrastive=contrastive,
                    image_positions=image_positions)
    torch.manual_seed(seed)
    model = VLM(cfg).to(dtype)
    with torch.no_grad():
        old = text_model.state_dict()
        for name, p in model.text_model.state_dict().items():
            if name.startswith("cross_layers."):
                continue  # new cross-attention layers: fresh (their gates start closed)
            src = old["text_model." + name]
            if name == "embed_tokens.weight":
                n = min(src.shape[0], p.shape[0])
                p[:n] = src[:n]
                p[n:] = src.float().mean(0).to(dtype)  # new tokens start at the mean embedding
            else:
                p.copy_(src)
        if not text_cfg.tie_word_embeddings:
            head = old["lm_head.weight"]
            n = min(head.shape[0], model.lm_head.weight.shape[0])
            model.lm_head.weight[:n] = head[:n]
            model.lm_head.weight[n:] = head.float().mean(0).to(dtype)
        if vision_state is not None:
            missing = [k for k in model.load_state_dict(vision_state, strict=False).missing_keys
                       if k.startswith("vision_model.")]
            if missing:
                raise SmolVLMError(f"{vision}: the vision checkpoint lacks {missing[:3]}")
    image_config = ImageProcessingConfig(max_image_size=vision_cfg.image_size, longest_edge=4 * vision_cfg.image_size)
    processor = vision_processor(text_processor, tokenizer, image_config, cfg.image_seq_len)
    return model.eval(), processor
