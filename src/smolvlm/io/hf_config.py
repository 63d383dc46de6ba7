"""Hugging Face names <-> ours: config.json <-> VLMConfig, and tensor names (ours are SmolVLM's minus its `model.`
prefix, so mapping a state dict is a prefix swap)."""

import dataclasses

import torch

from smolvlm.errors import SmolVLMError
from smolvlm.models.cnn import CNNConfig
from smolvlm.models.decoder import DecoderConfig
from smolvlm.models.vision import VisionConfig
from smolvlm.models.vlm import VLMConfig

# "smolvlm_variant": smolvlm's own options beyond the SmolVLM layout (a CNN vision encoder, the mlp / ldp /
# cross-attention connectors, shared decoder layers, a contrastive head: the top-level keys "connector",
# "cross_attention_every", "contrastive" and the text config's "layer_repeats" say which); the distinct
# model_type makes transformers refuse such a checkpoint instead of loading it wrongly.
VARIANT_MODEL_TYPE = "smolvlm_variant"
VLM_MODEL_TYPES = ("smolvlm", "idefics3", VARIANT_MODEL_TYPE)
TEXT_MODEL_TYPES = ("llama",)


def text_config_from_hf(c: dict) -> DecoderConfig:
    rope = c.get("rope_parameters") or {}
    if rope.get("rope_type", "default") not in ("default", None) or c.get("rope_scaling"):
        raise SmolVLMError(f"unsupported RoPE scaling {rope or c.get('rope_scaling')}; only plain RoPE is")
    heads = c["num_attention_heads"]
    return DecoderConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads,
        rms_norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
        max_position_embeddings=c.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        layer_repeats=c.get("layer_repeats", 1),  # smolvlm_variant only
    )


def vision_config_from_hf(c: dict) -> VisionConfig:
    return VisionConfig(
        hidden_size=c.get("hidden_size", 768),
        intermediate_size=c.get("intermediate_size", 3072),
        num_layers=c.get("num_hidden_layers", 12),
        num_heads=c.get("num_attention_heads", 12),
        num_channels=c.get("num_channels", 3),
        image_size=c.get("image_size", 224),
        patch_size=c.get("patch_size", 32),
        layer_norm_eps=c.get("layer_norm_eps", 1e-6),
    )


def cnn_config_from_dict(c: dict) -> CNNConfig:
    names = {f.name for f in dataclasses.fields(CNNConfig)}
    return CNNConfig(**{k: v for k, v in c.items() if k in names})


def config_from_hf(c: dict) -> VLMConfig:
    model_type = c.get("model_type")
    if model_type in VLM_MODEL_TYPES:
        text = text_config_from_hf(c["text_config"])
        # SmolVLM decides tying at the top level of its config
        text.tie_word_embeddings = bool(c.get("tie_word_embeddings", False))
        vc = c.get("vision_config") or {}
        return VLMConfig(
            text=text,
            vision=cnn_config_from_dict(vc) if vc.get("model_type") == "smolvlm_cnn" else vision_config_from_hf(vc),
            scale_factor=c.get("scale_factor", 2),
            image_token_id=c.get("image_token_id", 128257),
            connector=c.get("connector", "pixel-shuffle"),
            cross_attention_every=c.get("cross_attention_every", 2),
            contrastive=bool(c.get("contrastive", False)),
            image_positions=bool(c.get("image_positions", False)),
        )
    if model_type in TEXT_MODEL_TYPES:
        return VLMConfig(text=text_config_from_hf(c), vision=None)
    raise SmolVLMError(
        f"unsupported model_type {model_type!r} in config.json; smolvlm loads "
        f"{', '.join(VLM_MODEL_TYPES + TEXT_MODEL_TYPES)} checkpoints"
    )


def text_config_to_hf(t: DecoderConfig, special: dict) -> dict:
    return {
        "model_type": "llama",
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads,
        "head_dim": t.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": t.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
        "rope_theta": t.rope_theta,  # for readers of the older layout
        "max_position_embeddings": t.max_position_embeddings,
        "tie_word_embeddings": t.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        **({"layer_repeats": t.layer_repeats} if t.layer_repeats != 1 else {}),
        **special,
    }


def config_to_hf(cfg: VLMConfig, special: dict, dtype: torch.dtype) -> dict:
    """special: bos/eos/pad token ids for the text config."""
    dtype_name = str(dtype).removeprefix("torch.")
    if cfg.vision is None:
        if cfg.text.layer_repeats != 1:
            raise SmolVLMError("a text-only model with shared layers (layer_repeats) has no Llama layout to save "
                               "as; give it a vision encoder or layer_repeats 1")
        return {"architectures": ["LlamaForCausalLM"], **text_config_to_hf(cfg.text, special), "dtype": dtype_name}
    v = cfg.vision
    if isinstance(v, CNNConfig):
        vision_config = {"model_type": "smolvlm_cnn", **dataclasses.asdict(v)}
    else:
        vision_config = {
            "model_type": "smolvlm_vision",
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_layers,
            "num_attention_heads": v.num_heads,
            "num_channels": v.num_channels,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": v.layer_norm_eps,
        }
    smolvlm_layout = cfg.smolvlm_layout
    options = {}
    if not smolvlm_layout:
        options = {"connector": cfg.connector, "contrastive": cfg.contrastive, "image_positions": cfg.image_positions}
        if cfg.connector == "cross-attention":
            options["cross_attention_every"] = cfg.cross_attention_every
    return {
        "architectures": ["SmolVLMForConditionalGeneration" if smolvlm_layout else "SmolVLMVariant"],
        "model_type": "smolvlm" if smolvlm_layout else VARIANT_MODEL_TYPE,
        "image_token_id": cfg.image_token_id,
        "scale_factor": cfg.scale_factor,
        **options,
        "tie_word_embeddings": cfg.text.tie_word_embeddings,
        "dtype": dtype_name,
        "vision_config": vision_config,
        "text_config": text_config_to_hf(cfg.text, special),
    }


# ---------------------------------------------------------------------------------------------
# tensor names


def hf_key_to_ours(key: str, text_only: bool) -> str | None:
    """Map a Hugging Face tensor name to ours; None for tensors we do not use."""
    if text_only:
        if key.startswith("model."):
            return "text_model." + key.removeprefix("model.")
        return key if key.startswith("lm_head.") else None  # lm_head.weight (+ weight_scale when quantized)
    for prefix in ("model.vision_model.", "model.connector.", "model.contrastive.", "model.text_model."):
        if key.startswith(prefix):
            return key.removeprefix("model.")
    return key if key.startswith("lm_head.") else None  # lm_head.weight (+ weight_scale when quantized)


def ours_to_hf_key(key: str, text_only: bool) -> str:
    if key.startswith("lm_head."):
        return key
    if text_only:
        return "model." + key.removeprefix("text_model.")
    return "model." + key
