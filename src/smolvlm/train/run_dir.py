"""The run folder OUT and what the trainer writes there (claimed and logged with smolvlm.run_folder):

    OUT/run.json                  the config (and preset) the run was started with
    OUT/checkpoints/step-N.pt     model, optimizer, RNG states (written atomically; the last few kept)
    OUT/metrics.jsonl             one JSON row per optimizer step
    OUT/loss.png                  the loss curve (with matplotlib)
    OUT/budget.json               a max_minutes run: how it ended
    OUT/model, OUT/adapters       the finished model (a SmolVLM folder) and its LoRA adapters alone
"""

from __future__ import annotations

import copy
import random
import sys
from pathlib import Path

import torch

from smolvlm.files import atomic_path
from smolvlm.lora import lora_modules, merge_lora, save_adapters
from smolvlm.models.vlm import VLM
from smolvlm.run_folder import JsonlLog, claim
from smolvlm.train.config import Stage, TrainConfig, config_to_dict

EXECUTION_KEYS = ("threads", "workers", "checkpoint_every", "keep_checkpoints")


def prepare_run_dir(out: Path, cfg: TrainConfig, resume: bool, preset: str | None = None) -> None:
    """OUT/run.json records the config; a folder holding a different run is never mixed into."""
    existing = "{folder} already holds a training run; pass --resume to continue it or choose another --out"
    claim(out, {"config": config_to_dict(cfg), "preset": preset}, same=_computed,
          existing=None if resume else existing,
          different="{folder} holds a different run ({difference}); resume with the same config or choose another "
                    "--out",
          unreadable="{folder} holds an unreadable run.json; pick another --out",
          foreign="{folder} is not empty and holds no smolvlm run; choose an empty or new --out")


def _computed(record: dict) -> dict:
    """What of a run.json a resume must match: the config but how it is executed, which may change between
    sessions (e.g. more cores); the preset is resume_config's to check."""
    return {k: v for k, v in record["config"].items() if k not in EXECUTION_KEYS}


def checkpoint_paths(out: Path) -> list[tuple[int, Path]]:
    folder = out / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for p in folder.glob("step-*.pt"):
        try:
            found.append((int(p.stem.split("-")[1]), p))
        except (IndexError, ValueError):
            continue
    return sorted(found)


def save_checkpoint(out: Path, step: int, model: VLM, optimizer, keep: int, extra: dict | None = None) -> None:
    """extra: more entries of the state (a budgeted run's time so far and planned stage lengths)."""
    folder = out / "checkpoints"
    folder.mkdir(exist_ok=True)
    state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(), **(extra or {})}
    final = folder / f"step-{step:07d}.pt"
    with atomic_path(final) as tmp:  # a kill leaves at most a hidden .tmp file, which resume ignores
        torch.save(state, tmp)
    for _, old in checkpoint_paths(out)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)


def load_latest_checkpoint(out: Path) -> tuple[int, dict | None]:
    """(step, state) of the newest checkpoint in OUT, or (0, None) when there is none."""
    ckpts = checkpoint_paths(out)
    if not ckpts:
        return 0, None
    step, path = ckpts[-1]
    return step, torch.load(path, map_location="cpu", weights_only=False)


def read_metrics(out: Path) -> list[dict]:
    """The rows of OUT/metrics.jsonl, up to a line cut by a kill."""
    return JsonlLog(out / "metrics.jsonl").read()


def open_metrics(out: Path, start: int) -> JsonlLog:
    """OUT/metrics.jsonl cut back to exactly the steps up to `start` (a killed run may have logged more), opened
    for appending this session's rows."""
    log = JsonlLog(out / "metrics.jsonl")
    log.open(keep=lambda row: row.get("step", 0) <= start)
    return log


def plot_losses(out: Path, rows: list[dict], stages: list[Stage]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no matplotlib: loss plot skipped; pip install 'smolvlm[train]')", file=sys.stderr)
        return None
    steps = [r["step"] for r in rows if "loss" in r]
    losses = [r["loss"] for r in rows if "loss" in r]
    if not steps:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss per step")
    w = max(1, len(losses) // 50)
    if w > 1:
        smooth = [sum(losses[max(0, i - w + 1):i + 1]) / len(losses[max(0, i - w + 1):i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, lw=1.5, label=f"mean of {w}")
    boundary = 0
    for s in stages[:-1]:
        boundary += s.steps
        ax.axvline(boundary, color="gray", ls="--", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per answer token)")
    ax.set_title(f"training loss: {out.name}")
    ax.legend()
    fig.tight_layout()
    path = out / "loss.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def save_final(model: VLM, processor, out: Path) -> Path:
    """OUT/model: a SmolVLM checkpoint (adapters merged); OUT/adapters: the LoRA adapters alone."""
    from smolvlm.io import save

    model = model.eval()
    if lora_modules(model):
        save_adapters(model, out / "adapters")
        model = merge_lora(copy.deepcopy(model))
    save(model, processor, out / "model")
    return out / "model"
