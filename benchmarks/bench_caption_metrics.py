"""How long the pure-Python COCO caption metrics take on a COCO-sized job.

    .venv/bin/python benchmarks/bench_caption_metrics.py [--images 5000] [--refs 5] [--meteor]

Makes `--images` synthetic captions with `--refs` references each (COCO-like sentences: 8-16 words
from a 2,000-word vocabulary, with punctuation, numbers and contractions so the tokenizer works for
its living), then times each step of ``score_captions``: PTB tokenization, BLEU-1..4, ROUGE-L,
CIDEr-D (and METEOR through the Java scorer with --meteor). Prints a table and one JSON line.
The target (docs/eval.md) is under 10 s for 5,000 images x 5 references on one CPU core.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time


def synthetic_corpus(n_images: int, n_refs: int, seed: int = 0) -> tuple[dict, dict]:
    rng = random.Random(seed)
    syllables = ["ba", "ko", "ri", "ten", "mo", "la", "pe", "su", "dar", "ni", "go", "ve", "sha", "tru", "lo"]
    vocab = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(4000)})[:2000]
    glue = ["a", "the", "of", "on", "in", "with", "and", "is", "are", "two", "three", "man's", "don't", "it's"]
    punct = ["", "", "", ".", ".", ",", "!", " ."]

    def sentence(topic: list[str]) -> str:
        words = []
        for _ in range(rng.randint(8, 16)):
            r = rng.random()
            words.append(rng.choice(topic) if r < 0.4 else rng.choice(glue) if r < 0.7 else rng.choice(vocab))
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), str(rng.randint(2, 1999)))
        text = " ".join(words)
        return (text[0].upper() + text[1:]) + rng.choice(punct)

    refs, preds = {}, {}
    for i in range(n_images):
        topic = rng.sample(vocab, 6)
        refs[i] = [sentence(topic) for _ in range(n_refs)]
        preds[i] = sentence(topic)
    return refs, preds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--refs", type=int, default=5)
    parser.add_argument("--meteor", action="store_true", help="also time METEOR (needs Java + pycocoevalcap)")
    args = parser.parse_args()

    from smolvlm.eval.caption_metrics import _prepare, bleu, cider_d_tokenized, meteor, rouge_l, score_captions

    refs, preds = synthetic_corpus(args.images, args.refs)
    steps = {}
    t0 = time.perf_counter()
    _, tok_refs, tok_preds, _ = _prepare(refs, preds, tokenize=True)
    steps["PTB tokenization"] = time.perf_counter() - t0
    for name, fn in (("BLEU-1..4", bleu), ("ROUGE-L", rouge_l), ("CIDEr-D", cider_d_tokenized)):
        t = time.perf_counter()
        fn(tok_refs, tok_preds)
        steps[name] = time.perf_counter() - t
    if args.meteor:
        t = time.perf_counter()
        score, _, why = meteor(tok_refs, tok_preds)
        steps["METEOR (Java)" if score is not None else f"METEOR unavailable: {why}"] = time.perf_counter() - t
    t = time.perf_counter()
    result = score_captions(refs, preds, with_meteor=args.meteor)
    total = time.perf_counter() - t

    n_caps = args.images * (args.refs + 1)
    print(f"{args.images} images x {args.refs} references ({n_caps} captions), Python {platform.python_version()}, "
          f"{platform.machine()}")
    print("| step | seconds |\n|---|---|")
    for name, sec in steps.items():
        print(f"| {name} | {sec:.2f} |")
    print(f"| **score_captions, end to end** | **{total:.2f}** |")
    print("scores: " + ", ".join(f"{k} {v:.4f}" for k, v in result.scores.items()))
    print(json.dumps({"images": args.images, "refs_per_image": args.refs, "seconds_total": round(total, 3),
                      "seconds_by_step": {k: round(v, 3) for k, v in steps.items()},
                      "captions_per_second": round(n_caps / total)}))


if __name__ == "__main__":
    main()
