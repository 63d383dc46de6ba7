"""`smolvlm demo`: the whole pipeline on a laptop CPU, offline, in minutes.

    shapes world -> DIR/data/{test,compositional}/ (images + questions.jsonl + captions.jsonl)
    time budget (--minutes, default 10): a few probe steps time this CPU and refuse a budget too small
        (plan_steps)
    the blind baseline: each held-out question answered with its most common answer in the training data
        (smolvlm.eval.answer_prior; seconds), or with --blind-steps N a text-only model trained N steps
        (DIR/runs/blind)
    train the demo model from scratch (DIR/runs/main) -> DIR/model (a SmolVLM checkpoint): the preset's steps,
        or as many as fit what the budget has left after the model's own evaluation (train's max_minutes)
    evaluate it on the same held-out questions (smolvlm eval's shapes tasks) -> DIR/metrics.json, DIR/*.png,
        DIR/report.md, a table

Answers are generated greedily by the saved checkpoints loaded as `smolvlm generate` loads them
(`--dtype auto`, this CPU's fast paths), so `smolvlm generate --model DIR/model --image ... --prompt ...` gives the
same answers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from smolvlm.errors import SmolVLMError
from smolvlm.eval.accuracy import normalize_short_answer as normalize_answer  # a sample answer's right/wrong rule
from smolvlm.files import atomic_write_json, atomic_write_jsonl, atomic_write_text, read_jsonl

MARKER = "demo.json"  # marks a folder as a demo's, so --force never deletes anything else


def eval_task(model, processor, name: str, task: str, folder: Path, run_dir: Path, max_new_tokens: int | None,
              batch_size: int, progress: bool) -> tuple[dict, list[str]]:
    """`smolvlm eval --task TASK --data FOLDER` on every example of an exported split (the shapes tasks' own
    default is a sample of it): (its metrics, its predictions in the split's order)."""
    from smolvlm.eval.options import EvalOptions
    from smolvlm.eval.runner import run_task, task_predictions

    rows = read_jsonl(folder / ("captions.jsonl" if task == "shapes-captions" else "questions.jsonl"))
    opts = EvalOptions(data=str(folder), limit=len(rows), batch_size=batch_size, max_new_tokens=max_new_tokens,
                       progress=progress)
    scores = run_task(task, name, opts, run_dir, (model, processor))
    return scores, [row["prediction"] for row in task_predictions(task, opts, run_dir)]


def evaluate_model(model, processor, name: str, data_dir: Path, batch_size: int = 64, progress: bool = True) -> dict:
    """VQA accuracy (overall, per type) on the test and the compositional questions, caption CIDEr-D on the test
    images: smolvlm eval's shapes-vqa and shapes-captions on the exported data, in scratch run folders."""
    result: dict = {}
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix=f".eval-{name}-", dir=data_dir.parent) as scratch:
        for split in ("test", "compositional"):
            # 6 new tokens hold every shapes answer
            scores, answers = eval_task(model, processor, name, "shapes-vqa", data_dir / split,
                                        Path(scratch) / f"{split}-vqa", 6, batch_size, progress)
            result[split] = {"accuracy": scores["accuracy"], "n": scores["examples"],
                             "per_type": dict(sorted(scores["per_answer_type"].items())), "answers": answers}
        if model.has_vision:
            scores, captions = eval_task(model, processor, name, "shapes-captions", data_dir / "test",
                                         Path(scratch) / "test-captions", None, batch_size, progress)
            result["caption_cider"] = scores["CIDEr"]
            result["captions"] = captions
    result["eval_s"] = time.time() - t0
    result["params"] = sum(p.numel() for p in model.parameters())
    return result


