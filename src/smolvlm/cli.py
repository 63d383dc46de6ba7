"""The `smolvlm` command line. Each sub-command is a small function; problems with the user's input
(SmolVLMError) end the program with one line on stderr and a non-zero exit code, never a traceback."""

import argparse
import importlib
import json
import sys

from smolvlm.errors import SmolVLMError
from smolvlm.model_options import add_model_options

EXIT_USAGE = 2

# The names of smolvlm.train.PRESETS, for `train --help` without importing torch (tests/test_train.py
# checks that they agree).
TRAIN_PRESETS = ("shapes-tiny", "smollm2-shapes", "test-tiny")
# smolvlm.models.connector.CONNECTORS, for `train --help` without importing torch (tests check they agree)
CONNECTORS = ("pixel-shuffle", "mlp", "ldp", "cross-attention")
# `train` options that are shorthands for config keys (the values are checked with the config)
TRAIN_OPTION_KEYS = {"vision": "model.vision_type", "connector": "model.connector",
                     "cross_attention_every": "model.cross_attention_every", "share_layers": "model.text.layer_repeats",
                     "contrastive_weight": "contrastive_weight", "max_minutes": "max_minutes"}

# Sub-commands that live beside the code they drive. Each module has `add_parser(subparsers)`, which
# registers its sub-command with `set_defaults(func=...)`, and keeps heavy imports inside its functions.
COMMAND_MODULES: list[str] = ["smolvlm.demo", "smolvlm.doctor", "smolvlm.serve.cli", "smolvlm.caption", "smolvlm.chat",
                              "smolvlm.eval.score", "smolvlm.eval.runner", "smolvlm.bench", "smolvlm.ablate"]


def build_messages(prompt: str, n_images: int) -> list[dict]:
    """One user turn: the images, then the text (SmolVLM's layout). Text-only prompts stay plain
    strings so that text-only chat templates (e.g. SmolLM2's ChatML) render them too."""
    if n_images == 0:
        return [{"role": "user", "content": prompt}]
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]}]


def cmd_generate(args: argparse.Namespace) -> int:
    from smolvlm.generation import SamplingParams, TextStream
    from smolvlm.model_options import load_from_args, runtime_facts
    from smolvlm.processing import open_image

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


