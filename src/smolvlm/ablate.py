"""`smolvlm ablate`: the architecture options against each other, on the same data, for the same wall-clock time.

    for each variant (a few config overrides on one preset, shapes-tiny by default):
        train with max_minutes = the budget            -> DIR/<variant>/train (a normal run folder)
        smolvlm eval's shapes tasks on DIR/<variant>/train/model
            shapes-vqa (accuracy overall and per question type), shapes-gqa (the compositional split),
            shapes-captions (CIDEr), shapes-retrieval (R@1; by contrastive embeddings when the model has them)
                                                       -> DIR/<variant>/eval/<task>
        decode tokens/s (batch 1, greedy, measured as `smolvlm bench` does) and peak RSS
                                                       -> DIR/<variant>/result.json
    -> DIR/ablations.json, DIR/ablations.md (the table), DIR/ablations.png

Every variant starts from the same seed and sees the same examples in the same order; each gets the same
training time, so a slower architecture does fewer steps. Each variant runs in a process of its own, so its
peak RSS is its own and no variant inherits another's memory. A variant whose result.json exists is skipped;
one interrupted during training resumes from its last checkpoint (with the budget's clock where it was),
one interrupted during evaluation keeps the predictions already made.
"""

from __future__ import annotations

import argparse
import gc
import json
import signal
import sys
import time
from pathlib import Path

from smolvlm.cli.options import add_model_options
from smolvlm.errors import SmolVLMError
from smolvlm.eval.options import EvalOptions

# variant -> config overrides on the preset. The baseline is SmolVLM's layout (ViT + pixel shuffle); every other
# variant changes one thing from it, so each names the vision encoder too (shapes-tiny itself uses the CNN).
VIT = "model.vision_type=vit"
VARIANTS: dict[str, list[str]] = {
    "baseline": [VIT],
    "cnn": ["model.vision_type=cnn"],
    "mlp": [VIT, "model.connector=mlp"],
    "ldp": [VIT, "model.connector=ldp"],
    "cross-attention": [VIT, "model.connector=cross-attention"],
    "share-layers-2": [VIT, "model.text.layer_repeats=2"],
    "contrastive": [VIT, "contrastive_weight=0.1"],
}
EVAL_TASKS = ("shapes-vqa", "shapes-gqa", "shapes-captions", "shapes-retrieval")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def train_variant(cfg, folder: Path, args) -> dict:
    """Train one variant under the budget (or finish its interrupted run); returns its training figures."""
    from smolvlm.eval.run_folder import PeakMemory
    from smolvlm.files import atomic_write_text
    from smolvlm.train import read_metrics, train

    run = folder / "train"
    budget_file = run / "budget.json"
    # kept beside the run, so a variant whose evaluation was interrupted still reports its training's peak
    # (None: a resumed training, whose peak before the interruption is not known)
    peak_file = folder / "train_peak_rss_mb.json"
    if not ((run / "model" / "config.json").is_file() and budget_file.is_file()):
        resume = (run / "run.json").is_file()
        log(f"  training ({'resuming, ' if resume else ''}budget {args.budget_minutes:g} min)")
        gc.collect()
        with PeakMemory() as mem:
            train(cfg, run, resume=resume, progress=args.progress)
        atomic_write_text(peak_file, json.dumps(None if resume else mem.mb))
    peak = json.loads(peak_file.read_text()) if peak_file.is_file() else None
    note = json.loads(budget_file.read_text())
    rows = read_metrics(run)
    return {"steps": note["steps"], "train_seconds": note["train_seconds"], "ended_by": note["ended_by"],
            "final_loss": rows[-1]["loss"] if rows else None, "train_peak_rss_mb": peak}


def eval_options(args, world: dict) -> EvalOptions:
    """The options `smolvlm eval` would have for the shapes tasks, on the shapes world the variant trained on."""
    return EvalOptions(limit=args.eval_limit, seed=args.seed, world=world, dtype=args.dtype,
                       batch_size=args.batch_size, progress=args.progress)


def decode_tokens_per_s(model, processor) -> float:
    """Batch-1 greedy decoding speed after an image prompt, as `smolvlm bench` measures it: LONG and SHORT
    tokens timed, so the prefill cancels out."""
    from smolvlm.cli.bench import LONG, SHORT, best_time
    from smolvlm.data.shapes import ShapesWorld
    from smolvlm.generation import SamplingParams, generate
    from smolvlm.processing import build_messages

    image = next(iter(ShapesWorld(seed=0).captioning("test", 1))).image
    text = processor.apply_chat_template(build_messages("Describe this image.", 1), add_generation_prompt=True)
    inputs = processor(text, images=[[image]])

    def decode(n: int):
        return generate(model, processor, inputs, SamplingParams(max_new_tokens=n, ignore_eos=True))

    decode(SHORT)  # warm-up
    return (LONG - SHORT) / (best_time(lambda: decode(LONG), 2) - best_time(lambda: decode(SHORT), 2))


