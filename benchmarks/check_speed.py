"""Check the README's speed headlines against `smolvlm bench` and bench_vs_llamacpp.py results.

    smolvlm bench --model /tmp/vlm256r --image photo.jpg --compare transformers --threads 2 \\
        --batch-size 8 --repeat 2 --json > bf16.json
    smolvlm bench ... --quantize int8 --json > int8.json
    .venv/bin/python benchmarks/bench_vs_llamacpp.py --threads 2 --repeat 3 --json > int4.json
    .venv/bin/python benchmarks/check_speed.py bf16.json int8.json int4.json
    .venv/bin/python benchmarks/check_speed.py --run --model /tmp/vlm256r --image photo.jpg --threads 2 \\
        --batch-size 8 --repeat 2          # runs `smolvlm bench --compare transformers --json` itself

Each file is checked against the claims that apply to it (its kind and --quantize), at the bars the
speed work is held to (docs/speed.md, "issue's bar"): against transformers in bf16, vision per tile
>= 1.4x, time to first token >= 1.4x, batch-1 decode >= 2.0x, batch-B decode >= 3x our batch 1; with
int8, decode >= 3.5x; int4 SmolLM2-135M decode >= 1.0x llama.cpp. Peak RSS (bar <= 0.5x transformers)
is printed but does not fail the check: the README states it is not met. Each line prints the measured
figure beside its bar and the README's figure; exit code 1 when a figure is below its bar, 2 when a file
cannot be read or holds nothing to check.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from smolvlm.errors import SmolVLMError


@dataclass
class Claim:
    name: str
    value: float | None  # None: not measured in this file
    bar: float
    readme: str
    at_most: bool = False  # the bar is an upper bound (memory ratio)
    gating: bool = True  # False: printed only (a bar the README says is not met)

    @property
    def holds(self) -> bool:
        if self.value is None:
            return True
        return self.value <= self.bar if self.at_most else self.value >= self.bar


def first_json_object(text: str, where: str) -> dict:
    """The first JSON object in text (a command may print more after it)."""
    start = text.find("{")
    if start < 0:
        raise SmolVLMError(f"{where} holds no JSON object; give the output of a --json run")
    try:
        data, _ = json.JSONDecoder().raw_decode(text[start:])
    except ValueError as e:
        raise SmolVLMError(f"{where} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise SmolVLMError(f"{where} does not start with a JSON object")
    return data


def read_result(path: Path) -> dict:
    if not path.is_file():
        raise SmolVLMError(f"{path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SmolVLMError(f"{path} is not UTF-8 text") from None
    return first_json_object(text, str(path))


def run_bench(bench_args: list[str]) -> dict:
    """`smolvlm bench ARGS --compare transformers --json`, in a child process."""
    args = list(bench_args)
    if "--compare" not in args:
        args += ["--compare", "transformers"]
    cmd = [sys.executable, "-m", "smolvlm.cli", "bench", *args, "--json"]
    print("running: smolvlm bench " + " ".join(args + ["--json"]), file=sys.stderr)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SmolVLMError(f"smolvlm bench failed: {tail}")
    return first_json_object(r.stdout, "smolvlm bench's output")


def ratio(d: dict, key: str) -> float | None:
    value = d.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def bench_claims(d: dict, where: str) -> list[Claim]:
    rat = d.get("ratios")
    if not isinstance(rat, dict):
        raise SmolVLMError(f"{where} has no 'ratios': run `smolvlm bench` with --compare transformers")
    quantize = d.get("quantize")
    dtype = str(d.get("dtype", ""))
    if quantize is None and "bfloat16" not in dtype and dtype != "bf16":
        raise SmolVLMError(f"{where} was measured in {dtype or 'an unknown dtype'}; the README's figures are "
                           "bfloat16 (run on a CPU with bf16, or pass --dtype bfloat16)")
    if quantize == "int8":
        return [Claim("int8 decode vs transformers", ratio(rat, "decode_tok_s"), 3.5, "6.53x")]
    if quantize is not None:
        raise SmolVLMError(f"{where}: the README makes no claim for --quantize {quantize} against transformers "
                           "(int4's claim is against llama.cpp: benchmarks/bench_vs_llamacpp.py --json)")
    batch = None
    if ratio(d, "batch_decode_tok_s") and ratio(d, "decode_tok_s"):
        batch = d["batch_decode_tok_s"] / d["decode_tok_s"]
    return [
        Claim("vision per tile vs transformers", ratio(rat, "vision_s_per_tile"), 1.4, "1.44x"),
        Claim("time to first token vs transformers", ratio(rat, "ttft_s"), 1.4, "1.49x"),
        Claim("bf16 decode vs transformers", ratio(rat, "decode_tok_s"), 2.0, "5.11x"),
        Claim(f"batch {d.get('batch_size', 'B')} decode vs our batch 1", batch, 3.0, "4.0x"),
        Claim("peak RSS / transformers'", ratio(rat, "peak_rss_mb"), 0.5, "0.97 (not met)", at_most=True,
              gating=False),
    ]


def llamacpp_claims(d: dict, where: str) -> list[Claim]:
    if d.get("smolvlm_quantize") != "int4":
        raise SmolVLMError(f"{where}: the README's llama.cpp claim is for int4 (bench_vs_llamacpp.py's default), "
                           f"this run used {d.get('smolvlm_quantize')!r}")
    return [Claim("int4 decode vs llama.cpp", ratio(d, "ratio_smolvlm_over_llamacpp"), 1.0, "1.39x")]


def claims_of(d: dict, where: str) -> list[Claim]:
    if "ratio_smolvlm_over_llamacpp" in d:
        return llamacpp_claims(d, where)
    if "decode_tok_s" in d:
        return bench_claims(d, where)
    raise SmolVLMError(f"{where} is neither `smolvlm bench --json` nor bench_vs_llamacpp.py --json output")


def report(where: str, d: dict, claims: list[Claim]) -> list[Claim]:
    """Print one file's claims; returns the gating claims below their bars."""
    facts = [f"{k} {d[k]}" for k in ("dtype", "quantize", "threads", "tiles", "repeats", "model") if d.get(k)]
    print(f"{where}: " + ", ".join(facts))
    width = max(len(c.name) for c in claims)
    for c in claims:
        op = "<=" if c.at_most else ">="
        value = "-" if c.value is None else f"{c.value:.2f}x"
        if c.value is None:
            verdict = "not measured in this run"
        elif c.holds:
            verdict = "ok"
        else:
            verdict = "BELOW THE BAR" if c.gating else "short of the bar (as the README says)"
        print(f"  {c.name:<{width}}  {value:>7}  bar {op} {c.bar:.1f}x  README {c.readme:<15}  {verdict}")
    return [c for c in claims if c.gating and not c.holds]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # everything after --run is smolvlm bench's, passed on as given
    bench_args = argv[argv.index("--run") + 1:] if "--run" in argv else None
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                usage="%(prog)s FILE [FILE ...] | %(prog)s --run SMOLVLM_BENCH_ARGS ...")
    p.add_argument("files", nargs="*", metavar="FILE", help="JSON printed by `smolvlm bench --compare transformers "
                                                            "--json` or `bench_vs_llamacpp.py --json`")
    p.add_argument("--run", action="store_true", help="run `smolvlm bench --compare transformers --json` with the "
                                                      "arguments after --run and check its figures")
    args = p.parse_args(argv if bench_args is None else argv[:argv.index("--run")])
    try:
        if bench_args is not None:
            if args.files:
                raise SmolVLMError("give either JSON files or --run with `smolvlm bench` arguments, not both")
            results = [("smolvlm bench", run_bench(bench_args))]
        else:
            if not args.files:
                raise SmolVLMError("give the JSON files to check, or --run with `smolvlm bench` arguments")
            results = [(f, read_result(Path(f))) for f in args.files]
        checked = [(where, d, claims_of(d, where)) for where, d in results]
    except SmolVLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed, total = [], 0
    for where, d, claims in checked:
        failed += report(where, d, claims)
        total += sum(c.gating and c.value is not None for c in claims)
    if total == 0:
        print("error: no claim could be checked (no figure the claims need was measured)", file=sys.stderr)
        return 2
    print(f"{total - len(failed)} of {total} claims hold" + (f"; below: {', '.join(c.name for c in failed)}"
                                                             if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
