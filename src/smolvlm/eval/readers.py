"""Readers for the benchmark files in their original formats, returning plain dataclasses.

Image paths are built the way each dataset lays its images out. A missing image is not an error at
read time: the example still gets the path where the image should be (``image_missing`` /
:func:`missing_images` tell which are absent), so a listing can be checked before a long run.

Formats:

* VQA v2 (:func:`read_vqav2`): ``questions.json`` (``{"data_subtype": "val2014", "questions": [...]}``)
  and, except for test splits, ``annotations.json`` (10 ``answers`` per question, ``answer_type``,
  ``question_type``). Image: ``COCO_<data_subtype>_<12-digit image id>.jpg`` in `images_dir`, or in
  ``images_dir/<data_subtype>/`` (the COCO download layout) when it is there.
* COCO captions (:func:`read_coco_captions`): ``captions_*.json`` (``images`` with ``file_name``,
  ``annotations`` with ``image_id``/``caption``); and the Karpathy split file ``dataset_coco.json`` /
  ``dataset_flickr30k.json`` (:func:`read_karpathy`): ``images`` with ``filepath`` (COCO only),
  ``filename``, ``split``, ``sentences[].raw``.
* Flickr30k Entities (:func:`read_flickr30k_entities`): ``Sentences/<image id>.txt``, five annotated
  captions per file (``[/EN#123/people A man] rides ...`` -> ``A man rides ...``) and a split list
  (one image id per line); image ``<images_dir>/<id>.jpg``.
* GQA (:func:`read_gqa`): a questions JSON dict keyed by question id (``imageId``, ``question``,
  ``answer``, ``fullAnswer``, ``isBalanced``, ``types``), or a directory of such shards
  (``train_all_questions/train_all_questions_0.json`` ...). Image ``<images_dir>/<imageId>.jpg``.
* NLVR2 (:func:`read_nlvr2`): jsonl with ``identifier`` (``dev-850-0-0``), ``sentence``, ``label``
  (``"True"``/``"False"``). Images ``<identifier without its last -N>-img0.png`` / ``-img1.png``,
  flat in `images_dir`, or in ``<split>/`` (dev, test1) or ``train/<directory>/`` (train) below it.
* SNLI-VE (:func:`read_visual_entailment`) and Visual Genome QA (:func:`read_vgqa`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from smolvlm.errors import SmolVLMError

__all__ = [
    "CaptionExample", "GQAExample", "NLVR2Example", "VGQAExample", "VQAExample", "VisualEntailmentExample",
    "load_json", "missing_images", "read_coco_captions", "read_flickr30k_entities", "read_gqa", "read_karpathy",
    "read_nlvr2", "read_visual_entailment", "read_vgqa", "read_vqav2", "strip_entity_markup",
]


class _HasImage:
    @property
    def image_missing(self) -> bool:
        return not Path(self.image_path).is_file()


@dataclass
class VQAExample(_HasImage):
    question_id: int
    image_id: int
    image_path: Path
    question: str
    answers: list[str] = field(default_factory=list)  # the human answers (empty for test splits)
    answer_type: str | None = None
    question_type: str | None = None
    multiple_choice_answer: str | None = None


@dataclass
class CaptionExample(_HasImage):
    image_id: int | str
    image_path: Path
    captions: list[str]
    split: str | None = None


@dataclass
class GQAExample(_HasImage):
    question_id: str
    image_id: str
    image_path: Path
    question: str
    answer: str | None
    full_answer: str | None = None
    is_balanced: bool | None = None
    types: dict = field(default_factory=dict)


@dataclass
class NLVR2Example:
    identifier: str
    left_image: Path
    right_image: Path
    sentence: str
    label: bool | None  # None for an unlabeled (hidden test) file

    @property
    def image_missing(self) -> bool:
        return not (Path(self.left_image).is_file() and Path(self.right_image).is_file())


@dataclass
class VisualEntailmentExample(_HasImage):
    pair_id: str
    image_id: str
    image_path: Path
    premise: str
    hypothesis: str
    label: str  # entailment / neutral / contradiction


@dataclass
class VGQAExample(_HasImage):
    qa_id: int
    image_id: int
    image_path: Path
    question: str
    answer: str


def missing_images(examples) -> list:
    """The examples whose image file(s) do not exist."""
    return [ex for ex in examples if ex.image_missing]


# ------------------------------------------------------------------------------------------ helpers
def _read_text(path: Path) -> str:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SmolVLMError(f"{path} does not exist; check the path") from None
    except IsADirectoryError:
        raise SmolVLMError(f"{path} is a directory, not a file; give the file") from None
    except OSError as exc:
        raise SmolVLMError(f"cannot read {path} ({exc.strerror}); check its permissions") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SmolVLMError(f"{path} is not valid UTF-8 (byte {exc.start}); save it as UTF-8") from None


def _no_duplicate_keys(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(Exception):
    pass


def load_json(path, *, forbid_duplicate_keys: bool = False):
    """Parse a JSON file, with one-line SmolVLMErrors for missing, non-UTF-8 or malformed files
    (and, optionally, for an object with the same key twice, which json would silently collapse)."""
    text = _read_text(path)
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys if forbid_duplicate_keys else None)
    except json.JSONDecodeError as exc:
        raise SmolVLMError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                           "fix the file") from None
    except _DuplicateKey as exc:
        raise SmolVLMError(f"{path} has the key {exc.args[0]!r} more than once; each id must appear once") from None


def _load_jsonl(path) -> list[dict]:
    rows = []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise SmolVLMError(f"{path} line {lineno} is not valid JSON ({exc.msg}); fix the file") from None
    return rows


def _require(cond: bool, path, what: str) -> None:
    if not cond:
        raise SmolVLMError(f"{path} is not {what}; check that it is the right file")


def _images_dir(images_dir) -> Path:
    return Path(images_dir) if images_dir is not None else Path(".")


def _first_existing(candidates: list[Path]) -> Path:
    for c in candidates:
        if c.is_file():
            return c
    return candidates[0]


# --------------------------------------------------------------------------------------------- VQA
def read_vqav2(questions_json, annotations_json=None, images_dir=None) -> list[VQAExample]:
    """VQA v2 (or v1) questions, with their human answers when `annotations_json` is given."""
    q = load_json(questions_json)
    _require(isinstance(q, dict) and isinstance(q.get("questions"), list), questions_json,
             'a VQA questions file ({"questions": [...]})')
    subtype = q.get("data_subtype")
    anns = {}
    if annotations_json is not None:
        a = load_json(annotations_json)
        _require(isinstance(a, dict) and isinstance(a.get("annotations"), list), annotations_json,
                 'a VQA annotations file ({"annotations": [...]})')
        subtype = subtype or a.get("data_subtype")
        for ann in a["annotations"]:
            if ann["question_id"] in anns:
                raise SmolVLMError(f"{annotations_json} annotates question {ann['question_id']} twice; "
                                   "each question must appear once")
            anns[ann["question_id"]] = ann
    images = _images_dir(images_dir)
    out, seen = [], set()
    for item in q["questions"]:
        try:
            qid, image_id, question = item["question_id"], item["image_id"], item["question"]
        except (KeyError, TypeError):
            raise SmolVLMError(f"{questions_json} has a question without question_id/image_id/question") from None
        if qid in seen:
            raise SmolVLMError(f"{questions_json} lists question {qid} twice; each question must appear once")
        seen.add(qid)
        name = f"COCO_{subtype}_{int(image_id):012d}.jpg" if subtype else f"{int(image_id):012d}.jpg"
        path = _first_existing([images / name, images / str(subtype) / name])
        ann = anns.get(qid, {})
        out.append(VQAExample(
            question_id=qid, image_id=image_id, image_path=path, question=question,
            answers=[a["answer"] for a in ann.get("answers", [])], answer_type=ann.get("answer_type"),
            question_type=ann.get("question_type"), multiple_choice_answer=ann.get("multiple_choice_answer"),
        ))
    if annotations_json is not None:
        unknown = set(anns) - seen
        if unknown:
            raise SmolVLMError(f"{annotations_json} annotates {len(unknown)} question(s) missing from "
                               f"{questions_json} (e.g. {sorted(unknown)[:3]}); use the matching pair of files")
    return out


# ----------------------------------------------------------------------------------------- captions
def read_coco_captions(annotation_json, images_dir=None) -> list[CaptionExample]:
    """COCO ``captions_<split>.json``: one example per image, captions in file order."""
    d = load_json(annotation_json)
    _require(isinstance(d, dict) and isinstance(d.get("annotations"), list), annotation_json,
             'a COCO captions file ({"images": [...], "annotations": [...]})')
    images = _images_dir(images_dir)
    names = {img["id"]: img.get("file_name") for img in d.get("images", [])}
    order = list(names)
    caps: dict = {}
    for ann in d["annotations"]:
        if "image_id" not in ann or "caption" not in ann:
            raise SmolVLMError(f"{annotation_json} has an annotation without image_id/caption")
        if ann["image_id"] not in caps:
            caps[ann["image_id"]] = []
            if ann["image_id"] not in names:
                order.append(ann["image_id"])
        caps[ann["image_id"]].append(ann["caption"])
    out = []
    for image_id in order:
        if image_id not in caps:
            continue  # an image without captions (e.g. a results-only listing)
        name = names.get(image_id) or f"{int(image_id):012d}.jpg"
        out.append(CaptionExample(image_id=image_id, image_path=images / name, captions=caps[image_id]))
    return out


def read_karpathy(dataset_json, images_dir=None, split: str | None = None) -> list[CaptionExample]:
    """The Karpathy split file (``dataset_coco.json``, ``dataset_flickr30k.json``...); with `split`
    (``train``/``restval``/``val``/``test``) only that split. COCO images are identified by
    ``cocoid`` and found under ``<images_dir>/<filepath>/<filename>``; Flickr images by their file
    name's number, under ``<images_dir>/<filename>``."""
    d = load_json(dataset_json)
    _require(isinstance(d, dict) and isinstance(d.get("images"), list), dataset_json,
             'a Karpathy split file ({"images": [{"filename", "sentences", "split"}, ...]})')
    images = _images_dir(images_dir)
    out = []
    for img in d["images"]:
        if split is not None and img.get("split") != split:
            continue
        try:
            filename = img["filename"]
            captions = [s["raw"] for s in img["sentences"]]
        except (KeyError, TypeError):
            raise SmolVLMError(f"{dataset_json} has an image entry without filename/sentences[].raw") from None
        if "cocoid" in img:
            image_id = img["cocoid"]
        else:
            stem = Path(filename).stem
            image_id = int(stem) if stem.isdigit() else img.get("imgid", stem)
        path = images / img["filepath"] / filename if img.get("filepath") else images / filename
        out.append(CaptionExample(image_id=image_id, image_path=path, captions=captions, split=img.get("split")))
    return out


