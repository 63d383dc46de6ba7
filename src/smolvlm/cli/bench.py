"""`smolvlm bench`: CPU inference speed of one model on one image, optionally against transformers.

Each implementation is measured in its own fresh process (so peak RSS is its own), the same way:

    vision_s_per_tile  vision tower + connector on one tile (best of --iters)
    ttft_s             processor + vision + prefill of the image and "Describe this image." to the first
                       token (best of --iters; our per-model cache of image embeddings is cleared first)
    decode_tok_s       batch-1 greedy decoding after that prompt: 128 / (t136 - t8), t136 and t8 the
                       times of a 136-token and an 8-token run (--ignore-eos), so prefill cancels out
    batch_decode_tok_s with --batch-size B > 1: B text-only prompts decoded together, B * 128 / (t136 - t8)
    peak_rss_mb        the process's peak resident memory (ru_maxrss)

transformers' full processor needs torchvision, so the transformers side is fed our processor's
input_ids / pixel_values (the same values: tests/processing/test_processing.py checks them against transformers')
and only transformers' model is timed. With --repeat R the two processes alternate R times and each
figure is the best over the repeats, which keeps the ratios fair on a shared, noisy machine.
"""

import argparse
import json
import os
import subprocess
import sys
import time

from smolvlm.cli.doctor import print_report, runtime_report
from smolvlm.cli.options import add_model_options
from smolvlm.errors import SmolVLMError

