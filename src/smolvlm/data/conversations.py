"""One record type for all training data: a conversation (images + user/assistant turns), readers
for the formats people have (LLaVA JSON, Hugging Face `datasets` tables), and the step from a
conversation to model inputs with the loss on assistant tokens only.

    Conversation -> chat template, rendered turn by turn -> <image> expanded -> token ids + labels
"""

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from smolvlm.errors import SmolVLMError
from smolvlm.processing import Processor, open_image
from smolvlm.special_tokens import IMAGE

IGNORE = -100  # label of tokens that carry no loss


@dataclass
class Conversation:
    # HF chat messages: {"role": "user"|"assistant"|"system", "content": str | [{"type": "image"}|{"type": "text"}]}
    messages: list[dict]
    images: list[Any] = field(default_factory=list)  # PIL images or paths, in order of the image parts
    task: str = "default"  # for multi-task mixing
    caption: str = ""  # a description of the (first) image, for the contrastive loss (train.py)

    def check(self) -> None:
        n_parts = sum(
            1 for m in self.messages if isinstance(m.get("content"), list)
            for p in m["content"] if p.get("type") == "image"
        )
        if n_parts != len(self.images):
            raise SmolVLMError(f"a conversation has {n_parts} image parts but {len(self.images)} images")
        if not any(m.get("role") == "assistant" for m in self.messages):
            raise SmolVLMError("a conversation has no assistant turn, so nothing to learn from")


def qa_conversation(images: list[Any], pairs: list[tuple[str, str]], task: str = "default") -> Conversation:
    """Several question/answer turns about the same images (the images go in the first user turn)."""
    messages = []
    for i, (q, a) in enumerate(pairs):
        parts = [{"type": "image"}] * len(images) if i == 0 else []
        messages.append({"role": "user", "content": parts + [{"type": "text", "text": q}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    return Conversation(messages, list(images), task)


# ---------------------------------------------------------------------------------------------
# readers


def read_llava_json(path: str | Path, image_root: str | Path | None = None) -> list[Conversation]:
    """LLaVA-style JSON: [{"image": "x.jpg" (or a list), "conversations": [{"from": "human"|"gpt", "value"}]}].
    `<image>` in a human turn marks where the image goes (at the start when absent)."""
    path = Path(path)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SmolVLMError(f"dataset file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SmolVLMError(f"{path} is not valid UTF-8 JSON ({e})") from None
    if not isinstance(records, list):
        raise SmolVLMError(f"{path}: a LLaVA dataset is a JSON list of records")
    root = Path(image_root) if image_root is not None else path.parent
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    out = []
    for i, r in enumerate(records):
        try:
            images = r.get("image") or r.get("images") or []
            images = [root / p for p in ([images] if isinstance(images, str) else images)]
            messages, placed = [], 0
            for turn in r["conversations"]:
                role, text = roles[turn["from"]], turn["value"]
                if role != "user":
                    messages.append({"role": role, "content": [{"type": "text", "text": text}]})
                    continue
                if placed == 0 and images and IMAGE not in text:
                    text = IMAGE * len(images) + text
                pieces = text.split(IMAGE)
                parts = [{"type": "text", "text": pieces[0].strip()}] if pieces[0].strip() else []
                for piece in pieces[1:]:
                    parts.append({"type": "image"})
                    placed += 1
                    if piece.strip():
                        parts.append({"type": "text", "text": piece.strip()})
                messages.append({"role": "user", "content": parts})
        except (KeyError, TypeError, AttributeError) as e:
            raise SmolVLMError(f"{path}: record {i} is not a LLaVA conversation (missing/odd field {e})") from None
        conv = Conversation(messages, images)
        try:
            conv.check()
        except SmolVLMError as e:
            raise SmolVLMError(f"{path}: record {i}: {e}") from None
        out.append(conv)
    if not out:
        raise SmolVLMError(f"{path} holds no conversations")
    return out


def from_hf_dataset(
    dataset: Iterable[dict], image_column: str = "image", question_column: str | None = None,
    answer_column: str = "text", default_question: str = "Describe this image.",
) -> Iterator[Conversation]:
    """Rows of a Hugging Face `datasets` image-text table (image + caption/answer, optional question)."""
    for row in dataset:
        q = row[question_column] if question_column else default_question
        yield qa_conversation([row[image_column]], [(q, row[answer_column])])


# ---------------------------------------------------------------------------------------------
# conversation -> tokens


def load_images(conv: Conversation) -> list[Image.Image]:
    return [open_image(im) if isinstance(im, (str, Path)) else im for im in conv.images]


def tokenize_conversation(conv: Conversation, processor: Processor, max_len: int | None = None) -> dict:
    """input_ids and labels (assistant tokens only, including their end-of-turn marker), plus the
    processed images. The chat is rendered one message at a time so each assistant answer is
    tokenized exactly as generation will see it: after the prompt's generation prefix."""
    conv.check()
    images = load_images(conv)
    pixels = processor.process_images([images]) if images else None
    rows = pixels["rows"][0] if pixels else []
    cols = pixels["cols"][0] if pixels else []
    ids: list[int] = []
    labels: list[int] = []
    rendered, image_i = "", 0
    for k, m in enumerate(conv.messages):
        if m["role"] == "assistant":
            prefix = processor.apply_chat_template(conv.messages[:k], add_generation_prompt=True)
            full = processor.apply_chat_template(conv.messages[: k + 1], add_generation_prompt=False)
            segments = [(prefix[len(rendered):], False), (full[len(prefix):], True)]
            rendered = full
        else:
            full = processor.apply_chat_template(conv.messages[: k + 1], add_generation_prompt=False)
            segments = [(full[len(rendered):], False)]
            rendered = full
        for text, learn in segments:
            n_img = text.count(IMAGE)
            text = processor.expand_prompt(text, rows[image_i:image_i + n_img], cols[image_i:image_i + n_img])
            image_i += n_img
            seg = processor.tokenizer.encode(text, add_special_tokens=False).ids
            ids += seg
            labels += seg if learn else [IGNORE] * len(seg)
    if max_len is not None and len(ids) > max_len:
        raise SmolVLMError(f"a conversation is {len(ids)} tokens, over the limit of {max_len}")
    out = {"input_ids": ids, "labels": labels}
    if pixels:
        out["pixel_values"] = pixels["pixel_values"][0]  # (I, 3, H, W)
        out["pixel_attention_mask"] = pixels["pixel_attention_mask"][0]
    return out


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad token ids / labels and zero-pad image lists into one batch (the model skips all-zero
    padding images, as SmolVLM does)."""
    b = len(examples)
    t = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)
    labels = torch.full((b, t), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((b, t), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        attention_mask[i, :n] = 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    with_images = [e for e in examples if "pixel_values" in e]
    if with_images:
        n = max(e["pixel_values"].shape[0] for e in with_images)
        h = max(e["pixel_values"].shape[2] for e in with_images)
        w = max(e["pixel_values"].shape[3] for e in with_images)
        pv = torch.zeros((b, n, 3, h, w))
        pm = torch.zeros((b, n, h, w), dtype=torch.bool)
        for i, e in enumerate(examples):
            if "pixel_values" in e:
                k, _, eh, ew = e["pixel_values"].shape
                pv[i, :k, :, :eh, :ew] = e["pixel_values"]
                pm[i, :k, :eh, :ew] = e["pixel_attention_mask"]
        batch["pixel_values"], batch["pixel_attention_mask"] = pv, pm
    return batch
