"""One record type for all training data: a conversation (images + user/assistant turns), readers
for the formats people have (LLaVA JSON, Hugging Face `datasets` tables), and the step from a
conversation to model inputs with the loss on assistant tokens only.

    Conversation -> chat template, rendered turn by turn -> <image> expanded -> token ids + labels
"""

import json
import weakref
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
    caption: str = ""  # a description of the (first) image, for the contrastive loss (train/losses.py)
    # Each user/assistant exchange is its own question about the images (e.g. the shapes world's VQA
    # turns): trained as that many single-turn conversations packed into one sequence behind one shared
    # image prefix, no turn seeing another (see tokenize_conversation). Turns of one chat would leak
    # answers ("Is there a red circle?" tells the next turn there may be one) and teach a model to read
    # earlier turns instead of the image; packed, each turn is exactly the single question asked at test.
    independent_turns: bool = False

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
    processed images; with independent_turns also position_ids and branch_ids (see pack_turns)."""
    conv.check()
    images = load_images(conv)
    pixels = processor.process_images([images]) if images else None
    rows = pixels["rows"][0] if pixels else []
    cols = pixels["cols"][0] if pixels else []
    if conv.independent_turns:
        out = pack_turns(conv.messages, processor, rows, cols)
    else:
        ids, labels = tokenize_messages(conv.messages, processor, rows, cols)
        out = {"input_ids": ids, "labels": labels}
    if max_len is not None and len(out["input_ids"]) > max_len:
        raise SmolVLMError(f"a conversation is {len(out['input_ids'])} tokens, over the limit of {max_len}")
    if pixels:
        out["pixel_values"] = pixels["pixel_values"][0]  # (I, 3, H, W)
        out["pixel_attention_mask"] = pixels["pixel_attention_mask"][0]
    return out


# processor -> {(messages as JSON, rows, cols): (ids, labels)}: rendering the chat template is most of the cost
# of making a batch, and training data repeats its questions and answers (the shapes world asks a few thousand
# distinct ones). Per processor, since the template and tokenizer decide the tokens.
_TOKENIZED: "weakref.WeakKeyDictionary[Processor, dict]" = weakref.WeakKeyDictionary()
_TOKENIZED_MAX = 16384  # entries per processor; a full cache starts over


def tokenize_messages(messages: list[dict], processor: Processor, rows: list, cols: list) -> tuple[list, list]:
    """(ids, labels) of a chat whose images were split into rows x cols tiles. The chat is rendered one
    message at a time so each assistant answer is tokenized exactly as generation will see it: after
    the prompt's generation prefix. Results are memoized per processor (messages holding objects JSON
    cannot write, e.g. images in parts, are not)."""
    try:
        key = (json.dumps(messages, sort_keys=True), tuple(rows), tuple(cols))
    except TypeError:
        return _tokenize_messages(messages, processor, rows, cols)
    cache = _TOKENIZED.setdefault(processor, {})
    hit = cache.get(key)
    if hit is None:
        if len(cache) >= _TOKENIZED_MAX:
            cache.clear()
        hit = cache[key] = _tokenize_messages(messages, processor, rows, cols)
    return list(hit[0]), list(hit[1])


def _tokenize_messages(messages: list[dict], processor: Processor, rows: list, cols: list) -> tuple[list, list]:
    ids: list[int] = []
    labels: list[int] = []
    rendered, image_i = "", 0
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            prefix = processor.apply_chat_template(messages[:k], add_generation_prompt=True)
            full = processor.apply_chat_template(messages[: k + 1], add_generation_prompt=False)
            segments = [(prefix[len(rendered):], False), (full[len(prefix):], True)]
            rendered = full
        else:
            full = processor.apply_chat_template(messages[: k + 1], add_generation_prompt=False)
            segments = [(full[len(rendered):], False)]
            rendered = full
        for text, learn in segments:
            n_img = text.count(IMAGE)
            text = processor.expand_prompt(text, rows[image_i:image_i + n_img], cols[image_i:image_i + n_img])
            image_i += n_img
            seg = processor.tokenizer.encode(text, add_special_tokens=False).ids
            ids += seg
            labels += seg if learn else [IGNORE] * len(seg)
    return ids, labels


def pack_turns(messages: list[dict], processor: Processor, rows: list, cols: list) -> dict:
    """Each user/assistant exchange as its own single-turn chat (the first turn's images go with every
    question), packed: the tokens all of them start with (the image prefix) once, then each turn's rest.

        input_ids    [prefix][turn 1 rest][turn 2 rest]...
        position_ids 0..P-1  P..P+n1-1    P..P+n2-1       every turn at the positions it has alone
        branch_ids   0 ... 0  1 ... 1      2 ... 2         a token sees the prefix and its own turn only

    so each turn's tokens get exactly the hidden states they get alone (train/losses.py: branch_attention_mask)."""
    system = [m for m in messages if m["role"] == "system"]
    msgs = [m for m in messages if m["role"] != "system"]
    if not msgs or [m["role"] for m in msgs] != ["user", "assistant"] * (len(msgs) // 2):
        raise SmolVLMError("independent turns need alternating user / assistant messages")
    first = msgs[0]["content"]
    image_parts = [p for p in first if p.get("type") == "image"] if isinstance(first, list) else []
    turns = []
    for k in range(0, len(msgs), 2):
        question = msgs[k]["content"]
        if isinstance(question, list):
            question = [p for p in question if p.get("type") != "image"]
        else:
            question = [{"type": "text", "text": question}]
        single = system + [{"role": "user", "content": image_parts + question}, msgs[k + 1]]
        turns.append(tokenize_messages(single, processor, rows, cols))
    first_ids = turns[0][0]
    prefix = 0  # the longest start all turns share, before any label
    while (prefix < min(len(ids) for ids, _ in turns)
           and all(ids[prefix] == first_ids[prefix] and labels[prefix] == IGNORE for ids, labels in turns)):
        prefix += 1
    ids, labels = list(first_ids[:prefix]), [IGNORE] * prefix
    positions, branches = list(range(prefix)), [0] * prefix
    for b, (turn_ids, turn_labels) in enumerate(turns, 1):
        ids += turn_ids[prefix:]
        labels += turn_labels[prefix:]
        positions += range(prefix, len(turn_ids))
        branches += [b] * (len(turn_ids) - prefix)
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "branch_ids": branches}


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
    if any("branch_ids" in e for e in examples):
        # packed independent turns (pack_turns); a plain example is one branch (0) at positions 0..n-1
        position_ids = torch.zeros((b, t), dtype=torch.long)
        branch_ids = torch.full((b, t), -1, dtype=torch.long)  # -1: padding, seen by nobody
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            position_ids[i, :n] = torch.tensor(e.get("position_ids", range(n)))
            branch_ids[i, :n] = torch.tensor(e.get("branch_ids", [0] * n))
        batch["position_ids"], batch["branch_ids"] = position_ids, branch_ids
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
