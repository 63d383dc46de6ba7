"""smolvlm.io.gguf against transformers reading the same GGUF: the real SmolLM2-135M-Instruct
(Q4_1/Q8_0/F32) and tiny files written here (F16/Q8_0/F32, an output head, other tokenizer flags)."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize

from smolvlm.errors import SmolVLMError
from smolvlm.io.gguf import byte_alphabet, read_gguf, unpermute_rows

CONFIG_FIELDS = [
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "pad_token_id",
]
CORPUS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. It's 3:45pm; we'll see...",
    "def f(x):\n    return x ** 2  # square\n\n\nprint(f(12345678))",
    "   leading spaces, trailing spaces   ",
    "multiple\n\n\nnewlines\r\nand\ttabs \t \n ",
    "1234567890 3.14159 -42 1e-5 0x1F 1,000,000",
    "naïve café — “quotes” ünïcödé ß Ωμέγα Привет мир",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 😀👍🏽🇫🇷 👨‍👩‍👧‍👦 and ZWJ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|><|endoftext|>",
    "text<|im_end|>glued<|im_start|> <|im_end|>  spaced",
    "<repo_name>smolvlm<file_sep>src/main.py\n<gh_stars>10",
    "",
    " ",
    "\n",
]


def hf_dir_and_name(path):
    return str(path.parent), path.name


@pytest.fixture(scope="module")
def ours(gguf_path):
    return read_gguf(gguf_path)


@pytest.fixture(scope="module")
def hf_model(gguf_path):
    from transformers import AutoModelForCausalLM

    folder, name = hf_dir_and_name(gguf_path)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)


def hf_config(path):
    from transformers import AutoConfig

    folder, name = hf_dir_and_name(path)
    return AutoConfig.from_pretrained(folder, gguf_file=name)


def assert_config_matches(config, reference):
    for field in CONFIG_FIELDS:
        assert config[field] == getattr(reference, field), field
    assert config["rope_theta"] == reference.rope_parameters["rope_theta"]


def assert_state_dict_matches(state_dict, model):
    reference = model.state_dict()
    expected = set(reference)
    if model.config.tie_word_embeddings:  # transformers lists the tied head; it is the embedding itself
        assert model.lm_head.weight is model.model.embed_tokens.weight
        expected.discard("lm_head.weight")
    assert set(state_dict) == expected
    for name, tensor in state_dict.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, reference[name]), name


# ---------------------------------------------------------------------------------------------
# the real SmolLM2 file


def test_config_matches_transformers(ours, gguf_path):
    assert_config_matches(ours.config, hf_config(gguf_path))
    assert ours.config["tie_word_embeddings"] is True


def test_state_dict_matches_transformers(ours, hf_model):
    assert "lm_head.weight" not in ours.state_dict  # the file has no separate output tensor
    assert_state_dict_matches(ours.state_dict, hf_model)


def test_q_and_k_are_unpermuted_like_transformers(ours, hf_model, gguf_path):
    from gguf import GGUFReader

    raw = {t.name: t for t in GGUFReader(gguf_path).tensors if t.name in ("blk.3.attn_q.weight", "blk.3.attn_k.weight")}
    reference = hf_model.state_dict()
    for gguf_name, proj in (("blk.3.attn_q.weight", "q_proj"), ("blk.3.attn_k.weight", "k_proj")):
        ours_w = ours.state_dict[f"model.layers.3.self_attn.{proj}.weight"]
        as_stored = torch.from_numpy(dequantize(raw[gguf_name].data, raw[gguf_name].tensor_type).copy())
        assert torch.equal(ours_w, reference[f"model.layers.3.self_attn.{proj}.weight"])
        assert not torch.equal(ours_w, as_stored)  # the reordering did happen
        assert torch.equal(torch.sort(ours_w, dim=0).values, torch.sort(as_stored, dim=0).values)  # rows only


def test_unpermute_inverts_llama_cpp_permute():
    def llama_cpp_permute(w, n_head):  # convert_hf_to_gguf.py LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.random.default_rng(0).standard_normal((3 * 64, 40)).astype(np.float32)
    assert np.array_equal(unpermute_rows(llama_cpp_permute(w, 3), 3), w)


def test_dtype_conversion(gguf_path, ours):
    half = read_gguf(gguf_path, dtype=torch.bfloat16)
    assert set(half.state_dict) == set(ours.state_dict)
    for name, tensor in half.state_dict.items():
        assert torch.equal(tensor, ours.state_dict[name].to(torch.bfloat16)), name


def test_tokenizer_matches_transformers(ours, hf_text_tokenizer):
    tok = ours.tokenizer
    assert tok.get_vocab_size() == len(hf_text_tokenizer) == 49152
    for text in CORPUS:
        for add_special in (True, False):
            ids = tok.encode(text, add_special_tokens=add_special).ids
            assert ids == hf_text_tokenizer(text, add_special_tokens=add_special)["input_ids"], text
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf_text_tokenizer.decode(ids, skip_special_tokens=skip)
    # the whole pipeline (model, added tokens, pre-tokenizer, decoder, post-processor) is the same
    assert tok.to_str() == hf_text_tokenizer.backend_tokenizer.to_str()


def test_chat_tokens_are_special(ours):
    tok = ours.tokenizer
    ids = tok.encode("<|im_start|>user\nHi!<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2 and tok.id_to_token(1) == "<|im_start|>"
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHi!"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nHi!<|im_end|>"


def test_tokenizer_config_matches_transformers(ours, hf_text_tokenizer):
    tc = ours.tokenizer_config
    assert tc["chat_template"] == hf_text_tokenizer.chat_template
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert tc[name] == getattr(hf_text_tokenizer, name), name
    assert (tc["bos_token"], tc["eos_token"], tc["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")


def test_byte_alphabet_is_gpt2s():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    assert byte_alphabet() == bytes_to_unicode()


# ---------------------------------------------------------------------------------------------
# tiny files: an untied head, F16/Q8_0 storage, a llama-bpe pre-tokenizer, BOS added, <think>


def tiny_tokens():
    specials = ["<|endoftext|>", "<|begin|>", "<|end|>", "<think>"]
    types = [3, 3, 3, 4]
    letters = sorted(set(byte_alphabet().values()))
    merges = ["Ġ t", "h e", "Ġt he", "1 2"]
    tokens = specials + letters + ["Ġt", "he", "Ġthe", "12"]
    return tokens, types + [1] * (len(tokens) - len(types)), merges


def write_tiny_gguf(path, arch="llama", tokenizer_model="gpt2", pre="llama-bpe", norm_type=None):
    tokens, types, merges = tiny_tokens()
    hidden, inter, layers, heads, kv_heads, vocab = 64, 96, 2, 4, 2, len(tokens)
    w = GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_chat_template("{% for m in messages %}<|begin|>{{ m['content'] }}<|end|>{% endfor %}")

    rng = np.random.default_rng(0)

    def add(name, shape, kind):
        data = rng.standard_normal(shape).astype(np.float32)
        if kind == "q8":
            w.add_tensor(name, quantize(data, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
        elif kind == "i32":
            w.add_tensor(name, data.astype(np.int32))
        else:
            w.add_tensor(name, data.astype(np.float16 if kind == "f16" else np.float32))

    add("token_embd.weight", (vocab, hidden), "q8")
    add("output.weight", (vocab, hidden), "f16")
    add("output_norm.weight", (hidden,), "f32")
    add("rope_freqs.weight", (hidden // heads // 2,), "f32")  # no place in LlamaForCausalLM: dropped
    head_dim = hidden // heads
    for i in range(layers):
        add(f"blk.{i}.attn_q.weight", (heads * head_dim, hidden), "q8")
        add(f"blk.{i}.attn_k.weight", (kv_heads * head_dim, hidden), "f16")
        add(f"blk.{i}.attn_v.weight", (kv_heads * head_dim, hidden), "q8")
        add(f"blk.{i}.attn_output.weight", (hidden, hidden), "f32")
        add(f"blk.{i}.ffn_gate.weight", (inter, hidden), "q8")
        add(f"blk.{i}.ffn_up.weight", (inter, hidden), "f16")
        add(f"blk.{i}.ffn_down.weight", (hidden, inter), "q8")
        add(f"blk.{i}.attn_norm.weight", (hidden,), norm_type or "f32")
        add(f"blk.{i}.ffn_norm.weight", (hidden,), "f32")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_untied_mixed_types_match_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    ckpt = read_gguf(path)
    assert ckpt.config["tie_word_embeddings"] is False and "lm_head.weight" in ckpt.state_dict
    assert_config_matches(ckpt.config, hf_config(path))
    folder, name = hf_dir_and_name(path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    assert_state_dict_matches(ckpt.state_dict, model)


def test_tiny_llama_bpe_tokenizer_matches_transformers(tmp_path):
    from transformers import AutoTokenizer

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    tok = read_gguf(path).tokenizer
    folder, name = hf_dir_and_name(path)
    reference = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    assert tok.to_str() == reference.backend_tokenizer.to_str()
    for text in CORPUS + ["<think>the 12 theses</think>", "<|begin|>the<|end|>"]:
        ids = tok.encode(text).ids
        assert ids == reference(text)["input_ids"], text
        assert ids[0] == 1  # the file asks for BOS
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)
    assert tok.decode(tok.encode("<think>x").ids, skip_special_tokens=True) == "<think>x"  # not special


# ---------------------------------------------------------------------------------------------
# errors


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 10)
    with pytest.raises(SmolVLMError, match="not a GGUF file"):
        read_gguf(bad)
    with pytest.raises(SmolVLMError, match="does not exist"):
        read_gguf(tmp_path / "missing.gguf")


@pytest.mark.parametrize("keep", [10, 5_000, 1_000_000, 50_000_000, -1])
def test_truncated_file(gguf_path, tmp_path, keep):
    size = gguf_path.stat().st_size
    with open(gguf_path, "rb") as f:
        head = f.read(keep if keep > 0 else size + keep)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(head)
    with pytest.raises(SmolVLMError, match="truncated or corrupt"):
        read_gguf(cut)


def test_unsupported_architecture(tmp_path):
    with pytest.raises(SmolVLMError, match="'gpt2' model; only Llama-family"):
        read_gguf(write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2"))


def test_unsupported_tokenizer(tmp_path):
    with pytest.raises(SmolVLMError, match="'llama' tokenizer; only byte-level BPE"):
        read_gguf(write_tiny_gguf(tmp_path / "spm.gguf", tokenizer_model="llama"))
    with pytest.raises(SmolVLMError, match="'qwen2' pre-tokenizer, which is not supported"):
        read_gguf(write_tiny_gguf(tmp_path / "qwen.gguf", pre="qwen2"))


def test_tensor_type_that_cannot_be_dequantized(tmp_path):
    with pytest.raises(SmolVLMError, match="blk.0.attn_norm.weight is stored as I32, which cannot be dequantized"):
        read_gguf(write_tiny_gguf(tmp_path / "int.gguf", norm_type="i32"))
