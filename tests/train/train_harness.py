"""What the trainer's tests share: the `smolvlm` command run in a subprocess, and a run's loss curve."""

import os
import subprocess
import sys
from pathlib import Path

from smolvlm.train import read_metrics

SMOLVLM = [sys.executable, "-m", "smolvlm.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_cli(*args, check=True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([*SMOLVLM, *args], capture_output=True, text=True, env=ENV, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"smolvlm {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    return p


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out)]

