"""runtime.prepare(model): the one call that turns a plain model (models/) into the fast one for this CPU.

    model, processor = checkpoint.load(path, dtype="auto")   # plain PyTorch, the reference
    prepare(model, quantize="int8")                           # in place; returns the model

What it does, in order: weight-only int8 / int4 quantization of the decoder's projections (optional); a float32
model whose decoder weights are exact in bf16 keeps them in bf16 (half the bytes per decoding step, the same
float32 math); then the Fast* module classes of runtime/modules.py in place of the plain ones (fused projections,
one-pass attention, pre-packed oneDNN weights where bf16 is native, the decoding step in one C++ call). The state
dict keeps its keys and values (bf16-stored weights: the same values), so a prepared model saves like a plain
one. Inference only: training never calls it (the fast paths step aside under autograd anyway).
"""

from __future__ import annotations

import torch

from smolvlm.models.decoder import MLP, Attention, Decoder, RMSNorm
from smolvlm.models.vision import VisionAttention, VisionMLP
from smolvlm.runtime import modules
from smolvlm.runtime.quantize import DECODER_PROJECTIONS, INT4_GROUP_SIZE, check_mode, quantize_model


def prepare(model, quantize: str | None = None, group_size: int = INT4_GROUP_SIZE):
    """Quantize (None, "int8" or "int4"), then swap in the Fast* modules. Idempotent: a prepared model is
    prepared again (fusions remade) without harm, e.g. after its weights were replaced."""
    if check_mode(quantize) is not None:
        saved = getattr(model, "quantization", None)
        if saved is None:
            quantize_model(model, quantize, group_size)
        elif saved["mode"] != quantize:
            from smolvlm.errors import SmolVLMError

            raise SmolVLMError(f"the model is already quantized ({saved['mode']}); cannot requantize to {quantize}")
    text = model.text_model
    for linear in _decoder_linears(model):
        _adopt(modules.FastLinear, torch.nn.Linear, linear)
    store_bf16(model)
    for block in text.layers:
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            _adopt(modules.FastRMSNorm, RMSNorm, norm)
        _adopt(modules.FastAttention, Attention, block.self_attn)
        _adopt(modules.FastMLP, MLP, block.mlp)
    _adopt(modules.FastRMSNorm, RMSNorm, text.norm)
    _adopt(modules.FastDecoder, Decoder, text)
    if model.has_vision and hasattr(model.vision_model, "encoder"):  # a ViT (the CNN has no attention)
        for block in model.vision_model.encoder["layers"]:
            _adopt(modules.FastVisionAttention, VisionAttention, block.self_attn)
            _adopt(modules.FastVisionMLP, VisionMLP, block.mlp)
    return model


def _decoder_linears(model) -> list:
    """The decoder's projections and the output head (the weights a decoding step streams)."""
    found = [getattr(part, name) for block in model.text_model.layers for part in (block.self_attn, block.mlp)
             for name in DECODER_PROJECTIONS if hasattr(part, name)]
    return found + [model.lm_head]


def store_bf16(model) -> bool:
    """A float32 model whose decoder weights are all exact in bf16 (a bf16 checkpoint loaded as float32, as `--dtype
    auto` does on a CPU without native bf16) keeps them in bf16: a decoding step streams half the bytes, and every
    product is still float32 math on the same values (FastLinear converts on the fly). The head stays float32 when
    tied to the embeddings. Returns whether it did so; a model with any inexact weight is left as it is."""
    if model.dtype != torch.float32:
        return False
    tied = model.lm_head.weight is model.text_model.embed_tokens.weight
    linears = [m for m in _decoder_linears(model) if not (tied and m is model.lm_head)]
    if not linears or any(type(m) is not modules.FastLinear or m.bias is not None for m in linears):
        return False  # quantized, LoRA-wrapped or biased layers: not this model
    converted = []
    with torch.no_grad():
        for m in linears:
            if m.weight.dtype != torch.float32:
                return False
            wb = m.weight.detach().to(torch.bfloat16)
            if not torch.equal(wb.float(), m.weight):
                return False
            converted.append(wb)
        for m, wb in zip(linears, converted, strict=True):
            m.weight = torch.nn.Parameter(wb, requires_grad=m.weight.requires_grad)
    return True


def _adopt(fast: type, plain: type, module) -> None:
    """Swap `module`'s class for `fast` (or redo its fusions when it already is one); leave modules of any
    other class (a LoRA wrapper, a variant) as they are."""
    if type(module) is plain or type(module) is fast:
        fast.adopt(module)
