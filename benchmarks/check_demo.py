"""Check a `smolvlm demo` output folder against the demo's bars.

    make demo                                              # or: smolvlm demo --out demo-out --force
    .venv/bin/python benchmarks/check_demo.py demo-out     # or the path of its metrics.json

Reads DIR/metrics.json (written by src/smolvlm/demo.py) and checks the bars the demo is held to
(docs/training.md): held-out VQA accuracy >= 0.85, >= 0.40 above the blind baseline (metrics.json's "blind":
the answer prior by default), no question type below 0.60, and a caption CIDEr-D >= 5.0. Each line prints the
measured figure beside its bar (the README's figures are runs of their own, and move with the steps a machine's
speed buys); the exit code is 1 when a figure is below its bar, 2 when the file cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from smolvlm.errors import SmolVLMError


@dataclass
class Claim:
    name: str
    value: float
    bar: float
    signed: bool = False  # print as a difference (+0.526)

    @property
    def holds(self) -> bool:
        return self.value >= self.bar


def read_metrics(path: Path) -> dict:
    """metrics.json of a demo folder (or the file itself), with a one-line error for anything else."""
    file = path / "metrics.json" if path.is_dir() else path
    if not file.is_file():
        raise SmolVLMError(f"{file} does not exist; run `smolvlm demo --out {path}` first (or name its metrics.json)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise SmolVLMError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise SmolVLMError(f"{file} holds a {type(data).__name__}, not the demo's metrics object")
    return data


def number(m: dict, key: str, where: str) -> float:
    value = m.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SmolVLMError(f"{where} has no number under {key!r} (got {value!r}); is it a `smolvlm demo` metrics.json?")
    return float(value)


def demo_claims(m: dict, where: str) -> list[Claim]:
    acc = number(m, "vqa_accuracy", where)
    blind = number(m, "blind_vqa_accuracy", where)
    per_type = m.get("per_type")
    if not isinstance(per_type, dict) or not per_type:
        raise SmolVLMError(f"{where} has no per-question-type accuracies under 'per_type'")
    types = {t: number(per_type, t, f"{where} per_type") for t in per_type}
    lowest = min(types, key=types.get)
    return [
        Claim("held-out VQA accuracy", acc, 0.85),
        Claim("above the blind baseline", acc - blind, 0.40, signed=True),
        Claim(f"lowest question type ({lowest})", types[lowest], 0.60),
        Claim("caption CIDEr-D", number(m, "caption_cider", where), 5.0),
    ]


def report(claims: list[Claim]) -> int:
    width = max(len(c.name) for c in claims)
    for c in claims:
        value = f"{c.value:+.3f}" if c.signed else f"{c.value:.3f}"
        bar = f"{c.bar:+.2f}" if c.signed else f"{c.bar:.2f}"
        verdict = "ok" if c.holds else "BELOW THE BAR"
        print(f"  {c.name:<{width}}  {value:>7}  bar >= {bar:<5}  {verdict}")
    failed = [c for c in claims if not c.holds]
    print(f"{len(claims) - len(failed)} of {len(claims)} claims hold" + (f"; below: {', '.join(c.name for c in failed)}"
                                                                         if failed else ""))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", nargs="?", default="demo-out", help="a demo output folder or its metrics.json "
                                                               "(default: %(default)s)")
    args = p.parse_args(argv)
    try:
        path = Path(args.path)
        m = read_metrics(path)
        claims = demo_claims(m, str(path))
    except SmolVLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    steps = m.get("train_steps", "?")
    print(f"{path}: preset {m.get('preset', '?')}, {steps} training steps, {m.get('n_test_questions', '?')} "
          f"test questions, demo wall time {m.get('wall_s', '?')} s")
    return report(claims)


if __name__ == "__main__":
    sys.exit(main())
