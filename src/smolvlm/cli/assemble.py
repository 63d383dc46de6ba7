"""`smolvlm assemble`: a SmolVLM checkpoint from a SigLIP encoder and a Llama / SmolLM2 decoder (smolvlm.io)."""

import argparse


def cmd_assemble(args: argparse.Namespace) -> int:
    from smolvlm.io import assemble, save
    from smolvlm.models.vlm import preset

    vision = args.vision if args.vision else preset("smolvlm-256m").vision
    model, processor = assemble(vision, args.decoder, scale_factor=args.scale_factor, dtype=args.dtype,
                                seed=args.seed)
    save(model, processor, args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {n / 1e6:.1f}M parameters, vocabulary {model.cfg.text.vocab_size}, "
          f"{model.cfg.image_seq_len} tokens per image tile")
    return 0


def add_parser(subparsers) -> None:
    a = subparsers.add_parser(
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
    a.add_argument("--dtype", default="float32", help="the dtype the checkpoint is saved in: float32 (default) or "
                   "bfloat16 (not the compute dtype of the model-running commands)")
    a.add_argument("--seed", type=int, default=0, help="seed of the new weights' initialisation")
    a.set_defaults(func=cmd_assemble)