def prepare_out(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise SmolVLMError(f"{out} is not empty and is not a smolvlm demo folder; choose a new --out")
        if not force:
            raise SmolVLMError(f"{out} holds an earlier demo; pass --force to replace it or choose a new --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / MARKER, {"started": time.strftime("%Y-%m-%dT%H:%M:%S")})


def plot_results(out: Path, metrics: dict, main_rows: list[dict], blind_rows: list[dict]) -> list[str]:
    """The accuracy per question type against the blind baseline's, and the loss curves (blind_rows: a trained
    blind model's metrics rows, or none)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no matplotlib: plots skipped; pip install 'smolvlm[train]')", file=sys.stderr)
        return []
    fig, ax = plt.subplots(figsize=(7, 3.5))
    types = list(metrics["per_type"])
    xs = range(len(types))
    ax.bar([x - 0.2 for x in xs], [metrics["per_type"][t] for t in types], 0.4, label="model")
    ax.bar([x + 0.2 for x in xs], [metrics["blind_per_type"][t] for t in types], 0.4, label="blind baseline")
    ax.set_xticks(list(xs), types)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (held-out test)")
    ax.axhline(0.6, color="gray", lw=0.6, ls=":")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "accuracy_by_type.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for rows, label in ((main_rows, "model"), (blind_rows, "blind baseline")):
        if not rows:
            continue
        ax.plot([r["elapsed_s"] for r in rows], [r["loss"] for r in rows], lw=0.8, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("loss per answer token")
    if blind_rows:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
    return ["accuracy_by_type.png", "loss.png"]


def sample_answers(model, processor, data_dir: Path, n: int) -> list[dict]:
    """A few test questions answered exactly as `smolvlm generate` answers them (one at a time)."""
    from smolvlm.generation import SamplingParams, generate
    from smolvlm.processing import build_messages, open_image

    rows = read_jsonl(data_dir / "test" / "questions.jsonl")
    picked, seen = [], set()
    for r in rows:  # one question per image, first n images
        if r["image"] not in seen:
            seen.add(r["image"])
            picked.append(r)
        if len(picked) == n:
            break
    out = []
    for r in picked:
        text = processor.apply_chat_template(build_messages(r["question"], 1), add_generation_prompt=True)
        inputs = processor(text, images=[[open_image(data_dir / "test" / r["image"])]])
        answer = generate(model, processor, inputs, SamplingParams(max_new_tokens=16)).text
        out.append({**r, "prediction": answer, "correct": normalize_answer(answer) == normalize_answer(r["answer"])})
    return out


def write_report(out: Path, metrics: dict, samples: list[dict], plots: list[str]) -> None:
    lines = [
        "# smolvlm demo report", "",
        f"Model: `{out / 'model'}` ({metrics['params'] / 1e6:.1f}M parameters), trained from scratch for "
        f"{metrics['train_steps']} steps in {metrics['train_s']:.0f} s on this CPU"
        + (f" (of the preset's {metrics['preset_steps']}: what the {metrics['budget_minutes']:g}-minute budget buys "
           f"at {metrics['probe_s_per_step']:.3f} s/step)" if metrics["train_steps"] < metrics["preset_steps"] else "")
        + "; " + blind_description(metrics) + ".", "",
        "| | model | blind baseline |", "|---|---|---|",
        f"| VQA accuracy (test, {metrics['n_test_questions']} questions) | {metrics['vqa_accuracy']:.3f} | "
        f"{metrics['blind_vqa_accuracy']:.3f} |",
    ]
    for t in metrics["per_type"]:
        lines.append(f"| {t} | {metrics['per_type'][t]:.3f} | {metrics['blind_per_type'][t]:.3f} |")
    lines += [
        f"| compositional split (held-out color+shape combos) | {metrics['compositional_accuracy']:.3f} | "
        f"{metrics['blind_compositional_accuracy']:.3f} |",
        f"| caption CIDEr-D (test) | {metrics['caption_cider']:.3f} | |", "",
    ]
    lines += [f"![{p}]({p})" for p in plots] + ["", "## Sample answers", "",
                                                 "Re-ask any of them: `smolvlm generate --model "
                                                 f"{out / 'model'} --image IMAGE --prompt QUESTION`", ""]
    for s in samples:
        mark = "right" if s["correct"] else "WRONG"
        lines += [f"![{s['image']}](data/test/{s['image']})", "",
                  f"**Q:** {s['question']}  **A (model):** {s['prediction']}  (truth: {s['answer']}, {mark})", ""]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


DEMO_MINUTES = 10.0  # the whole demo's wall-clock budget by default (`make demo`'s bar)
# What the demo costs besides the model's own steps, in units of one model step on the same CPU (measured on
# the full demo: a step of a trained blind baseline costs 0.8 of a seeing one; the answer prior, evaluating and
# saving well under 160 steps' time); they turn one probe's speed into a plan for the whole demo.
BLIND_STEP_COST = 0.8
RESERVE_STEPS = 160
MODEL_EVAL_STEPS = 50  # the model's evaluation, when no trained baseline's evaluation timed it (~20 measured)
# training examples whose questions the answer prior counts (~128k questions of ~1.6k texts for shapes-tiny:
# a few seconds, and its accuracy on the test questions no longer moves by more than the counts' sampling)
PRIOR_EXAMPLES = 20_000
PROBE_STEPS = 10  # timed steps, after one untimed (it pays one-off costs)
EVAL_MARGIN = 1.15  # the model's evaluation against the blind one's: the same questions, answers of similar length
FINISH_SECONDS = 25.0  # sample answers, plots, report, the interpreter's exit (20 was short on a float32 demo)
MIN_STEP_SHARE = 0.25  # a budget that buys fewer of the preset's steps than this is refused, not run


@dataclasses.dataclass
class StepPlan:
    steps: int  # the model's training steps
    blind_steps: int  # a trained blind baseline's; 0 = the answer prior
    configured: int  # the preset's steps
    seconds_per_step: float  # probed; 0 = not probed (no budget)


def plan_steps(configured: int, seconds_per_step: float, seconds_left: float,
               blind_steps: int | None = None) -> StepPlan:
    """The most model steps, up to the preset's, for which the model, the blind baseline (blind_steps of a
    trained one; None: the answer prior) and evaluation fit in seconds_left at seconds_per_step. Raises when that
    is fewer than MIN_STEP_SHARE of the preset's steps (a demo that short would show nothing)."""
    affordable = seconds_left / max(seconds_per_step, 1e-9) - RESERVE_STEPS  # in model steps
    blind_steps = blind_steps or 0

    def cost(n: int) -> float:
        return n + BLIND_STEP_COST * blind_steps

    n = configured
    if cost(n) > affordable:  # cost is increasing in n: bisect for the largest n that fits
        lo, hi = 0, configured
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if cost(mid) <= affordable else (lo, mid - 1)
        n = lo
    if n < MIN_STEP_SHARE * configured:
        need = (cost(math.ceil(MIN_STEP_SHARE * configured)) + RESERVE_STEPS) * seconds_per_step / 60
        raise SmolVLMError(f"the time budget leaves {max(0.0, seconds_left) / 60:.1f} min, and this CPU trains at "
                           f"{seconds_per_step:.2f} s/step: even a short demo needs ~{need:.0f} min; raise --minutes "
                           "or pass --minutes 0 (the preset's steps, however long they take)")
    return StepPlan(n, blind_steps, configured, seconds_per_step)


def probe_seconds_per_step(cfg, folder: Path) -> float:
    """This CPU's seconds per training step of cfg, timed on PROBE_STEPS steps after the curriculum (its first
    steps are shorter sequences than the rest) in a scratch run folder, removed afterwards."""
    from smolvlm.train import read_metrics, train

    probe = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, curriculum_steps=0), checkpoint_every=0,
                                max_minutes=0.0)
    try:
        train(probe, folder, max_steps=PROBE_STEPS + 1, progress=False)
        rows = read_metrics(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return (rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]) / max(1, len(rows) - 1)