PROMPT = "Describe this image."
LONG, SHORT = 136, 8  # decode_tok_s = (LONG - SHORT) / (t_LONG - t_SHORT)


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def best_time(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


# ---------------------------------------------------------------------------------------------
# the two implementations, behind the same four calls


class Ours:
    def __init__(self, model_path: str, dtype: str, quantize: str | None):
        from smolvlm.cli.options import load_for_inference

        self.model, self.processor = load_for_inference(model_path, dtype, quantize)

    def vision(self, pixel_values):
        import torch

        with torch.inference_mode():
            return self.model.encode_images(pixel_values)

    def first_token(self, text: str, images):
        from smolvlm.generation import SamplingParams, generate

        inputs = self.processor(text, images=images)
        return generate(self.model, self.processor, inputs, SamplingParams(max_new_tokens=1, ignore_eos=True))

    def decode(self, inputs: dict, n: int):
        from smolvlm.generation import SamplingParams, generate, generate_batch

        params = SamplingParams(max_new_tokens=n, ignore_eos=True)
        if inputs["input_ids"].shape[0] == 1:
            return generate(self.model, self.processor, inputs, params)
        return generate_batch(self.model, self.processor, inputs, params)


class Transformers:
    def __init__(self, model_path: str, dtype: str, quantize: str | None):

        from smolvlm.io import resolve
        from smolvlm.io.checkpoint import parse_dtype
        from smolvlm.io.gguf import load_gguf

        if quantize:
            raise SmolVLMError("--quantize applies to smolvlm only; transformers is measured in --dtype")
        path = resolve(model_path)
        torch_dtype = parse_dtype(dtype)
        if path.is_file():  # a GGUF: transformers dequantizes it itself
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch_dtype, attn_implementation="sdpa")
            self.processor = load_gguf(path, "float32")[1]  # only its tokenizer/template are used
        else:
            from transformers import AutoModelForImageTextToText

            from smolvlm.processing import Processor

            self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype,
                                                                     attn_implementation="sdpa")
            self.processor = Processor.from_pretrained(path)
        self.model.eval()

    def vision(self, pixel_values):
        import torch

        with torch.inference_mode():
            return self.model.get_image_features(pixel_values=pixel_values)

    def _generate(self, inputs: dict, n: int):
        import torch

        kwargs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "pixel_values",
                                                             "pixel_attention_mask")}
        with torch.inference_mode():
            return self.model.generate(**kwargs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def first_token(self, text: str, images):
        return self._generate(self.processor(text, images=images), 1)

    def decode(self, inputs: dict, n: int):
        return self._generate(inputs, n)


IMPLEMENTATIONS = {"smolvlm": Ours, "transformers": Transformers}


def measure(args) -> dict:
    """Run in a worker process: load, warm up, time. Returns the figures (and what was measured)."""
    import torch

    from smolvlm.processing import build_messages, open_image

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    impl = IMPLEMENTATIONS[args.worker](args.model, args.dtype, args.quantize)
    load_s = time.perf_counter() - t0
    proc = impl.processor
    has_vision = proc.image_config is not None and args.image is not None
    images = [[open_image(args.image)]] if has_vision else None
    text = proc.apply_chat_template(build_messages(PROMPT, 1 if has_vision else 0), add_generation_prompt=True)
    inputs = proc(text, images=images)
    from smolvlm.runtime import cpu

    out = {"impl": args.worker, "dtype": cpu.dtype_name(cpu.resolve_dtype(args.dtype)), "dtype_requested": args.dtype,
           "quantize": args.quantize, "threads": torch.get_num_threads(),
           "prompt_tokens": int(inputs["input_ids"].shape[1]), "load_s": round(load_s, 3)}
    if args.worker == "smolvlm":
        from smolvlm.runtime.quantize import quantization_summary

        out["quantization"] = quantization_summary(impl.model)

    if has_vision:
        out["tiles"] = int(inputs["pixel_values"].shape[1])
        tile = inputs["pixel_values"][:, :1]  # (1, 1, 3, 512, 512): both models cast it to their dtype
        impl.vision(tile)  # warm-up
        out["vision_s_per_tile"] = best_time(lambda: impl.vision(tile), args.iters)

    impl.first_token(text, images)  # warm-up
    out["ttft_s"] = best_time(lambda: impl.first_token(text, images), args.iters)

    impl.decode(inputs, SHORT)  # warm-up
    t_long = best_time(lambda: impl.decode(inputs, LONG), args.iters)
    t_short = best_time(lambda: impl.decode(inputs, SHORT), args.iters)
    out["decode_tok_s"] = (LONG - SHORT) / (t_long - t_short)
    out["t136_s"], out["t8_s"] = t_long, t_short

    if args.batch_size > 1:
        prompts = [proc.apply_chat_template(build_messages(f"{PROMPT} ({i + 1})", 0), add_generation_prompt=True)
                   for i in range(args.batch_size)]
        batch = proc(prompts)
        impl.decode(batch, SHORT)
        t_long = best_time(lambda: impl.decode(batch, LONG), args.iters)
        t_short = best_time(lambda: impl.decode(batch, SHORT), args.iters)
        out["batch_size"] = args.batch_size
        out["batch_decode_tok_s"] = args.batch_size * (LONG - SHORT) / (t_long - t_short)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def run_worker(args, impl: str) -> dict:
    cmd = [sys.executable, "-m", "smolvlm.cli.bench", "--worker", impl, "--model", args.model, "--dtype", args.dtype,
           "--iters", str(args.iters), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    if args.image:
        cmd += ["--image", args.image]
    if args.quantize and impl == "smolvlm":
        cmd += ["--quantize", args.quantize]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SmolVLMError(f"the {impl} measurement failed: {tail}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def best_of(runs: list[dict]) -> dict:
    """Per figure, the best over repeated runs: the least time / memory, the most tokens per second."""
    out = dict(runs[0])
    for key in out:
        values = [r[key] for r in runs if isinstance(r.get(key), float)]
        if values:
            out[key] = max(values) if key.endswith("tok_s") else min(values)
    out["repeats"] = len(runs)
    return out


def ratios(ours: dict, ref: dict) -> dict:
    """Speed-ups (>1 = smolvlm faster) and the memory ratio (<1 = smolvlm smaller)."""
    r = {}
    for key in ("decode_tok_s", "batch_decode_tok_s"):
        if key in ours and key in ref:
            r[key] = ours[key] / ref[key]
    for key in ("vision_s_per_tile", "ttft_s"):
        if key in ours and key in ref:
            r[key] = ref[key] / ours[key]
    r["peak_rss_mb"] = ours["peak_rss_mb"] / ref["peak_rss_mb"]
    return r


FIGURES = [("vision_s_per_tile", "vision s/tile", "{:.3f}"), ("ttft_s", "time to 1st token s", "{:.2f}"),
           ("decode_tok_s", "decode tok/s (batch 1)", "{:.1f}"), ("batch_decode_tok_s", "decode tok/s (batch B)",
                                                                   "{:.1f}"), ("peak_rss_mb", "peak RSS MB", "{:.0f}")]


def print_table(results: dict[str, dict], rat: dict | None) -> None:
    names = list(results)
    head = f"{'':26}" + "".join(f"{n:>16}" for n in names) + (f"{'ratio':>10}" if rat else "")
    print(head)
    for key, label, fmt in FIGURES:
        if not any(key in results[n] for n in names):
            continue
        row = f"{label:26}" + "".join(f"{fmt.format(results[n][key]) if key in results[n] else '-':>16}"
                                      for n in names)
        if rat and key in rat:
            row += f"{rat[key]:>9.2f}x"
        print(row)
    first = results[names[0]]
    extra = f", {first['tiles']} tiles" if "tiles" in first else ""
    print(f"({first['prompt_tokens']} prompt tokens{extra}, {first['threads']} threads; ratios: speed-up of smolvlm, "
          "and for RSS smolvlm / transformers)" if rat else f"({first['prompt_tokens']} prompt tokens{extra})")


def cmd_bench(args: argparse.Namespace) -> int:
    from smolvlm.io import resolve
    from smolvlm.io.checkpoint import parse_dtype
    from smolvlm.processing import open_image
    from smolvlm.runtime.quantize import check_mode

    parse_dtype(args.dtype)
    args.quantize = check_mode(args.quantize)
    resolve(args.model)  # a clear error for a missing model before any worker starts
    if args.image:
        open_image(args.image)
    if args.batch_size < 1 or args.iters < 1 or args.repeat < 1:
        raise SmolVLMError("--batch-size, --iters and --repeat must be >= 1")
    impls = ["smolvlm"] + (["transformers"] if args.compare == "transformers" else [])
    runs: dict[str, list[dict]] = {i: [] for i in impls}
    for _ in range(args.repeat):
        for impl in impls:  # alternate, so both see the same machine load
            runs[impl].append(run_worker(args, impl))
    results = {impl: best_of(r) for impl, r in runs.items()}
    rat = ratios(results["smolvlm"], results["transformers"]) if args.compare else None
    facts = runtime_report()
    if args.json:
        print(json.dumps({**results["smolvlm"], "runtime": facts,
                          **({"transformers": results["transformers"], "ratios": rat} if rat else {})}, indent=2))
    else:
        print_report(facts)
        print_table(results, rat)
    return 0


def add_parser(subparsers) -> None:
    b = subparsers.add_parser(
        "bench", help="measure CPU inference speed (optionally against transformers)",
        description="Time one model on one image: vision tower per tile, time to first token, batch-1 decode "
                    "tokens/s (128 / (t136 - t8)), peak RSS; each implementation in its own process.",
    )
    add_model_options(b, dtype_note="transformers runs in the same dtype (--quantize applies to smolvlm only)")
    b.add_argument("--image", metavar="FILE", help="the image (a 640x480 photo gives 13 tiles with SmolVLM's "
                                                   "processor); omit for a text-only model")
    b.add_argument("--batch-size", type=int, default=1, metavar="B",
                   help="also measure decoding B text-only prompts together (default 1: skip)")
    b.add_argument("--compare", choices=["transformers"], help="also measure transformers, in its own process")
    b.add_argument("--repeat", type=int, default=1, metavar="R",
                   help="alternate the processes R times and keep each figure's best (default 1)")
    b.add_argument("--iters", type=int, default=3, metavar="N", help="timed runs per figure, best kept (default 3)")
    b.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    b.set_defaults(func=cmd_bench)


def worker_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m smolvlm.cli.bench", description="one measurement (internal)")
    p.add_argument("--worker", choices=list(IMPLEMENTATIONS), required=True)
    add_model_options(p)
    p.add_argument("--image")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(json.dumps(measure(args)))
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
