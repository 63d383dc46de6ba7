"""LoRA: low-rank adapters on the decoder's linear layers.

y = W x + (alpha / r) * B (A x), with A (r, in) random, B (out, r) zero, so training starts from the
base model exactly. Adapters save alone in PEFT's layout (adapter_config.json +
adapter_model.safetensors) or merge into W.
"""

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from smolvlm.errors import SmolVLMError
from smolvlm.models.vlm import VLM

PEFT_PREFIX = "base_model.model."


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    # decoder projections to adapt (names of nn.Linear modules inside text_model.layers[i])
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scale
            self.base.weight += delta.to(self.base.weight.dtype)
        return self.base


def lora_modules(model: VLM) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model: VLM, cfg: LoRAConfig) -> VLM:
    """Wrap the target projections of every decoder block; freezes everything but the adapters."""
    for p in model.parameters():
        p.requires_grad_(False)
    found = 0
    for block in model.text_model.layers:
        for parent in (block.self_attn, block.mlp):
            for name in cfg.targets:
                base = getattr(parent, name, None)
                if isinstance(base, nn.Linear):
                    setattr(parent, name, LoRALinear(base, cfg.rank, cfg.alpha).to(base.weight.dtype))
                    found += 1
    if not found:
        raise SmolVLMError(f"no decoder projection matches LoRA targets {cfg.targets}")
    model.lora_config = cfg
    return model


def merge_lora(model: VLM) -> VLM:
    """Fold every adapter into its base weight; the model is a plain VLM again."""
    for name, m in lora_modules(model).items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, m.merged())
    model.__dict__.pop("lora_config", None)
    return model


def hf_module_name(name: str) -> str:
    """Our module path -> the path inside transformers' SmolVLMForConditionalGeneration."""
    return name if name.startswith("lm_head") else "model." + name


def save_adapters(model: VLM, folder: str | Path) -> None:
    folder = Path(folder)
    cfg: LoRAConfig = model.lora_config
    tensors = {}
    for name, m in lora_modules(model).items():
        prefix = PEFT_PREFIX + hf_module_name(name)
        tensors[f"{prefix}.lora_A.weight"] = m.lora_A.weight.detach().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = m.lora_B.weight.detach().contiguous()
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
        "target_modules": cfg.targets, "lora_dropout": 0.0, "bias": "none",
    }
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        save_file(tensors, Path(tmp) / "adapter_model.safetensors", metadata={"format": "pt"})
        (Path(tmp) / "adapter_config.json").write_text(json.dumps(peft_config, indent=2))
        for f in ("adapter_model.safetensors", "adapter_config.json"):
            os.replace(Path(tmp) / f, folder / f)


def load_adapters(model: VLM, folder: str | Path) -> VLM:
    folder = Path(folder)
    try:
        peft = json.loads((folder / "adapter_config.json").read_text())
        tensors = load_file(folder / "adapter_model.safetensors")
    except (OSError, json.JSONDecodeError) as e:
        raise SmolVLMError(f"{folder} does not hold LoRA adapters ({e})") from None
    cfg = LoRAConfig(rank=peft["r"], alpha=peft["lora_alpha"], targets=list(peft["target_modules"]))
    add_lora(model, cfg)
    modules = lora_modules(model)
    for key, t in tensors.items():
        path = key.removeprefix(PEFT_PREFIX).removeprefix("model.")
        name, _, part = path.rpartition(".lora_")
        if name not in modules:
            raise SmolVLMError(f"adapter tensor {key} has no matching module in this model")
        getattr(modules[name], "lora_" + part.split(".")[0]).weight.data.copy_(t)
    return model
