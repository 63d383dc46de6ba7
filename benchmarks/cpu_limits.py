"""What this CPU can do for SmolVLM-256M-shaped inference, measured with plain torch (no model code):
the ceilings `smolvlm bench`'s figures should be read against.

    .venv/bin/python benchmarks/cpu_limits.py --threads 2 [--json]

  gemm             bf16 matmul GFLOP/s at the vision tower's shapes (1024 patches x 768 -> 2304 / 3072 / 768)
  vision_floor_s   one 512-px tile's linear layers (12 x 14.5 GFLOP) at that rate, attention not counted
  gemm_float32     the same in float32: ATen's matmul and oneDNN's pre-packed weights (what smolvlm's float32
                   vision runs on x86 from AVX2 up), and the floor of a tile at the faster of the two
  vit_attention    one 1024-patch, 12-head bf16 attention layer: SDPA kernel vs matmul-softmax-matmul over
                   all heads at once vs 2 heads at a time (ms)
  decode_weights   one decoding token's projections over 30 distinct layers (SmolLM2-135M: fused q/k/v,
                   o, fused gate/up, down) plus the 49152 x 576 head, weights read from memory each time,
                   in bf16 / int8 (per channel) / int4 (groups of 32): the floor of ms per token
  decode_attention one token's attention over 140 and 900 cached positions, 30 layers (3 kv heads x 3
                   queries): SDPA vs two matmuls (ms)
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F


def best_ms(fn, iters: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1000


def gemm(iters: int) -> dict:
    out = {}
    for k, n in ((768, 2304), (768, 3072), (3072, 768)):
        x, w = torch.randn(1024, k, dtype=torch.bfloat16), torch.randn(n, k, dtype=torch.bfloat16)
        out[f"1024x{k}->{n}"] = 2 * 1024 * k * n / 1e6 / best_ms(lambda x=x, w=w: F.linear(x, w), iters)
    return out


def gemm_float32(iters: int) -> dict:
    packing = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    out = {}
    for k, n in ((768, 2304), (768, 3072), (3072, 768)):
        x, w = torch.randn(1024, k), torch.randn(n, k)
        flop = 2 * 1024 * k * n / 1e6
        with torch.inference_mode():
            out[f"aten_1024x{k}->{n}"] = flop / best_ms(lambda x=x, w=w: F.linear(x, w), iters)
            if packing:
                packed = torch.ops.mkldnn._reorder_linear_weight(w, 1024)
                out[f"onednn_1024x{k}->{n}"] = flop / best_ms(
                    lambda x=x, p=packed: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], ""), iters)
    return out


def vit_attention(iters: int) -> dict:
    q, k, v = (torch.randn(1, 12, 1024, 64, dtype=torch.bfloat16) for _ in range(3))

    def chunked(c):
        return torch.cat([torch.softmax(q[:, h:h + c] @ k[:, h:h + c].transpose(-1, -2) * 0.125, -1) @ v[:, h:h + c]
                          for h in range(0, 12, c)], dim=1)

    return {"sdpa": best_ms(lambda: F.scaled_dot_product_attention(q, k, v), iters),
            "matmul_all_heads": best_ms(lambda: chunked(12), iters),
            "matmul_2_heads_at_a_time": best_ms(lambda: chunked(2), iters)}


def decode_weights(iters: int) -> dict:
    shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # fused qkv, o, fused gate/up, down
    xs = {k: torch.randn(1, k, dtype=torch.bfloat16) for _, k in shapes}
    bf16 = [[torch.randn(n, k, dtype=torch.bfloat16) for n, k in shapes] for _ in range(30)]
    int8 = [[(torch.randint(-127, 127, (n, k), dtype=torch.int8), torch.rand(n, dtype=torch.bfloat16))
             for n, k in shapes] for _ in range(30)]
    int4 = []
    for _ in range(30):
        layer = []
        for n, k in shapes:
            codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
            layer.append((packed, torch.rand(k // 32, n, 2, dtype=torch.bfloat16)))
        int4.append(layer)
    head = torch.randn(49152, 576, dtype=torch.bfloat16)
    head8 = (torch.randint(-127, 127, (49152, 576), dtype=torch.int8), torch.rand(49152, dtype=torch.bfloat16))
    x = xs[576]
    out = {
        "bf16_layers": best_ms(lambda: [F.linear(xs[w.shape[1]], w) for ws in bf16 for w in ws], iters),
        "int8_layers": best_ms(lambda: [torch.ops.aten._weight_int8pack_mm(xs[w.shape[1]], w, s)
                                        for ws in int8 for w, s in ws], iters),
        "int4_layers": best_ms(lambda: [torch.ops.aten._weight_int4pack_mm_for_cpu(xs[sz.shape[0] * 32], p, 32, sz)
                                        for ws in int4 for p, sz in ws], iters),
        "bf16_head": best_ms(lambda: F.linear(x, head), iters),
        "int8_head": best_ms(lambda: torch.ops.aten._weight_int8pack_mm(x, *head8), iters),
    }
    out["bf16_tok_s_ceiling"] = 1000 / (out["bf16_layers"] + out["bf16_head"])
    out["int8_tok_s_ceiling"] = 1000 / (out["int8_layers"] + out["int8_head"])
    out["int4_tok_s_ceiling"] = 1000 / (out["int4_layers"] + out["int8_head"])
    return out


def decode_attention(iters: int) -> dict:
    k = torch.randn(30, 1, 3, 1024, 64, dtype=torch.bfloat16)  # 30 layers' caches, 3 kv heads
    v = torch.randn_like(k)
    q = torch.randn(1, 3, 3, 64, dtype=torch.bfloat16)  # the 3 query heads of each kv head as rows

    def sdpa(s: int) -> None:
        for i in range(30):
            F.scaled_dot_product_attention(q, k[i, :, :, :s], v[i, :, :, :s])

    def two_matmuls(s: int) -> None:
        for i in range(30):
            torch.softmax(q @ k[i, :, :, :s].transpose(-1, -2) * 0.125, -1) @ v[i, :, :, :s]

    out = {}
    for s in (140, 900):
        out[f"sdpa_{s}"] = best_ms(lambda s=s: sdpa(s), iters)
        out[f"matmul_{s}"] = best_ms(lambda s=s: two_matmuls(s), iters)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    res = {"threads": args.threads, "gemm_gflops": gemm(args.iters)}
    res["vision_floor_s"] = 12 * 14.5 / min(res["gemm_gflops"].values())
    res["gemm_float32_gflops"] = gemm_float32(args.iters)
    best = {}  # per shape, the faster of ATen and oneDNN
    for name, rate in res["gemm_float32_gflops"].items():
        shape = name.split("_", 1)[1]
        best[shape] = max(best.get(shape, 0.0), rate)
    res["vision_floor_float32_s"] = 12 * 14.5 / min(best.values())
    res["vit_attention_ms"] = vit_attention(args.iters)
    res["decode_weights_ms"] = decode_weights(args.iters)
    res["decode_attention_ms"] = decode_attention(args.iters)
    if args.json:
        print(json.dumps(res, indent=2))
        return
    for section, values in res.items():
        if isinstance(values, dict):
            print(section)
            for k, v in values.items():
                print(f"  {k:28s} {v:10.2f}")
        else:
            print(f"{section:30s} {values}")


if __name__ == "__main__":
    main()
