"""The trainer tests' shared run: a finished test-tiny run that several test files start from or check."""

from pathlib import Path

import pytest

from smolvlm.train import resolve_config, train


@pytest.fixture(scope="session")
def base_run(tmp_path_factory) -> Path:
    """A finished test-tiny run (fp32, 12 steps) whose model the LoRA and distillation tests start from."""
    out = tmp_path_factory.mktemp("base") / "run"
    cfg = resolve_config("test-tiny", None, ["bf16=false", "stages.0.steps=12", "threads=1"])
    train(cfg, out, progress=False)
    return out
