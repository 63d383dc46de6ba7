"""`smolvlm train`: the command part of training (options -> config -> smolvlm.train.train -> a summary). Imports
nothing heavy at module level, so that `smolvlm --help` stays fast."""

import argparse
import json

from smolvlm.errors import SmolVLMError

# The names of smolvlm.train.PRESETS, for `train --help` without importing torch (tests/train/test_train_config.py
# checks that they agree).
TRAIN_PRESETS = ("shapes-tiny", "smollm2-shapes", "test-tiny")
# smolvlm.models.connector.CONNECTORS, for `train --help` without importing torch (tests check they agree)
CONNECTORS = ("pixel-shuffle", "mlp", "ldp", "cross-attention")
# `train` options that are shorthands for config keys (the values are checked with the config)
TRAIN_OPTION_KEYS = {"vision": "model.vision_type", "connector": "model.connector",
                     "cross_attention_every": "model.cross_attention_every", "share_layers": "model.text.layer_repeats",
                     "contrastive_weight": "contrastive_weight", "max_minutes": "max_minutes"}


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


def add_parser(subparsers) -> None:
    t = subparsers.add_parser(
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
