"""Inference-time weight transforms: weight-only int8 / int4 quantization and fused projections.

A linear layer y = x W^T with W (N out, K in):

    int8  W ~= q * s                      q int8 (N, K), s (N,) per output channel
    int4  W ~= (q - 8) * s + z            q in [0, 15] (N, K) stored two per byte (N, K/2) uint8, the even input
                                          in the low nibble; s and z (N, K / g) per group of g inputs

Both layouts are what the state dict saves and what the C++ kernels read (csrc/gemv.cpp: kinds 1 and 2), so
loading and saving never repack. A few rows (decoding) go through that kernel, which converts the weights on
the fly; more rows (a prompt) through ATen's int8 kernel, or for int4 ATen's int4 kernel on a copy in its own
layout (bf16 with native bf16 only, derived on first use) or else the weight dequantized to the activation dtype
and F.linear. Decoding one token reads every weight once,
so on a CPU its cost is the bytes read: int8 halves them, int4 (with its scales) makes them ~5/16.
Activations stay in the model's dtype; with float32 activations (CPUs without native bf16) the few-row products
hold x as two int8s per input (~16 bits per block of 32) and use integer dot products (csrc/gemv_q8.cpp, kinds 4
and 5), because converting each weight to float costs more there than reading it.

Fusion: q/k/v (and gate/up) read the same input, so one matmul over their concatenated rows replaces
three (two) calls. The fused weight owns the storage and each projection's weight becomes a view of its
rows, so the state dict, `checkpoint.save` and name-based wrapping (LoRA on `q_proj`, ...) still see the
original modules. The fused matmul is used only while every projection still points into that storage
(not after LoRA wrapping, a dtype change or a reassignment) and never under autograd (see `Fused.usable`).
"""

import torch
import torch.nn.functional as F
from torch import nn

from smolvlm.errors import SmolVLMError
from smolvlm.runtime import cpu, kernels

QUANTIZE_MODES = ("int8", "int4")
# inputs per int4 scale/zero pair. 32 rather than 64: SmolLM2's released GGUF weights sit on a Q4_1 grid
# of 32-input groups, which int4 g32 reproduces (top-1 agreement with bf16 96% vs 70% for g64, measured:
# benchmarks/quant_quality.py) for ~10% more kernel time.
INT4_GROUP_SIZE = 32
# up to this many rows a quantized layer runs the C++ streaming kernel (csrc/gemv.cpp's kMaxB)
GEMV_ROWS = 16
ACT_DTYPES = (torch.bfloat16, torch.float32)  # the kernels' activation dtypes (and a dense weight's)
DECODER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def check_mode(mode: str | None) -> str | None:
    if mode in (None, "", "none"):
        return None
    if mode not in QUANTIZE_MODES:
        raise SmolVLMError(f"unknown quantization {mode!r}; choose int8 or int4 (or none)")
    return mode


# ---------------------------------------------------------------------------------------------
# quantized linear layers


def _kernel(rows: int):
    """The C++ kernels when a matmul of `rows` rows should use their streaming GEMV, else None."""
    return kernels.extension() if rows <= GEMV_ROWS else None


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ weight^T (+ bias), the weight in x's dtype or in bf16 under float32 x (prepare.store_bf16:
    converted on the fly, float32 math). A decoding step's few rows go through the C++ streaming kernel."""
    rows = x.numel() // x.shape[-1]
    if bias is None and not torch.is_grad_enabled() and x.dtype in ACT_DTYPES and weight.dtype in ACT_DTYPES:
        ext = _kernel(rows)
        if ext is not None:
            y = ext.project(x.reshape(rows, x.shape[-1]), 0, weight, torch.empty(0), 0)
            return y.view(*x.shape[:-1], weight.shape[0])
    if weight.dtype != x.dtype:
        weight, bias = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
    return F.linear(x, weight, bias)