def cmd_assemble(args: argparse.Namespace) -> int:
    from smolvlm.checkpoint import assemble, save
    from smolvlm.models.vlm import preset

    vision = args.vision if args.vision else preset("smolvlm-256m").vision
    model, processor = assemble(vision, args.decoder, scale_factor=args.scale_factor, dtype=args.dtype,
                                seed=args.seed)
    save(model, processor, args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {n / 1e6:.1f}M parameters, vocabulary {model.cfg.text.vocab_size}, "
          f"{model.cfg.image_seq_len} tokens per image tile")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import os

    from smolvlm.train import config_to_dict, resolve_config, resume_config, train

    shorthands = [f"{key}={getattr(args, name)}" for name, key in TRAIN_OPTION_KEYS.items()
                  if getattr(args, name) is not None]
    cfg = None
    if args.resume and args.out:  # a resumed run starts from its own recorded config
        cfg = resume_config(args.out, args.preset, args.config, shorthands + args.overrides)
    if cfg is None:
        cfg = resolve_config(args.preset, args.config, shorthands + args.overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    if not args.out:
        raise SmolVLMError("--out is required (the run folder); e.g. --out runs/a")
    if args.max_steps is not None and args.max_steps < 1:
        raise SmolVLMError("--max-steps must be >= 1")
    result = train(cfg, args.out, resume=args.resume, max_steps=args.max_steps, progress=not args.no_progress,
                   preset=args.preset)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    summary = {"out": str(result.out), "steps": result.steps, "final_loss": result.final_loss,
               "wall_s": round(result.wall_s, 1), "model": str(result.model_dir) if result.model_dir else None}
    if args.json:
        print(json.dumps(summary))
    else:
        where = f"; model in {result.model_dir}" if result.model_dir else "; not finished (--resume to continue)"
        loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
        print(f"trained {result.steps} steps in {result.wall_s:.0f} s, last loss {loss}{where}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smolvlm", description="Build, train, evaluate, compress and serve small vision-language models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser(
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

    a = sub.add_parser(
        "assemble", help="build a SmolVLM from a SigLIP encoder and a Llama/SmolLM2 decoder",
        description="Put a vision encoder (a SigLIP checkpoint folder, or a fresh SigLIP-B/16-512 when "
                    "--vision is omitted) in front of a decoder (folder, .gguf or packaged name), add "
                    "SmolVLM's image tokens to the vocabulary, and save a SmolVLM checkpoint that smolvlm "
                    "and transformers load. The connector starts untrained.",
    )
    a.add_argument("--vision", help="SigLIP checkpoint folder or hub id (default: a fresh encoder)")
    a.add_argument("--decoder", required=True, help="decoder: folder, .gguf, hub id or packaged name")
    a.add_argument("--out", required=True, help="output checkpoint folder")
    a.add_argument("--scale-factor", type=int, default=4, help="pixel-shuffle factor (default 4, as SmolVLM)")
    a.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
    a.add_argument("--seed", type=int, default=0, help="seed of the new weights' initialisation")
    a.set_defaults(func=cmd_assemble)

    t = sub.add_parser(
        "train", help="train a model (presets, YAML configs, stages, LoRA, distillation, torchrun DDP)",
        description="Train from a preset and/or a YAML config, with KEY=VALUE overrides (e.g. "
                    "optim.lr_decoder=3e-3 stages.0.steps=500 data.questions_per_image=4). Writes "
                    "OUT/metrics.jsonl, OUT/loss.png, OUT/checkpoints/ and, at the end, OUT/model (a SmolVLM "
                    "checkpoint that `smolvlm generate` loads). Launch with `torchrun --nproc-per-node N -m "
                    "smolvlm.cli train ...` for data-parallel training (gloo on CPU).",
    )
    t.add_argument("--preset", help=f"starting config: {', '.join(TRAIN_PRESETS)} (default: the dataclass defaults)")
    t.add_argument("--config", metavar="FILE", help="YAML file of config keys, applied over the preset")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, applied last")
    arch = t.add_argument_group("architecture options (docs/architectures.md; any but the defaults saves a "
                                "smolvlm_variant checkpoint)")
    arch.add_argument("--vision", metavar="{vit,cnn}", help="vision encoder: vit (SigLIP-style, default) or cnn "
                      "(MobileNet-style) = model.vision_type")
    arch.add_argument("--connector", metavar="{" + ",".join(CONNECTORS) + "}",
                      help="how image features reach the decoder (default pixel-shuffle) = model.connector")
    arch.add_argument("--cross-attention-every", type=int, metavar="K",
                      help="cross-attention: a gated cross-attention layer before every K-th decoder block "
                           "(default 2) = model.cross_attention_every")
    arch.add_argument("--share-layers", type=int, metavar="K",
                      help="run each decoder block K times in a row, weights shared (default 1) = "
                           "model.text.layer_repeats")
    arch.add_argument("--contrastive-weight", type=float, metavar="W",
                      help="add W x a SigLIP image-caption loss (a contrastive head) = contrastive_weight")
    t.add_argument("--max-minutes", type=float, metavar="M",
                   help="wall-clock budget: the schedule is fitted to it and the run ends when it is spent = "
                        "max_minutes")
    t.add_argument("--out", metavar="DIR", help="run folder (new, or the run to --resume); required but with "
                   "--print-config")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint, "
                   "with the config it recorded (KEY=VALUE may change only threads, workers, checkpointing)")
    t.add_argument("--max-steps", type=int, metavar="N", help="stop after global step N (resume later)")
    t.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    t.set_defaults(func=cmd_train)

    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except SmolVLMError as e:
        print(f"smolvlm {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
