"""A small byte-level BPE vocabulary for models trained from scratch on the shapes world.

SmolLM2's 49,152-token vocabulary makes a tiny decoder spend half of each training step on the output
softmax and the embedding table (measured: 0.72 s vs 0.38 s per shapes-tiny step on one core). The
shapes world speaks ~100 words, so the demo model uses a BPE vocabulary trained on the world's own
text instead: same pre-tokenizer and decoder as SmolLM2 (byte level, so any text still encodes), same
special tokens, 528 entries (the merges run out before VOCAB_SIZE). It is rebuilt deterministically
from the world's text whenever a model names `shapes` as its vocabulary source, and saved with the model
(tokenizer.json) like any other.
"""

import random
from collections.abc import Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from smolvlm.data.shapes import (
    CAPTION_PROMPTS,
    NUMBER_WORDS,
    PAIR_PROMPT,
    PALETTE,
    SHAPES,
    WorldConfig,
    captions,
    make_pair,
    make_scene,
    questions,
)

VOCAB_SIZE = 600
# SmolLM2's special tokens (ids 0, 1, 2 there too); the SmolVLM image tokens are appended later
# (checkpoint.add_image_tokens), as for SmolLM2's vocabulary
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_TOKEN = "<|im_end|>"
CHAT_WORDS = ("User:", "Assistant:", "System:")  # SmolVLM's chat template around each turn


def world_text(n_scenes: int = 2000, seed: int = 0) -> Iterator[str]:
    """Every kind of text the shapes world produces (captions, questions, answers, pair statements,
    prompts) over all its colors and shapes, plus the chat template's words."""
    cfg = WorldConfig(colors=tuple(PALETTE), shapes=SHAPES, held_out=())
    rng = random.Random(seed)
    yield from CHAT_WORDS
    yield from CAPTION_PROMPTS
    yield " ".join(NUMBER_WORDS) + " " + " ".join(str(i) for i in range(10))
    for i in range(n_scenes):
        scene = make_scene(cfg, "train", i, seed)
        yield from captions(scene)
        for q in questions(scene, rng, 8, cfg, scheduled=False):
            yield f"User:{q.question}\nAssistant: {q.answer}\n"
        if i % 10 == 0:
            left, right, statement, _ = make_pair(cfg, "train", i, seed)
            yield PAIR_PROMPT.format(statement)


def shapes_tokenizer(vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """The byte-level BPE tokenizer trained on `world_text()` (deterministic: same input, same merges)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(world_text(), trainer)
    return tokenizer
