"""Generation parts that need no model: sampling filters, incremental text with stop strings."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from smolvlm.generation import SamplingParams, TextAssembler, sample_next


def byte_decoder(vocab: list[bytes]):
    return lambda ids: b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")


def test_text_pieces_hold_back_unfinished_utf8_characters():
    vocab = [b"h", b"\xc3", b"\xa9", b"!"]  # "é" arrives as two tokens
    asm = TextAssembler(byte_decoder(vocab), stop=[])
    pieces = [asm.add(t, final=False) for t in (0, 1, 2)] + [asm.add(3, final=True)]
    assert pieces == ["h", "", "é", "!"]
    assert asm.text == "hé!"


@settings(max_examples=60, deadline=None)
@given(
    words=st.lists(st.sampled_from(["a", "b", "ab", "STOP", "S", "TOP", " ", "é"]), min_size=1, max_size=20),
    stop=st.sampled_from([[], ["STOP"], ["b", "TOP"], ["ab"]]),
)
def test_streamed_pieces_equal_final_text_and_never_pass_a_stop_string(words, stop):
    vocab = [w.encode() for w in words]
    asm = TextAssembler(byte_decoder(vocab), stop=stop)
    out = ""
    for i in range(len(words)):
        out += asm.add(i, final=i == len(words) - 1)
        if asm.stopped:
            break
    full = "".join(words)
    cut = min([full.find(s) for s in stop if s in full], default=len(full))
    assert out == full[:cut] == asm.text
    assert asm.stopped == (cut < len(full))


def test_greedy_top_k_top_p():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert sample_next(logits, SamplingParams(temperature=0), None).item() == 1
    rng = torch.Generator().manual_seed(0)
    # top_k=2 keeps tokens 1 and 3 only
    draws = {sample_next(logits, SamplingParams(temperature=1.0, top_k=2), rng).item() for _ in range(200)}
    assert draws == {1, 3}
    # top_p small enough keeps only the most likely token
    draws = {sample_next(logits, SamplingParams(temperature=1.0, top_p=0.5), rng).item() for _ in range(50)}
    assert draws == {1}
    # softmax([0,3,1,2]) ~ [.03, .64, .09, .24]: top_p=0.8 keeps 1 and 3 (cumulative .64 < .8 <= .88)
    draws = {sample_next(logits, SamplingParams(temperature=1.0, top_p=0.8), rng).item() for _ in range(300)}
    assert draws == {1, 3}


def test_bad_sampling_params_are_clear_errors():
    import pytest

    from smolvlm.errors import SmolVLMError

    for params, word in [
        (SamplingParams(max_new_tokens=0), "max_new_tokens"),
        (SamplingParams(temperature=-1), "temperature"),
        (SamplingParams(top_p=0), "top_p"),
        (SamplingParams(top_k=-3), "top_k"),
    ]:
        with pytest.raises(SmolVLMError, match=word):
            params.check()
