"""The ``smolvlm score`` sub-command: score predictions against references with the official metrics.

``smolvlm score captions --refs REFS.json --preds PREDS.json [--json] [--no-meteor]``
    REFS is ``{id: [caption, ...]}`` or a COCO captions annotation file; PREDS is ``{id: caption}``
    or a COCO results file ``[{"image_id": ..., "caption": ...}]``. Ids are compared as strings
    (JSON object keys are strings, COCO ids are numbers). With ``{id: [...]}`` references the ids
    of the two files must be the same; with a COCO annotation file only the images in PREDS are
    scored (as COCOEvalCap does), and a PREDS id the annotations lack is an error.
    Prints BLEU-1..4, METEOR (when the official
    Java scorer can run, otherwise "unavailable" and why), ROUGE-L and CIDEr.

``smolvlm score vqa --questions Q.json --annotations A.json --results R.json [--json]``
    The official VQA files; results are ``[{"question_id": ..., "answer": ...}]`` with exactly one
    answer per annotated question. Prints the overall and per-answer-type accuracy as the official
    report does (percent, 2 decimals). ``--json`` prints unrounded accuracies in 0..1
    (``overall``, ``per_answer_type``, ``per_question_type``, ``per_question``) and the official
    rounded report under ``official`` (with the per-question ``evalQA``).

Problems with the files (missing, not UTF-8, malformed JSON, duplicate ids, ids that do not match,
captions that are not strings) raise :class:`~smolvlm.errors.SmolVLMError` with one clear sentence.
Empty candidate captions are scored as they are (0 for that image) and reported as a warning on
stderr (and under ``warnings`` with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import sys

from smolvlm.errors import SmolVLMError

__all__ = ["add_parser", "cmd_score_captions", "cmd_score_vqa", "load_caption_predictions",
           "load_caption_references"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``score`` (with ``captions`` and ``vqa``) on an argparse subparsers object; each
    leaf stores ``func`` (parsed args -> exit code)."""
    score = subparsers.add_parser("score", help="score predictions with the official caption / VQA metrics",
                                  description="Score predictions with the official caption / VQA metrics.")
    sub = score.add_subparsers(dest="score_command", metavar="{captions,vqa}")
    sub.required = True

    c = sub.add_parser("captions", help="BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap-exact)",
                       description="Score captions like pycocoevalcap (PTB tokenization, BLEU-1..4, METEOR when "
                                   "the official Java scorer is installed, ROUGE-L, CIDEr-D).")
    c.add_argument("--refs", required=True,
                   help='{"id": ["ref", ...]} (ids must match PREDS exactly) or a COCO captions annotation file '
                        '(then, as COCOEvalCap does, only the images in PREDS are scored)')
    c.add_argument("--preds", required=True, help='{"id": "caption"} or a COCO results file '
                                                  '[{"image_id", "caption"}]')
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.add_argument("--no-meteor", action="store_true", help="skip METEOR (it starts a Java process)")
    c.set_defaults(func=cmd_score_captions)

    v = sub.add_parser("vqa", help="VQA accuracy (official vqaEval)",
                       description="VQA accuracy exactly as the official evaluation.")
    v.add_argument("--questions", required=True, help="VQA questions JSON")
    v.add_argument("--annotations", required=True, help="VQA annotations JSON")
    v.add_argument("--results", required=True, help='[{"question_id": ..., "answer": ...}]')
    v.add_argument("--json", action="store_true", help="print one JSON object")
    v.set_defaults(func=cmd_score_vqa)
    return score


# ------------------------------------------------------------------------------------------ loading
def _load(path):
    from smolvlm.eval.readers import load_json

    return load_json(path, forbid_duplicate_keys=True)


def load_caption_references(path) -> tuple[dict[str, list[str]], bool]:
    """``({id: [captions]}, is_coco_annotation_file)`` from either accepted references format (ids as
    strings)."""
    data = _load(path)
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        refs: dict[str, list[str]] = {}
        for ann in data["annotations"]:
            if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
                raise SmolVLMError(f"{path}: every COCO annotation needs image_id and caption")
            refs.setdefault(str(ann["image_id"]), []).append(ann["caption"])
        for img in data.get("images", []):
            if isinstance(img, dict) and "id" in img and str(img["id"]) not in refs:
                raise SmolVLMError(f"{path}: image {img['id']} has no caption; remove it or add its captions")
        if not refs:
            raise SmolVLMError(f"{path} has no caption annotations")
        return refs, True
    if isinstance(data, dict):
        refs = {}
        for key, value in data.items():
            if isinstance(value, str) or not isinstance(value, list):
                raise SmolVLMError(f"{path}: the references of {key!r} must be a list of captions")
            refs[str(key)] = value
        if not refs:
            raise SmolVLMError(f"{path} has no references")
        return refs, False
    raise SmolVLMError(f"{path} is neither {{id: [captions]}} nor a COCO captions annotation file")


