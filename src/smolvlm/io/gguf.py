"""Read a Llama-family GGUF (e.g. SmolLM2) into Hugging Face form, without transformers.

A GGUF holds the config as llama.cpp metadata keys, the weights under llama.cpp names (quantized, and
with Q/K rows reordered for llama.cpp's rotary embedding), and the tokenizer as vocabulary + merges.
This gives back what `transformers` derives from the same file -- LlamaConfig fields, a
LlamaForCausalLM state dict and a `tokenizers` tokenizer -- following the rules of
transformers/modeling_gguf_pytorch_utils.py, transformers/integrations/ggml.py and
transformers/integrations/gguf/gguf_tokenizer_mapping.py (5.x), which the tests check value for value.
`load_gguf` turns that into a text-only smolvlm model and its processor.
"""

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from smolvlm.errors import SmolVLMError
from smolvlm.io.checkpoint import model_from_state, parse_dtype
from smolvlm.io.hf_config import hf_key_to_ours, text_config_from_hf
from smolvlm.models.vlm import VLM, VLMConfig
from smolvlm.processing import Processor


@dataclass
class GGUFCheckpoint:
    config: dict  # Hugging Face LlamaConfig fields
    state_dict: dict[str, torch.Tensor]  # Hugging Face LlamaForCausalLM names
    tokenizer: Tokenizer
    tokenizer_config: dict  # bos/eos/pad/unk token strings (or None) and the chat template (or None)


# GGUF metadata key -> LlamaConfig field (transformers' GGUF_CONFIG_MAPPING for "llama" and "tokenizer").
CONFIG_KEYS = {
    "llama.vocab_size": "vocab_size",
    "llama.embedding_length": "hidden_size",
    "llama.feed_forward_length": "intermediate_size",
    "llama.block_count": "num_hidden_layers",
    "llama.attention.head_count": "num_attention_heads",
    "llama.attention.head_count_kv": "num_key_value_heads",
    "llama.rope.dimension_count": "head_dim",  # the rotary width, which is the whole head for llama
    "llama.attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "llama.rope.freq_base": "rope_theta",
    "llama.context_length": "max_position_embeddings",
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
}
REQUIRED_CONFIG = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# LlamaConfig's own defaults, which is what transformers ends up with when the file leaves a key out.
CONFIG_DEFAULTS = {
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None,
}

# llama.cpp tensor names -> LlamaForCausalLM names (gguf's llama tensor map, which transformers inverts).
# Tensors not listed (e.g. `rope_freqs.weight`) have no place in LlamaForCausalLM; transformers drops them too.
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
BLOCK_TENSORS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
CONTROL, USER_DEFINED = 3, 4
# tokenizer.ggml.pre values transformers splits with Llama 3's regex; "default"/"gpt2"/"smollm" get
# GPT-2's plain byte-level split. transformers has other regexes (qwen2, tekken, gpt-4o, ...): not supported.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_PRE = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
              "jina-v5-nano", "dbrx", "smaug-bpe"}
GPT2_PRE = {"default", "gpt2", "smollm"}