def answer_prior(cfg):
    """The blind baseline of cfg's training data: smolvlm.eval.answer_prior over PRIOR_EXAMPLES examples."""
    from smolvlm.eval.answer_prior import AnswerPrior
    from smolvlm.train import ShapesTrainingData

    return AnswerPrior.fit(ShapesTrainingData(cfg.data, cfg.batch_size).training_questions(PRIOR_EXAMPLES))


def evaluate_prior(prior, data_dir: Path) -> dict:
    """evaluate_model's VQA results for the answer prior: the same questions, the same scorer; no captions."""
    from smolvlm.eval.options import EvalOptions
    from smolvlm.eval.runner import score_vqa
    from smolvlm.eval.tasks import load_task_data

    result: dict = {"prior_questions": prior.questions}
    t0 = time.time()
    for split in ("test", "compositional"):
        folder = data_dir / split
        opts = EvalOptions(data=str(folder), limit=len(read_jsonl(folder / "questions.jsonl")))
        examples = load_task_data("shapes-vqa", opts).examples
        answers = [prior.answer(ex.prompt, ex.meta.get("question_type")) for ex in examples]
        scores = score_vqa(examples, {ex.id: a for ex, a in zip(examples, answers, strict=True)})
        result[split] = {"accuracy": scores["accuracy"], "n": len(examples),
                         "per_type": dict(sorted(scores["per_answer_type"].items())), "answers": answers}
    result["eval_s"] = time.time() - t0
    return result