def evaluate_variant(folder: Path, world: dict, args) -> dict:
    from smolvlm.cli.options import load_for_inference
    from smolvlm.eval.run_folder import PeakMemory
    from smolvlm.eval.runner import run_task

    model_dir = folder / "train" / "model"
    gc.collect()
    with PeakMemory() as mem:
        model, processor = load_for_inference(str(model_dir), args.dtype)
        opts, tasks = eval_options(args, world), {}
        for task in EVAL_TASKS:
            log(f"  {task}")
            tasks[task] = run_task(task, str(model_dir), opts, folder / "eval" / task, (model, processor))
        log("  decode speed")
        tok_s = decode_tokens_per_s(model, processor)
    vqa, retrieval = tasks["shapes-vqa"], tasks["shapes-retrieval"]
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "vqa_accuracy": vqa["accuracy"], "vqa_per_type": vqa["per_answer_type"],
        "compositional_accuracy": tasks["shapes-gqa"]["accuracy"],
        "caption_cider": tasks["shapes-captions"]["CIDEr"],
        "retrieval_r1": (retrieval["image_to_text_R@1"] + retrieval["text_to_image_R@1"]) / 2,
        "retrieval_i2t_r1": retrieval["image_to_text_R@1"], "retrieval_t2i_r1": retrieval["text_to_image_R@1"],
        "retrieval_scoring": retrieval["scoring"],
        "decode_tok_s": tok_s, "eval_peak_rss_mb": mem.mb,
    }


def run_variant(name: str, args) -> int:
    """Train and evaluate one variant (in a process of its own); writes DIR/<name>/result.json."""
    import torch

    from smolvlm.files import atomic_write_json
    from smolvlm.train import resolve_config

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.out) / name
    try:
        overrides = [*args.overrides, *VARIANTS[name], f"max_minutes={args.budget_minutes}"]
        cfg = resolve_config(args.preset, None, overrides)
        result = {"variant": name, "overrides": VARIANTS[name], **train_variant(cfg, folder, args)}
        result.update(evaluate_variant(folder, cfg.data.world, args))  # evaluated on the world it trained on
    except SmolVLMError as e:
        log(f"smolvlm ablate: error: variant {name}: {e}")
        return 2
    peaks = [p for p in (result["train_peak_rss_mb"], result["eval_peak_rss_mb"]) if p is not None]
    result["peak_rss_mb"] = max(peaks)
    result["settings"] = ablation_settings(args)
    atomic_write_json(folder / "result.json", result)
    return 0


def ablation_settings(args) -> dict:
    """What makes variants comparable: a result made under other settings is not reused."""
    return {"preset": args.preset, "budget_minutes": args.budget_minutes, "overrides": list(args.overrides),
            "eval_limit": args.eval_limit, "seed": args.seed, "dtype": args.dtype}


def run_ablation(args) -> dict:
    import multiprocessing

    from smolvlm.files import atomic_write_json, atomic_write_text

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for i, name in enumerate(args.variants, 1):
        result_file = out / name / "result.json"
        if result_file.is_file():
            results[name] = json.loads(result_file.read_text())
            settings, earlier = ablation_settings(args), results[name].get("settings", {})
            if earlier != settings:
                key = next(k for k in settings if earlier.get(k) != settings[k])
                raise SmolVLMError(f"{result_file} was made with {key}={earlier.get(key)!r}, this run has "
                                   f"{settings[key]!r}: its figures would not compare; use another --out, or "
                                   f"delete {out / name} to redo that variant")
            log(f"[{i}/{len(args.variants)}] {name}: done earlier, skipped")
            continue
        log(f"[{i}/{len(args.variants)}] {name} ({' '.join(VARIANTS[name])})")
        t0 = time.time()
        # "spawn": a fresh interpreter, not a fork of this one (with its torch threads and memory)
        worker = multiprocessing.get_context("spawn").Process(target=variant_process, args=(name, args))
        worker.start()
        try:
            worker.join()
        finally:  # interrupted (Ctrl-C, SIGTERM): stop the variant too instead of leaving it training alone
            if worker.is_alive():
                worker.terminate()
                worker.join()
        if worker.exitcode != 0 or not result_file.is_file():
            raise SmolVLMError(f"variant {name} failed (exit code {worker.exitcode}; its output is above); fix it "
                               f"and run the same command again: finished variants are kept")
        result = results[name] = json.loads(result_file.read_text())
        log(f"  done in {time.time() - t0:.0f} s: {result['steps']} steps, VQA {result['vqa_accuracy']:.3f}, "
            f"CIDEr {result['caption_cider']:.3f}, R@1 {result['retrieval_r1']:.3f}, "
            f"{result['decode_tok_s']:.0f} tok/s")
    summary = {"preset": args.preset, "budget_minutes": args.budget_minutes, "overrides": args.overrides,
               "eval_limit": args.eval_limit, "variants": results}
    atomic_write_json(out / "ablations.json", summary)
    atomic_write_text(out / "ablations.md", ablation_markdown(summary))
    plot_ablation(summary, out / "ablations.png")
    return summary


def variant_process(name: str, args) -> None:
    sys.exit(run_variant(name, args))


