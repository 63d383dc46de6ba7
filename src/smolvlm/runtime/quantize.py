"""Inference-time weight transforms: weight-only int8 / int4 quantization and fused projections.

A linear layer y = x W^T with W (N out, K in):

    int8  W ~= q * s                      q int8 (N, K), s (N,) per output channel
          -> torch.ops.aten._weight_int8pack_mm (x stays bfloat16; the kernel dequantizes on the fly)
    int4  W ~= (q - 8) * s + z            q in [0, 15] (N, K), s and z (N, K / g) per group of g inputs
          -> torch.ops.aten._weight_int4pack_mm_for_cpu (tinygemm's layout: q packed two per byte)

Decoding one token reads every weight once, so on a CPU its cost is the bytes read: int8 halves them,
int4 quarters them. Activations stay in the model's dtype (weight-only quantization).

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

QUANTIZE_MODES = ("int8", "int4")
# inputs per int4 scale/zero pair. 32 rather than 64: SmolLM2's released GGUF weights sit on a Q4_1 grid
# of 32-input groups, which int4 g32 reproduces (top-1 agreement with bf16 96% vs 70% for g64, measured:
# benchmarks/quant_quality.py) for ~10% more kernel time.
INT4_GROUP_SIZE = 32
DECODER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def check_mode(mode: str | None) -> str | None:
    if mode in (None, "", "none"):
        return None
    if mode not in QUANTIZE_MODES:
        raise SmolVLMError(f"unknown quantization {mode!r}; choose int8 or int4 (or none)")
    return mode


# ---------------------------------------------------------------------------------------------
# quantized linear layers


class Int8Linear(nn.Module):
    """Weight-only int8 linear, one scale per output channel (symmetric, no bias)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)  # (N, K) int8
        self.register_buffer("weight_scale", scale)  # (N,) in the activation dtype

    @classmethod
    def from_float(cls, w: torch.Tensor, dtype: torch.dtype) -> "Int8Linear":
        wf = w.detach().float()
        scale = (wf.abs().amax(dim=1) / 127).clamp(min=1e-12)  # (N,)
        q = torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q, scale.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.weight_scale.dtype)  # the kernel takes 2-D input only
        y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.weight_scale)
        return y.view(*shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int4Linear(nn.Module):
    """Weight-only int4 linear, asymmetric, one (scale, zero) per group of `group_size` inputs (no bias).

    The state dict holds a portable form (`weight` uint8 (N, K/2): two 4-bit values per byte, the even
    input in the low nibble; `weight_scale`, `weight_zero` (N, K/g)); the CPU kernel's packed layout is
    built from it at load time and never saved."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int):
        super().__init__()
        n, k = q.shape
        self.in_features, self.out_features, self.group_size = k, n, group_size
        # tinygemm's layout: int4 packed (N, K/2) + scales_and_zeros (K/g, N, 2) in the activation dtype
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2),
                             persistent=False)
        self.register_buffer("scales_and_zeros", torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous(),
                             persistent=False)

    @classmethod
    def from_float(cls, w: torch.Tensor, dtype: torch.dtype, group_size: int = INT4_GROUP_SIZE) -> "Int4Linear":
        n, k = w.shape
        wf = w.detach().float().reshape(n, k // group_size, group_size)
        lo, hi = wf.amin(dim=-1), wf.amax(dim=-1)  # (N, K/g)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        zero = lo + 8 * scale  # tinygemm dequantizes as (q - 8) * scale + zero
        # round scale and zero to the activation dtype first, so q is chosen for the values the kernel uses
        scale, zero = scale.to(dtype), zero.to(dtype)
        q = torch.round((wf - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15)
        return cls(q.reshape(n, k).to(torch.uint8), scale, zero, group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.scales_and_zeros.dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
        return y.view(*shape[:-1], self.out_features)

    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q uint8 (N, K), scale (N, K/g), zero (N, K/g)), recovered from the kernel's layout by
        dequantizing the identity (the packed layout itself is an implementation detail of the kernel)."""
        n, k, g = self.out_features, self.in_features, self.group_size
        sz = self.scales_and_zeros.float()  # (K/g, N, 2)
        scale, zero = sz[..., 0].t().contiguous(), sz[..., 1].t().contiguous()
        # W^T = kernel(I): exact, every product is one weight value times 1
        eye = torch.eye(k, dtype=torch.float32)
        w = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, g, self.scales_and_zeros.float()).t()
        q = torch.round((w.reshape(n, k // g, g) - zero[..., None]) / scale[..., None] + 8).clamp(0, 15)
        return q.reshape(n, k).to(torch.uint8), self.scales_and_zeros[..., 0].t(), self.scales_and_zeros[..., 1].t()

    def dequantize(self) -> torch.Tensor:
        q, scale, zero = self.unpacked()
        n, k, g = self.out_features, self.in_features, self.group_size
        w = (q.float().reshape(n, k // g, g) - 8) * scale.float()[..., None] + zero.float()[..., None]
        return w.reshape(n, k)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        q, scale, zero = self.unpacked()
        destination[prefix + "weight"] = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()  # (N, K/2) uint8
        destination[prefix + "weight_scale"] = scale.contiguous()
        destination[prefix + "weight_zero"] = zero.contiguous()

    @classmethod
    def from_saved(cls, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype):
        q = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)  # (N, K)
        return cls(q, scale.to(dtype), zero.to(dtype), q.shape[1] // scale.shape[1])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 g={self.group_size}"


def quantized_linear(linear: nn.Linear, mode: str, dtype: torch.dtype, group_size: int = INT4_GROUP_SIZE):
    if linear.bias is not None:
        raise SmolVLMError("weight-only quantization here covers bias-free linear layers only")
    if mode == "int8":
        return Int8Linear.from_float(linear.weight, dtype)
    if linear.in_features % group_size:
        return Int8Linear.from_float(linear.weight, dtype)  # cannot group it: int8 is the safe fallback
    return Int4Linear.from_float(linear.weight, dtype, group_size)


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
    if type(m) is nn.Linear:
        return m.weight
    if isinstance(m, Int8Linear):
        return m.weight
    if isinstance(m, Int4Linear):
        return m.packed
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
        if type(m0) is nn.Linear:
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
        else:
            self.sz = torch.cat([m.scales_and_zeros for m in mods], dim=1)  # (K/g, sum N, 2)
            self.group_size = m0.group_size
            if all(n % 64 == 0 for n in self.sizes):
                # tinygemm's CPU layout packs rows in blocks of 64: such blocks concatenate as they are
                self.packed = torch.cat([m.packed for m in mods])
                row = 0
                for m, n in zip(mods, self.sizes, strict=True):
                    m.packed, m.scales_and_zeros = self.packed[row : row + n], self.sz[:, row : row + n]
                    row += n
            else:  # other row counts: pack the concatenation anew (the parts keep their own copies)
                q = torch.cat([m.unpacked()[0] for m in mods]).to(torch.int32)
                self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
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
            return F.linear(x, self.weight, self.bias)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.kind == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x2.to(self.scale.dtype), self.weight, self.scale)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(self.sz.dtype), self.packed, self.group_size,
                                                            self.sz)
        return y.view(*shape[:-1], y.shape[-1])


def fuse(parent: nn.Module, names: tuple[str, ...]) -> Fused | None:
    """Fuse parent's `names` projections (idempotent); None when they cannot be fused."""
    current = parent.__dict__.get("_fused")
    if current is not None and current.names == names and current.intact(parent):
        return current
    try:
        fused = Fused(parent, names)
    except ValueError:
        return None
    parent.__dict__["_fused"] = fused  # plain attribute: invisible to state_dict / named_modules / .to()
    return fused


def prepare_for_inference(model, quantize: str | None = None, group_size: int = INT4_GROUP_SIZE):
    """Quantize (optional) then fuse q/k/v and gate/up in the decoder and q/k/v in the vision tower.
    In place; the state dict keeps its keys (quantized layers store their quantized tensors)."""
    if check_mode(quantize) is not None:
        quantize_model(model, quantize, group_size)
    for block in model.text_model.layers:
        fuse(block.self_attn, ("q_proj", "k_proj", "v_proj"))
        fuse(block.mlp, ("gate_proj", "up_proj"))
    if model.has_vision and hasattr(model.vision_model, "encoder"):  # a ViT (the CNN has no attention)
        for block in model.vision_model.encoder["layers"]:
            fuse(block.self_attn, ("q_proj", "k_proj", "v_proj"))
    return model


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

    return {
        "tokens": int(target.numel()),
        "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
        "logit_cosine": float(F.cosine_similarity(ref, got, dim=-1).mean()),
        "ppl_reference": ppl(ref),
        "ppl": ppl(got),
    }
