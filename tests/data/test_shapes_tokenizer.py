"""The shapes world's small BPE vocabulary (the demo model's)."""

import random

from smolvlm.data.shapes import ShapesWorld, captions
from smolvlm.data.shapes_tokenizer import SPECIAL_TOKENS, shapes_tokenizer
from smolvlm.train import build_train_model, resolve_config


def test_it_is_small_deterministic_and_words_are_single_tokens():
    tok = shapes_tokenizer()
    assert tok.to_str() == shapes_tokenizer().to_str()  # rebuilt identically for every model
    assert 300 <= tok.get_vocab_size() <= 1000
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    world = ShapesWorld(seed=5)
    for scene in world.scenes("test", 20):
        for q in world.questions(scene, 6):
            ids = tok.encode(q.question).ids
            assert len(ids) == len(q.question.replace("?", " ?").split())  # one token per word
            assert tok.decode(tok.encode(" " + q.answer).ids) == " " + q.answer
        for c in captions(scene):
            assert tok.decode(tok.encode(c).ids) == c


def test_any_text_still_encodes_byte_level():
    tok = shapes_tokenizer()
    rng = random.Random(0)
    noise = "".join(chr(rng.randrange(32, 0x3000)) for _ in range(50))
    for text in ["zebra crossing ünïcödé 😀", "\t\n  spaces", noise]:
        assert tok.decode(tok.encode(text).ids) == text


def test_a_scratch_model_on_it_has_a_small_vocabulary():
    cfg = resolve_config("test-tiny", None, ["model.decoder=shapes"])
    model, processor = build_train_model(cfg.model, 0)
    assert model.cfg.text.vocab_size == processor.tokenizer.get_vocab_size() < 1200
    for t in ("<end_of_utterance>", "<image>", "<fake_token_around_image>", "<|im_end|>"):
        assert len(processor.tokenizer.encode(t).ids) == 1, t
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                                          {"role": "assistant", "content": [{"type": "text", "text": "yes"}]}])
    assert processor.tokenizer.decode(processor.tokenizer.encode(text).ids, skip_special_tokens=False) == text
