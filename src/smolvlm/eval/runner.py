"""``smolvlm eval``: run a model on a benchmark in its own file format and score it with the official metrics.

One task at a time::

    smolvlm eval --model M --task vqav2 --data DIR --images DIR [--limit N] [--batch-size B] [--out DIR]

or the shapes suite, which prints the table the SmolVLM documents print (one row per model) and an
efficiency table::

    smolvlm eval --suite shapes --model M [--model M2 ...] [--limit N] [--out DIR] [--json]

Tasks and what they score (see docs/eval.md for the data layouts):

============================  ===========================================  ============================
task                          data                                         metric
============================  ===========================================  ============================
vqav2                         folder with VQA ``*questions*.json`` and      official VQA accuracy
                              ``*annotations*.json``
coco-captions                 COCO ``captions_*.json`` or Karpathy          BLEU-1..4, ROUGE-L, CIDEr-D
                              ``dataset_coco.json`` (``--split``)           (METEOR with ``--meteor``)
flickr30k-retrieval           Karpathy ``dataset_flickr30k.json`` or a      Recall@1/5/10, both ways
                              Flickr30k Entities folder (``sentences/`` +
                              ``<split>.txt``)
gqa                           GQA questions JSON or a folder of shards      exact-match accuracy
nlvr2                         NLVR2 jsonl                                   accuracy (true/false)
shapes-vqa, shapes-gqa,       generated in memory (``ShapesWorld``), or     as above
shapes-captions,              ``--data`` = a folder written by
shapes-retrieval,             ``smolvlm.data.shapes.export``
shapes-nlvr2
============================  ===========================================  ============================

Retrieval scores every (image, caption) pair by the model's mean log-probability per token of the
caption as its answer to the caption prompt given the image (the image is encoded once, the captions
go through the decoder in batches), or, for a model with a contrastive head (``--retrieval-scoring
contrastive``, the default for such models), by the cosine of its image and caption embeddings.
Predictions go to ``OUT/predictions.jsonl`` as they are made (flushed per batch), so a run that is
stopped resumes where it was; ``metrics.json`` is written atomically at the end. An image that cannot
be read is counted and reported: its questions are scored as unanswered (an empty answer, which is
wrong), its captions as empty, and in retrieval the image and its captions are left out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smolvlm.cli.options import DTYPE_HELP
from smolvlm.errors import SmolVLMError

__all__ = ["TASKS", "add_parser", "run_task", "run_suite"]

TASKS = ("vqav2", "coco-captions", "flickr30k-retrieval", "gqa", "nlvr2",
         "shapes-vqa", "shapes-gqa", "shapes-captions", "shapes-retrieval", "shapes-nlvr2")
SUITE_TASKS = ("shapes-vqa", "shapes-captions", "shapes-retrieval", "shapes-gqa", "shapes-nlvr2")
# Examples per shapes task when --limit is not given (questions, images or pairs; retrieval: images,
# each with its 5 captions, so the similarity matrix is 20 x 100).
SHAPES_DEFAULT_LIMIT = {"shapes-vqa": 200, "shapes-gqa": 200, "shapes-captions": 50, "shapes-retrieval": 20,
                        "shapes-nlvr2": 100}
# The usual short-answer instruction for VQAv2 / GQA (LLaVA's evaluation prompt).
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
MAX_NEW_TOKENS = {"qa": 16, "caption": 48}


# ------------------------------------------------------------------------------------------ examples
@dataclass
class QAExample:
    """A question about one or two images; `gold` is what the task's scorer needs."""

    id: Any
    images: list  # paths or PIL images
    prompt: str
    gold: Any
    meta: dict = field(default_factory=dict)


@dataclass
class CaptionExample:
    id: Any
    image: Any  # a path or a PIL image
    refs: list[str]


@dataclass
class TaskData:
    kind: str  # "qa", "caption" or "retrieval"
    examples: list


def _open_image(image):
    """A PIL image from a path (read as every command reads images: processing.open_image, EXIF orientation applied;
    the processor puts transparency on white) or a PIL image; None and the reason when it cannot be read."""
    from PIL import Image

    from smolvlm.processing import open_image

    if isinstance(image, Image.Image):
        return image, None
    try:
        return open_image(image), None
    except SmolVLMError as e:
        return None, str(e)


