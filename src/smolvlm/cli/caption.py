"""`smolvlm caption`: caption many images into a JSON Lines file, in batches, resumably.

One line per image: {"path", "caption", "finish_reason", "prompt_tokens", "completion_tokens"}, or
{"path", "error"} for a file that could not be read as an image. A second run with the same --out skips
every image already there, so an interrupted run picks up where it stopped. Lines are flushed and synced
after each batch; a half-written last line (the process was killed mid-write) is cut off on resume.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from smolvlm.cli.options import add_model_options
from smolvlm.errors import SmolVLMError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
DEFAULT_PROMPT = "Describe this image in one sentence."


def find_images(paths: list[str]) -> list[Path]:
    """Files as given (whatever their suffix), folders searched recursively for image suffixes, in a
    stable order, each file once. A path that does not exist is kept: it is reported as unreadable."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            found.append(p)
    return list(dict.fromkeys(f.absolute() for f in found))


def read_existing(out: Path) -> dict[str, dict]:
    """The records already in `out`, by path (a later line wins). A last line without its newline is a
    write that was cut short: it is removed so that appending starts on a clean line."""
    if not out.exists():
        return {}
    if not out.is_file():
        raise SmolVLMError(f"--out {out} is not a file")
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(out, "r+b") as f:
            f.truncate(end)
        print(f"smolvlm caption: removed an unfinished last line from {out}", file=sys.stderr)
    records = {}
    for n, line in enumerate(data[:end].decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            raise SmolVLMError(f"{out}:{n} is not a JSON line; is --out really a captions file?") from None
        if not isinstance(r, dict) or not isinstance(r.get("path"), str):
            raise SmolVLMError(f"{out}:{n} has no \"path\"; is --out really a captions file?")
        records[r["path"]] = r
    return records


def caption_batch(model, processor, prompt_text: str, paths: list[Path], params) -> list[dict]:
    """Records for a batch of images, in order. Unreadable images become error records; the rest are
    captioned in one left-padded batch."""
    from smolvlm.generation import generate_batch
    from smolvlm.processing import open_image

    records: list[dict | None] = [None] * len(paths)
    readable = []
    for i, p in enumerate(paths):
        try:
            readable.append((i, open_image(p)))
        except SmolVLMError as e:
            records[i] = {"path": str(p), "error": str(e)}

    def run(items):
        inputs = processor([prompt_text] * len(items), images=[[img] for _, img in items])
        for (i, _), r in zip(items, generate_batch(model, processor, inputs, params), strict=True):
            records[i] = {"path": str(paths[i]), "caption": r.text, "finish_reason": r.finish_reason,
                          "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens}

    if readable:
        try:
            run(readable)
        except SmolVLMError:  # one image the processor cannot take (e.g. an odd mode): find it, keep the rest
            for item in readable:
                try:
                    run([item])
                except SmolVLMError as e:
                    records[item[0]] = {"path": str(paths[item[0]]), "error": str(e)}
    return records


def cmd_caption(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from smolvlm.generation import SamplingParams
    from smolvlm.processing import build_messages

    if args.batch_size < 1:
        raise SmolVLMError(f"--batch-size must be >= 1, got {args.batch_size}")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
    params.check()
    out = Path(args.out)
    if not out.parent.exists():
        raise SmolVLMError(f"the folder of --out {out} does not exist")
    paths = find_images(args.paths)
    if not paths:
        raise SmolVLMError("no images found in " + ", ".join(args.paths) + f" (suffixes: {sorted(IMAGE_SUFFIXES)})")
    existing = read_existing(out)
    todo = [p for p in paths if str(p) not in existing or (args.retry_errors and "error" in existing[str(p)])]
    skipped = len(paths) - len(todo)

    start = time.perf_counter()
    captioned, failures, facts = 0, [], {}
    if todo:
        from smolvlm.cli.options import load_from_args, runtime_facts

        model, processor = load_from_args(args)
        facts = runtime_facts(model, args.dtype)
        if not model.has_vision:
            raise SmolVLMError(f"{args.model} is a text-only model (no vision encoder); it cannot caption images")
        prompt_text = processor.apply_chat_template(build_messages(args.prompt, 1), add_generation_prompt=True)
        with open(out, "a", encoding="utf-8") as f, tqdm(total=len(todo), unit="img", desc="captioning",
                                                          disable=args.quiet, file=sys.stderr) as bar:
            for at in range(0, len(todo), args.batch_size):
                for r in caption_batch(model, processor, prompt_text, todo[at:at + args.batch_size], params):
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
                    if "error" in r:
                        failures.append(r)
                        bar.write(f"smolvlm caption: skipped {r['path']}: {r['error']}", file=sys.stderr)
                    else:
                        captioned += 1
                f.flush()
                os.fsync(f.fileno())  # a batch on disk is a batch that a resumed run will not redo
                bar.update(min(args.batch_size, len(todo) - at))
    seconds = time.perf_counter() - start

    summary = {"out": str(out), "images": len(paths), "captioned": captioned, "failed": len(failures),
               "skipped": skipped, "seconds": round(seconds, 2),
               "failures": [{"path": r["path"], "error": r["error"]} for r in failures], **facts}
    if args.json:
        print(json.dumps(summary))
    else:
        rate = f", {captioned / seconds:.2f} images/s" if captioned and seconds > 0 else ""
        print(f"captioned {captioned}, failed {len(failures)}, already in {out}: {skipped} "
              f"({seconds:.1f} s{rate})")
        for r in failures:
            print(f"  failed: {r['path']}: {r['error']}")
    return 0


def add_parser(subparsers) -> None:
    c = subparsers.add_parser(
        "caption", help="caption many images into a JSON Lines file (batched, resumable)",
        description="Caption image files and folders (searched recursively) with a greedy answer to --prompt, "
                    "in batches, appending one JSON line per image to --out: "
                    '{"path", "caption", "finish_reason", "prompt_tokens", "completion_tokens"}, or '
                    '{"path", "error"} for a file that is not a readable image (reported, never fatal). '
                    "Images already in --out are skipped, so re-running resumes an interrupted run.",
    )
    c.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders")
    add_model_options(c, model_help="a SmolVLM checkpoint folder or hub id")
    c.add_argument("--out", required=True, metavar="FILE", help="the JSON Lines file to append to")
    c.add_argument("--prompt", default=DEFAULT_PROMPT, help="the instruction (default: %(default)r)")
    c.add_argument("--batch-size", type=int, default=8, metavar="B", help="images per batch (default: %(default)s)")
    c.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="default: %(default)s")
    c.add_argument("--retry-errors", action="store_true", help="try again the images recorded as errors")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.add_argument("--json", action="store_true",
                   help="print the summary as one JSON object: out, images, captioned, failed, skipped, seconds, "
                        "failures, and what ran (dtype, dtype_requested, cpu_level, quantization) when a model ran")
    c.set_defaults(func=cmd_caption)
