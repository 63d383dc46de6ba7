"""The training loop. Each optimizer step: the stage's trainable parts and learning rate, this process's
micro-batches forward and backward (gradient accumulation), the gradients summed over processes, clipping, the
update, one row of metrics and, when due, a checkpoint. A run with a time budget (max_minutes) times its first
steps, rescales the stages to the steps the rest of the budget buys, and ends cleanly when the time is up."""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from smolvlm.data.conversations import IGNORE
from smolvlm.errors import SmolVLMError
from smolvlm.files import atomic_write_json
from smolvlm.lora import add_lora, lora_modules
from smolvlm.models.vlm import VLM
from smolvlm.train.config import Stage, TrainConfig
from smolvlm.train.data import StepBatches, build_data, step_loader
from smolvlm.train.distributed import Dist, init_distributed
from smolvlm.train.losses import batch_loss
from smolvlm.train.run_dir import (
    load_latest_checkpoint,
    open_metrics,
    plot_losses,
    prepare_run_dir,
    read_metrics,
    save_checkpoint,
    save_final,
)
from smolvlm.train.setup import (
    build_train_model,
    keep_freed_memory,
    load_teacher,
    lr_factor,
    param_groups,
    set_trainable,
)


@dataclass
class TrainResult:
    out: Path
    steps: int
    final_loss: float | None
    wall_s: float
    model_dir: Path | None
    budget_spent: bool = False  # a max_minutes run that ended because its time was up


def stage_at(stages: list[Stage], step: int) -> tuple[int, int]:
    """(stage index, step within the stage) of a global step."""
    for i, s in enumerate(stages):
        if step < s.steps:
            return i, step
        step -= s.steps
    return len(stages) - 1, stages[-1].steps


# ---------------------------------------------------------------------------------------------
# the schedule and the time budget

# A run with a time budget times these steps (after the first, which pays one-off costs) and then plans
# its schedule: the stages are rescaled to the steps the rest of the budget buys at that speed. It plans again
# every REPLAN_STEPS steps from the speed of the last ones, so steps that get slower (a curriculum's short first
# sequences, a busier machine) shorten the schedule, which then still ends with its learning rate decayed, instead of
# the clock cutting it.
BUDGET_PROBE_STEPS = 8
REPLAN_STEPS = 100
UNPLANNED = 10**9  # the step count of a budgeted run until its plan is made (it ends by the clock or the plan)


def budget_plan(stages: list[Stage], steps_done: int, seconds_per_step: float, seconds_left: float,
                may_extend: bool = True, current: list[Stage] | None = None) -> list[Stage]:
    """The stages rescaled (same proportions and warmups) to steps_done + the steps seconds_left buys; with
    may_extend false, never past the configured stages' total. current: the plan being followed (a re-plan), whose
    stages finished by steps_done stay as they were while the rest share what is left."""
    target = steps_done + int(seconds_left / max(seconds_per_step, 1e-9))
    if not may_extend:
        target = min(target, sum(s.steps for s in stages))
    current = current or stages
    i, _ = stage_at(current, steps_done)
    head = sum(s.steps for s in current[:i])  # the finished stages' steps
    scale = max(0, target - head) / sum(s.steps for s in stages[i:])
    rest = [dataclasses.replace(s, steps=max(s.warmup_steps + 1, round(s.steps * scale))) for s in stages[i:]]
    rest[0] = dataclasses.replace(rest[0], steps=max(rest[0].steps, steps_done - head))  # never before now
    return list(current[:i]) + rest


@dataclass
class Schedule:
    """The stages this session follows and the step it stops at (a budgeted run changes both as it goes)."""

    stages: list[Stage]
    total: int  # this session stops after this step
    planned: bool  # a budgeted run's stage lengths are set from its measured speed
    max_steps: int | None  # --max-steps: a pause, not the run's end

    @property
    def length(self) -> int:
        """Where the run ends (when not planned yet, a budgeted run's is UNPLANNED or more)."""
        return sum(s.steps for s in self.stages)

    def stop_at(self, total: int) -> None:
        self.total = total if self.max_steps is None else min(total, self.max_steps)


