"""`smolvlm serve`: the OpenAI-compatible server and the web chat page."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from smolvlm.cli.options import add_model_options
from smolvlm.errors import SmolVLMError


def served_name(model: str) -> str:
    """What /v1/models lists: the checkpoint folder's (or file's) name, or the hub id as given."""
    p = Path(model)
    return p.name if p.exists() else model


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from smolvlm.serve.app import create_app
    except ImportError as e:
        raise SmolVLMError(f"serving needs the 'serve' extra ({e.name} is missing); pip install 'smolvlm[serve]'"
                           ) from None
    from smolvlm.cli.options import load_from_args, runtime_facts
    from smolvlm.serve.protocol import Limits

    for name in ("max_batch_size", "max_queue", "max_images", "max_image_pixels", "max_tokens", "max_request_bytes"):
        if getattr(args, name) < 1:
            raise SmolVLMError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.port <= 65535:
        raise SmolVLMError(f"--port must be in 0..65535, got {args.port}")
    limits = Limits(max_request_bytes=args.max_request_bytes, max_images=args.max_images,
                    max_image_pixels=args.max_image_pixels, max_image_bytes=min(args.max_request_bytes, 10 << 20),
                    max_tokens=args.max_tokens, max_queue=args.max_queue)
    model, processor = load_from_args(args)
    name = args.served_model_name or served_name(args.model)
    app = create_app(model, processor, name, limits, max_batch_size=args.max_batch_size,
                     allow_remote_images=args.allow_remote_images, api_key=args.api_key)
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        print("smolvlm serve: warning: listening beyond this machine without --api-key", file=sys.stderr)
    facts = runtime_facts(model, args.dtype)
    quant = f", {facts['quantization']['mode']}" if facts["quantization"] else ""
    print(f"smolvlm serve: {name} ({facts['dtype']} on CPU level {facts['cpu_level']}{quant}) at "
          f"http://{args.host}:{args.port}/ (chat page) and http://{args.host}:{args.port}/v1 (OpenAI API)",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


def add_parser(subparsers) -> None:
    s = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API, with a web chat page",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve a model over HTTP:\n"
                    "  POST /v1/chat/completions  OpenAI chat completions: text and image_url parts (base64 data:\n"
                    "                             URLs), several images, multi-turn, stream=true (server-sent events)\n"
                    "  GET  /v1/models            the served model\n"
                    "  GET  /health               status, queue and counters\n"
                    "  GET  /                     a chat page: pick or drop an image, ask, watch the answer stream in\n"
                    "Concurrent requests are batched. Bad requests get OpenAI-style error bodies with 4xx codes;\n"
                    "a full queue gets 503 with Retry-After. Needs the 'serve' extra (fastapi, uvicorn).",
        epilog="example: smolvlm serve --model HuggingFaceTB/SmolVLM-256M-Instruct --port 8000\n"
               "then: OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='-').chat.completions.create(...)",
    )
    add_model_options(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    s.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    s.add_argument("--api-key", metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/* (the page has a field for it under settings)")
    s.add_argument("--served-model-name", metavar="NAME", help="the model id in responses (default: folder name)")
    s.add_argument("--max-batch-size", type=int, default=8, metavar="B",
                   help="requests decoded together (default: %(default)s)")
    s.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests waiting for the model before new ones get 503 (default: %(default)s)")
    s.add_argument("--max-images", type=int, default=8, metavar="N", help="images per request (default: %(default)s)")
    s.add_argument("--max-image-pixels", type=int, default=4096 * 4096, metavar="N",
                   help="width*height of one image, checked before decoding (default: %(default)s)")
    s.add_argument("--max-tokens", type=int, default=4096, metavar="N",
                   help="the largest max_tokens a request may ask for (default: %(default)s)")
    s.add_argument("--max-request-bytes", type=int, default=20 * 1024 * 1024, metavar="N",
                   help="request body size limit (default: %(default)s)")
    s.add_argument("--allow-remote-images", action="store_true",
                   help="let requests name http(s) image URLs for the server to download (off: only data: URLs)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default: %(default)s)")
    s.set_defaults(func=cmd_serve)