class Int8Linear(nn.Module):
    """Weight-only int8 linear, one scale per output channel (symmetric, no bias)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)  # (N, K) int8
        self.register_buffer("weight_scale", scale)  # (N,) in the activation dtype
        self.fallback: str | None = None  # why an int4 model holds this layer in int8 (quantization_summary)

    @classmethod
    def from_float(cls, w: torch.Tensor, dtype: torch.dtype) -> "Int8Linear":
        wf = w.detach().float()
        scale = (wf.abs().amax(dim=1) / 127).clamp(min=1e-12)  # (N,)
        q = torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q, scale.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.weight_scale)

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def kernel_kind(storage: str, act_dtype: torch.dtype) -> int:
    """The C++ projection kind for "int8" / "int4" storage (csrc/gemv.cpp): with float32 activations x is held as
    two int8s per input (~16 bits per block of 32) for integer dot products (kinds 5 / 4), else the weights are
    converted to x's dtype (1 / 2)."""
    q8 = act_dtype == torch.float32
    return (5 if q8 else 1) if storage == "int8" else (4 if q8 else 2)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ (weight * scale)^T in scale's dtype (the activation dtype)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(scale.dtype)  # the kernels take 2-D input only
    ext = _kernel(x2.shape[0])
    if ext is not None:
        y = ext.project(x2, kernel_kind("int8", scale.dtype), weight, scale, 0)
    else:
        y = torch.ops.aten._weight_int8pack_mm(x2, weight, scale)
    return y.view(*shape[:-1], weight.shape[0])


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) values in [0, 15] -> (N, K/2) uint8, input 2j in the low nibble of byte j, 2j+1 in the high one."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> q (N, K) uint8 in [0, 15] (pack_int4's inverse)."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def _scales_for_kernel(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The kernel's (N, K/g, 2) (scale, zero) pairs: bf16 when that holds them exactly (5 bits read per weight
    instead of 6), else float32."""
    sz = torch.stack([scale, zero], dim=-1).float()
    as_bf16 = sz.to(torch.bfloat16)
    return as_bf16.contiguous() if torch.equal(as_bf16.float(), sz) else sz.contiguous()


def dequantize_int4(packed: torch.Tensor, sz: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """(N, K/2) packed nibbles and (N, K/g, 2) (scale, zero) -> W (N, K) in `dtype`."""
    n = packed.shape[0]
    q = unpack_int4(packed).view(n, -1, group_size).float()
    sz = sz.float()
    return ((q - 8) * sz[..., :1] + sz[..., 1:]).view(n, -1).to(dtype)


def aten_int4_applies(act_dtype: torch.dtype, sz: torch.Tensor) -> bool:
    """ATen's int4 kernel for these activations: bf16 ones on a CPU with native bf16, and scales it holds exactly."""
    return act_dtype == torch.bfloat16 and sz.dtype == torch.bfloat16 and cpu.native_bf16()


def aten_int4(packed: torch.Tensor, sz: torch.Tensor, derived: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The int4 weights in ATen's layout (packed (N, K/2) uint8, scales and zeros (K/g, N, 2) bf16), the same values
    as pack_int4's nibbles and (scale, zero): made once and kept in `derived` (the owner's attribute) while the stored
    tensors stay where they are."""
    key = (packed.data_ptr(), sz.data_ptr(), sz.dtype)
    if derived.get("key") != key:
        derived["key"] = key
        derived["packed"] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(packed).to(torch.int32), 2)
        derived["sz"] = sz.transpose(0, 1).to(torch.bfloat16).contiguous()
    return derived["packed"], derived["sz"]


def int4_linear(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group_size: int, dtype: torch.dtype,
                derived: dict | None = None) -> torch.Tensor:
    """x (..., K) @ W^T in `dtype` (the activation dtype) for W stored as pack_int4 nibbles and (scale, zero).
    `derived`: the owner's cache of ATen's packed copy (below), made on first use and remade if W moves."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(dtype)
    if derived is not None and aten_int4_applies(dtype, sz):
        # bf16 with native bf16: ATen's int4 kernel streams the weights faster than ours at a few rows and beats
        # dequantizing at many, but wants its own layout, derived once from the stored one
        aten_packed, aten_sz = aten_int4(packed, sz, derived)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, aten_packed, group_size, aten_sz)
    elif (ext := _kernel(x2.shape[0])) is not None:
        y = ext.project(x2, kernel_kind("int4", dtype), packed, sz, group_size)
    else:  # elsewhere (float32: ATen's int4 kernel is far slower there) one dequantized copy per call
        y = F.linear(x2, dequantize_int4(packed, sz, group_size, dtype))
    return y.view(*shape[:-1], packed.shape[0])