def load_caption_predictions(path) -> dict[str, str]:
    """``{id: caption}`` from either accepted predictions format (ids as strings)."""
    data = _load(path)
    if isinstance(data, list):
        preds: dict[str, str] = {}
        for item in data:
            if not isinstance(item, dict) or "image_id" not in item or "caption" not in item:
                raise SmolVLMError(f"{path}: every COCO result needs image_id and caption")
            key = str(item["image_id"])
            if key in preds:
                raise SmolVLMError(f"{path} has more than one caption for image {item['image_id']}; "
                                   "give one caption per image")
            preds[key] = item["caption"]
        return preds
    if isinstance(data, dict) and "annotations" not in data:
        return {str(k): v for k, v in data.items()}
    raise SmolVLMError(f"{path} is neither {{id: caption}} nor a COCO results list [{{image_id, caption}}]")


# --------------------------------------------------------------------------------------- commands
def cmd_score_captions(args: argparse.Namespace) -> int:
    from smolvlm.eval.caption_metrics import METRIC_NAMES, score_captions

    refs, is_coco = load_caption_references(args.refs)
    preds = load_caption_predictions(args.preds)
    notes = []
    if is_coco:
        # COCOEvalCap scores the images of the results file; the annotation file may hold more
        # (e.g. captions_val2014.json for the 5,000 Karpathy test images). A result for an image
        # the annotations do not have is still an error (the official scorer fails on it too).
        unknown = [k for k in preds if k not in refs]
        if unknown:
            raise SmolVLMError(f"{args.preds} has captions for {len(unknown)} image id(s) that {args.refs} does "
                               f"not annotate (e.g. {unknown[:3]}); use the annotation file of the same split")
        if len(preds) < len(refs):
            notes.append(f"scored the {len(preds)} images of {args.preds} out of the {len(refs)} annotated in "
                         f"{args.refs} (as COCOEvalCap does)")
        refs = {k: refs[k] for k in preds}
    result = score_captions(refs, preds, with_meteor=not args.no_meteor)
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        out = {name: result.scores[name] for name in METRIC_NAMES if name in result.scores}
        out["num_images"] = result.num_images
        if result.unavailable:
            out["unavailable"] = result.unavailable
        if result.warnings or notes:
            out["warnings"] = result.warnings + notes
        print(json.dumps(out))
        return 0
    print(f"{result.num_images} images")
    for name in METRIC_NAMES:
        if name in result.scores:
            print(f"{name:8s} {result.scores[name]:.4f}")
        elif name in result.unavailable:
            print(f"{name:8s} unavailable ({result.unavailable[name]})")
    return 0


def cmd_score_vqa(args: argparse.Namespace) -> int:
    from smolvlm.eval.readers import read_vqav2
    from smolvlm.eval.vqa_metric import evaluate_vqa

    examples = read_vqav2(args.questions, args.annotations)
    results = _load(args.results)
    if not isinstance(results, list):
        raise SmolVLMError(f"{args.results} must be a list of {{question_id, answer}} objects")
    preds = {}
    for item in results:
        if not isinstance(item, dict) or "question_id" not in item or "answer" not in item:
            raise SmolVLMError(f"{args.results}: every result needs question_id and answer")
        qid = item["question_id"]
        if qid in preds:
            raise SmolVLMError(f"{args.results} answers question {qid} more than once; give one answer per question")
        preds[qid] = item["answer"]
    no_answers = [ex.question_id for ex in examples if not ex.answers]
    if no_answers:
        raise SmolVLMError(f"{args.annotations} has no human answers for {len(no_answers)} question(s) "
                           f"(e.g. {no_answers[:3]}); use the annotations of the same split as the questions")
    # The annotation dicts themselves, in file order: the official leave-one-out compares whole answer
    # dicts and sums the accuracies in this order (read_vqav2 above only validates the pair of files).
    from smolvlm.eval.readers import load_json

    result = evaluate_vqa(preds, load_json(args.annotations)["annotations"])
    official = result.official()
    if args.json:
        print(json.dumps({
            "overall": result.overall,
            "per_answer_type": result.per_answer_type,
            "per_question_type": result.per_question_type,
            "per_question": {str(k): v for k, v in result.per_question.items()},
            "official": {**official, "evalQA": {str(k): v for k, v in result.official_per_question().items()}},
        }))
        return 0
    print(f"{len(examples)} questions")
    print(f"overall  {official['overall']:.2f}")
    for atype, acc in official["perAnswerType"].items():
        print(f"{str(atype):8s} {acc:.2f}")
    return 0
