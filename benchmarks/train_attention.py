"""Training attention on this CPU: SDPA's math backend against its flash kernel, forward + backward, at the
decoder shapes of the shapes-tiny preset, in float32 and under bf16 autocast. The trainer picks the backend per
dtype from this (smolvlm.train.losses.batch_loss).

    .venv/bin/python benchmarks/train_attention.py --threads 2 [--json]
    SMOLVLM_CPU=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python benchmarks/train_attention.py

Prints ms per layer (best of --iters) for each dtype and backend and the math/flash ratio (> 1: flash faster).
"""

import argparse
import json

import torch
import torch.nn.functional as F
from cpu_limits import best_ms  # this folder's timing helper (a script's folder is on sys.path)
from torch.nn.attention import SDPBackend, sdpa_kernel

from smolvlm.runtime import cpu


def layer_ms(dtype: torch.dtype, backend: SDPBackend, shape: tuple, iters: int) -> float:
    b, h, hkv, t, hd = shape

    def make(heads):  # (B, T, H, hd) transposed, as the decoder's projections give them
        return torch.randn(b, t, heads, hd, dtype=dtype).transpose(1, 2).requires_grad_(True)

    q, k, v = make(h), make(hkv), make(hkv)
    mask = torch.ones(b, 1, t, t, dtype=torch.bool).tril()

    def step():
        with sdpa_kernel(backend):
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).sum().backward()

    return round(best_ms(step, iters), 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--batch", type=int, default=16, help="sequences per step (shapes-tiny: 16)")
    p.add_argument("--tokens", type=int, default=181, help="padded sequence length (shapes-tiny: ~180)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shape = (args.batch, 4, 2, args.tokens, 32)  # shapes-tiny's decoder: 4 heads, 2 kv heads, 32 dims each
    facts = cpu.summary()
    results = {"cpu": facts["cpu"], "level": facts["level"], "threads": args.threads, "shape": list(shape)}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        math_ms = layer_ms(dtype, SDPBackend.MATH, shape, args.iters)
        flash_ms = layer_ms(dtype, SDPBackend.FLASH_ATTENTION, shape, args.iters)
        results[name] = {"math_ms": math_ms, "flash_ms": flash_ms, "math_over_flash": round(math_ms / flash_ms, 2)}
    if args.json:
        print(json.dumps(results))
        return
    print(f"{facts['cpu']} ({facts['level']}), {args.threads} threads; one attention layer forward + backward, "
          f"B, H, Hkv, T, hd = {shape}")
    for name in ("float32", "bfloat16"):
        r = results[name]
        print(f"  {name:9s} math {r['math_ms']:7.2f} ms   flash {r['flash_ms']:7.2f} ms   "
              f"math/flash {r['math_over_flash']:.2f}x")


if __name__ == "__main__":
    main()
