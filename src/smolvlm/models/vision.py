"""SigLIP-style vision transformer, as in SmolVLM (Idefics3's NaViT-flavoured SigLIP).

pixels (N, 3, H, W) -> patch conv -> + learned positions -> pre-LN blocks -> post-LN -> (N, P, D)

Module names follow Hugging Face's `SmolVLMVisionTransformer`, so the state dict maps 1:1 onto the
`model.vision_model.*` tensors of a SmolVLM checkpoint.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from smolvlm.runtime import kernels


@dataclass
class VisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    num_channels: int = 3
    image_size: int = 512  # the tile size the encoder was trained on
    patch_size: int = 16
    layer_norm_eps: float = 1e-6

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


def grid_position_ids(patch_mask: torch.Tensor, side: int) -> torch.Tensor:
    """NaViT-style positions: the real (unpadded) patch grid of each image is stretched over the
    encoder's full side x side position grid by bucketing fractional coordinates.
    patch_mask (N, h, w) bool -> ids (N, h*w), 0 on padding patches."""
    n, h, w = patch_mask.shape
    boundaries = torch.arange(1 / side, 1.0, 1 / side, device=patch_mask.device)
    rows = patch_mask[:, :, 0].sum(dim=1)  # (N,) real patch rows
    cols = patch_mask[:, 0, :].sum(dim=1)  # (N,) real patch cols
    frac_h = torch.arange(h, device=patch_mask.device, dtype=torch.float32)[None, :] * (1.0 / rows)[:, None]
    frac_w = torch.arange(w, device=patch_mask.device, dtype=torch.float32)[None, :] * (1.0 / cols)[:, None]
    bucket_h = torch.bucketize(frac_h.clamp(max=1.0 - 1e-6), boundaries, right=True)  # (N, h)
    bucket_w = torch.bucketize(frac_w.clamp(max=1.0 - 1e-6), boundaries, right=True)  # (N, w)
    ids = (bucket_h[:, :, None] * side + bucket_w[:, None, :]).reshape(n, -1)  # (N, h*w)
    return torch.where(patch_mask.reshape(n, -1), ids, 0)


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.patches_per_side**2, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values)  # (N, D, h, w)
        # contiguous: a transposed x would make every later residual add keep that layout, and every
        # LayerNorm copy it back (measured: ~30 ms of a 0.64 s tile)
        x = x.flatten(2).transpose(1, 2).contiguous()  # (N, h*w, D)
        return x + self.position_embedding(grid_position_ids(patch_mask, self.cfg.patches_per_side))


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        n, p, d = x.shape
        fused = self.__dict__.get("_fused")  # quantize.fuse: one matmul for q, k, v at inference
        if fused is not None and fused.usable(self):
            qkv = inference_linear(x, fused).view(n, p, 3, self.num_heads, self.head_dim)
            # bf16: q, k, v straight from the fused output into csrc/attention.cpp (one pass, no copies)
            key_mask = None if attn_mask is None else attn_mask.view(n, p)
            y = kernels.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], key_mask)  # (N, P, H, hd) or None
            if y is not None:
                return inference_linear(y.view(n, p, d), self.out_proj)
            # one copy into head-major order: the attention's matmuls would otherwise copy each strided slice
            qkv = qkv.permute(2, 0, 3, 1, 4).contiguous()
            q, k, v = qkv[0], qkv[1], qkv[2]  # (N, H, P, hd) each
        else:
            q = self.q_proj(x).view(n, p, self.num_heads, self.head_dim).transpose(1, 2)  # (N, H, P, hd)
            k = self.k_proj(x).view(n, p, self.num_heads, self.head_dim).transpose(1, 2)
            v = self.v_proj(x).view(n, p, self.num_heads, self.head_dim).transpose(1, 2)
        if x.dtype == torch.bfloat16 and not torch.is_grad_enabled():
            y = matmul_attention(q, k, v, attn_mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # bidirectional
        return inference_linear(y.transpose(1, 2).reshape(n, p, d), self.out_proj)


# Heads per matmul-softmax-matmul in bf16 inference: two heads' scores (2 x 1024 x 1024 bf16, 4 MB) stay in
# cache between the three steps; all twelve at once (25 MB) do not (measured, 2 threads, one 1024-patch
# layer: 12.8 ms in chunks of 2 heads, 27.5 ms all at once, 20.9 ms for the CPU SDPA kernel).
HEADS_PER_CHUNK = 2


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None):
    """softmax(q k^T / sqrt(hd)) v as bf16 matmuls, a few heads at a time (see HEADS_PER_CHUNK). q, k, v
    (N, H, P, hd); attn_mask (N, 1, 1, P) bool, True on keys that may be attended. Returns (N, H, P, hd)."""
    q = q * q.shape[-1] ** -0.5
    out = []
    for h in range(0, q.shape[1], HEADS_PER_CHUNK):
        hs = slice(h, h + HEADS_PER_CHUNK)
        scores = torch.matmul(q[:, hs], k[:, hs].transpose(-1, -2))  # (N, c, P, P)
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        out.append(torch.matmul(kernels.softmax_(scores), v[:, hs]))  # csrc/softmax.cpp
    return torch.cat(out, dim=1)


# bf16 inference: the tower's linears through oneDNN with each weight kept in oneDNN's blocked layout (packed
# once, then reused), the bias and fc1's GELU applied in the matmul's epilogue. Measured, 2 threads, one
# tile, alternating in one process: 0.540 vs 0.567 s best, 0.559 vs 0.606 s median against F.linear (with only
# fc1 + GELU through oneDNN, unpacked); unpacked, ~2% of that remains. The packed copies cost ~170 MB (SmolVLM).
ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise") \
    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
PACK_ROWS = 1024  # the row count oneDNN packs for: one 512-px tile of 16-px patches (any count works)


def packed_weight(owner, weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's blocked copy of `weight`, kept in owner.__dict__ (outside the state dict) and made again when
    the weight is replaced or updated in place (an optimizer step bumps its version)."""
    key = (weight.data_ptr(), 0 if weight.is_inference() else weight._version)
    cached = owner.__dict__.get("_packed_weight")
    if cached is None or cached[0] != key:
        cached = (key, torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS))
        owner.__dict__["_packed_weight"] = cached
    return cached[1]