def _find_one(folder: Path, pattern: str, what: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        listing = ", ".join(p.name for p in found) or "none"
        raise SmolVLMError(f"{folder} must hold exactly one {what} file ({pattern}), found {listing}; "
                           "give a folder with one questions and one annotations file")
    return found[0]


def _images_dir(args, data: Path) -> Path:
    if args.images:
        return Path(args.images)
    base = data if data.is_dir() else data.parent
    return base / "images" if (base / "images").is_dir() else base


def load_task_data(task: str, args) -> TaskData:
    """The examples of `task` (at most args.limit), from args.data or generated (shapes)."""
    from smolvlm.data.shapes import PAIR_PROMPT
    from smolvlm.eval import readers

    limit = args.limit
    if task.startswith("shapes-"):
        return _shapes_data(task, args)
    if args.data is None:
        raise SmolVLMError(f"--task {task} needs --data (the benchmark's files); see smolvlm eval --help")
    data = Path(args.data)
    if not data.exists():
        raise SmolVLMError(f"--data {data} does not exist")
    images = _images_dir(args, data)
    if task == "vqav2":
        if not data.is_dir():
            raise SmolVLMError("--data for vqav2 is the folder holding the questions and annotations JSON files")
        exs = readers.read_vqav2(_find_one(data, "*questions*.json", "questions"),
                                 _find_one(data, "*annotations*.json", "annotations"), images)
        exs = exs[:limit] if limit else exs
        return TaskData("qa", [QAExample(e.question_id, [e.image_path], e.question + SHORT_ANSWER,
                                         e.answers, {"answer_type": e.answer_type, "question_type": e.question_type})
                               for e in exs])
    if task == "gqa":
        exs = readers.read_gqa(data, images)
        if any(e.answer is None for e in exs):
            raise SmolVLMError(f"{data} has questions without answers (a test split?); GQA accuracy needs them")
        exs = exs[:limit] if limit else exs
        return TaskData("qa", [QAExample(e.question_id, [e.image_path], e.question + SHORT_ANSWER, e.answer)
                               for e in exs])
    if task == "nlvr2":
        exs = readers.read_nlvr2(data, images)
        if any(e.label is None for e in exs):
            raise SmolVLMError(f"{data} has examples without labels (the hidden test set?); accuracy needs them")
        exs = exs[:limit] if limit else exs
        return TaskData("qa", [QAExample(e.identifier, [e.left_image, e.right_image], PAIR_PROMPT.format(e.sentence),
                                         e.label) for e in exs])
    if task == "coco-captions":
        caps = _read_caption_file(data, images, args.split)
        caps = caps[:limit] if limit else caps
        return TaskData("caption", [CaptionExample(c.image_id, c.image_path, c.captions) for c in caps])
    if task == "flickr30k-retrieval":
        if data.is_dir():
            sentences = next((data / n for n in ("sentences", "Sentences") if (data / n).is_dir()), None)
            if sentences is None:
                raise SmolVLMError(f"{data} has no sentences/ folder; give Flickr30k Entities' folder or the "
                                   "Karpathy dataset_flickr30k.json")
            split_file = data / f"{args.split or 'test'}.txt"
            if not split_file.is_file():
                raise SmolVLMError(f"{split_file} does not exist; pass --split with a split list in {data}")
            caps = readers.read_flickr30k_entities(sentences, split_file, images)
        else:
            caps = _read_caption_file(data, images, args.split)
        caps = caps[:limit] if limit else caps
        return TaskData("retrieval", [CaptionExample(c.image_id, c.image_path, c.captions) for c in caps])
    raise SmolVLMError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def _read_caption_file(path: Path, images: Path, split: str | None):
    from smolvlm.eval import readers

    if path.is_dir():
        raise SmolVLMError(f"{path} is a folder; give the COCO captions or Karpathy JSON file")
    d = readers.load_json(path)
    if isinstance(d, dict) and isinstance(d.get("annotations"), list):
        return readers.read_coco_captions(path, images)
    split = split or "test"
    caps = readers.read_karpathy(path, images, split=split)
    if not caps:
        raise SmolVLMError(f"{path} has no images in split {split!r}; pass --split (train, restval, val or test)")
    return caps


def _shapes_data(task: str, args) -> TaskData:
    limit = args.limit or SHAPES_DEFAULT_LIMIT[task]
    if args.data is not None:
        return _shapes_export_data(task, Path(args.data), limit)
    from smolvlm.data.shapes import PAIR_PROMPT, ShapesWorld, WorldConfig

    world = ShapesWorld(WorldConfig.from_dict(args.world), seed=args.seed)
    if task in ("shapes-vqa", "shapes-gqa"):
        # VQA-style on the test split; GQA-style (compositional generalisation) on the held-out combos
        split = "test" if task == "shapes-vqa" else "compositional"
        out = []
        for item in world.vqa(split, math.ceil(limit / 4), questions_per_image=4):
            for k, q in enumerate(item.questions):
                gold = [q.answer] * 10 if task == "shapes-vqa" else q.answer  # VQA: ten agreeing annotators
                out.append(QAExample(f"{item.scene.id}-{k}", [item.image], q.question, gold,
                                     {"answer_type": q.qtype, "question_type": q.qtype}))
        return TaskData("qa", out[:limit])
    if task in ("shapes-captions", "shapes-retrieval"):
        exs = [CaptionExample(item.scene.id, item.image, item.captions) for item in world.captioning("test", limit)]
        return TaskData("caption" if task == "shapes-captions" else "retrieval", exs)
    return TaskData("qa", [QAExample(f"pair-{i:06d}", [p.left_image, p.right_image], PAIR_PROMPT.format(p.statement),
                                     p.label) for i, p in enumerate(world.pairs("test", limit))])


def _read_jsonl(path: Path) -> list[dict]:
    from smolvlm.eval.readers import _load_jsonl

    if not path.is_file():
        raise SmolVLMError(f"{path} does not exist; --data for a shapes task is a split folder written by "
                           "smolvlm.data.shapes.export (with questions.jsonl, captions.jsonl, pairs.jsonl)")
    return _load_jsonl(path)


def _shapes_export_data(task: str, folder: Path, limit: int) -> TaskData:
    from smolvlm.data.shapes import PAIR_PROMPT

    if task in ("shapes-vqa", "shapes-gqa"):
        rows = _read_jsonl(folder / "questions.jsonl")[:limit]
        return TaskData("qa", [
            QAExample(f"q{i:06d}", [folder / r["image"]], r["question"],
                      [r["answer"]] * 10 if task == "shapes-vqa" else r["answer"],
                      {"answer_type": r.get("type"), "question_type": r.get("type")})
            for i, r in enumerate(rows)])
    if task in ("shapes-captions", "shapes-retrieval"):
        rows = _read_jsonl(folder / "captions.jsonl")[:limit]
        return TaskData("caption" if task == "shapes-captions" else "retrieval",
                        [CaptionExample(r["image"], folder / r["image"], r["captions"]) for r in rows])
    rows = _read_jsonl(folder / "pairs.jsonl")[:limit]
    return TaskData("qa", [QAExample(f"pair-{i:06d}", [folder / r["left"], folder / r["right"]],
                                     PAIR_PROMPT.format(r["statement"]), bool(r["label"]))
                           for i, r in enumerate(rows)])


# ---------------------------------------------------------------------------------------- run folder
class RunFolder:
    """OUT/run.json (what was run), OUT/predictions.jsonl (one line per example, appended and flushed
    per batch), OUT/timing.jsonl (samples and seconds of each session), OUT/metrics.json (atomic)."""

    def __init__(self, folder: Path, identity: dict, fresh: bool):
        self.folder = folder
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SmolVLMError(f"cannot create {folder} ({exc.strerror}); pass a writable --out") from None
        self.preds_path = folder / "predictions.jsonl"
        run_json = folder / "run.json"
        if fresh:
            for name in ("predictions.jsonl", "timing.jsonl", "metrics.json", "run.json"):
                (folder / name).unlink(missing_ok=True)
        if run_json.is_file():
            try:
                old = json.loads(run_json.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                old = None
            if old != identity:
                raise SmolVLMError(f"{folder} holds predictions of a different run ({run_json}); use another --out "
                                   "or pass --fresh to discard them")
        else:
            atomic_write_text(run_json, json.dumps(identity, indent=2) + "\n")
        self.done: dict[str, dict] = {}
        if self.preds_path.is_file():
            with open(self.preds_path, "rb") as f:
                raw = f.read()
            good = 0
            for line in raw.split(b"\n"):
                if not line.endswith(b"}"):  # a line cut short by a kill: dropped and redone
                    break
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    break
                self.done[str(row["id"])] = row
                good += len(line) + 1
            if good < len(raw):  # cut the partial tail so appends start on a fresh line
                with open(self.preds_path, "r+b") as f:
                    f.truncate(good)
        self._file = open(self.preds_path, "a", encoding="utf-8")

    def add(self, rows: list[dict]) -> None:
        for row in rows:
            self._file.write(json.dumps(row) + "\n")
            self.done[str(row["id"])] = row
        self._file.flush()
        os.fsync(self._file.fileno())

    def add_timing(self, samples: int, seconds: float, peak_mb: float) -> None:
        with open(self.folder / "timing.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"samples": samples, "seconds": seconds, "peak_memory_mb": peak_mb}) + "\n")

    def timing(self) -> dict:
        rows = []
        path = self.folder / "timing.jsonl"
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        samples = sum(r["samples"] for r in rows)
        seconds = sum(r["seconds"] for r in rows)
        peaks = [r["peak_memory_mb"] for r in rows if r.get("peak_memory_mb") is not None]
        return {"samples": samples, "seconds": round(seconds, 3),
                "samples_per_s": round(samples / seconds, 3) if seconds > 0 else None,
                "peak_memory_mb": round(max(peaks), 1) if peaks else None}

    def close(self) -> None:
        self._file.close()


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class PeakMemory:
    """Peak resident memory (MB) of this process while the block runs. On Linux the high-water mark
    is reset first (``/proc/self/clear_refs``), so each model/task gets its own peak; elsewhere it is
    the process's peak so far (``getrusage``)."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.resettable = True
        except OSError:
            self.resettable = False
        return self

    def __exit__(self, *exc):
        self.mb = None
        if self.resettable:
            try:
                for line in Path("/proc/self/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.mb = int(line.split()[1]) / 1024
            except OSError:
                pass
        if self.mb is None:
            self.mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
        return False


# ------------------------------------------------------------------------------------------- model work
def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="ex", disable=not enabled, dynamic_ncols=True, file=sys.stderr)


def _messages(n_images: int, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


def generate_answers(model, processor, prompts: list[str], images: list[list], max_new_tokens: int) -> list[str]:
    """Greedy answers, one per prompt, in one left-padded batch (images: one list per prompt; a
    text-only model gets the prompts without images)."""
    from smolvlm.generation import SamplingParams, generate_batch

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    if model.has_vision:
        texts = [processor.apply_chat_template(_messages(len(ims), p), add_generation_prompt=True)
                 for p, ims in zip(prompts, images, strict=True)]
        inputs = processor(texts, images=images)
    else:
        texts = [processor.apply_chat_template(_messages(0, p), add_generation_prompt=True) for p in prompts]
        inputs = processor(texts)
    return [r.text.strip() for r in generate_batch(model, processor, inputs, params)]


def run_generation(model, processor, run: RunFolder, examples: list, kind: str, args, desc: str) -> tuple[int, float]:
    """Answer (or caption) every example not yet in `run`; returns (examples done now, seconds)."""
    import torch

    from smolvlm.data.shapes import CAPTION_PROMPT

    todo = [ex for ex in examples if str(ex.id) not in run.done]
    max_new = args.max_new_tokens or MAX_NEW_TOKENS["qa" if kind == "qa" else "caption"]
    t0 = time.perf_counter()
    bar = _progress(len(examples), desc, args.progress)
    bar.update(len(examples) - len(todo))
    with torch.inference_mode():
        for start in range(0, len(todo), args.batch_size):
            chunk = todo[start:start + args.batch_size]
            rows, ready = [], []
            for ex in chunk:
                paths = ex.images if kind == "qa" else [ex.image]
                opened, errors = [], []
                if model.has_vision:
                    for p in paths:
                        im, err = _open_image(p)
                        opened.append(im)
                        if err:
                            errors.append(err)
                if errors:
                    rows.append({"id": ex.id, "prediction": "", "error": "; ".join(errors)})
                else:
                    ready.append((ex, opened))
            if ready:
                prompts = [ex.prompt if kind == "qa" else CAPTION_PROMPT for ex, _ in ready]
                answers = generate_answers(model, processor, prompts, [ims for _, ims in ready], max_new)
                rows += [{"id": ex.id, "prediction": a} for (ex, _), a in zip(ready, answers, strict=True)]
            run.add(rows)
            bar.update(len(chunk))
    bar.close()
    return len(todo), time.perf_counter() - t0


def caption_logprobs(model, processor, image, captions: list[str], batch_size: int) -> list[float]:
    """Mean log-probability per token of each caption as the answer to CAPTION_PROMPT about `image`."""
    import torch

    from smolvlm.data.shapes import CAPTION_PROMPT

    prefix_text = processor.apply_chat_template(_messages(1, CAPTION_PROMPT), add_generation_prompt=True)
    inputs = processor(prefix_text, images=[[image]])
    prefix = inputs["input_ids"][0].tolist()
    embeds = model.encode_images(inputs["pixel_values"], inputs.get("pixel_attention_mask"))
    sep = _answer_separator(processor)
    out = []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start:start + batch_size]
        conts = [processor.tokenizer.encode(sep + c, add_special_tokens=False).ids or [processor.pad_token_id or 0]
                 for c in chunk]
        length = len(prefix) + max(len(c) for c in conts)
        ids = torch.full((len(chunk), length), processor.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for i, c in enumerate(conts):
            ids[i, :len(prefix) + len(c)] = torch.tensor(prefix + c)
            mask[i, :len(prefix) + len(c)] = 1
        h = model.hidden_states(ids, image_embeds=embeds.repeat(len(chunk), 1, 1), attention_mask=mask)
        for i, c in enumerate(conts):
            # the logits at position t predict token t + 1
            logits = model.lm_head(h[i, len(prefix) - 1:len(prefix) - 1 + len(c)]).float()
            lp = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(c)[:, None])
            out.append(float(lp.mean()))
    return out


def _answer_separator(processor) -> str:
    """What the chat template puts between the generation prompt and the assistant's text (e.g. a
    space after SmolVLM's "Assistant:", nothing after ChatML's "assistant\\n")."""
    marker = "\u2063caption\u2063"
    gen = processor.apply_chat_template(_messages(0, "x"), add_generation_prompt=True)
    full = processor.apply_chat_template(_messages(0, "x") + [
        {"role": "assistant", "content": [{"type": "text", "text": marker}]}], add_generation_prompt=False)
    if full.startswith(gen) and marker in full[len(gen):]:
        return full[len(gen):full.index(marker, len(gen))]
    return ""


def caption_embeddings(model, processor, captions: list[str], batch_size: int):
    """The contrastive head's embeddings of the captions (C, D), as training computes them."""
    import torch

    out = []
    for start in range(0, len(captions), batch_size):
        inputs = processor(captions[start:start + batch_size], padding_side="right")
        out.append(model.text_embedding(inputs["input_ids"], inputs["attention_mask"]).float())
    return torch.cat(out)


def image_embedding(model, processor, image):
    """The contrastive head's embedding (D,) of one image, placed in the caption prompt as in training."""
    from smolvlm.data.shapes import CAPTION_PROMPT

    text = processor.apply_chat_template(_messages(1, CAPTION_PROMPT), add_generation_prompt=True)
    inputs = processor(text, images=[[image]])
    embeds = model.encode_images(inputs["pixel_values"], inputs.get("pixel_attention_mask"))
    return model.image_embedding(inputs["input_ids"], embeds)[0].float()


def retrieval_scoring(model, args) -> str:
    mode = getattr(args, "retrieval_scoring", "auto")
    if mode == "contrastive" and not model.has_contrastive:
        raise SmolVLMError("--retrieval-scoring contrastive needs a model with a contrastive head (trained with "
                           "contrastive_weight > 0 or a 'contrastive' stage); use logprob")
    if mode == "auto":
        return "contrastive" if model.has_contrastive else "logprob"
    return mode


def run_retrieval(model, processor, run: RunFolder, examples: list, args, desc: str) -> tuple[int, float]:
    """One row per image: the scores of every caption of every image (cached per image)."""
    import torch

    captions = [c for ex in examples for c in ex.refs]
    todo = [ex for ex in examples if str(ex.id) not in run.done]
    t0 = time.perf_counter()
    bar = _progress(len(examples), desc, args.progress)
    bar.update(len(examples) - len(todo))
    contrastive = retrieval_scoring(model, args) == "contrastive"
    with torch.inference_mode():
        texts = caption_embeddings(model, processor, captions, args.batch_size) if contrastive and todo else None
        for ex in todo:
            im, err = _open_image(ex.image)
            if err:
                run.add([{"id": ex.id, "scores": None, "error": err}])
            elif contrastive:
                run.add([{"id": ex.id, "scores": (texts @ image_embedding(model, processor, im)).tolist()}])
            else:
                run.add([{"id": ex.id, "scores": caption_logprobs(model, processor, im, captions, args.batch_size)}])
            bar.update(1)
    bar.close()
    return len(todo) * len(captions), time.perf_counter() - t0


# ------------------------------------------------------------------------------------------- scoring
def score_task(task: str, data: TaskData, run: RunFolder, args) -> dict:
    rows = {str(ex.id): run.done[str(ex.id)] for ex in data.examples}
    errors = {k: r["error"] for k, r in rows.items() if r.get("error")}
    result: dict[str, Any] = {"task": task, "examples": len(data.examples), "unreadable_images": len(errors)}
    if errors:
        result["unreadable"] = dict(list(errors.items())[:20])
    if data.kind == "retrieval":
        result.update(_score_retrieval(data.examples, rows))
        return result
    preds = {ex.id: rows[str(ex.id)]["prediction"] for ex in data.examples}
    if data.kind == "caption":
        from smolvlm.eval.caption_metrics import score_captions

        res = score_captions({ex.id: ex.refs for ex in data.examples}, preds, with_meteor=args.meteor)
        result.update(res.scores)
        if res.unavailable.get("METEOR") and args.meteor:
            result["METEOR_unavailable"] = res.unavailable["METEOR"]
        result["warnings"] = res.warnings
        return result
    if task in ("vqav2", "shapes-vqa"):
        from smolvlm.eval.vqa_metric import evaluate_vqa

        missing = [ex.id for ex in data.examples if not ex.gold]
        if missing:
            raise SmolVLMError(f"{len(missing)} question(s) have no human answers (e.g. {missing[:3]}); "
                               "VQA accuracy needs the annotations of a train/val split")
        qs = [{"question_id": ex.id, "answers": ex.gold, **ex.meta} for ex in data.examples]
        res = evaluate_vqa(preds, qs)
        result.update({"accuracy": res.overall, "per_answer_type": res.per_answer_type,
                       "official": res.official()})
        return result
    if task in ("gqa", "shapes-gqa"):
        from smolvlm.eval.accuracy import gqa_accuracy

        res = gqa_accuracy(preds, {ex.id: ex.gold for ex in data.examples})
        result["accuracy"] = res.overall
        return result
    from smolvlm.eval.accuracy import nlvr2_accuracy

    res = nlvr2_accuracy(preds, {ex.id: ex.gold for ex in data.examples})
    result.update({"accuracy": res.overall, "unparsed_answers": res.unparsed})
    return result


def _score_retrieval(examples: list, rows: dict) -> dict:
    import numpy as np

    from smolvlm.eval.retrieval import retrieval_recall

    n_caps = [len(ex.refs) for ex in examples]
    owners = np.repeat(np.arange(len(examples)), n_caps)
    keep = [i for i, ex in enumerate(examples) if rows[str(ex.id)].get("scores") is not None]
    if not keep:
        raise SmolVLMError("no image could be read, so there is nothing to rank; check --images")
    cap_keep = np.isin(owners, keep)
    sim = np.array([rows[str(examples[i].id)]["scores"] for i in keep], dtype=np.float64)[:, cap_keep]
    remap = {old: new for new, old in enumerate(keep)}
    rec = retrieval_recall(sim, np.array([remap[o] for o in owners[cap_keep]]))
    out = {"images": len(keep), "captions": int(cap_keep.sum())}
    for direction, name in (("i2t", "image_to_text"), ("t2i", "text_to_image")):
        for k, v in rec[direction].items():
            out[f"{name}_R@{k}"] = v
    return out


# ---------------------------------------------------------------------------------------------- runs
def _model_identity(model_arg: str) -> str:
    p = Path(model_arg)
    return str(p.resolve()) if p.exists() else model_arg


def _slug(text: str) -> str:
    name = Path(text.rstrip("/")).name or "model"
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def run_task(task: str, model_arg: str, args, out: Path, loaded=None) -> dict:
    """Run and score one task for one model; returns the metrics (also written to out/metrics.json)."""
    from smolvlm.cli.options import load_for_inference
    from smolvlm.io.checkpoint import parse_dtype
    from smolvlm.runtime.cpu import dtype_name

    data = load_task_data(task, args)
    if not data.examples:
        raise SmolVLMError(f"no examples to evaluate for {task}; check --data / --limit")
    generated = f"generated(seed={args.seed})"
    if args.world:  # a run on another world does not resume this one's predictions (the default keeps its identity)
        generated = f"generated(seed={args.seed}, world={json.dumps(args.world, sort_keys=True)})"
    identity = {"task": task, "model": _model_identity(model_arg), "data": str(Path(args.data).resolve())
                if args.data else generated, "limit": args.limit,
                "images": args.images, "split": args.split, "max_new_tokens": args.max_new_tokens,
                # the resolved dtype: "auto" is float32 on one CPU and bfloat16 on another
                "dtype": dtype_name(parse_dtype(args.dtype))}
    if getattr(args, "quantize", None):
        identity["quantize"] = args.quantize
    model, processor = loaded if loaded is not None else load_for_inference(model_arg, args.dtype,
                                                                             getattr(args, "quantize", None))
    if data.kind == "retrieval" and model.has_vision and retrieval_scoring(model, args) == "contrastive":
        identity["scoring"] = "contrastive"  # (logprob runs keep the identity they always had)
    run = RunFolder(out, identity, args.fresh)
    try:
        if data.kind in ("caption", "retrieval") and not model.has_vision:
            return {"task": task, "skipped": "the model has no vision encoder"}
        with PeakMemory() as mem:
            desc = f"{_slug(model_arg)} {task}"
            if data.kind == "retrieval":
                samples, seconds = run_retrieval(model, processor, run, data.examples, args, desc)
            else:
                samples, seconds = run_generation(model, processor, run, data.examples, data.kind, args, desc)
        if samples:
            run.add_timing(samples, seconds, mem.mb)
        result = score_task(task, data, run, args)
        result["model"] = model_arg
        result["params"] = sum(p.numel() for p in model.parameters())
        result["efficiency"] = run.timing()
        if data.kind == "retrieval":
            result["efficiency"]["unit"] = "image-caption pairs"
            result["scoring"] = retrieval_scoring(model, args)
        atomic_write_text(out / "metrics.json", json.dumps(result, indent=2) + "\n")
        return result
    finally:
        run.close()


def run_suite(args) -> dict:
    """Every shapes task for every --model: {"models": [{name, params, task results...}]}."""
    from smolvlm.cli.options import load_for_inference

    rows = []
    for model_arg in args.model:
        loaded = load_for_inference(model_arg, args.dtype, getattr(args, "quantize", None))
        results = {}
        for task in SUITE_TASKS:
            results[task] = run_task(task, model_arg, args, Path(args.out) / _slug(model_arg) / task, loaded)
        rows.append({"model": model_arg, "params": sum(p.numel() for p in loaded[0].parameters()),
                     "tasks": results})
    return {"suite": "shapes", "seed": args.seed, "models": rows}


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def suite_markdown(suite: dict) -> str:
    lines = ["| model | params | VQA acc | caption CIDEr | R@1 (i→t / t→i) | GQA-style acc | NLVR2-style acc |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in suite["models"]:
        t = row["tasks"]
        r = t["shapes-retrieval"]
        r1 = "n/a" if "skipped" in r else f"{r['image_to_text_R@1']:.3f} / {r['text_to_image_R@1']:.3f}"
        lines.append(f"| {_slug(row['model'])} | {row['params'] / 1e6:.2f}M | {_fmt(t['shapes-vqa'].get('accuracy'))} "
                     f"| {_fmt(t['shapes-captions'].get('CIDEr'))} | {r1} | {_fmt(t['shapes-gqa'].get('accuracy'))} "
                     f"| {_fmt(t['shapes-nlvr2'].get('accuracy'))} |")
    lines += ["", "| model | task | samples/s | peak memory MB |", "|---|---|---:|---:|"]
    for row in suite["models"]:
        for task, res in row["tasks"].items():
            eff = res.get("efficiency") or {}
            unit = " (pairs)" if eff.get("unit") else ""
            lines.append(f"| {_slug(row['model'])} | {task} | {_fmt(eff.get('samples_per_s'), 2)}{unit} "
                         f"| {_fmt(eff.get('peak_memory_mb'), 0)} |")
    return "\n".join(lines) + "\n"


def _print_task(result: dict) -> None:
    skip = {"official", "per_answer_type", "unreadable", "warnings", "efficiency", "model"}
    for key, value in result.items():
        if key in skip:
            continue
        print(f"{key:24s} {value:.4f}" if isinstance(value, float) else f"{key:24s} {value}")
    for atype, acc in (result.get("per_answer_type") or {}).items():
        print(f"  {str(atype):22s} {acc:.4f}")
    eff = result.get("efficiency") or {}
    print(f"{'samples/s':24s} {_fmt(eff.get('samples_per_s'), 2)}")
    print(f"{'peak memory MB':24s} {_fmt(eff.get('peak_memory_mb'), 0)}")
    for k, err in (result.get("unreadable") or {}).items():
        print(f"unreadable image ({k}): {err}", file=sys.stderr)


def parse_world(text: str | None) -> dict:
    """--world: WorldConfig fields as a JSON object ({} for the default world)."""
    if not text:
        return {}
    example = "e.g. --world '{\"max_objects\": 3}'"
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as e:
        raise SmolVLMError(f"--world is not valid JSON ({e}); {example}") from None
    if not isinstance(fields, dict):
        raise SmolVLMError(f"--world must be a JSON object of shapes-world fields, got {text!r}; {example}")
    return fields


def cmd_eval(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise SmolVLMError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise SmolVLMError(f"--limit must be >= 1, got {args.limit}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    args.progress = not args.no_progress
    args.world = parse_world(args.world)
    if args.suite:
        if args.task:
            raise SmolVLMError("give either --suite or --task, not both")
        args.out = args.out or "eval-runs/suite-shapes"
        suite = run_suite(args)
        md = suite_markdown(suite)
        out = Path(args.out)
        atomic_write_text(out / "suite.json", json.dumps(suite, indent=2) + "\n")
        atomic_write_text(out / "suite.md", md)
        print(json.dumps(suite) if args.json else md, end="" if not args.json else "\n")
        return 0
    if not args.task:
        raise SmolVLMError("give --task (one of " + ", ".join(TASKS) + ") or --suite shapes")
    if len(args.model) != 1:
        raise SmolVLMError("--task evaluates one --model; use --suite shapes to compare several")
    out = Path(args.out or f"eval-runs/{args.task}-{_slug(args.model[0])}")
    result = run_task(args.task, args.model[0], args, out)
    if args.json:
        print(json.dumps(result))
    else:
        _print_task(result)
        print(f"(predictions and metrics in {out})")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="run a model on a benchmark (VQAv2, COCO, Flickr30k, GQA, NLVR2, shapes) and score it",
        description=__doc__.split("\n\n")[0].replace("``", "") + " Tasks: " + ", ".join(TASKS)
                    + ". Predictions are cached in "
                    "--out as JSONL, so an interrupted run resumes; an unreadable image is counted and reported. "
                    "--suite shapes runs the five shapes tasks for each --model and prints the benchmark table "
                    "(params, VQA acc, caption CIDEr, R@1, GQA-style acc, NLVR2-style acc) and the efficiency "
                    "table (samples/s, peak memory) as Markdown, or JSON with --json.")
    p.add_argument("--model", action="append", required=True, metavar="M",
                   help="checkpoint folder, .gguf, hub id or packaged name; repeat with --suite to compare models")
    p.add_argument("--task", choices=TASKS, help="the benchmark to run")
    p.add_argument("--suite", choices=("shapes",), help="run every shapes task and print the tables")
    p.add_argument("--data", help="the benchmark's files (see docs/eval.md); shapes tasks: optional export folder")
    p.add_argument("--images", help="folder of the images (default: DATA/images, else DATA's folder)")
    p.add_argument("--split", help="Karpathy split / Flickr30k Entities split list (default: test)")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate the first N examples (shapes: default "
                   + ", ".join(f"{k.removeprefix('shapes-')} {v}" for k, v in SHAPES_DEFAULT_LIMIT.items()) + ")")
    p.add_argument("--batch-size", type=int, default=16, metavar="B", help="prompts per batch (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help=f"answer length limit (default {MAX_NEW_TOKENS['qa']} for questions, "
                        f"{MAX_NEW_TOKENS['caption']} for captions)")
    p.add_argument("--out", help="run folder: predictions.jsonl, metrics.json (default eval-runs/<task>-<model>)")
    p.add_argument("--fresh", action="store_true", help="discard the predictions already in --out")
    p.add_argument("--seed", type=int, default=0, help="shapes world seed for generated data (default 0)")
    p.add_argument("--world", metavar="JSON", help="shapes world fields for generated data, as the training config's "
                   "data.world (e.g. '{\"question_types\": [\"color\", \"count\"]}'; default: the default world)")
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantization of the decoder at load")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--meteor", action="store_true", help="also METEOR for captions (needs Java + pycocoevalcap)")
    p.add_argument("--retrieval-scoring", choices=("auto", "logprob", "contrastive"), default="auto",
                   help="retrieval: caption log-probability, or the cosine of contrastive embeddings (auto, the "
                        "default: contrastive when the model has a contrastive head)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)
    return p
