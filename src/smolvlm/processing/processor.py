"""SmolVLM's processor: prompts -> image-token blocks -> input_ids, images -> pixel_values (images.py), chat
templates (chat_template.py); read from and written to a checkpoint folder's processor files.

Text: each `<image>` becomes `<fake_token_around_image><row_r_col_c><image>*image_seq_len` per tile
(a newline after each row), then `\n<fake_token_around_image><global-img><image>*n<fake_token_around_image>`.
A prompt's frames are padded to the batch's largest count with zero frames; pixel_attention_mask marks the real
pixels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, processors

from smolvlm.errors import SmolVLMError
from smolvlm.processing.chat_template import (
    SMOLVLM_CHAT_TEMPLATE,
    compile_chat_template,
    plain_value,
    template_reads_parts,
)
from smolvlm.processing.images import ImageProcessingConfig, image_frames, nest_images, normalize_frame, open_image
from smolvlm.special_tokens import END_OF_UTTERANCE, FAKE_IMAGE, GLOBAL_IMAGE, IMAGE, row_col_token

# ---------------------------------------------------------------------------------------------
# the processor


def _token_str(v: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or a serialized AddedToken."""
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SmolVLMError(f"{path} is not a readable JSON file ({e}); restore it from the checkpoint") from None
    if not isinstance(d, dict):
        raise SmolVLMError(f"{path} should hold a JSON object; restore it from the checkpoint")
    return d


PROCESSOR_CONFIG, PREPROCESSOR_CONFIG = "processor_config.json", "preprocessor_config.json"
# processor_config.json keys read into the processor itself; any others (e.g. "video_processor") are kept as they are
PROCESSOR_KEYS = ("image_processor", "image_seq_len", "processor_class", "chat_template")