def inference_linear(x: torch.Tensor, layer, gelu: bool = False) -> torch.Tensor:
    """layer(x), then tanh-GELU if asked. `layer` is an nn.Linear or a quantize.Fused of nn.Linears."""
    weight = getattr(layer, "weight", None)
    plain = type(layer) is nn.Linear or getattr(layer, "kind", None) == "float"
    if ONEDNN_LINEAR and plain and x.dtype == weight.dtype == torch.bfloat16 and not torch.is_grad_enabled():
        return torch.ops.mkldnn._linear_pointwise(x, packed_weight(layer, weight), layer.bias,
                                                  "gelu" if gelu else "none", [], "tanh" if gelu else "")
    y = layer(x)
    return F.gelu(y, approximate="tanh") if gelu else y


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return inference_linear(inference_linear(x, self.fc1, gelu=True), self.fc2)


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), attn_mask)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        # a ModuleDict only so that parameter names read `encoder.layers.{i}` as in SmolVLM checkpoints
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))})
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values (N, 3, H, W); patch_mask (N, H/ps, W/ps) bool, True on real (unpadded) patches.
        Returns (N, P, D) with P = (H/ps) * (W/ps)."""
        n, _, h, w = pixel_values.shape
        ps = self.cfg.patch_size
        if patch_mask is None:
            patch_mask = torch.ones(n, h // ps, w // ps, dtype=torch.bool, device=pixel_values.device)
        x = self.embeddings(pixel_values, patch_mask)
        # keys on padding patches are masked out; an all-real batch needs no mask at all
        attn_mask = None if bool(patch_mask.all()) else patch_mask.reshape(n, 1, 1, -1)
        for block in self.encoder["layers"]:
            x = block(x, attn_mask)
        return self.post_layernorm(x)
