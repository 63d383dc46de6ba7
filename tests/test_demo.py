"""`smolvlm demo` end to end on the test-tiny preset: the files it promises, and answers that
`smolvlm generate` reproduces from the saved model."""

import json
import subprocess
import sys

import pytest

from smolvlm.demo import (
    BLIND_STEP_COST,
    RESERVE_STEPS,
    normalize_answer,
    plan_steps,
)
from smolvlm.errors import SmolVLMError


def test_normalize_answer():
    assert normalize_answer(" Yes.") == "yes"
    assert normalize_answer("Red") == "red"
    assert normalize_answer("3 .") == "3"
    assert normalize_answer("a.b") == "a.b"


def _plan_seconds(plan, seconds_per_step):
    return (plan.steps + BLIND_STEP_COST * plan.blind_steps + RESERVE_STEPS) * seconds_per_step


def test_plan_keeps_the_preset_steps_when_they_fit():
    plan = plan_steps(1800, 0.25, 590.0)
    assert (plan.steps, plan.blind_steps, plan.configured) == (1800, 0, 1800)


@pytest.mark.parametrize("blind_steps", [None, 400])
def test_plan_trains_fewer_steps_on_a_slower_cpu_and_fits_the_budget(blind_steps):
    plan = plan_steps(1800, 0.4, 590.0, blind_steps)
    assert 450 <= plan.steps < 1800 and plan.blind_steps == (blind_steps or 0)
    assert _plan_seconds(plan, 0.4) <= 590.0  # fits...
    bigger = type(plan)(plan.steps + 1, plan.blind_steps, 1800, 0.4)
    assert _plan_seconds(bigger, 0.4) > 590.0  # ...and is the longest that does
    # a trained baseline's steps come out of the model's
    assert plan_steps(1800, 0.4, 590.0, 400).steps < plan_steps(1800, 0.4, 590.0).steps


def test_plan_refuses_a_budget_that_buys_almost_nothing():
    with pytest.raises(SmolVLMError, match="raise --minutes or pass --minutes 0"):
        plan_steps(1800, 0.33, 180.0)


@pytest.mark.parametrize("args, message", [(["--minutes", "-1"], "--minutes must be >= 0"),
                                           (["--blind-steps", "0"], "--blind-steps must be >= 1")])
def test_demo_refuses_bad_options_in_one_line(tmp_path, args, message):
    p = subprocess.run([sys.executable, "-m", "smolvlm.cli", "demo", "--out", str(tmp_path / "o"), "--preset",
                        "test-tiny", *args], capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and message in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    p = subprocess.run(
        [sys.executable, "-m", "smolvlm.cli", "demo", "--out", str(out), "--preset", "test-tiny",
         "--test-images", "12", "--no-progress", "--json", "threads=1"],
        capture_output=True, text=True, timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return out, json.loads(p.stdout)


def test_demo_writes_what_it_promises(demo_dir):
    out, printed = demo_dir
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == printed
    for key in ("vqa_accuracy", "blind_vqa_accuracy", "compositional_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    assert set(metrics["per_type"]) == {"color", "shape", "count", "exist", "relation", "compare"}
    assert metrics["caption_cider"] >= 0.0 and metrics["wall_s"] > 0
    # the default 10-minute budget probed this CPU and kept all of test-tiny's 8 steps; the probe left no run behind
    assert metrics["probe_s_per_step"] > 0 and metrics["train_steps"] == metrics["preset_steps"] == 8
    assert not (out / "runs" / "probe").exists()
    # the default blind baseline is the answer prior: no text-only model was trained
    assert metrics["blind"] == "answer prior" and metrics["blind_train_steps"] == 0
    assert metrics["blind_prior_questions"] > 1000 and not (out / "runs" / "blind").exists()
    lines = (out / "data" / "test" / "questions.jsonl").read_text().splitlines()
    assert len(lines) == 48
    first = json.loads(lines[0])
    assert {"image", "question", "answer"} <= set(first) and (out / "data" / "test" / first["image"]).is_file()
    assert (out / "model" / "config.json").is_file() and (out / "model" / "model.safetensors").is_file()
    assert (out / "accuracy_by_type.png").stat().st_size > 1000 and (out / "loss.png").stat().st_size > 1000
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 48 and not any("<" in p["prediction"] + p["blind_prediction"] for p in preds)
    report = (out / "report.md").read_text()
    assert "VQA accuracy" in report and "![accuracy_by_type.png]" in report


def test_demo_trains_a_text_only_baseline_when_asked(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run(
        [sys.executable, "-m", "smolvlm.cli", "demo", "--out", str(out), "--preset", "test-tiny", "--blind-steps", "3",
         "--test-images", "4", "--minutes", "0", "--no-progress", "--json", "threads=1"],
        capture_output=True, text=True, timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    metrics = json.loads(p.stdout)
    assert metrics["blind"] == "text-only model" and metrics["blind_train_steps"] == 3
    assert (out / "runs" / "blind" / "model" / "config.json").is_file()
    assert "a text-only model trained 3 steps" in (out / "report.md").read_text()
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 16 and all(isinstance(r["blind_prediction"], str) for r in preds)


def test_generate_agrees_with_the_demo_answers(demo_dir):
    out, _ = demo_dir
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and f"**A (model):** {samples[0]['prediction']}" in (out / "report.md").read_text()
    for row in samples[:3]:
        p = subprocess.run(
            [sys.executable, "-m", "smolvlm.cli", "generate", "--model", str(out / "model"), "--image",
             str(out / "data" / "test" / row["image"]), "--prompt", row["question"], "--max-new-tokens", "16",
             "--json"],
            capture_output=True, text=True, timeout=300,
        )
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["text"] == row["prediction"]


def test_demo_refuses_a_foreign_folder(tmp_path):
    from smolvlm.demo import prepare_out

    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(SmolVLMError, match="not a smolvlm demo folder"):
        prepare_out(tmp_path, force=True)
    assert (tmp_path / "thesis.tex").exists()
