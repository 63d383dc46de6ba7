"""The training config: dataclasses for the model, data, stages, optimizer and distillation, read from plain
dicts (YAML files, `section.key=value` overrides) with every unknown key and wrong type refused by its full name."""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

from smolvlm.errors import SmolVLMError
from smolvlm.lora import LoRAConfig
from smolvlm.models.cnn import CNNConfig
from smolvlm.models.connector import CONNECTORS
from smolvlm.models.decoder import DecoderConfig
from smolvlm.models.vision import VisionConfig

PARTS = ("vision", "connector", "decoder", "lora")


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
    # data-preparation processes (they overlap with compute); "auto": 1 where training runs in float32, 0 with bf16
    # (docs/training.md: a worker speeds float32 steps up and slows bf16 ones down on a 2-core CPU)
    workers: int | str = 1
    threads: int = 0  # torch threads per process (0 = cores / processes)
    contrastive_weight: float = 0.0  # > 0: + this x SigLIP's image-caption loss in every "lm" stage
    max_minutes: float = 0.0  # > 0: a wall-clock budget for the whole run (the stages' steps are rescaled to it)
    budget_may_extend: bool = True  # false: the budget only shortens the stages, never trains more than configured

    @property
    def contrastive(self) -> bool:
        """The model needs a contrastive head: some stage's loss uses it."""
        return self.contrastive_weight > 0 or any(s.objective == "contrastive" for s in self.stages)

    @property
    def use_bf16(self) -> bool:
        from smolvlm.runtime.cpu import native_bf16

        return native_bf16() if self.bf16 == "auto" else bool(self.bf16)

    @property
    def data_workers(self) -> int:
        """The data-preparation processes this run uses (`workers` resolved)."""
        return (0 if self.use_bf16 else 1) if self.workers == "auto" else self.workers

    def check(self) -> None:
        if isinstance(self.bf16, str) and self.bf16 != "auto":
            raise SmolVLMError(f"config key 'bf16' must be true, false or auto, got {self.bf16!r}")
        if self.workers != "auto" and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                       or self.workers < 0):
            raise SmolVLMError(f"config key 'workers' must be a whole number >= 0 or auto, got {self.workers!r}")
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