def read_gguf(path, dtype: torch.dtype = torch.float32) -> GGUFCheckpoint:
    """Config, weights (dequantized to `dtype`) and tokenizer of a Llama-family GGUF file."""
    path = Path(path)
    reader = open_gguf(path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    architecture = meta.get("general.architecture")
    if architecture != "llama":
        raise SmolVLMError(f"{path} is a {architecture!r} model; only Llama-family GGUF files (such as SmolLM2) "
                           "can be read, so convert or pick a llama one")
    config = read_config(path, meta, {t.name for t in reader.tensors})
    tokenizer, tokenizer_config = build_tokenizer(path, meta)  # before the slow part, to fail fast
    state_dict = read_tensors(path, reader, config, dtype)
    return GGUFCheckpoint(config, state_dict, tokenizer, tokenizer_config)


def read_gguf_tokenizer(path) -> tuple[Tokenizer, dict]:
    """Only the tokenizer and its config (no weights): what a model trained from scratch with this
    vocabulary needs."""
    path = Path(path)
    reader = open_gguf(path)
    meta = {name: field.contents() for name, field in reader.fields.items()
            if name.startswith(("tokenizer.", "general."))}
    return build_tokenizer(path, meta)


class PlainArrayReader(GGUFReader):
    """GGUFReader over a plain-ndarray view of its memory map. Parsing the metadata slices the map
    ~250k times (once per token and merge), and each slice of an `np.memmap` subclass costs a Python
    `__array_finalize__`; this alone cuts the 135M file's metadata parse from ~3 s to under 1 s."""

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._data = value.view(np.ndarray)  # still backed by (and keeping alive) the read-only map


def open_gguf(path: Path) -> GGUFReader:
    if not path.is_file():
        raise SmolVLMError(f"{path} does not exist or is not a file; pass the path of a .gguf file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise SmolVLMError(f"{path} is not a GGUF file (it does not start with 'GGUF'); pass a .gguf model file")
    try:
        # gguf maps the file and checks every tensor fits in it, so a cut-off file fails here
        return PlainArrayReader(path)
    except (ValueError, IndexError, OverflowError) as e:
        raise SmolVLMError(f"{path} is truncated or corrupt ({e}); download or convert it again") from e


def read_config(path: Path, meta: dict, tensor_names: set[str]) -> dict:
    config = {"model_type": "llama"}
    config.update({field: meta[key] for key, field in CONFIG_KEYS.items() if key in meta})
    missing = [field for field in REQUIRED_CONFIG if field not in config]
    if missing:
        raise SmolVLMError(f"{path} lacks the metadata for {', '.join(missing)}; the file is incomplete, "
                           "convert it again with llama.cpp")
    for field, default in CONFIG_DEFAULTS.items():
        config.setdefault(field, default)
    config["rms_norm_eps"] = float(config["rms_norm_eps"])
    config["rope_theta"] = float(config["rope_theta"])
    # The vocabulary length stands in when the file does not state it (transformers issue #32526).
    config.setdefault("vocab_size", len(meta.get("tokenizer.ggml.tokens", ())))
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
    # llama.cpp writes `output.weight` only when the head is not the embedding matrix.
    config["tie_word_embeddings"] = "output.weight" not in tensor_names
    return config


def hf_tensor_name(gguf_name: str, num_layers: int) -> str | None:
    stem = gguf_name.removesuffix(".weight")
    if stem in GLOBAL_TENSORS and gguf_name.endswith(".weight"):
        return f"{GLOBAL_TENSORS[stem]}.weight"
    m = BLOCK_NAME.fullmatch(gguf_name)
    if m and int(m[1]) < num_layers and m[2] in BLOCK_TENSORS:
        return f"model.layers.{m[1]}.{BLOCK_TENSORS[m[2]]}.weight"
    return None


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order. HF's rotary embedding pairs dimension i with i + head_dim/2,
    llama.cpp's pairs adjacent dimensions, so its converter interleaved each head's two halves."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_tensors(path: Path, reader: GGUFReader, config: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state_dict = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name, config["num_hidden_layers"])
        if name is None:
            continue
        try:
            weights = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as e:
            raise SmolVLMError(f"{path}: tensor {tensor.name} is stored as {tensor.tensor_type.name}, which cannot be "
                               "dequantized; use a file in F32/F16/BF16, Q4/Q5/Q8_0 or a K-quant") from e
        if tensor.name.endswith(".attn_q.weight"):
            weights = unpermute_rows(weights, config["num_attention_heads"])
        elif tensor.name.endswith(".attn_k.weight"):
            weights = unpermute_rows(weights, config["num_key_value_heads"])
        # One tensor at a time: the float32 array is dropped as soon as it is in `dtype`.
        array = np.ascontiguousarray(weights)
        if not array.flags.writeable:  # F32 tensors come back as views of the read-only file map
            array = array.copy()
        state_dict[name] = torch.from_numpy(array).to(dtype)

    expected = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{part}.weight" for i in range(config["num_hidden_layers"]) for part in BLOCK_TENSORS.values()
    ]
    missing = [name for name in expected if name not in state_dict]
    if missing:
        raise SmolVLMError(f"{path} lacks {len(missing)} weight tensors (first: {missing[0]}); "
                           "the file is incomplete, convert it again with llama.cpp")
    return state_dict


def byte_alphabet() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte: the alphabet byte-level BPE vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    unprintable = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(unprintable)) for b in range(256)}


