"""The trainer: one readable loop for every stage, preset and launch mode.

    TrainConfig (config.py: dataclasses; YAML + CLI overrides; presets.py: the named presets)
      -> model (scratch / assembled from a pretrained decoder / a checkpoint) + processor (setup.py)
      -> dataset: example index -> conversation -> tokens + labels (data.py; deterministic, so resume is exact)
      -> stages: freeze/unfreeze vision, connector, decoder, or LoRA on the decoder; AdamW per stage
         with per-group learning rates, linear warmup + cosine decay (setup.py)
      -> each step (loop.py): micro-batches (gradient accumulation) under bf16 autocast, loss on assistant
         tokens, optional distillation from a teacher, optional SigLIP contrastive loss (auxiliary, or a stage's
         only objective; losses.py), gradient clipping, DDP all-reduce when under torchrun (distributed.py)
      -> optional time budget (max_minutes): the schedule is stretched or shrunk to the steps the budget
         buys at the speed of the first steps, and the run ends cleanly when the budget is spent (loop.py)
      -> OUT/metrics.jsonl, OUT/loss.png, OUT/checkpoints/step-N.pt (atomic), OUT/model (SmolVLM folder)
         (run_dir.py)
"""

from smolvlm.train.config import (
    PARTS,
    DataSpec,
    DistillConfig,
    ModelSpec,
    OptimConfig,
    Stage,
    TrainConfig,
    apply_overrides,
    config_to_dict,
    from_dict,
    load_yaml,
    merge_dicts,
)
from smolvlm.train.data import ConversationList, ShapesTrainingData, StepBatches, build_data, step_loader
from smolvlm.train.distributed import Dist, init_distributed
from smolvlm.train.loop import TrainResult, budget_plan, stage_at, train
from smolvlm.train.losses import batch_loss, branch_attention_mask, contrastive_loss, token_losses
from smolvlm.train.presets import (
    PRESETS,
    adapt_preset,
    resolve_config,
    resume_config,
    shapes_tiny,
    smollm2_shapes,
    tiny_smoke,
)
from smolvlm.train.run_dir import (
    checkpoint_paths,
    plot_losses,
    prepare_run_dir,
    read_metrics,
    save_checkpoint,
    save_final,
)
from smolvlm.train.setup import (
    bridge_modules,
    build_train_model,
    init_weights,
    load_teacher,
    lr_factor,
    param_groups,
    set_trainable,
)

__all__ = [
    "PARTS", "PRESETS", "ConversationList", "DataSpec", "Dist", "DistillConfig", "ModelSpec", "OptimConfig",
    "ShapesTrainingData", "Stage", "StepBatches", "TrainConfig", "TrainResult", "adapt_preset", "apply_overrides",
    "batch_loss", "branch_attention_mask", "bridge_modules", "budget_plan", "build_data", "build_train_model",
    "checkpoint_paths", "config_to_dict", "contrastive_loss", "from_dict", "init_distributed", "init_weights",
    "load_teacher", "load_yaml", "lr_factor", "merge_dicts", "param_groups", "plot_losses", "prepare_run_dir",
    "read_metrics", "resolve_config", "resume_config", "save_checkpoint", "save_final", "set_trainable",
    "shapes_tiny", "smollm2_shapes", "stage_at", "step_loader", "tiny_smoke", "token_losses", "train",
]
