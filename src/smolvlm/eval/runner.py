"""Running and scoring tasks: one task for one model (run_task), the shapes suite for several models (run_suite)
and its Markdown tables. Each task runs in a run folder of its own (smolvlm.eval.run_folder), so a stopped run
resumes; the metrics are each task's official ones (smolvlm.eval.vqa_metric, caption_metrics, accuracy, retrieval).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from smolvlm.errors import SmolVLMError
from smolvlm.eval.options import EvalOptions
from smolvlm.eval.predict import (
    retrieval_scoring,
    run_generation,
    run_retrieval,
)
from smolvlm.eval.run_folder import PeakMemory, RunFolder, read_predictions
from smolvlm.eval.tasks import SUITE_TASKS, TaskData, load_task_data
from smolvlm.files import atomic_write_text

__all__ = ["run_suite", "run_task", "score_task", "score_vqa", "suite_markdown", "task_predictions"]


# ------------------------------------------------------------------------------------------- scoring
def score_task(task: str, data: TaskData, run: RunFolder, opts: EvalOptions) -> dict:
    """The metrics of the predictions in `run` for `data` (the task's own: VQA accuracy, caption metrics, recall...)."""
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

        res = score_captions({ex.id: ex.refs for ex in data.examples}, preds, with_meteor=opts.meteor)
        result.update(res.scores)
        if res.unavailable.get("METEOR") and opts.meteor:
            result["METEOR_unavailable"] = res.unavailable["METEOR"]
        result["warnings"] = res.warnings
        return result
    if task in ("vqav2", "shapes-vqa"):
        result.update(score_vqa(data.examples, preds))
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


def score_vqa(examples: list, preds: dict) -> dict:
    """VQA accuracy (the official metric) of preds (example id -> answer): overall, per answer type, and the
    official evaluation's own result layout."""
    from smolvlm.eval.vqa_metric import evaluate_vqa

    missing = [ex.id for ex in examples if not ex.gold]
    if missing:
        raise SmolVLMError(f"{len(missing)} question(s) have no human answers (e.g. {missing[:3]}); "
                           "VQA accuracy needs the annotations of a train/val split")
    res = evaluate_vqa(preds, [{"question_id": ex.id, "answers": ex.gold, **ex.meta} for ex in examples])
    return {"accuracy": res.overall, "per_answer_type": res.per_answer_type, "official": res.official()}


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


def model_slug(text: str) -> str:
    """A model argument (folder, file, hub id) as a file-name-safe name: its last path part."""
    name = Path(text.rstrip("/")).name or "model"
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def run_task(task: str, model_arg: str, opts: EvalOptions, out: Path, loaded=None) -> dict:
    """Run and score one task for one model; returns the metrics (also written to out/metrics.json). `loaded`:
    the (model, processor) of model_arg when the caller has it loaded already."""
    from smolvlm.cli.options import load_for_inference
    from smolvlm.io.checkpoint import parse_dtype
    from smolvlm.runtime.cpu import dtype_name

    data = load_task_data(task, opts)
    if not data.examples:
        raise SmolVLMError(f"no examples to evaluate for {task}; check --data / --limit")
    generated = f"generated(seed={opts.seed})"
    if opts.world:  # a run on another world does not resume this one's predictions (the default keeps its identity)
        generated = f"generated(seed={opts.seed}, world={json.dumps(opts.world, sort_keys=True)})"
    identity = {"task": task, "model": _model_identity(model_arg), "data": str(Path(opts.data).resolve())
                if opts.data else generated, "limit": opts.limit,
                "images": opts.images, "split": opts.split, "max_new_tokens": opts.max_new_tokens,
                # the resolved dtype: "auto" is float32 on one CPU and bfloat16 on another
                "dtype": dtype_name(parse_dtype(opts.dtype))}
    if opts.quantize:
        identity["quantize"] = opts.quantize
    model, processor = loaded if loaded is not None else load_for_inference(model_arg, opts.dtype, opts.quantize,
                                                                             opts.threads)
    scoring = retrieval_scoring(model, opts.retrieval_scoring) if data.kind == "retrieval" and model.has_vision \
        else None
    if scoring == "contrastive":
        identity["scoring"] = "contrastive"  # (logprob runs keep the identity they always had)
    run = RunFolder(out, identity, opts.fresh)
    try:
        if data.kind in ("caption", "retrieval") and not model.has_vision:
            return {"task": task, "skipped": "the model has no vision encoder"}
        with PeakMemory() as mem:
            desc = f"{model_slug(model_arg)} {task}"
            if data.kind == "retrieval":
                samples, seconds = run_retrieval(model, processor, run, data.examples, opts, desc)
            else:
                samples, seconds = run_generation(model, processor, run, data.examples, data.kind, opts, desc)
        if samples:
            run.add_timing(samples, seconds, mem.mb)
        result = score_task(task, data, run, opts)
        result["model"] = model_arg
        result["params"] = sum(p.numel() for p in model.parameters())
        result["efficiency"] = run.timing()
        if data.kind == "retrieval":
            result["efficiency"]["unit"] = "image-caption pairs"
            result["scoring"] = scoring
        atomic_write_text(out / "metrics.json", json.dumps(result, indent=2) + "\n")
        return result
    finally:
        run.close()


def task_predictions(task: str, opts: EvalOptions, out: Path) -> list[dict]:
    """The rows of OUT/predictions.jsonl (a run_task's with these options) in the order of the task's examples."""
    done = read_predictions(out)
    return [done[str(ex.id)] for ex in load_task_data(task, opts).examples]


def run_suite(models: list[str], opts: EvalOptions, out: Path) -> dict:
    """Every shapes task for every model, in OUT/<model>/<task>: {"models": [{name, params, task results...}]}."""
    from smolvlm.cli.options import load_for_inference

    rows = []
    for model_arg in models:
        loaded = load_for_inference(model_arg, opts.dtype, opts.quantize, opts.threads)
        results = {}
        for task in SUITE_TASKS:
            results[task] = run_task(task, model_arg, opts, Path(out) / model_slug(model_arg) / task, loaded)
        rows.append({"model": model_arg, "params": sum(p.numel() for p in loaded[0].parameters()),
                     "tasks": results})
    return {"suite": "shapes", "seed": opts.seed, "models": rows}


def fmt(value, digits: int = 3) -> str:
    """A table cell: the number to `digits` places, or n/a."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def suite_markdown(suite: dict) -> str:
    lines = ["| model | params | VQA acc | caption CIDEr | R@1 (i→t / t→i) | GQA-style acc | NLVR2-style acc |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in suite["models"]:
        t = row["tasks"]
        r = t["shapes-retrieval"]
        r1 = "n/a" if "skipped" in r else f"{r['image_to_text_R@1']:.3f} / {r['text_to_image_R@1']:.3f}"
        lines.append(f"| {model_slug(row['model'])} | {row['params'] / 1e6:.2f}M "
                     f"| {fmt(t['shapes-vqa'].get('accuracy'))} "
                     f"| {fmt(t['shapes-captions'].get('CIDEr'))} | {r1} | {fmt(t['shapes-gqa'].get('accuracy'))} "
                     f"| {fmt(t['shapes-nlvr2'].get('accuracy'))} |")
    lines += ["", "| model | task | samples/s | peak memory MB |", "|---|---|---:|---:|"]
    for row in suite["models"]:
        for task, res in row["tasks"].items():
            eff = res.get("efficiency") or {}
            unit = " (pairs)" if eff.get("unit") else ""
            lines.append(f"| {model_slug(row['model'])} | {task} | {fmt(eff.get('samples_per_s'), 2)}{unit} "
                         f"| {fmt(eff.get('peak_memory_mb'), 0)} |")
    return "\n".join(lines) + "\n"