def make_schedule(cfg: TrainConfig, state: dict | None, max_steps: int | None) -> Schedule:
    """The configured stages; for a time budget, the plan the checkpoint recorded, or until the plan is made, the
    first stage open-ended (warmup, then the peak learning rate) and the run ended by the clock (a budget that may
    not extend the stages starts from them as configured)."""
    budget_s = cfg.max_minutes * 60
    planned = budget_s > 0 and state is not None and "planned_steps" in state
    stages = cfg.stages
    if planned:
        stages = [dataclasses.replace(s, steps=n) for s, n in zip(cfg.stages, state["planned_steps"], strict=True)]
    open_ended = budget_s and not planned and cfg.budget_may_extend  # a budget that only shortens starts as configured
    if open_ended:
        stages = [dataclasses.replace(cfg.stages[0], steps=UNPLANNED)] + cfg.stages[1:]
    schedule = Schedule(stages, total=0, planned=planned, max_steps=max_steps)
    schedule.stop_at(UNPLANNED if open_ended else schedule.length)
    return schedule


@dataclass
class Clock:
    """Training time over all sessions of a run: a resumed run goes on from what its checkpoint recorded."""

    before: float  # the earlier sessions' seconds
    start: float = field(default_factory=time.time)

    def seconds(self) -> float:
        return self.before + time.time() - self.start


@dataclass
class Budget:
    """A run's wall-clock budget (max_minutes; 0 = none) and what this session measured against it."""

    seconds: float
    timed_from: tuple[int, float] | None = None  # (step, training seconds) where the speed is measured from
    spent: bool = False  # the time ran out before the schedule's end


def check_budget(budget: Budget, schedule: Schedule, cfg: TrainConfig, dist: Dist, done: int, train_seconds: float,
                 bar) -> float:
    """After step `done`: plan the schedule once BUDGET_PROBE_STEPS steps are timed and again every REPLAN_STEPS
    steps, end the session here when the time is up. Returns the training time by rank 0's clock, so every process
    decides alike."""
    clock = dist.all_reduce(torch.tensor([train_seconds if dist.main else 0.0], dtype=torch.float64))
    train_seconds = clock.item()
    if budget.timed_from is None:  # this session's first step (it pays one-off costs): time from here
        budget.timed_from = (done, train_seconds)
    elif done - budget.timed_from[0] >= (REPLAN_STEPS if schedule.planned else BUDGET_PROBE_STEPS):
        per_step = (train_seconds - budget.timed_from[1]) / (done - budget.timed_from[0])
        schedule.stages = budget_plan(cfg.stages, done, per_step, budget.seconds - train_seconds,
                                      cfg.budget_may_extend, schedule.stages if schedule.planned else None)
        schedule.planned = True
        schedule.stop_at(max(done, schedule.length))
        budget.timed_from = (done, train_seconds)
        if bar is not None:
            bar.total = schedule.total
            bar.refresh()
    budget.spent = train_seconds >= budget.seconds and done < schedule.total
    if budget.spent:
        schedule.total = done
    return train_seconds


# ---------------------------------------------------------------------------------------------
# the steps of train()