def ablation_markdown(summary: dict) -> str:
    rows = list(summary["variants"].values())
    types = sorted({t for r in rows for t in r["vqa_per_type"]})
    lines = [f"Preset {summary['preset']}, {summary['budget_minutes']:g} min of training each"
             + (f", overrides {' '.join(summary['overrides'])}" if summary["overrides"] else "") + ".",
             "R@1 is the mean of image-to-text and text-to-image (c: scored by contrastive embeddings, else by "
             "caption log-probability); peak RSS is the larger of training's and evaluation's (e: evaluation's "
             "alone, the training was resumed and its earlier peak is not known).", "",
             "| variant | params | train s | steps | VQA acc | " + " | ".join(types)
             + " | compositional acc | CIDEr | R@1 | decode tok/s | peak RSS MB |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(types) + "---:|---:|---:|---:|---:|"]
    for r in rows:
        per_type = " | ".join(f"{r['vqa_per_type'].get(t, float('nan')):.3f}" for t in types)
        mark = " c" if r["retrieval_scoring"] == "contrastive" else ""
        lines.append(f"| {r['variant']} | {r['params'] / 1e6:.2f}M | {r['train_seconds']:.0f} | {r['steps']} "
                     f"| {r['vqa_accuracy']:.3f} | {per_type} | {r['compositional_accuracy']:.3f} "
                     f"| {r['caption_cider']:.3f} | {r['retrieval_r1']:.3f}{mark} | {r['decode_tok_s']:.0f} "
                     f"| {r['peak_rss_mb']:.0f}{' e' if r['train_peak_rss_mb'] is None else ''} |")
    return "\n".join(lines) + "\n"


def plot_ablation(summary: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("(no matplotlib: plot skipped; pip install 'smolvlm[train]')")
        return False
    rows = list(summary["variants"].values())
    names = [r["variant"] for r in rows]
    panels = [("VQA accuracy", "vqa_accuracy"), ("compositional accuracy", "compositional_accuracy"),
              ("caption CIDEr", "caption_cider"), ("retrieval R@1", "retrieval_r1"),
              ("training steps in the budget", "steps"), ("decode tokens/s", "decode_tok_s")]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    for ax, (title, key) in zip(axes.flat, panels, strict=True):
        ax.bar(range(len(rows)), [r[key] for r in rows], color="tab:blue")
        ax.set_xticks(range(len(rows)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"{summary['preset']}: {summary['budget_minutes']:g} min of training per variant")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def cmd_ablate(args: argparse.Namespace) -> int:
    names = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else list(VARIANTS)
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise SmolVLMError(f"unknown variant {unknown[0] if unknown else '(none)'!r} in --variants; choose from "
                           f"{', '.join(VARIANTS)}")
    if args.budget_minutes <= 0:
        raise SmolVLMError(f"--budget-minutes must be > 0, got {args.budget_minutes}")
    if args.eval_limit is not None and args.eval_limit < 1:
        raise SmolVLMError(f"--eval-limit must be >= 1, got {args.eval_limit}")
    args.variants, args.progress = names, not args.no_progress
    if args.threads:
        args.overrides = [f"threads={args.threads}", *args.overrides]
    # SIGTERM (kill, a CI timeout) unwinds like Ctrl-C does, so run_ablation stops the running variant
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        summary = run_ablation(args)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(json.dumps(summary) if args.json else ablation_markdown(summary), end="\n" if args.json else "")
    if not args.json:
        print(f"(table, JSON and plot in {args.out})")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "ablate", help="train and evaluate each architecture option on the shapes world under one time budget",
        description="Train each variant (" + ", ".join(VARIANTS) + ") from the same preset, data and seed for "
                    "the same wall-clock budget, evaluate it with the shapes tasks of `smolvlm eval` (VQA overall "
                    "and per type, compositional split, caption CIDEr, retrieval R@1) and time its decoding; "
                    "writes DIR/ablations.json, DIR/ablations.md and DIR/ablations.png. A variant already done is "
                    "skipped, so an interrupted ablation continues where it stopped. See docs/architectures.md.")
    p.add_argument("--out", required=True, metavar="DIR", help="the ablation folder (one subfolder per variant)")
    p.add_argument("--budget-minutes", type=float, default=10.0, metavar="M",
                   help="training time per variant (default %(default)s)")
    p.add_argument("--variants", metavar="A,B,...", help="which variants (default: all)")
    p.add_argument("--preset", default="shapes-tiny", help="the training preset the variants change "
                   "(default %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every variant")
    p.add_argument("--eval-limit", type=int, metavar="N", help="examples per eval task (default: smolvlm eval's)")
    p.add_argument("--batch-size", type=int, default=16, metavar="B", help="eval prompts per batch (default 16)")
    p.add_argument("--seed", type=int, default=0, help="shapes world seed of the eval data (default 0)")
    add_model_options(p, model=False, quantize=False, dtype_note="the variants' evaluation and decoding (training "
                      "follows the preset's bf16 setting)", threads_note="training too (default there: the preset's)")
    p.add_argument("--json", action="store_true", help="print ablations.json instead of the table")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_ablate)
    return p
