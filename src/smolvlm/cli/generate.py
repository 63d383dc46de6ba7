"""`smolvlm generate`: answer one prompt about zero or more images, streamed to the terminal (or as one JSON
object)."""

import argparse
import json
import sys

from smolvlm.cli.options import add_model_options
from smolvlm.errors import SmolVLMError


def cmd_generate(args: argparse.Namespace) -> int:
    from smolvlm.cli.options import load_from_args, runtime_facts
    from smolvlm.generation import SamplingParams, TextStream
    from smolvlm.processing import build_messages, open_image

    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, stop=args.stop or [], ignore_eos=args.ignore_eos,
    )
    params.check()
    images = [open_image(p) for p in args.image or []]  # fail on a bad image before loading the model
    model, processor = load_from_args(args)
    if images and not model.has_vision:
        raise SmolVLMError(f"{args.model} is a text-only model (no vision encoder); drop --image")
    text = processor.apply_chat_template(build_messages(args.prompt, len(images)), add_generation_prompt=True)
    inputs = processor(text, images=[images] if images else None)

    stream = TextStream(model, processor, inputs, params)
    if args.json:
        for _ in stream:
            pass
        r = stream.result
        print(json.dumps({
            "text": r.text, "token_ids": r.token_ids, "logprobs": r.logprobs, "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens, "finish_reason": r.finish_reason,
            **runtime_facts(model, args.dtype),
        }))
    else:
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def add_parser(subparsers) -> None:
    g = subparsers.add_parser(
        "generate", help="answer a prompt about zero or more images",
        description="Answer a prompt (a user turn: the images, then the text, through the model's chat "
                    "template) and stream the answer to the terminal.",
    )
    add_model_options(g)
    g.add_argument("--image", action="append", metavar="FILE", help="an image file; repeat for several")
    g.add_argument("--prompt", required=True, help="the question or instruction")
    g.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="default: %(default)s")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 (default) is greedy")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling (default 1: off)")
    g.add_argument("--top-k", type=int, default=0, metavar="K", help="top-k sampling (default 0: off)")
    g.add_argument("--seed", type=int, default=None, metavar="S", help="seed for sampling")
    g.add_argument("--stop", action="append", metavar="TEXT", help="stop before this text; repeatable")
    g.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-new-tokens tokens")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object: text, token_ids, logprobs, prompt_tokens, completion_tokens, "
                        "finish_reason, and what ran: dtype, dtype_requested, cpu_level, quantization")
    g.set_defaults(func=cmd_generate)
