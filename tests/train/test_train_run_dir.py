"""The run folder (smolvlm.train.run_dir): run.json guards against mixing runs, a resume starts from the recorded
config, and a run killed mid-way continues the same loss curve to the same model, bit for bit."""

import signal
import subprocess
import time

import pytest
import torch
from train_harness import ENV, SMOLVLM, losses, run_cli

from smolvlm.errors import SmolVLMError
from smolvlm.io import load
from smolvlm.train import checkpoint_paths, prepare_run_dir, read_metrics, resolve_config, resume_config, train


def test_run_dir_guards(tmp_path, base_run):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(SmolVLMError, match="not empty and holds no smolvlm run"):
        train(resolve_config("test-tiny", None, []), other, progress=False)
    with pytest.raises(SmolVLMError, match="already holds a training run"):
        train(resolve_config("test-tiny", None, ["bf16=false", "stages.0.steps=12", "threads=1"]), base_run,
              progress=False)
    with pytest.raises(SmolVLMError, match=r"holds a different run \(seed: 0 there, 5 now\)"):
        train(resolve_config("test-tiny", None, ["bf16=false", "stages.0.steps=12", "threads=1", "seed=5"]),
              base_run, resume=True, progress=False)


def test_kill_and_resume_continue_the_same_loss_curve(tmp_path):
    over = ["bf16=false", "stages.0.steps=10", "checkpoint_every=3", "threads=1"]
    straight = tmp_path / "straight"
    run_cli("train", "--preset", "test-tiny", "--out", str(straight), "--no-progress", *over)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*SMOLVLM, "train", "--preset", "test-tiny", "--out", str(killed), "--no-progress",
                             "checkpoint_every=3", *over[:2], "threads=1"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any(s >= 3 for s, _ in checkpoint_paths(killed)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [s for s, _ in checkpoint_paths(killed)]
    assert done and max(done) < 10, "the run should have been killed mid-way"
    for _, path in checkpoint_paths(killed):  # whatever survived the kill is whole
        torch.load(path, weights_only=False)
    # no preset, no overrides: the run continues with the config it recorded
    run_cli("train", "--out", str(killed), "--resume", "--no-progress")
    assert losses(killed) == losses(straight)
    assert [r["step"] for r in read_metrics(killed)] == list(range(1, 11))
    a, _ = load(straight / "model")
    b, _ = load(killed / "model")
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), k


def test_resume_starts_from_the_recorded_config(tmp_path):
    cfg = resolve_config("test-tiny", None, ["optim.lr_decoder=3e-3", "stages.0.steps=7"])
    prepare_run_dir(tmp_path, cfg, resume=False, preset="test-tiny")
    assert resume_config(tmp_path / "none", "test-tiny", None, []) is None
    back = resume_config(tmp_path, "test-tiny", None, ["threads=1", "checkpoint_every=2"])
    assert back.optim.lr_decoder == 3e-3 and back.stages[0].steps == 7 and back.threads == 1
    prepare_run_dir(tmp_path, back, resume=True)  # how it runs may change
    with pytest.raises(SmolVLMError, match="started from preset 'test-tiny', not from 'shapes-tiny'"):
        resume_config(tmp_path, "shapes-tiny", None, [])
    with pytest.raises(SmolVLMError, match=r"holds a different run \(optim.lr_decoder: 0.003 there, 0.001 now\)"):
        prepare_run_dir(tmp_path, resume_config(tmp_path, None, None, ["optim.lr_decoder=1e-3"]), resume=True)
    (tmp_path / "run.json").write_text("{")
    with pytest.raises(SmolVLMError, match="unreadable run.json"):
        resume_config(tmp_path, None, None, [])
