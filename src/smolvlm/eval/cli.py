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
import sys
from pathlib import Path

from smolvlm.cli.options import MODEL_HELP, add_model_options
from smolvlm.errors import SmolVLMError
from smolvlm.eval.options import EvalOptions
from smolvlm.eval.predict import MAX_NEW_TOKENS
from smolvlm.eval.runner import fmt, model_slug, run_suite, run_task, suite_markdown
from smolvlm.eval.tasks import SHAPES_DEFAULT_LIMIT, TASKS
from smolvlm.files import atomic_write_json, atomic_write_text

__all__ = ["add_parser", "cmd_eval", "options_from_args", "parse_world"]


def _print_task(result: dict) -> None:
    skip = {"official", "per_answer_type", "unreadable", "warnings", "efficiency", "model"}
    for key, value in result.items():
        if key in skip:
            continue
        print(f"{key:24s} {value:.4f}" if isinstance(value, float) else f"{key:24s} {value}")
    for atype, acc in (result.get("per_answer_type") or {}).items():
        print(f"  {str(atype):22s} {acc:.4f}")
    eff = result.get("efficiency") or {}
    print(f"{'samples/s':24s} {fmt(eff.get('samples_per_s'), 2)}")
    print(f"{'peak memory MB':24s} {fmt(eff.get('peak_memory_mb'), 0)}")
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


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    """The EvalOptions of `smolvlm eval`'s arguments, checked (one-line errors for bad values)."""
    if args.batch_size < 1:
        raise SmolVLMError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise SmolVLMError(f"--limit must be >= 1, got {args.limit}")
    return EvalOptions(data=args.data, images=args.images, split=args.split, limit=args.limit, seed=args.seed,
                       world=parse_world(args.world), dtype=args.dtype, quantize=args.quantize, threads=args.threads,
                       batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, meteor=args.meteor,
                       retrieval_scoring=args.retrieval_scoring, fresh=args.fresh, progress=not args.no_progress)


def cmd_eval(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    if args.suite:
        if args.task:
            raise SmolVLMError("give either --suite or --task, not both")
        out = Path(args.out or "eval-runs/suite-shapes")
        suite = run_suite(args.model, opts, out)
        md = suite_markdown(suite)
        atomic_write_json(out / "suite.json", suite)
        atomic_write_text(out / "suite.md", md)
        print(json.dumps(suite) if args.json else md, end="" if not args.json else "\n")
        return 0
    if not args.task:
        raise SmolVLMError("give --task (one of " + ", ".join(TASKS) + ") or --suite shapes")
    if len(args.model) != 1:
        raise SmolVLMError("--task evaluates one --model; use --suite shapes to compare several")
    out = Path(args.out or f"eval-runs/{args.task}-{model_slug(args.model[0])}")
    result = run_task(args.task, args.model[0], opts, out)
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
    add_model_options(p, several_models=True,
                      model_help=MODEL_HELP + "; repeat with --suite to compare models")
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
    p.add_argument("--meteor", action="store_true", help="also METEOR for captions (needs Java + pycocoevalcap)")
    p.add_argument("--retrieval-scoring", choices=("auto", "logprob", "contrastive"), default="auto",
                   help="retrieval: caption log-probability, or the cosine of contrastive embeddings (auto, the "
                        "default: contrastive when the model has a contrastive head)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)
    return p