def restore(model: VLM, cfg: TrainConfig, stages: list[Stage], start: int, state: dict | None, dist: Dist) -> None:
    """The model as the run left it at step `start`: LoRA adapters from the first stage that trains them (a
    checkpoint holding them loads only into a model that has them), the checkpoint's weights and RNG states. A new
    run under torchrun starts every process from rank 0's weights."""
    stage_i, _ = stage_at(stages, start)
    if any("lora" in s.train for s in stages[:stage_i + 1]):
        add_lora(model, cfg.lora)
    if state is not None:
        model.load_state_dict(state["model"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
    if dist.world > 1 and state is None:
        for p in model.state_dict().values():
            torch.distributed.broadcast(p, 0)


def stage_optimizer(model: VLM, cfg: TrainConfig, stage: Stage, stage_step: int,
                    state: dict | None) -> tuple[torch.optim.AdamW, list[nn.Parameter]]:
    """(AdamW, its parameters) over the parts `stage` trains; a run resumed mid-stage gets the checkpoint's
    optimizer state back."""
    if "lora" in stage.train and not lora_modules(model):
        add_lora(model, cfg.lora)
    set_trainable(model, stage.train)
    groups = param_groups(model, cfg.optim)
    params = [p for g in groups for p in g["params"]]
    # fused: one kernel over all parameters, not a dozen ops per parameter list
    optimizer = torch.optim.AdamW(groups, betas=tuple(cfg.optim.betas), fused=True)
    if state is not None and stage_step > 0:
        optimizer.load_state_dict(state["optimizer"])
    return optimizer, params


@dataclass
class StepStats:
    loss: float  # per answer token of the global batch (a "contrastive" stage: the contrastive loss)
    contrastive: float  # the contrastive loss, mean over the global batch's micro-batches
    tokens: float  # tokens of the global batch (padding excluded)
    grad_norm: float | None  # before clipping (None: no clipping)


def optimizer_step(model: VLM, teacher: VLM | None, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
                   micro: list[dict], cfg: TrainConfig, stage: Stage, dist: Dist, step: int) -> StepStats:
    """One optimizer step on this process's micro-batches of the global batch (step counts from 0)."""
    # label tokens, tokens, micro-batches: summed over processes, they normalize every process's losses alike
    counts = torch.tensor([sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro),
                           sum(b["n_tokens"] for b in micro), len(micro)], dtype=torch.float64)
    dist.all_reduce(counts)
    n_global, n_batches = max(1.0, counts[0].item()), counts[2].item()
    sums = torch.zeros(2, dtype=torch.float64)  # summed cross-entropy, summed contrastive loss
    for batch in micro:
        loss, ce, con = batch_loss(model, batch, teacher, cfg, stage.objective, n_global, n_batches)
        loss.backward()
        sums += torch.stack([ce.double(), con.double()])
    dist.all_reduce_grads(params)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip) if cfg.optim.grad_clip > 0 else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sums = dist.all_reduce(sums)
    contrastive_value = sums[1].item() / n_batches
    loss_value = sums[0].item() / n_global if stage.objective == "lm" else contrastive_value
    if not math.isfinite(loss_value):
        raise SmolVLMError(f"the loss became {loss_value} at step {step + 1}; lower the learning rates "
                           "(optim.lr_*) or lengthen the warmup (stages.N.warmup_steps)")
    return StepStats(loss_value, contrastive_value, counts[1].item(),
                     float(grad_norm) if grad_norm is not None else None)


