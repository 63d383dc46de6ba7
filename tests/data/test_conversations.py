"""Conversation records: assistant-only labels that match what generation sees, batching, readers."""

import json

import pytest
import torch
from PIL import Image

from smolvlm.data.conversations import (
    IGNORE,
    collate,
    from_hf_dataset,
    qa_conversation,
    read_llava_json,
    tokenize_conversation,
)
from smolvlm.errors import SmolVLMError
from smolvlm.train import PRESETS, build_train_model


@pytest.fixture(scope="module")
def processor():
    return build_train_model(PRESETS["test-tiny"]().model, 0)[1]


def spans(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The runs of labelled tokens."""
    out, run = [], []
    for i, lab in zip(ids, labels, strict=True):
        if lab == IGNORE:
            if run:
                out.append(run)
            run = []
        else:
            assert lab == i
            run.append(i)
    return out + ([run] if run else [])


def test_labels_cover_exactly_the_answers(processor):
    conv = qa_conversation([Image.new("RGB", (32, 32), "red")], [("What color?", "red"), ("How many?", "1")])
    ex = tokenize_conversation(conv, processor)
    answers = [processor.decode(s, skip_special_tokens=False) for s in spans(ex["input_ids"], ex["labels"])]
    assert answers == [" red<end_of_utterance>\n", " 1<end_of_utterance>\n"]
    # the tokens are those of the whole chat rendered at once, i.e. what generation sees turn by turn
    whole = processor(processor.apply_chat_template(conv.messages, add_generation_prompt=False),
                      images=[conv.images])
    assert ex["input_ids"] == whole["input_ids"][0].tolist()
    torch.testing.assert_close(ex["pixel_values"], whole["pixel_values"][0])
    with pytest.raises(SmolVLMError, match="over the limit of 10"):
        tokenize_conversation(conv, processor, max_len=10)


def test_collate_pads_right_and_masks_padding(processor):
    a = tokenize_conversation(qa_conversation([Image.new("RGB", (32, 32), "red")], [("Q?", "yes")]), processor)
    b = tokenize_conversation(qa_conversation([], [("A longer question without an image?", "no")]), processor)
    batch = collate([a, b], pad_id=7)
    n_a, n_b = len(a["input_ids"]), len(b["input_ids"])
    assert batch["input_ids"].shape == (2, max(n_a, n_b))
    assert batch["attention_mask"].sum(1).tolist() == [n_a, n_b]
    short = 0 if n_a < n_b else 1
    assert (batch["input_ids"][short, min(n_a, n_b):] == 7).all()
    assert (batch["labels"][short, min(n_a, n_b):] == IGNORE).all()
    assert batch["pixel_values"].shape[:2] == (2, 1) and not batch["pixel_values"][1].any()


def test_read_llava_json(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    (tmp_path / "d.json").write_text(json.dumps([
        {"image": "x.png", "conversations": [{"from": "human", "value": "What is it?"},
                                             {"from": "gpt", "value": "A square."}]},
        {"image": "x.png", "conversations": [{"from": "human", "value": "Look: <image> and say"},
                                             {"from": "gpt", "value": "ok"}]},
    ]))
    first, second = read_llava_json(tmp_path / "d.json")
    assert first.messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "What is it?"}]
    assert first.images == [tmp_path / "x.png"]
    assert [p["type"] for p in second.messages[0]["content"]] == ["text", "image", "text"]
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "x.png"}]))
    with pytest.raises(SmolVLMError, match="record 0 is not a LLaVA conversation"):
        read_llava_json(tmp_path / "bad.json")
    (tmp_path / "notjson.json").write_text("{")
    with pytest.raises(SmolVLMError, match="not valid UTF-8 JSON"):
        read_llava_json(tmp_path / "notjson.json")


def test_hf_dataset_rows_become_conversations(processor):
    image = Image.new("RGB", (32, 32), "blue")
    rows = [{"image": image, "text": "a blue square"}, {"image": image, "q": "Color?", "text": "blue"}]
    convs = list(from_hf_dataset(rows[:1])) + list(from_hf_dataset(rows[1:], question_column="q"))
    assert convs[0].messages[0]["content"][-1]["text"] == "Describe this image."
    assert convs[1].messages[0]["content"][-1]["text"] == "Color?"
    ex = tokenize_conversation(convs[0], processor)
    answer = spans(ex["input_ids"], ex["labels"])
    assert processor.decode(answer[0], skip_special_tokens=False) == " a blue square<end_of_utterance>\n"


def test_packed_independent_turns_give_each_turn_exactly_its_single_turn_logits():
    """pack_turns + train.branch_attention_mask: every answer token of a packed example gets the logits
    it gets when its question is asked alone (the evaluation's single-turn prompt)."""
    from smolvlm.train import branch_attention_mask

    model, processor = build_train_model(PRESETS["test-tiny"]().model, 0)
    model.eval()
    image = Image.effect_noise((32, 32), 60).convert("RGB")
    pairs = [("What color is the circle?", "red"), ("How many objects are there?", "3"), ("Is it big?", "no")]
    conv = qa_conversation([image], pairs)
    conv.independent_turns = True
    packed = tokenize_conversation(conv, processor)
    singles = [tokenize_conversation(qa_conversation([image], [p]), processor) for p in pairs]
    other = tokenize_conversation(qa_conversation([image], [("Caption this picture.", "A red circle.")]), processor)
    assert spans(packed["input_ids"], packed["labels"]) == [s for e in singles for s in spans(e["input_ids"],
                                                                                                e["labels"])]
    assert len(packed["input_ids"]) < sum(len(e["input_ids"]) for e in singles)  # the image prefix once
    batch = collate([packed, other], pad_id=0)  # a plain example in the same batch is one branch
    assert batch["branch_ids"][1, :len(other["input_ids"])].eq(0).all()
    with torch.no_grad():
        h = model.hidden_states(batch["input_ids"], batch["pixel_values"], position_ids=batch["position_ids"],
                                attn_mask=branch_attention_mask(batch["branch_ids"]))
        logits = model.lm_head(h)
        got = logits[0, :-1][torch.tensor(packed["labels"][1:]) != IGNORE]
        want = []
        for e in singles + [other]:
            single = model(torch.tensor([e["input_ids"]]), e["pixel_values"][None])[0, :-1]
            want.append(single[torch.tensor(e["labels"][1:]) != IGNORE])
    torch.testing.assert_close(got, torch.cat(want[:3]), atol=1e-5, rtol=1e-5)
    n_other = len(other["input_ids"])
    torch.testing.assert_close(logits[1, :n_other - 1][torch.tensor(other["labels"][1:]) != IGNORE], want[3],
                               atol=1e-5, rtol=1e-5)


def test_tokenized_chats_are_memoized_per_processor_and_stay_exact(processor):
    """tokenize_messages keeps what it rendered (training repeats its questions): a repeat returns the first
    result as fresh lists, another processor renders its own, and parts JSON cannot hold are not kept."""
    from smolvlm.data import conversations as c

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    c._TOKENIZED.pop(processor, None)
    first = c.tokenize_messages(messages, processor, [0], [0])
    assert first == c._tokenize_messages(messages, processor, [0], [0])
    assert len(c._TOKENIZED[processor]) == 1
    first[0].append(-1)  # the caller owns what it got
    again = c.tokenize_messages(messages, processor, [0], [0])
    assert again == c._tokenize_messages(messages, processor, [0], [0]) and again[0][-1] != -1
    assert len(c._TOKENIZED[processor]) == 1
    other = build_train_model(PRESETS["test-tiny"]().model, 0)[1]
    assert other not in c._TOKENIZED
    c.tokenize_messages(messages, other, [0], [0])
    assert other in c._TOKENIZED
    with_object = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (8, 8))},
                                                {"type": "text", "text": "What color?"}]}]
    c.tokenize_messages(with_object, processor, [0], [0])
    assert len(c._TOKENIZED[processor]) == 1
