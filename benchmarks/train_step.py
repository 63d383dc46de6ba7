"""A training step on this CPU with and without the padding skipped: the shapes-tiny preset's optimizer step on
the same post-curriculum batches, once as the trainer runs it (the decoder's norms, projections and MLP on the real
tokens only: models.decoder.RealTokens) and once over the padded (B, T) grid, alternating round by round so a
noisy machine slows both alike. Data is made before timing, so this is the step's compute alone.

    .venv/bin/python benchmarks/train_step.py --threads 2 [--json]
    SMOLVLM_CPU=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python benchmarks/train_step.py

Prints seconds per step (median over rounds of each round's mean), the share of padding in the batches, and the
padded/skipped ratio (> 1: skipping is faster).
"""

import argparse
import json
import statistics
import time

import torch

from smolvlm.runtime import cpu
from smolvlm.train import StepBatches, build_data, build_train_model, resolve_config
from smolvlm.train.distributed import init_distributed
from smolvlm.train.loop import optimizer_step, stage_optimizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=16, help="batches timed per round (default 16)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of each way, alternating (default 3)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.steps < 1 or args.rounds < 1:
        p.error("--steps and --rounds must be at least 1")
    torch.set_num_threads(args.threads)
    cfg = resolve_config("shapes-tiny", None, ["data.curriculum_steps=0"])
    model, processor = build_train_model(cfg.model, cfg.seed)
    data = StepBatches(build_data(cfg.data, cfg.seed, cfg.batch_size), processor, cfg, 0, 1)
    skipped = [data[300 + i] for i in range(args.steps)]  # post-curriculum steps
    # without attention_mask the trainer has no real-token mask and runs the padded grid
    padded = [[{k: v for k, v in b.items() if k != "attention_mask"} for b in step] for step in skipped]
    real = sum(b["n_tokens"] for step in skipped for b in step)
    grid = sum(b["input_ids"].numel() for step in skipped for b in step)
    dist, stage = init_distributed(), cfg.stages[0]
    optimizer, params = stage_optimizer(model, cfg, stage, 0, None)
    model.train()
    for i, step in enumerate(skipped[:3]):  # warm-up: one-off allocations, oneDNN primitives
        optimizer_step(model, None, optimizer, params, step, cfg, stage, dist, i)
    times: dict[str, list[float]] = {"skipped": [], "padded": []}
    for _ in range(args.rounds):
        for name, steps in (("skipped", skipped), ("padded", padded)):
            t0 = time.perf_counter()
            for i, step in enumerate(steps):
                optimizer_step(model, None, optimizer, params, step, cfg, stage, dist, 100 + i)
            times[name].append((time.perf_counter() - t0) / len(steps))
    s_skip, s_pad = statistics.median(times["skipped"]), statistics.median(times["padded"])
    facts = cpu.summary()
    out = {"cpu": facts["cpu"], "level": facts["level"], "threads": args.threads,
           "dtype": "bfloat16" if cfg.use_bf16 else "float32", "padding_share": round(1 - real / grid, 3),
           "skipped_s_per_step": round(s_skip, 4), "padded_s_per_step": round(s_pad, 4),
           "padded_over_skipped": round(s_pad / s_skip, 3), "rounds": {k: [round(t, 4) for t in v]
                                                                       for k, v in times.items()}}
    if args.json:
        print(json.dumps(out))
        return
    print(f"{out['cpu']} ({out['level']}), {args.threads} threads, {out['dtype']} training; shapes-tiny, "
          f"{args.steps} steps x {args.rounds} rounds, {out['padding_share']:.0%} of the batches' grid is padding")
    print(f"  padding skipped {s_skip:.4f} s/step   padded {s_pad:.4f} s/step   "
          f"padded/skipped {out['padded_over_skipped']:.2f}x")


if __name__ == "__main__":
    main()
