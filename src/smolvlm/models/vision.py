"""SigLIP-style vision transformer, as in SmolVLM (Idefics3's NaViT-flavoured SigLIP).

pixels (N, 3, H, W) -> patch conv -> + learned positions -> pre-LN blocks -> post-LN -> (N, P, D)

Module names follow Hugging Face's `SmolVLMVisionTransformer`, so the state dict maps 1:1 onto the
`model.vision_model.*` tensors of a SmolVLM checkpoint.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


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


# https://github.com/huggingface/transformers/blob/main/src/transformers/models/smolvlm/modeling_smolvlm.py
# (SmolVLMVisionEmbeddings)
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


# https://github.com/huggingface/transformers/blob/main/src/transformers/models/smolvlm/modeling_smolvlm.py
# (SmolVLMVisionAttention)
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
        """x (N, P, D); attn_mask (N, 1, 1, P) bool, True on keys that may be attended, or None."""
        n, p, d = x.shape
        q = self.q_proj(x).view(n, p, self.num_heads, self.head_dim).transpose(1, 2)  # (N, H, P, hd)
        k = self.k_proj(x).view(n, p, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(n, p, self.num_heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # bidirectional, (N, H, P, hd)
        return self.out_proj(y.transpose(1, 2).reshape(n, p, d))


# https://github.com/huggingface/transformers/blob/main/src/transformers/models/smolvlm/modeling_smolvlm.py
# (SmolVLMVisionMLP)
class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


# https://github.com/huggingface/transformers/blob/main/src/transformers/models/smolvlm/modeling_smolvlm.py
# (SmolVLMEncoderLayer)
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


# https://github.com/huggingface/transformers/blob/main/src/transformers/models/smolvlm/modeling_smolvlm.py
# (SmolVLMVisionTransformer)
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
