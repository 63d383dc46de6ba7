"""SmolLM2-135M text-only decoding: smolvlm against llama.cpp on the same GGUF file, in one run.

    .venv/bin/pip install -e ".[llamacpp]"        # llama-cpp-python (compiles llama.cpp: minutes)
    .venv/bin/python benchmarks/bench_vs_llamacpp.py --threads 2 --repeat 3
    .venv/bin/python benchmarks/bench_vs_llamacpp.py --quantize int8 --json
    SMOLVLM_CPU=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python benchmarks/bench_vs_llamacpp.py
                                                   # as an AVX2-only CPU would run it (--dtype auto: float32)

Both decode the same chat prompt greedily, ignoring EOS. Decode speed is measured like `smolvlm bench`:
128 / (t136 - t8) from a 136-token and an 8-token run (prompt processing cancels out). The two engines
run one after the other inside each repeat (never at the same time), so a busy machine slows both alike; each
engine's figure is 128 over the median of its repeats' (t136 - t8) (a best-of on each length alone lets one slow
8-token run inflate the rate). llama.cpp uses the file's own Q4_1 weights; smolvlm
dequantizes them and requantizes to --quantize (default int4, groups of 32, head int8).
"""

import argparse
import json
import statistics
import time

import torch

from smolvlm.cli.options import load_for_inference
from smolvlm.generation import SamplingParams, generate
from smolvlm.io import resolve
from smolvlm.processing import build_messages
from smolvlm.runtime import cpu, kernels
from smolvlm.runtime.quantize import quantization_summary

LONG, SHORT = 136, 8


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="a GGUF file or packaged name")
    p.add_argument("--quantize", default="int4", choices=["int4", "int8", "none"])
    p.add_argument("--dtype", default="auto", help="activation dtype (auto: bfloat16 with native bf16, else float32)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        raise SystemExit("llama-cpp-python is not installed: pip install -e '.[llamacpp]'") from None

    torch.set_num_threads(args.threads)
    path = resolve(args.model)
    dtype = cpu.dtype_name(cpu.resolve_dtype(args.dtype))
    model, processor = load_for_inference(str(path), dtype, None if args.quantize == "none" else args.quantize)
    text = processor.apply_chat_template(build_messages("Write a short story about a lighthouse.", 0))
    inputs = processor(text)
    prompt = inputs["input_ids"][0].tolist()
    llm = Llama(model_path=str(path), n_ctx=512, n_threads=args.threads, n_threads_batch=args.threads,
                n_batch=512, verbose=False)

    def run_llama(n: int) -> list[int]:
        out = []
        for tok in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(tok)  # llm.generate does not stop at EOS by itself: exactly n tokens
            if len(out) == n:
                break
        return out

    def run_ours(n: int) -> list[int]:
        return generate(model, processor, inputs, SamplingParams(max_new_tokens=n, ignore_eos=True)).token_ids

    run_llama(SHORT), run_ours(SHORT)  # warm-up
    times = {"llama.cpp": {LONG: [], SHORT: []}, "smolvlm": {LONG: [], SHORT: []}}
    for _ in range(args.repeat):
        for n in (LONG, SHORT):
            times["llama.cpp"][n].append(timed(lambda n=n: run_llama(n)))
            times["smolvlm"][n].append(timed(lambda n=n: run_ours(n)))
    # per repeat, the long run less the short one (prompt processing and set-up cancel out); the median of those
    tok_s = {k: (LONG - SHORT) / statistics.median(a - b for a, b in zip(v[LONG], v[SHORT], strict=True))
             for k, v in times.items()}
    same = sum(a == b for a, b in zip(run_llama(32), run_ours(32), strict=True))
    summary = quantization_summary(model)
    result = {"model": str(path.name), "prompt_tokens": len(prompt), "threads": args.threads,
              "smolvlm_quantize": args.quantize, "smolvlm_dtype": dtype, "cpu_level": cpu.level(),
              "kernels": kernels.status()["module"],
              "smolvlm_layers": {"int4": summary["int4"], "int8": summary["int8"], "fallbacks": summary["fallbacks"]},
              "decode_tok_s": tok_s,
              "ratio_smolvlm_over_llamacpp": tok_s["smolvlm"] / tok_s["llama.cpp"],
              "greedy_tokens_equal_of_32": same}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{path.name}, {len(prompt)}-token prompt, {args.threads} threads, median of {args.repeat}, "
          f"smolvlm {dtype} on {cpu.level()} ({summary['int4']} int4 / {summary['int8']} int8 layers)")
    print(f"  llama.cpp (Q4_1)          {tok_s['llama.cpp']:7.1f} tok/s")
    print(f"  smolvlm ({args.quantize:>4})            {tok_s['smolvlm']:7.1f} tok/s   "
          f"{result['ratio_smolvlm_over_llamacpp']:.2f}x llama.cpp")
    print(f"  same greedy tokens: {same}/32")


if __name__ == "__main__":
    main()
