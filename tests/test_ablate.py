"""The time-budgeted trainer and `smolvlm ablate` end to end on a tiny budget (seconds)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smolvlm.cli.main import main
from smolvlm.errors import SmolVLMError
from smolvlm.io import load
from smolvlm.train import checkpoint_paths, read_metrics, resolve_config, train


@pytest.mark.usefixtures("restore_torch_threads")
def test_time_budget_fits_the_schedule_and_ends_with_a_model(tmp_path):
    # 3 configured steps, but a budget worth many more: the schedule is stretched to the budget
    over = ["threads=1", "stages.0.steps=3", "stages.0.warmup_steps=2", "max_minutes=0.08", "checkpoint_every=0"]
    result = train(resolve_config("test-tiny", None, over), tmp_path / "run", progress=False)
    note = json.loads((tmp_path / "run" / "budget.json").read_text())
    rows = read_metrics(tmp_path / "run")
    assert note["steps"] == result.steps == len(rows) > 3 + 8
    assert note["ended_by"] in ("budget", "schedule") and note["train_seconds"] < 0.08 * 60 + 3
    assert result.model_dir is not None and load(result.model_dir)[0].has_vision
    assert [s for s, _ in checkpoint_paths(tmp_path / "run")] == [result.steps]
    # warmup, then the peak until the plan is made, then cosine decay towards the end
    lrs = [r["lr"] for r in rows]
    assert lrs[0] < lrs[1] == max(lrs) and lrs[-1] < 0.3 * max(lrs)


@pytest.mark.usefixtures("restore_torch_threads")
def test_ablate_end_to_end_and_resumable(tmp_path, capsys):
    out = tmp_path / "ablation"
    argv = ["ablate", "--out", str(out), "--budget-minutes", "0.03", "--variants", "baseline,contrastive",
            "--preset", "test-tiny", "--eval-limit", "2", "--threads", "1", "--no-progress", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert list(summary["variants"]) == ["baseline", "contrastive"]
    for name, r in summary["variants"].items():
        assert r["steps"] >= 1 and r["params"] > 0 and r["decode_tok_s"] > 0 and r["peak_rss_mb"] > 0
        assert 0 <= r["vqa_accuracy"] <= 1 and set(r["vqa_per_type"]) and 0 <= r["retrieval_r1"] <= 1
        assert (out / name / "train" / "model" / "config.json").is_file()
        assert (out / name / "eval" / "shapes-retrieval" / "metrics.json").is_file()
    assert summary["variants"]["contrastive"]["retrieval_scoring"] == "contrastive"
    assert summary["variants"]["baseline"]["retrieval_scoring"] == "logprob"
    table = (out / "ablations.md").read_text()
    assert "| baseline |" in table and "| contrastive |" in table and "decode tok/s" in table
    assert (out / "ablations.png").stat().st_size > 5000
    assert json.loads((out / "ablations.json").read_text()) == summary
    # a second run skips what is done
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err.count("done earlier, skipped") == 2 and json.loads(captured.out) == summary
    # a variant interrupted after its training is evaluated again and still reports its training's peak RSS
    (out / "baseline" / "result.json").unlink()
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)["variants"]["baseline"]
    assert again["train_peak_rss_mb"] == summary["variants"]["baseline"]["train_peak_rss_mb"] > 0
    # results made under another budget are not mixed into this one's table
    other = [a if a != "0.03" else "0.05" for a in argv]
    assert main(other) == 2
    assert "was made with budget_minutes=0.03, this run has 0.05" in capsys.readouterr().err


def test_ablate_option_errors(tmp_path, capsys):
    assert main(["ablate", "--out", str(tmp_path), "--variants", "baseline,resnet"]) == 2
    assert "unknown variant 'resnet' in --variants; choose from baseline, cnn" in capsys.readouterr().err
    assert main(["ablate", "--out", str(tmp_path), "--budget-minutes", "0"]) == 2
    assert "--budget-minutes must be > 0" in capsys.readouterr().err


def test_contrastive_retrieval_needs_the_head(tmp_path):
    from smolvlm.eval.predict import retrieval_scoring
    from smolvlm.train import build_train_model

    model, _ = build_train_model(resolve_config("test-tiny", None, []).model, 0)
    with pytest.raises(SmolVLMError, match="needs a model with a contrastive head"):
        retrieval_scoring(model, "contrastive")


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == pid:  # field 4 of /proc/PID/stat: the parent's pid
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # not a zombie
    except OSError:
        return False


def test_killing_ablate_stops_the_variant_it_runs(tmp_path):
    out = tmp_path / "ablation"
    parent = subprocess.Popen(
        [sys.executable, "-m", "smolvlm.cli", "ablate", "--out", str(out), "--budget-minutes", "5", "--variants",
         "baseline", "--preset", "test-tiny", "--threads", "1", "--no-progress"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not list((out / "baseline" / "train").glob("metrics.jsonl")):  # the variant is training
        assert parent.poll() is None and time.time() < deadline, "the variant never started training"
        time.sleep(0.5)
    children = children_of(parent.pid)
    assert children
    parent.terminate()
    assert parent.wait(timeout=60) != 0
    deadline = time.time() + 30
    while any(alive(c) for c in children):
        assert time.time() < deadline, "a variant process outlived the killed ablation"
        time.sleep(0.2)
    assert not (out / "baseline" / "result.json").exists()
