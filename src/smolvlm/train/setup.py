"""The model a run trains: its initial weights (from scratch, assembled around a pretrained decoder, or a
checkpoint), which parts a stage trains, the optimizer's parameter groups and learning-rate schedule, and the
distillation teacher."""

from __future__ import annotations

import ctypes
import dataclasses
import math
import sys

import torch
from torch import nn

from smolvlm.errors import SmolVLMError
from smolvlm.lora import lora_modules
from smolvlm.models.cnn import CNNConfig, init_cnn
from smolvlm.models.vlm import VLM, VLMConfig
from smolvlm.train.config import DistillConfig, ModelSpec, OptimConfig, Stage


def keep_freed_memory() -> None:
    """Make glibc's malloc keep freed memory in the process. Every training step frees and re-allocates the same
    activations; by default glibc hands large freed blocks back to the OS, and the next step page-faults them in
    again (shapes-tiny: ~14,000 faults a step, a few % of the step's CPU time in the kernel). Blocks up to 32 MiB
    (glibc's largest threshold) then come from the heap, which is not trimmed: the process stays at its peak
    memory. Elsewhere (other C libraries, other systems) nothing changes."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 1 << 30)


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


def build_train_model(spec: ModelSpec, seed: int, contrastive: bool = False):
    """(model in float32, processor) to train, for a model spec; contrastive: give it a contrastive head. (Not
    smolvlm.io.checkpoint.model_from_state, which builds a model from a config and its saved weights.)"""
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
