"""`smolvlm demo` end to end on the test-tiny preset: the files it promises, and answers that
`smolvlm generate` reproduces from the saved model."""

import json
import subprocess
import sys

import pytest

from smolvlm.demo import normalize_answer, vqa_scores
from smolvlm.errors import SmolVLMError


def test_normalize_answer():
    assert normalize_answer(" Yes.") == "yes"
    assert normalize_answer("Red") == "red"
    assert normalize_answer("3 .") == "3"
    assert normalize_answer("a.b") == "a.b"


def test_vqa_scores_per_type():
    rows = [{"answer": "red", "type": "color"}, {"answer": "2", "type": "count"}, {"answer": "yes", "type": "count"}]
    s = vqa_scores(rows, ["Red.", "3", "yes"])
    assert s["accuracy"] == pytest.approx(2 / 3)
    assert s["per_type"] == {"color": 1.0, "count": 0.5}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    p = subprocess.run(
        [sys.executable, "-m", "smolvlm.cli", "demo", "--out", str(out), "--preset", "test-tiny", "--blind-steps", "3",
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