def read_image_config(folder: Path, proc_cfg: dict, model_cfg: dict) -> tuple[ImageProcessingConfig | None, int]:
    """The image settings and image_seq_len from either layout transformers writes: 5.x nests the image processor
    in processor_config.json ("image_processor"; it wins over preprocessor_config.json, as in transformers), 4.x
    wrote preprocessor_config.json beside a processor_config.json holding image_seq_len. (None, 0): text-only."""
    proc_path, pre_path = folder / PROCESSOR_CONFIG, folder / PREPROCESSOR_CONFIG
    if proc_cfg.get("image_processor") is not None:
        image_config = ImageProcessingConfig.from_dict(proc_cfg["image_processor"], f'{proc_path} "image_processor"')
    elif pre_path.is_file():
        image_config = ImageProcessingConfig.from_dict(_read_json(pre_path), str(pre_path))
    elif "vision_config" in model_cfg:
        raise SmolVLMError(f"{folder} holds a vision model but no image processor settings (no {PREPROCESSOR_CONFIG} "
                           f'and no "image_processor" in {PROCESSOR_CONFIG}); copy them from the original checkpoint')
    else:
        return None, 0
    image_seq_len = proc_cfg.get("image_seq_len")
    if image_seq_len is None:  # older checkpoints: from the model config, as SmolVLM computes it
        vc = model_cfg.get("vision_config") or {}
        if not all(k in vc for k in ("image_size", "patch_size")) or "scale_factor" not in model_cfg:
            raise SmolVLMError(f"{folder} has no processor_config.json with image_seq_len and no "
                               "config.json to compute it from; add processor_config.json")
        image_seq_len = (vc["image_size"] // vc["patch_size"]) ** 2 // model_cfg["scale_factor"] ** 2
    elif isinstance(image_seq_len, bool) or not isinstance(image_seq_len, int) or image_seq_len <= 0:
        raise SmolVLMError(f"{proc_path}: image_seq_len={json.dumps(image_seq_len)} should be a positive integer "
                           "(image tokens per tile)")
    return image_config, image_seq_len


def processor_config_dict(image_config: ImageProcessingConfig, image_seq_len: int, extra: dict) -> dict:
    """processor_config.json as transformers 5.x writes it: the image processor nested, a video processor beside
    it (the loaded one, else one with the image settings: what transformers derives from preprocessor_config.json
    when the entry is missing), image_seq_len. extra: the loaded file's other keys, written back unchanged."""
    image = {k: v for k, v in image_config.to_dict().items() if k != "processor_class"}
    video = {k: v for k, v in image.items() if k not in ("do_image_splitting", "image_processor_type")}
    video["video_processor_type"] = "SmolVLMVideoProcessor"
    return {"video_processor": video, **extra, "image_processor": image, "image_seq_len": image_seq_len,
            "processor_class": "SmolVLMProcessor"}


class Processor:
    """Tokenizer + SmolVLM image processing + chat template; `processor(text, images)` gives the model's
    inputs. `image_config` is None for a text-only model."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_config: ImageProcessingConfig | None,
        image_seq_len: int,
        chat_template: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        *,
        bos_token: str | None = None,
        unk_token: str | None = None,
        clean_up_tokenization_spaces: bool = False,
        tokenizer_config: dict | None = None,
    ):
        if tokenizer.padding is not None or tokenizer.truncation is not None:
            # our own copy without them: we pad per batch ourselves and never truncate (like the processor)
            tokenizer = Tokenizer.from_str(tokenizer.to_str())
            tokenizer.no_padding()
            tokenizer.no_truncation()
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.image_seq_len = int(image_seq_len)
        if image_config is not None and chat_template is None:
            chat_template = SMOLVLM_CHAT_TEMPLATE
        self.chat_template = chat_template
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.tokenizer_config = dict(tokenizer_config or {})  # other fields, written back by save_pretrained
        self.processor_config_extra: dict = {}  # processor_config.json's other keys (a video processor), likewise

        def first_known(*candidates):
            return next((t for t in candidates if t is not None and tokenizer.token_to_id(t) is not None), None)

        self.eos_token = eos_token if eos_token is not None else first_known("<|im_end|>", "<|endoftext|>", "</s>")
        self.pad_token = pad_token if pad_token is not None else self.eos_token
        self.bos_token, self.unk_token = bos_token, unk_token
        tid = tokenizer.token_to_id
        self.bos_token_id = tid(bos_token) if bos_token is not None else None
        self.pad_token_id = tid(self.pad_token) if self.pad_token is not None else None
        eos_id = tid(self.eos_token) if self.eos_token is not None else None
        self.eos_token_ids: list[int] = [eos_id] if eos_id is not None else []
        self.end_of_utterance_id = tid(END_OF_UTTERANCE)
        self.image_token_id = tid(IMAGE)
        if image_config is not None:
            image_config.check()
            missing = [t for t in (IMAGE, FAKE_IMAGE, GLOBAL_IMAGE) if tid(t) is None]
            if missing:
                raise SmolVLMError(f"the tokenizer lacks SmolVLM's image tokens {missing}; use a SmolVLM tokenizer")
            if self.image_seq_len <= 0:
                raise SmolVLMError(f"image_seq_len must be positive for a vision model, got {image_seq_len}")

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def has_vision(self) -> bool:
        return self.image_config is not None

    # -- loading and saving -----------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> Processor:
        """Read tokenizer.json, tokenizer_config.json, the chat template (processor_config.json's
        "chat_template", chat_template.json, chat_template.jinja, tokenizer_config.json, in transformers'
        order of precedence), and the image settings and image_seq_len from processor_config.json and/or
        preprocessor_config.json (read_image_config)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise SmolVLMError(f"{folder} is not a folder; pass a checkpoint folder with tokenizer.json")
        if not (folder / "tokenizer.json").is_file():
            raise SmolVLMError(f"{folder} has no tokenizer.json; smolvlm needs a fast (tokenizers) tokenizer")
        try:
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise SmolVLMError(f"{folder / 'tokenizer.json'} is not a valid tokenizer ({e})") from None

        def optional(name: str) -> dict:
            return _read_json(folder / name) if (folder / name).is_file() else {}

        tok_cfg, proc_cfg = optional("tokenizer_config.json"), optional("processor_config.json")
        model_cfg, gen_cfg = optional("config.json"), optional("generation_config.json")
        specials = {k: _token_str(tok_cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        _apply_transformers_tokenizer_fixups(tokenizer, tok_cfg, specials)

        chat_template, template_file = proc_cfg.get("chat_template"), PROCESSOR_CONFIG
        if chat_template is None and (folder / "chat_template.json").is_file():
            chat_template, template_file = _read_json(folder / "chat_template.json").get("chat_template"), \
                "chat_template.json"
        if chat_template is None and (folder / "chat_template.jinja").is_file():
            chat_template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        if chat_template is None:
            chat_template, template_file = tok_cfg.get("chat_template"), "tokenizer_config.json"
        if isinstance(chat_template, list):  # the old named-templates format
            if not all(isinstance(t, dict) and {"name", "template"} <= set(t) for t in chat_template):
                raise SmolVLMError(f"{folder / template_file}: chat_template should be a Jinja template string or "
                                   'a list of {"name": ..., "template": ...}')
            chat_template = {t["name"]: t["template"] for t in chat_template}.get("default")
        if chat_template is not None and not isinstance(chat_template, str):
            raise SmolVLMError(f"{folder / template_file}: chat_template should be a Jinja template string, "
                               f"got {type(chat_template).__name__}")

        image_config, image_seq_len = read_image_config(folder, proc_cfg, model_cfg)

        proc = cls(
            tokenizer, image_config, image_seq_len, chat_template=chat_template,
            eos_token=specials["eos_token"], pad_token=specials["pad_token"],
            bos_token=specials["bos_token"], unk_token=specials["unk_token"],
            clean_up_tokenization_spaces=bool(tok_cfg.get("clean_up_tokenization_spaces", False)),
            tokenizer_config=tok_cfg,
        )
        if image_config is not None:
            proc.processor_config_extra = {k: v for k, v in proc_cfg.items() if k not in PROCESSOR_KEYS}
        extra = gen_cfg.get("eos_token_id")
        for i in extra if isinstance(extra, list) else [extra]:
            if isinstance(i, int) and i not in proc.eos_token_ids:
                proc.eos_token_ids.append(i)
        return proc

    def save_pretrained(self, folder: str | Path) -> None:
        """tokenizer.json, tokenizer_config.json, chat_template.jinja, and for a vision model both image layouts:
        preprocessor_config.json (what transformers 4.x reads) and processor_config.json with the image processor
        nested (what 5.x writes and reads first), so that either version loads the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(folder / "tokenizer.json"))
        drop = {"chat_template", "added_tokens_decoder", "name_or_path", "tokenizer_file", "is_local",
                "local_files_only", "auto_map"}
        cfg = {k: v for k, v in self.tokenizer_config.items() if k not in drop}
        cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            cfg.pop(key, None)
            if getattr(self, key) is not None:
                cfg[key] = getattr(self, key)
        cfg["clean_up_tokenization_spaces"] = self.clean_up_tokenization_spaces
        if self.has_vision:
            cfg["processor_class"] = "SmolVLMProcessor"
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        if self.chat_template is not None:
            (folder / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
            if (folder / "chat_template.json").exists():  # the legacy file wins in transformers; keep it in sync
                (folder / "chat_template.json").write_text(json.dumps({"chat_template": self.chat_template}))
        if self.has_vision:
            (folder / PREPROCESSOR_CONFIG).write_text(json.dumps(self.image_config.to_dict(), indent=2) + "\n")
            proc = processor_config_dict(self.image_config, self.image_seq_len, self.processor_config_extra)
            (folder / PROCESSOR_CONFIG).write_text(json.dumps(proc, indent=2, sort_keys=True) + "\n")

    # -- images -------------------------------------------------------------------------------------

    def _require_vision(self) -> ImageProcessingConfig:
        if self.image_config is None:
            raise SmolVLMError("this model has no vision encoder (a text-only checkpoint); drop the images")
        return self.image_config

    def process_images(self, images: Any) -> dict:
        """images: one list of PIL images (or paths) per prompt -> pixel_values float32 (B, I, 3, H, W),
        pixel_attention_mask bool (B, I, H, W) (I = the most frames of any prompt), rows, cols
        (per prompt, per image; 0, 0 for an unsplit image). Same values as SmolVLMImageProcessorPil;
        its mask is int64 (we use bool), and it keeps uint8 pixels when both rescale and normalize are off
        (we always give float32)."""
        cfg = self._require_vision()
        batch = nest_images(images, 1)
        frames, rows, cols = [], [], []
        for sample in batch:
            f, r, c = [], [], []
            for image in sample:
                if isinstance(image, (str, Path)):
                    image = open_image(image)
                fi, ri, ci = image_frames(image, cfg)
                f += fi  # uint8 until written into the batch (a float32 copy of every frame would add its size)
                r.append(ri)
                c.append(ci)
            frames.append(f)
            rows.append(r)
            cols.append(c)
        all_frames = [x for f in frames for x in f]
        if not all_frames:
            raise SmolVLMError("no images were given to process")
        n = max(len(f) for f in frames)
        h = max(x.shape[0] for x in all_frames)  # frames are (h, w, 3) here
        w = max(x.shape[1] for x in all_frames)
        if not cfg.do_pad and (any(len(f) != n for f in frames) or any(x.shape[:2] != (h, w) for x in all_frames)):
            raise SmolVLMError("without do_pad every prompt needs the same number of same-sized frames; "
                               "set do_pad=True")
        pixel_values = np.zeros((len(frames), n, 3, h, w), dtype=np.float32)  # missing frames stay all-zero
        mask = np.zeros((len(frames), n, h, w), dtype=bool) if cfg.do_pad else None
        for i, f in enumerate(frames):
            for j, x in enumerate(f):
                pixel_values[i, j, :, : x.shape[0], : x.shape[1]] = normalize_frame(x, cfg)
                if mask is not None:
                    mask[i, j, : x.shape[0], : x.shape[1]] = True
        out = {"pixel_values": torch.from_numpy(pixel_values), "rows": rows, "cols": cols}
        if mask is not None:
            out["pixel_attention_mask"] = torch.from_numpy(mask)
        return out

    # -- text ---------------------------------------------------------------------------------------

    def image_prompt(self, rows: int, cols: int) -> str:
        """The token block that stands for one image of rows x cols tiles (+ global image)."""
        tokens = IMAGE * self.image_seq_len
        if rows == 0 and cols == 0:
            return f"{FAKE_IMAGE}{GLOBAL_IMAGE}{tokens}{FAKE_IMAGE}"
        if self.tokenizer.token_to_id(row_col_token(rows, cols)) is None:
            raise SmolVLMError(
                f"an image split into {rows}x{cols} tiles needs a {row_col_token(rows, cols)} token, which the "
                "tokenizer lacks; lower longest_edge or raise max_image_size in the image config")
        text = ""
        for r in range(1, rows + 1):
            text += "".join(f"{FAKE_IMAGE}{row_col_token(r, c)}{tokens}" for c in range(1, cols + 1)) + "\n"
        return text + f"\n{FAKE_IMAGE}{GLOBAL_IMAGE}{tokens}{FAKE_IMAGE}"

    def expand_prompt(self, text: str, rows: list[int], cols: list[int]) -> str:
        """Replace the i-th `<image>` of text with image i's full token block."""
        pieces = text.split(IMAGE)
        if len(pieces) - 1 != len(rows) or len(rows) != len(cols):
            raise SmolVLMError(f"the text has {len(pieces) - 1} {IMAGE} placeholders but {len(rows)} images were "
                               f"given; put one {IMAGE} in the text per image")
        out = [pieces[0]]
        for r, c, piece in zip(rows, cols, pieces[1:], strict=True):
            out += [self.image_prompt(r, c), piece]
        return "".join(out)

    def __call__(self, text: str | list[str], images: Any = None, padding_side: str = "left",
                 add_special_tokens: bool = True) -> dict:
        """input_ids (B, T) int64 and attention_mask (B, T) int64, padded with the pad token on
        padding_side ("left" for generation, "right" for training); with images also pixel_values
        (B, I, 3, H, W) float32 and pixel_attention_mask (B, I, H, W) bool."""
        if padding_side not in ("left", "right"):
            raise SmolVLMError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise SmolVLMError("text must be a string or a non-empty list of strings")
        batch = nest_images(images, len(texts))
        out: dict[str, Any] = {}
        if any(batch):
            self._require_vision()
        if self.has_vision:
            if batch and len(batch) != len(texts):
                raise SmolVLMError(f"got {len(texts)} prompts but {len(batch)} lists of images; "
                                   "pass one list of images per prompt")
            counts = [t.count(IMAGE) for t in texts]
            given = [len(b) for b in batch] if batch else [0] * len(texts)
            if counts != given:
                raise SmolVLMError(f"the prompts have {counts} {IMAGE} placeholders but {given} images were "
                                   f"given; put one {IMAGE} in each prompt per image")
            if any(given):
                pixels = self.process_images(batch)
                texts = [self.expand_prompt(t, r, c) for t, r, c in zip(texts, pixels["rows"], pixels["cols"],
                                                                        strict=True)]
                out = {k: v for k, v in pixels.items() if k not in ("rows", "cols")}
        ids = [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)]
        longest = max(len(x) for x in ids)
        if any(len(x) != longest for x in ids) and self.pad_token_id is None:
            raise SmolVLMError("prompts of different lengths need a pad token, and the tokenizer has none")
        input_ids = torch.full((len(ids), longest), self.pad_token_id or 0, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), longest), dtype=torch.long)
        for i, x in enumerate(ids):
            span = slice(longest - len(x), longest) if padding_side == "left" else slice(0, len(x))
            input_ids[i, span] = torch.tensor(x, dtype=torch.long)
            attention_mask[i, span] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, **out}

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render the chat template with jinja2 as transformers does. Content may be a string or a list
        of {"type": "image"} / {"type": "text", "text": ...} parts. A string becomes one text part for
        templates that walk parts (SmolVLM's; transformers would render it as nothing there), and parts
        are joined into one string, images as `<image>`, for templates that print content as a string
        (e.g. SmolLM2's ChatML, where transformers would fail on a list)."""
        if self.chat_template is None:
            raise SmolVLMError("this model has no chat template; format the prompt yourself or pass chat_template=")
        reads_parts = template_reads_parts(self.chat_template)
        chat = []
        for m in messages:
            if not isinstance(m, dict) or "role" not in m:
                raise SmolVLMError(f"each chat message must be a dict with 'role' and 'content', got {m!r}")
            m = {k: v for k, v in m.items() if v is not None}  # as transformers: a None key is a missing key
            content = m.get("content")
            if isinstance(content, (list, tuple)):
                if not all(isinstance(p, dict) and "type" in p for p in content):
                    raise SmolVLMError("message content parts must be dicts with a 'type' ('image' or 'text')")
                if any(p["type"] == "image" for p in content):
                    self._require_vision()
                if not reads_parts:  # a string template: the parts in order, each image as its placeholder
                    content = "".join(IMAGE if p["type"] == "image" else p.get("text", "") for p in content
                                      if p["type"] in ("image", "text"))
            elif isinstance(content, str) and reads_parts:
                content = [{"type": "text", "text": content}]
            m["content"] = content
            chat.append(plain_value(m))
        special = {k: getattr(self, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                   if getattr(self, k) is not None}
        try:
            return compile_chat_template(self.chat_template).render(
                messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                **{**special, **plain_value(kwargs)})
        except jinja2.exceptions.TemplateError as e:
            raise SmolVLMError(f"the chat template failed on these messages: {e}") from None

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = [ids] if isinstance(ids, int) else list(ids)
        text = self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces and type(self.tokenizer.model).__name__ != "BPE":
            # transformers' clean_up_tokenization (it skips it for BPE tokenizers, which it would corrupt)
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text


def _apply_transformers_tokenizer_fixups(tokenizer: Tokenizer, cfg: dict, specials: dict) -> None:
    """What transformers' tokenizer loading does on top of tokenizer.json: special tokens named in
    tokenizer_config.json but missing from the vocabulary are added, and an explicit add_bos_token /
    add_eos_token rebuilds the post-processor (BOS/EOS around every encoded text)."""
    named = [t for t in specials.values() if t is not None]
    extra = cfg.get("extra_special_tokens") or cfg.get("additional_special_tokens") or []
    extra = list(extra.values()) if isinstance(extra, dict) else list(extra)
    missing = [t for t in named + [_token_str(t) for t in extra] if t is not None and tokenizer.token_to_id(t) is None]
    if missing:
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)])
    if "add_bos_token" in cfg or "add_eos_token" in cfg or tokenizer.post_processor is None:
        bos, eos = specials["bos_token"], specials["eos_token"]
        add_bos = bool(cfg.get("add_bos_token")) and bos is not None
        add_eos = bool(cfg.get("add_eos_token")) and eos is not None
        single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
        pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
        special = ([(bos, tokenizer.token_to_id(bos))] if add_bos else []) + (
            [(eos, tokenizer.token_to_id(eos))] if add_eos else [])
        tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