_ENTITY = re.compile(r"\[/EN#\d+(?:/[^\s\]]+)*\s+([^\]]*)\]")


def strip_entity_markup(sentence: str) -> str:
    """``[/EN#221796/people A girl] sits`` -> ``A girl sits`` (Flickr30k Entities annotations)."""
    return _ENTITY.sub(r"\1", sentence)


def read_flickr30k_entities(sentences_dir, split_file=None, images_dir=None) -> list[CaptionExample]:
    """Flickr30k Entities captions: ``<sentences_dir>/<id>.txt`` for each image id listed in
    `split_file` (one id per line), or for every ``.txt`` file when no split is given."""
    sentences_dir = Path(sentences_dir)
    if not sentences_dir.is_dir():
        raise SmolVLMError(f"{sentences_dir} is not a directory; give Flickr30k Entities' Sentences folder")
    if split_file is not None:
        ids = [line.strip() for line in _read_text(split_file).splitlines() if line.strip()]
        if len(set(ids)) != len(ids):
            raise SmolVLMError(f"{split_file} lists an image id twice; each image must appear once")
    else:
        ids = sorted((p.stem for p in sentences_dir.glob("*.txt")), key=lambda s: (len(s), s))
    images = _images_dir(images_dir)
    out = []
    for image_id in ids:
        text = _read_text(sentences_dir / f"{image_id}.txt")
        captions = [strip_entity_markup(line.strip()) for line in text.splitlines() if line.strip()]
        out.append(CaptionExample(image_id=int(image_id) if image_id.isdigit() else image_id,
                                  image_path=images / f"{image_id}.jpg", captions=captions,
                                  split=Path(split_file).stem if split_file is not None else None))
    return out