def train_blind(cfg, steps: int, folder: Path, progress: bool):
    """A text-only model trained `steps` steps with the model's recipe and data, images dropped. No curriculum:
    that only teaches looking, and a blind model must see the test-time question mix."""
    from smolvlm.train import Stage, train

    blind_cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, blind=True, image_positions=False),
        data=dataclasses.replace(cfg.data, curriculum_steps=0),
        stages=[Stage(name="blind", steps=steps, train=["decoder"],
                      warmup_steps=min(cfg.stages[0].warmup_steps, steps // 2))],
    )
    print(f"training the blind baseline ({steps} steps)", file=sys.stderr)
    return train(blind_cfg, folder, progress=progress)


def blind_description(m: dict) -> str:
    if m.get("blind") == "text-only model":
        return f"the blind baseline: a text-only model trained {m['blind_train_steps']} steps"
    return (f"the blind baseline: each question's most common answer in the training data "
            f"({m['blind_prior_questions']:,} training questions counted)")


def run_demo(out: str | Path, preset: str = "shapes-tiny", overrides: list[str] | None = None,
             blind_steps: int | None = None, test_images: int = 300, compositional_images: int = 100,
             force: bool = False, progress: bool = True, minutes: float = DEMO_MINUTES) -> dict:
    from smolvlm.cli.options import load_for_inference
    from smolvlm.data.shapes import ShapesWorld, WorldConfig
    from smolvlm.runtime import kernels
    from smolvlm.train import resolve_config, train

    t_start = time.time()
    out = Path(out)
    cfg = resolve_config(preset, None, overrides or [])
    if cfg.data.source != "shapes":
        raise SmolVLMError("the demo trains on the shapes world; leave data.source at 'shapes'")
    if not math.isfinite(minutes) or minutes < 0:
        raise SmolVLMError(f"--minutes must be >= 0 (0: no time budget), got {minutes}")
    if blind_steps is not None and blind_steps < 1:
        raise SmolVLMError(f"--blind-steps must be >= 1, got {blind_steps}")
    prepare_out(out, force)

    world = ShapesWorld(WorldConfig(**cfg.data.world), cfg.data.seed)
    data_dir = out / "data"
    world.export(data_dir, "test", test_images, questions_per_image=4, progress=progress)
    world.export(data_dir, "compositional", compositional_images, questions_per_image=4, progress=progress)

    # a CPU too slow for the preset's steps within the budget (e.g. float32 where bf16 is not native) trains
    # fewer; a fast one trains exactly the preset's, so its figures repeat from run to run. A config with its
    # own max_minutes budgets itself.
    budgeted = minutes > 0 and cfg.max_minutes == 0
    # the C++ kernels the evaluations use, loaded now: a first build (or a rebuild after a change) is then said up
    # front and kept out of the timed probe and evaluations
    kernels.extension()
    plan = StepPlan(cfg.total_steps, blind_steps or 0, cfg.total_steps, 0.0)
    if budgeted:
        speed = probe_seconds_per_step(cfg, out / "runs" / "probe")
        plan = plan_steps(cfg.total_steps, speed, minutes * 60 - (time.time() - t_start), blind_steps)
        print(f"this CPU: {speed:.3f} s/step; about {plan.steps} of the preset's {plan.configured} steps fit the "
              f"{minutes:g}-minute budget", file=sys.stderr)

    if blind_steps is None:
        print(f"counting the answer prior (the blind baseline) over {PRIOR_EXAMPLES:,} training examples",
              file=sys.stderr)
        t0 = time.time()
        prior = answer_prior(cfg)
        blind, blind_eval = None, {**evaluate_prior(prior, data_dir), "fit_s": time.time() - t0}
        model_eval_s = MODEL_EVAL_STEPS * plan.seconds_per_step
    else:
        blind = train_blind(cfg, blind_steps, out / "runs" / "blind", progress)
        # loaded from disk as `smolvlm generate` loads them (--dtype auto, this CPU's fast paths), so the answers
        # are the ones reported; its evaluation times this CPU's, which the model's budget then leaves room for
        blind_eval = evaluate_model(*load_for_inference(str(blind.model_dir)), "blind", data_dir, progress=progress)
        model_eval_s = EVAL_MARGIN * blind_eval["eval_s"]

    if budgeted:
        # what is left, less the model's evaluation and the report, is the model's training budget: train()
        # times its first steps and trains the preset's steps, or as many as fit with the schedule rescaled
        # (budget_may_extend=false: never more than the preset's)
        left = minutes * 60 - (time.time() - t_start) - model_eval_s - FINISH_SECONDS
        if left < MIN_STEP_SHARE * cfg.total_steps * plan.seconds_per_step:
            raise SmolVLMError(f"the baseline and its evaluation left {max(0.0, left) / 60:.1f} min for the model: "
                               "too little for a demo worth reading; raise --minutes or pass --minutes 0")
        cfg = dataclasses.replace(cfg, max_minutes=left / 60, budget_may_extend=False)
    print(f"training {preset} (up to {cfg.total_steps} steps)", file=sys.stderr)
    main = train(cfg, out / "runs" / "main", progress=progress)
    os.replace(main.model_dir, out / "model")
    model, processor = load_for_inference(str(out / "model"))
    seeing = evaluate_model(model, processor, "main", data_dir, progress=progress)
    samples = sample_answers(model, processor, data_dir, 6)

    from smolvlm.train import read_metrics

    metrics = {
        "vqa_accuracy": seeing["test"]["accuracy"],
        "blind_vqa_accuracy": blind_eval["test"]["accuracy"],
        "per_type": seeing["test"]["per_type"],
        "blind_per_type": blind_eval["test"]["per_type"],
        "compositional_accuracy": seeing["compositional"]["accuracy"],
        "blind_compositional_accuracy": blind_eval["compositional"]["accuracy"],
        "compositional_per_type": seeing["compositional"]["per_type"],
        "caption_cider": seeing["caption_cider"],
        "n_test_questions": seeing["test"]["n"],
        "n_compositional_questions": seeing["compositional"]["n"],
        "params": seeing["params"],
        "train_steps": main.steps,
        "preset_steps": plan.configured,
        "probe_s_per_step": round(plan.seconds_per_step, 4),
        "budget_minutes": minutes,
        "blind": "answer prior" if blind is None else "text-only model",
        "blind_train_steps": 0 if blind is None else blind.steps,
        "blind_prior_questions": blind_eval.get("prior_questions", 0),
        "train_s": round(main.wall_s, 1),
        "blind_train_s": round(blind_eval["fit_s"] if blind is None else blind.wall_s, 1),
        "eval_s": round(seeing["eval_s"] + blind_eval["eval_s"], 1),
        "preset": preset,
        "overrides": overrides or [],
    }
    plots = plot_results(out, metrics, read_metrics(out / "runs" / "main"),
                         [] if blind is None else read_metrics(out / "runs" / "blind"))
    write_report(out, metrics, samples, plots)
    atomic_write_jsonl(out / "samples.jsonl", samples)
    _write_predictions(out / "predictions.jsonl", data_dir, seeing, blind_eval)
    metrics["wall_s"] = round(time.time() - t_start, 1)
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def _write_predictions(path: Path, data_dir: Path, seeing: dict, blind: dict) -> None:
    rows = read_jsonl(data_dir / "test" / "questions.jsonl")
    answers = zip(rows, seeing["test"]["answers"], blind["test"]["answers"], strict=True)
    atomic_write_jsonl(path, ({**r, "prediction": a, "blind_prediction": b} for r, a, b in answers))


def format_table(m: dict) -> str:
    rows = [("", "model", "blind"), ("VQA accuracy", f"{m['vqa_accuracy']:.3f}", f"{m['blind_vqa_accuracy']:.3f}")]
    rows += [(f"  {t}", f"{v:.3f}", f"{m['blind_per_type'][t]:.3f}") for t, v in m["per_type"].items()]
    rows += [("compositional", f"{m['compositional_accuracy']:.3f}", f"{m['blind_compositional_accuracy']:.3f}"),
             ("caption CIDEr-D", f"{m['caption_cider']:.3f}", "-"),
             ("train steps", str(m["train_steps"]), str(m["blind_train_steps"] or "-")),
             ("time (s)", f"{m['train_s']:.0f}", f"{m['blind_train_s']:.0f}")]
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{w}}  {b:>7}  {c:>7}" for a, b, c in rows)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="generate shapes data, train a VLM from scratch, evaluate it against a blind baseline",
        description="The main job, offline on a CPU: make the shapes world's held-out data, train the demo "
                    "model (preset shapes-tiny) and a text-only baseline, evaluate both, and write "
                    "DIR/metrics.json, DIR/model/, DIR/data/test/, plots and DIR/report.md.",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (new, or an earlier demo with --force)")
    p.add_argument("--preset", default="shapes-tiny", help="training preset (default: %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="training config overrides")
    p.add_argument("--blind-steps", type=int, metavar="N",
                   help="train a text-only model for N steps as the blind baseline (default: the answer prior, "
                        "each question's most common answer in the training data)")
    p.add_argument("--minutes", type=float, default=DEMO_MINUTES, metavar="M",
                   help="wall-clock budget of the whole demo: a slower CPU trains fewer of the preset's steps "
                        "(default: %(default)s; 0 = the preset's steps however long they take)")
    p.add_argument("--test-images", type=int, default=300, metavar="N", help="test images (4 questions each)")
    p.add_argument("--force", action="store_true", help="replace an earlier demo in DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print metrics.json instead of the table")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    m = run_demo(args.out, args.preset, args.overrides, args.blind_steps, args.test_images, force=args.force,
                 progress=not args.no_progress, minutes=args.minutes)
    if args.json:
        print(json.dumps(m, indent=2))
    else:
        print(format_table(m))
        print(f"\nwall time {m['wall_s']:.0f} s; metrics in {Path(args.out) / 'metrics.json'}, "
              f"report in {Path(args.out) / 'report.md'}")
    return 0
