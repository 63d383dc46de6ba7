"""Distributed training (smolvlm.train.distributed): two processes under torchrun give the loss curve of one
process with gradient accumulation over the same global batch."""

import subprocess
import sys

import pytest
from train_harness import ENV, losses, run_cli


def test_torchrun_two_processes_match_one(tmp_path):
    over = ["bf16=false", "stages.0.steps=4", "batch_size=4", "threads=1"]
    one = tmp_path / "one"
    run_cli("train", "--preset", "test-tiny", "--out", str(one), "--no-progress", "grad_accum=2", *over)
    two = tmp_path / "two"
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "smolvlm.cli",
         "train", "--preset", "test-tiny", "--out", str(two), "--no-progress", *over],
        capture_output=True, text=True, env=ENV, timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert losses(one) == pytest.approx(losses(two), rel=1e-5, abs=1e-6)
    assert len(losses(two)) == 4
