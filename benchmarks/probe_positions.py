"""Does a shapes model know *where* things are, and does its decoder use it?

    .venv/bin/python benchmarks/probe_positions.py demo-out/model [--scenes 100] [--json]

Two measurements on one-object scenes of the shapes world:
  token probe   a ridge regression from each image token alone (the connector's output, what the decoder
                reads) to that token's grid column: if it recovers the column, the position is in the
                token's value, where attention can read it
  answers       the model's answers to "Is the red object in the left half of the image?" and the same
                question with "right", for a red circle placed at several columns: a model that uses the
                position answers the two differently
"""

import argparse
import json
import random

import torch

from smolvlm.data.shapes import Scene, SceneObject, WorldConfig, render
from smolvlm.errors import SmolVLMError
from smolvlm.generation import SamplingParams, generate
from smolvlm.io import load


def one_object(cfg: WorldConfig, color: str, x: int, y: int, half: float = 9.0) -> Scene:
    box = (x + 0.5 - half, y + 0.5 - half, x + 0.5 + half, y + 0.5 + half)
    return Scene("test", 0, 0, cfg.image_size, (SceneObject("circle", color, "large", x, y, box),), cfg)


def ask(model, processor, image, question: str) -> str:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    inputs = processor(processor.apply_chat_template(msgs, add_generation_prompt=True), images=[[image]])
    return generate(model, processor, inputs, SamplingParams(max_new_tokens=4)).text.strip()


def token_probe(model, processor, cfg: WorldConfig, scenes: int) -> dict:
    rng = random.Random(0)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    feats, cols = [], []
    with torch.inference_mode():
        for _ in range(scenes):
            lo, hi = 9, cfg.image_size - 10
            scene = one_object(cfg, rng.choice(cfg.colors), rng.randint(lo, hi), rng.randint(lo, hi))
            pixels = processor(text, images=[[render(scene, cfg)]])["pixel_values"]
            tokens = model.encode_images(pixels)[0].float()  # (L, D): one tile's tokens, row-major grid
            side = int(tokens.shape[0] ** 0.5)
            feats.append(tokens)
            cols.append((torch.arange(tokens.shape[0]) % side).float())
    x, col = torch.cat(feats), torch.cat(cols)
    x = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    n = len(x) * 3 // 4  # fit on the first scenes' tokens, test on the rest
    w = torch.linalg.solve(x[:n].T @ x[:n] + torch.eye(x.shape[1]), x[:n].T @ col[:n])
    pred, truth = x[n:] @ w, col[n:]
    middle = (side - 1) / 2
    return {"grid_side": side, "column_mean_abs_error": (pred - truth).abs().mean().item(),
            "half_accuracy": ((pred < middle) == (truth < middle)).float().mean().item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a shapes checkpoint folder (e.g. demo-out/model)")
    p.add_argument("--scenes", type=int, default=100, help="one-object scenes for the token probe")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.scenes < 4:
        p.error(f"--scenes must be at least 4 (the probe fits on 3/4 of them, tests on the rest), got {args.scenes}")
    try:
        model, processor = load(args.model)
    except SmolVLMError as e:
        p.error(str(e))
    if not model.has_vision:
        p.error(f"{args.model} has no vision encoder; give a shapes VLM checkpoint (e.g. demo-out/model)")
    cfg = WorldConfig()
    out = {"token_probe": token_probe(model, processor, cfg, args.scenes), "answers": []}
    s = cfg.image_size
    for x in (s * 3 // 16, s * 5 // 16, s * 11 // 16, s * 13 // 16):
        image = render(one_object(cfg, "red", x, s // 2), cfg)
        out["answers"].append({"x": x, **{side: ask(model, processor, image, f"Is the red object in the {side} half "
                                                                               "of the image?")
                                          for side in ("left", "right")}})
    if args.json:
        print(json.dumps(out, indent=2))
        return
    t = out["token_probe"]
    print(f"token probe: column from one token, mean error {t['column_mean_abs_error']:.2f} of {t['grid_side']} "
          f"columns, left/right half {t['half_accuracy']:.0%}")
    print("red circle at x | left half? | right half?")
    for a in out["answers"]:
        print(f"{a['x']:>15} | {a['left']:>10} | {a['right']:>11}")


if __name__ == "__main__":
    main()