# --------------------------------------------------------------------------------------------- GQA
def _shard_key(path: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def read_gqa(questions, images_dir=None) -> list[GQAExample]:
    """GQA questions from one JSON file or from a directory of shards (read in natural name order)."""
    questions = Path(questions)
    files = sorted(questions.glob("*.json"), key=_shard_key) if questions.is_dir() else [questions]
    if not files:
        raise SmolVLMError(f"{questions} holds no .json question shards")
    images = _images_dir(images_dir)
    out, seen = [], set()
    for f in files:
        d = load_json(f, forbid_duplicate_keys=True)
        _require(isinstance(d, dict), f, "a GQA questions file (a JSON object keyed by question id)")
        for qid, item in d.items():
            if qid in seen:
                raise SmolVLMError(f"GQA question {qid} appears in more than one shard ({f}); remove the duplicate")
            seen.add(qid)
            try:
                image_id, question = item["imageId"], item["question"]
            except (KeyError, TypeError):
                raise SmolVLMError(f"{f}: question {qid} has no imageId/question") from None
            out.append(GQAExample(question_id=qid, image_id=image_id, image_path=images / f"{image_id}.jpg",
                                  question=question, answer=item.get("answer"), full_answer=item.get("fullAnswer"),
                                  is_balanced=item.get("isBalanced"), types=item.get("types") or {}))
    return out


# ------------------------------------------------------------------------------------------- NLVR2
def _nlvr2_label(value, path, ident):
    if isinstance(value, bool):
        return value
    if value in ("True", "true"):
        return True
    if value in ("False", "false"):
        return False
    if value is None:
        return None
    raise SmolVLMError(f"{path}: example {ident} has label {value!r}; NLVR2 labels are True or False")


def read_nlvr2(jsonl, images_dir=None) -> list[NLVR2Example]:
    """NLVR2 examples; each has its left (``-img0.png``) and right (``-img1.png``) image."""
    images = _images_dir(images_dir)
    out = []
    for row in _load_jsonl(jsonl):
        try:
            ident, sentence = row["identifier"], row["sentence"]
        except KeyError:
            raise SmolVLMError(f"{jsonl} has a line without identifier/sentence") from None
        base, sep, _ = ident.rpartition("-")
        if not sep:
            raise SmolVLMError(f"{jsonl}: identifier {ident!r} does not look like NLVR2's <split>-<n>-<m>-<k>")
        split = ident.split("-", 1)[0]
        paths = []
        for side in ("img0", "img1"):
            name = f"{base}-{side}.png"
            candidates = [images / name, images / split / name]
            if "directory" in row:
                candidates.append(images / split / str(row["directory"]) / name)
            paths.append(_first_existing(candidates))
        out.append(NLVR2Example(identifier=ident, left_image=paths[0], right_image=paths[1], sentence=sentence,
                                label=_nlvr2_label(row.get("label"), jsonl, ident)))
    return out


# ------------------------------------------------------------------------------------- SNLI-VE, VG
def read_visual_entailment(jsonl, images_dir=None) -> list[VisualEntailmentExample]:
    """SNLI-VE pairs: the Flickr30k image is the premise, ``sentence2`` the hypothesis."""
    images = _images_dir(images_dir)
    out = []
    for row in _load_jsonl(jsonl):
        try:
            out.append(VisualEntailmentExample(
                pair_id=row["pairID"], image_id=str(row["Flickr30K_ID"]),
                image_path=images / f"{row['Flickr30K_ID']}.jpg", premise=row["sentence1"],
                hypothesis=row["sentence2"], label=row["gold_label"]))
        except KeyError as exc:
            raise SmolVLMError(f"{jsonl} has a pair without {exc.args[0]}") from None
    return out


def read_vgqa(question_answers_json, images_dir=None) -> list[VGQAExample]:
    """Visual Genome ``question_answers.json``: one example per question-answer pair."""
    d = load_json(question_answers_json)
    _require(isinstance(d, list), question_answers_json, "Visual Genome's question_answers.json (a list)")
    images = _images_dir(images_dir)
    out = []
    for img in d:
        for qa in img.get("qas", []):
            image_id = qa.get("image_id", img.get("id"))
            out.append(VGQAExample(qa_id=qa["qa_id"], image_id=image_id, image_path=images / f"{image_id}.jpg",
                                   question=qa["question"], answer=qa["answer"]))
    return out