def log_step(log, bar, done: int, stage: Stage, stats: StepStats, optimizer: torch.optim.Optimizer, seconds: float,
             train_seconds: float, cfg: TrainConfig) -> None:
    """One row of OUT/metrics.jsonl (written at once, so a kill loses at most the row being written)."""
    row = {"step": done, "stage": stage.name, "loss": round(stats.loss, 6),
           "lr": round(max(g["lr"] for g in optimizer.param_groups), 8), "tokens": int(stats.tokens),
           "tokens_per_s": round(stats.tokens / max(seconds, 1e-9), 1),
           "grad_norm": round(stats.grad_norm, 4) if stats.grad_norm is not None else None,
           "elapsed_s": round(train_seconds, 2)}
    if stage.objective == "lm" and cfg.contrastive_weight > 0:
        row["contrastive"] = round(stats.contrastive, 6)
    log.append(row)
    if bar is not None:
        bar.set_postfix(stage=stage.name, loss=f"{stats.loss:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        bar.update(1)


def checkpoint_due(cfg: TrainConfig, schedule: Schedule, stage_i: int, done: int) -> bool:
    """Every checkpoint_every steps, at the end of the session and at the end of each stage."""
    boundary = done == sum(s.steps for s in schedule.stages[:stage_i + 1])
    return bool(cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == schedule.total or boundary


def progress_bar(total: int, start: int):
    from tqdm import tqdm

    return tqdm(total=total if total < UNPLANNED else None, initial=start, desc="train", unit="step",
                dynamic_ncols=True)


def finish_run(out: Path, cfg: TrainConfig, model: VLM, processor, schedule: Schedule, budget: Budget, step: int,
               clock: Clock) -> Path | None:
    """The loss plot, and for a finished run its model folder (and a budgeted run's budget.json). A budgeted run
    is finished when its plan is done or its time is up; --max-steps only pauses a run."""
    finished = budget.spent or step >= schedule.length
    plot_losses(out, read_metrics(out), schedule.stages)
    if budget.seconds and finished:
        note = {"max_minutes": cfg.max_minutes, "steps": step, "planned_steps": schedule.length,
                "train_seconds": round(clock.seconds(), 1), "ended_by": "budget" if budget.spent else "schedule"}
        atomic_write_json(out / "budget.json", note)
    return save_final(model, processor, out) if finished else None


# ---------------------------------------------------------------------------------------------
# the loop


def train(cfg: TrainConfig, out: str | Path, resume: bool = False, max_steps: int | None = None,
          progress: bool = True, preset: str | None = None) -> TrainResult:
    """Run (or continue) the training described by cfg in the folder out (`preset`: the name recorded in
    run.json, so a resume can tell a different preset from the run's own)."""
    cfg.check()
    out = Path(out)
    dist = init_distributed()
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // dist.world))
    keep_freed_memory()
    if dist.main:
        prepare_run_dir(out, cfg, resume, preset)
    dist.barrier()

    model, processor = build_train_model(cfg.model, cfg.seed, cfg.contrastive)
    teacher = load_teacher(cfg.distill, model, processor) if cfg.distill.teacher else None
    dataset = StepBatches(build_data(cfg.data, cfg.seed, cfg.batch_size), processor, cfg, dist.rank, dist.world)

    start, state = load_latest_checkpoint(out) if resume else (0, None)
    schedule = make_schedule(cfg, state, max_steps)
    budget = Budget(cfg.max_minutes * 60)
    seconds_before = state.get("train_seconds", 0.0) if state is not None else 0.0
    log = open_metrics(out, start) if dist.main else None
    restore(model, cfg, schedule.stages, start, state, dist)
    bar = progress_bar(schedule.total, start) if dist.main and progress else None

    clock = Clock(seconds_before)
    optimizer, params, current_stage = None, [], -1
    loss_value = None
    # a budgeted run may be planned longer than configured: the loader runs on until the loop stops
    loader = iter(step_loader(dataset, start, UNPLANNED if budget.seconds else schedule.total, cfg.data_workers))
    try:
        model.train()
        step = start
        while step < schedule.total:
            stage_i, stage_step = stage_at(schedule.stages, step)
            stage = schedule.stages[stage_i]
            if stage_i != current_stage:
                optimizer, params = stage_optimizer(model, cfg, stage, stage_step, state)
                state, current_stage = None, stage_i  # a checkpoint's optimizer state is for the stage it resumes in
            factor = lr_factor(stage_step, stage, cfg.optim.min_lr_ratio)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * factor

            t0 = time.time()
            stats = optimizer_step(model, teacher, optimizer, params, next(loader), cfg, stage, dist, step)
            seconds = time.time() - t0
            loss_value = stats.loss
            step += 1
            train_seconds = clock.seconds()
            if budget.seconds:
                train_seconds = check_budget(budget, schedule, cfg, dist, step, train_seconds, bar)

            if dist.main:
                log_step(log, bar, step, stage, stats, optimizer, seconds, train_seconds, cfg)
                if checkpoint_due(cfg, schedule, stage_i, step):
                    extra = {"train_seconds": train_seconds}
                    if schedule.planned:
                        extra["planned_steps"] = [s.steps for s in schedule.stages]
                    save_checkpoint(out, step, model, optimizer, cfg.keep_checkpoints, extra)
            dist.barrier()
    finally:
        # the worker process is shut down here, by the process that started it: the loader left in this frame
        # (frames can outlive their return in reference cycles) would be copied into the next forked worker,
        # which then fails to shut it down ("can only test a child process")
        del loader
    if bar is not None:
        bar.close()
    if log is not None:
        log.close()

    model_dir = finish_run(out, cfg, model, processor, schedule, budget, step, clock) if dist.main else None
    dist.barrier()
    if dist.world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return TrainResult(out, step, loss_value, time.time() - clock.start, model_dir, budget.spent)