class Int4Linear(nn.Module):
    """Weight-only int4 linear, asymmetric, one (scale, zero) per group of `group_size` inputs (no bias).

    The state dict holds the layout the kernels read (`weight` uint8 (N, K/2): two 4-bit values per byte, the
    even input in the low nibble; `weight_scale`, `weight_zero` (N, K/g) in the activation dtype); the only
    derived tensor is `sz`, the (N, K/g, 2) pairs the kernel reads, made at construction and never saved."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int):
        super().__init__()
        n, k = packed.shape[0], packed.shape[1] * 2
        if packed.dtype != torch.uint8 or scale.shape != (n, k // group_size) or zero.shape != scale.shape:
            raise SmolVLMError(f"int4 layer: weight {tuple(packed.shape)} {packed.dtype}, scale "
                               f"{tuple(scale.shape)} and zero {tuple(zero.shape)} do not fit groups of {group_size}")
        self.in_features, self.out_features, self.group_size = k, n, group_size
        self.register_buffer("weight", packed.contiguous())  # (N, K/2) uint8
        self.register_buffer("weight_scale", scale)  # (N, K/g) in the activation dtype
        self.register_buffer("weight_zero", zero)
        self.register_buffer("sz", _scales_for_kernel(scale, zero), persistent=False)
        self.derived: dict = {}  # ATen's layout of the same weights (aten_int4), made on first use with bf16

    @classmethod
    def from_float(cls, w: torch.Tensor, dtype: torch.dtype, group_size: int = INT4_GROUP_SIZE) -> "Int4Linear":
        n, k = w.shape
        wf = w.detach().float().reshape(n, k // group_size, group_size)
        lo, hi = wf.amin(dim=-1), wf.amax(dim=-1)  # (N, K/g)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        zero = lo + 8 * scale  # dequantized as (q - 8) * scale + zero
        # scale and zero rounded to bf16 whatever the activation dtype (the kernel then reads them as bf16: fewer
        # bytes per weight), and q chosen for the rounded values
        scale, zero = scale.to(torch.bfloat16).to(dtype), zero.to(torch.bfloat16).to(dtype)
        q = torch.round((wf - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15)
        return cls(pack_int4(q.reshape(n, k)), scale, zero, group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int4_linear(x, self.weight, self.sz, self.group_size, self.weight_scale.dtype, self.derived)

    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q uint8 (N, K) in [0, 15], scale (N, K/g), zero (N, K/g))."""
        return unpack_int4(self.weight), self.weight_scale, self.weight_zero

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4(self.weight, torch.stack([self.weight_scale, self.weight_zero], -1), self.group_size,
                               torch.float32)

    @classmethod
    def from_saved(cls, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype):
        if scale.dim() != 2 or scale.shape[1] == 0 or (packed.shape[1] * 2) % scale.shape[1]:
            raise SmolVLMError(f"int4 layer: scale {tuple(scale.shape)} does not fit weight {tuple(packed.shape)}")
        return cls(packed, scale.to(dtype), zero.to(dtype), packed.shape[1] * 2 // scale.shape[1])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 g={self.group_size}"


def quantized_linear(linear: nn.Linear, mode: str, dtype: torch.dtype, group_size: int = INT4_GROUP_SIZE):
    if linear.bias is not None:
        raise SmolVLMError("weight-only quantization here covers bias-free linear layers only")
    if mode == "int8":
        return Int8Linear.from_float(linear.weight, dtype)
    if linear.in_features % group_size:
        # cannot group it: int8 is the safe fallback, recorded so quantization_summary can say so
        layer = Int8Linear.from_float(linear.weight, dtype)
        layer.fallback = f"in_features {linear.in_features} is not a multiple of the int4 group size {group_size}"
        return layer
    return Int4Linear.from_float(linear.weight, dtype, group_size)


def quantization_summary(model) -> dict:
    """What the model's quantized layers actually are: {"mode", "group_size", "int4": count, "int8": count,
    "int8_layers": [names of the int8 layers of an int4 model], "fallbacks": {name: why int8, not int4}}.
    The int4 mode keeps the output head int8 on purpose (it is listed among int8_layers, without a fallback)."""
    q = getattr(model, "quantization", None) or {}
    counts, int8_layers, fallbacks = {"int4": 0, "int8": 0}, [], {}
    for name, m in model.named_modules():
        if isinstance(m, Int4Linear):
            counts["int4"] += 1
        elif isinstance(m, Int8Linear):
            counts["int8"] += 1
            if q.get("mode") == "int4":
                int8_layers.append(name)
            if getattr(m, "fallback", None):
                fallbacks[name] = m.fallback
    return {"mode": q.get("mode"), "group_size": q.get("group_size"), **counts, "int8_layers": int8_layers,
            "fallbacks": fallbacks}


def quantize_model(model, mode: str, group_size: int = INT4_GROUP_SIZE, lm_head: bool = True):
    """Replace the decoder's projections (int8 or int4) and the output head (int8) with weight-only
    quantized layers, in place.
    The float weights are dropped layer by layer, so peak memory stays at the float model's."""
    mode = check_mode(mode)
    if mode is None:
        return model
    if model.dtype == torch.float16:
        raise SmolVLMError("quantization needs a bfloat16 or float32 model (the CPU kernels' activation dtypes)")
    dtype = model.dtype
    for block in model.text_model.layers:
        for parent in (block.self_attn, block.mlp):
            for name in DECODER_PROJECTIONS:
                lin = getattr(parent, name, None)
                if isinstance(lin, nn.Linear):
                    setattr(parent, name, quantized_linear(lin, mode, dtype, group_size))
                elif lin is not None and not isinstance(lin, (Int8Linear, Int4Linear)):
                    raise SmolVLMError(f"cannot quantize {type(lin).__name__} (merge LoRA adapters first)")
    if lm_head:
        # with tied embeddings the head gets its own copy; the embedding table stays for lookups. The head
        # is int8 in both modes: in int4 it alone drops top-1 agreement to 84% (measured, SmolLM2-135M).
        model.lm_head = Int8Linear.from_float(model.lm_head.weight, dtype)
    model.quantization = {"mode": mode, "group_size": group_size, "lm_head": lm_head}
    return model


# ---------------------------------------------------------------------------------------------
# fused projections


def _primary(m) -> torch.Tensor | None:
    """The tensor whose storage identifies a fusable layer, or None for anything else (e.g. LoRA)."""
    if isinstance(m, nn.Linear):  # nn.Linear or runtime.modules.FastLinear (a LoRA wrapper is neither)
        return m.weight
    if isinstance(m, Int8Linear):
        return m.weight
    if isinstance(m, Int4Linear):
        return m.weight
    return None


class Fused:
    """One layer computing several same-input projections at once (see the module docstring).
    Kept outside the module tree (not an nn.Module attribute), so state dicts are unchanged."""

    def __init__(self, parent: nn.Module, names: tuple[str, ...]):
        mods = [getattr(parent, n) for n in names]
        kinds = {type(m) for m in mods}
        if len(kinds) != 1 or _primary(mods[0]) is None:
            raise ValueError(f"cannot fuse {[type(m).__name__ for m in mods]}")
        self.names = names
        self.sizes = [m.out_features for m in mods]
        m0 = mods[0]
        if isinstance(m0, nn.Linear):
            self.weight = torch.cat([m.weight.detach() for m in mods])  # (sum N, K)
            has_bias = m0.bias is not None
            self.bias = torch.cat([m.bias.detach() for m in mods]) if has_bias else None
            row = 0
            for m, n in zip(mods, self.sizes, strict=True):
                m.weight = nn.Parameter(self.weight[row : row + n], requires_grad=m.weight.requires_grad)
                if has_bias:
                    m.bias = nn.Parameter(self.bias[row : row + n], requires_grad=m.bias.requires_grad)
                row += n
            self.kind = "float"
        elif isinstance(m0, Int8Linear):
            self.weight = torch.cat([m.weight for m in mods])
            self.scale = torch.cat([m.weight_scale for m in mods])
            row = 0
            for m, n in zip(mods, self.sizes, strict=True):
                m.weight, m.weight_scale = self.weight[row : row + n], self.scale[row : row + n]
                row += n
            self.kind = "int8"
        else:  # int4: rows concatenate as they are in the portable layout
            self.weight = torch.cat([m.weight for m in mods])  # (sum N, K/2)
            # (sum N, K/g, 2); float32 if any part needs it (bf16 only where every part is exact in it)
            sz_dtype = torch.float32 if any(m.sz.dtype == torch.float32 for m in mods) else torch.bfloat16
            self.sz = torch.cat([m.sz.to(sz_dtype) for m in mods])
            self.dtype = m0.weight_scale.dtype
            self.derived: dict = {}  # ATen's layout of the same weights (aten_int4), made on first use with bf16
            self.group_size = m0.group_size
            row = 0
            for m, n in zip(mods, self.sizes, strict=True):
                m.weight, m.sz = self.weight[row : row + n], self.sz[row : row + n]
                row += n
            self.kind = "int4"
        self.ptrs = [_primary(m).data_ptr() for m in mods]

    def intact(self, parent: nn.Module) -> bool:
        """Every projection still a view of the fused storage (no LoRA wrap, dtype change, reassignment)."""
        for name, ptr in zip(self.names, self.ptrs, strict=True):
            t = _primary(getattr(parent, name))
            if t is None or t.data_ptr() != ptr:
                return False
        return True

    def usable(self, parent: nn.Module) -> bool:
        # under autograd the gradients must reach the projections' own parameters: use them
        return not torch.is_grad_enabled() and self.intact(parent)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "float":
            return dense_linear(x, self.weight, self.bias)
        if self.kind == "int8":
            return int8_linear(x, self.weight, self.scale)
        return int4_linear(x, self.weight, self.sz, self.group_size, self.dtype, self.derived)


def adopt_quantized(model, state: dict[str, torch.Tensor], quantization: dict, source: str) -> set[str]:
    """For a quantized checkpoint: replace each layer saved quantized (it has a `weight_scale`) with an
    Int8Linear / Int4Linear made from its tensors, which are taken out of `state`. Returns the float
    model's state-dict keys those layers stand for."""
    if quantization.get("mode") not in QUANTIZE_MODES:
        raise SmolVLMError(f"{source}: unknown quantization {quantization.get('mode')!r} in config.json")
    replaced = set()
    for key in [k for k in state if k.endswith(".weight_scale")]:
        prefix = key.removesuffix(".weight_scale")
        if prefix + ".weight" not in state:
            raise SmolVLMError(f"{source}: quantized layer {prefix} has a scale but no weight")
        w, scale, zero = state.pop(prefix + ".weight"), state.pop(key), state.pop(prefix + ".weight_zero", None)
        # fresh (aligned) memory: tensors read from a safetensors file can start at any byte offset, and
        # the int8 kernel's vector loads crash on a misaligned weight (seen with torch 2.13)
        w, scale = w.clone(), scale.clone()
        layer = Int8Linear(w, scale) if zero is None else Int4Linear.from_saved(w, scale, zero, scale.dtype)
        if zero is None and quantization.get("mode") == "int4" and prefix != "lm_head":
            layer.fallback = "saved as int8 in an int4 checkpoint"
        parent, _, child = prefix.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
        replaced.add(prefix + ".weight")
    model.quantization = dict(quantization)
    return replaced


@torch.inference_mode()
def compare_logits(reference, model, input_ids: torch.Tensor) -> dict:
    """Teacher-forced comparison of `model` against `reference` on a token sequence (1, T): top-1
    agreement and mean cosine of the next-token logits, and each model's perplexity on the sequence."""
    ref = reference(input_ids).float()[0, :-1]  # (T-1, V) predictions of tokens 1..T-1
    got = model(input_ids).float()[0, :-1]
    target = input_ids[0, 1:]

    def ppl(logits):
        return float(torch.exp(F.cross_entropy(logits, target)))

    return {"tokens": int(target.numel()), **logit_agreement(ref, got), "ppl_reference": ppl(ref), "ppl": ppl(got)}


def logit_agreement(ref: torch.Tensor, got: torch.Tensor) -> dict:
    """Next-token logits (N, V) of two models on the same positions: top-1 agreement and mean cosine."""
    return {"top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
            "logit_cosine": float(F.cosine_similarity(ref, got, dim=-1).mean())}
