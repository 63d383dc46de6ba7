"""`smolvlm doctor`: what this machine gives the runtime, and what the runtime chose.

The CPU and the features our kernels care about, the ISA level in use (SMOLVLM_CPU can lower it), what
`--dtype auto` resolves to, the C++ kernels (built or not, for which level, with which compiler), which
attention path runs, torch and its threads. `smolvlm bench` prints the same lines above its figures.
"""

from __future__ import annotations

import argparse
import json


def runtime_report(build: bool = False) -> dict:
    """The facts, as one JSON-able dict. build: compile the kernels now if they are not (else only report)."""
    import torch

    from smolvlm.runtime import cpu, kernels

    facts = cpu.summary()
    facts["dtype_auto_reason"] = cpu.describe_dtype("auto")
    if build:
        kernels.extension()
    facts["kernels"] = kernels.status()
    try:
        from smolvlm.runtime import attention

        facts["attention"] = {name: attention.kernel_used(dtype, 64)
                              for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32))}
    except Exception as e:  # the report must not fail on what it reports about  # noqa: BLE001
        facts["attention"] = f"unknown ({type(e).__name__}: {e})"
    facts["onednn"] = torch.backends.mkldnn.is_available()
    return facts


def print_report(facts: dict) -> None:
    k = facts["kernels"]
    forced = f" (SMOLVLM_CPU={facts['level_forced']}; detected {facts['level_detected']})" \
        if facts.get("level_forced") else ""
    lines = [
        ("cpu", f"{facts['cpu']} ({facts['arch']}, {facts['cores']} cores)"),
        ("features", " ".join(facts["features"]) or "(none of interest)"),
        ("level", f"{facts['level']}{forced}"),
        ("dtype auto", facts["dtype_auto_reason"]),
        ("kernels", _kernels_line(k)),
        ("attention", ", ".join(f"{d}: {v}" for d, v in facts["attention"].items())
         if isinstance(facts["attention"], dict) else facts["attention"]),
        ("torch", f"{facts['torch']}, {facts['torch_threads']} threads, ATen {facts['aten_capability']}, "
                  f"oneDNN {'yes' if facts['onednn'] else 'no'}"),
    ]
    for name, value in lines:
        print(f"{name + ':':12}{value}")


def _kernels_line(k: dict) -> str:
    state = "built" if k.get("built") else f"not built ({k.get('reason') or 'not yet: they build at first use'})"
    compiler = f", {k['compiler']}" if k.get("compiler") else ""
    return f"{state}, level {k.get('level')}{compiler}"


def cmd_doctor(args: argparse.Namespace) -> int:
    facts = runtime_report(build=args.build)
    if args.json:
        print(json.dumps(facts, indent=2))
    else:
        print_report(facts)
    return 0


def add_parser(subparsers) -> None:
    d = subparsers.add_parser(
        "doctor", help="what this CPU offers and which kernels and dtype smolvlm chose",
        description="Print the CPU's features, the ISA level in use (SMOLVLM_CPU=generic|avx2|avx512|avx512_bf16 "
                    "lowers it), what --dtype auto resolves to, whether the C++ kernels are built, which attention "
                    "path runs, torch's version and threads.",
    )
    d.add_argument("--build", action="store_true", help="compile the C++ kernels now if they are not built")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.set_defaults(func=cmd_doctor)