def build_tokenizer(path: Path, meta: dict) -> tuple[Tokenizer, dict]:
    """The byte-level BPE tokenizer transformers builds from the file (GPT2Tokenizer + GGUF special tokens)."""
    kind = meta.get("tokenizer.ggml.model")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2" or "tokenizer.ggml.merges" not in meta:
        raise SmolVLMError(f"{path} has a {kind!r} tokenizer{'' if kind != 'gpt2' else ' without merges'}; only "
                           "byte-level BPE ('gpt2' with merges, as in SmolLM2 and Llama 3) is supported")
    if pre not in GPT2_PRE | LLAMA3_PRE:
        raise SmolVLMError(f"{path} asks for the {pre!r} pre-tokenizer, which is not supported; supported: "
                           f"{', '.join(sorted(GPT2_PRE | LLAMA3_PRE))}")
    tokens = meta["tokenizer.ggml.tokens"]
    token_types = meta.get("tokenizer.ggml.token_type", [])  # absent: no added tokens (zips below stop at once)

    # A token using characters outside the byte alphabet (e.g. a real space) is respelled byte by byte.
    spelling = byte_alphabet()
    alphabet = set(spelling.values())
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): index
        for index, token in enumerate(tokens)
    }
    merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                     end_of_word_suffix="", fuse_unk=False))
    if pre in LLAMA3_PRE:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()

    # Control tokens (<|im_start|>, ...) stay whole and are dropped by decode(skip_special_tokens=True).
    # One outside the byte alphabet is a llama.cpp mislabel; transformers skips it, and so do we.
    tokenizer.add_special_tokens([
        AddedToken(token, normalized=False, special=True)
        for token, token_type in zip(tokens, token_types, strict=False)
        if token_type == CONTROL and set(token) <= alphabet
    ])
    # User-defined tokens (like <think>) also stay whole, but are ordinary text.
    tokenizer.add_tokens([
        AddedToken(token, normalized=False, special=False)
        for token, token_type in zip(tokens, token_types, strict=False)
        if token_type == USER_DEFINED and token in vocab
    ])

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None else None

    tokenizer_config = {
        "bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"), "unk_token": token("unknown_token_id"),
        "chat_template": meta.get("tokenizer.chat_template"),
    }
    # transformers makes the named tokens special too, unless they are already added tokens.
    already_added = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    tokenizer.add_special_tokens([
        AddedToken(tokenizer_config[name], normalized=False, special=True)
        for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        if tokenizer_config[name] is not None and tokenizer_config[name] not in already_added
    ])

    # BOS/EOS wrapping follows the file's add_bos_token/add_eos_token flags (off unless stated for gpt2).
    bos, eos = tokenizer_config["bos_token"], tokenizer_config["eos_token"]
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    single = (f"{bos}:0 " if add_bos else "") + "$A:0" + (f" {eos}:0" if add_eos else "")
    pair = single + (f" {bos}:1" if add_bos else "") + " $B:1" + (f" {eos}:1" if add_eos else "")
    special = [(t, tokenizer.token_to_id(t)) for t, used in ((bos, add_bos), (eos, add_eos)) if used]
    tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
    return tokenizer, tokenizer_config


# ---------------------------------------------------------------------------------------------
# as a smolvlm model


def load_gguf(path: str | Path, dtype: str | torch.dtype = "float32") -> tuple[VLM, Processor]:
    """A Llama-family GGUF (e.g. SmolLM2) as a text-only model with its own tokenizer and template."""
    ckpt = read_gguf(path, dtype=parse_dtype(dtype))
    cfg = VLMConfig(text=text_config_from_hf(ckpt.config), vision=None)
    state = {hf_key_to_ours(k, True): v for k, v in ckpt.state_dict.items()}
    model = model_from_state(cfg, state, str(path))
    return model, gguf_text_processor(ckpt.tokenizer, ckpt.tokenizer_config)


def gguf_text_processor(tokenizer: Tokenizer, tokenizer_config: dict) -> Processor:
    """The text-only processor of a GGUF file's tokenizer: its chat template, EOS, and EOS as padding
    when the file names no pad token."""
    tc = tokenizer_config
    return Processor(tokenizer, image_config=None, image_seq_len=0, chat_template=tc.get("chat_template"),
                     eos_token=tc.get("eos_token"), pad_token=tc.get("pad_token") or tc.get("eos_token"))
