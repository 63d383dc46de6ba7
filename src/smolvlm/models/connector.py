"""Connectors: the vision encoder's patch tokens (N, P, Dv) on an h x w grid -> decoder-width tokens.

    pixel-shuffle  SmolVLM's: space-to-depth by s, then a bias-free linear   (N, P/s^2, Dt)
    mlp            LLaVA-1.5's: Linear -> GELU -> Linear on every patch       (N, P, Dt)
    ldp            MobileVLM's lightweight downsample projector: the MLP, then depthwise-separable
                   conv blocks on the grid (stride 1 with a residual, then stride 2)   (N, ceil(h/2)*ceil(w/2), Dt)

Pixel shuffle trades sequence length for width: with s=4 a 32x32 patch grid becomes 64 tokens. The
cross-attention model (models/cross_attention.py) projects with pixel shuffle too; its tokens go to the
decoder's cross-attention layers instead of into the sequence.
"""

import torch
import torch.nn.functional as F
from torch import nn

from smolvlm.errors import SmolVLMError
from smolvlm.models.cnn import sincos_grid

CONNECTORS = ("pixel-shuffle", "mlp", "ldp", "cross-attention")
POSITION_SCALE = 0.5  # image_positions' starting RMS (a trained shapes model's tokens vary by ~0.66 per channel)


def pixel_shuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """(N, P, D) -> (N, P / scale^2, D * scale^2) on a square patch grid, in SmolVLM's element order."""
    n, p, d = x.shape
    side = int(p**0.5)
    if side * side != p or side % scale:
        raise SmolVLMError(f"the pixel-shuffle connector needs a square patch grid with sides divisible by "
                           f"scale_factor {scale}, got {p} patches; change the image size or scale_factor")
    x = x.view(n, side, side // scale, d * scale)  # merge `scale` neighbouring columns
    x = x.permute(0, 2, 1, 3)  # (N, side/s, side, D*s)
    x = x.reshape(n, side // scale, side // scale, d * scale * scale)  # merge `scale` neighbouring rows
    x = x.permute(0, 2, 1, 3)  # back to row-major
    return x.reshape(n, p // (scale * scale), d * scale * scale)


class PixelShuffleConnector(nn.Module):
    def __init__(self, vision_hidden: int, text_hidden: int, scale_factor: int, position_side: int = 0):
        super().__init__()
        self.scale_factor = scale_factor
        # a ModuleDict only so that the weight is named `modality_projection.proj.weight` as in SmolVLM
        self.modality_projection = nn.ModuleDict(
            {"proj": nn.Linear(vision_hidden * scale_factor**2, text_hidden, bias=False)}
        )
        if position_side:
            # smolvlm's option (VLMConfig.image_positions): where each token sits on the tile, added after the
            # projection so that no training of the vision side can wash it out; starts at 2D sin-cos codes
            # as loud as the tokens' own variation (docs/training.md)
            self.position_embedding = nn.Parameter(sincos_grid(position_side, text_hidden) * POSITION_SCALE)

    def forward(self, image_hidden: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.modality_projection["proj"](pixel_shuffle(image_hidden, self.scale_factor))  # (N, L, Dt)
        if hasattr(self, "position_embedding"):
            if x.shape[1] != self.position_embedding.shape[0]:
                raise SmolVLMError(f"this model's image positions cover {self.position_embedding.shape[0]} tokens "
                                   f"per tile, the image gives {x.shape[1]}; use the tile size it was trained on")
            x = x + self.position_embedding.to(x.dtype)
        return x


class MLPConnector(nn.Module):
    def __init__(self, vision_hidden: int, text_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(vision_hidden, text_hidden)
        self.fc2 = nn.Linear(text_hidden, text_hidden)

    def forward(self, image_hidden: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(image_hidden)))  # (N, P, Dt)


class DepthwiseSeparable(nn.Module):
    """Depthwise 3x3 (stride 1 or 2) -> LayerNorm -> Hardswish -> pointwise 1x1 -> LayerNorm, on (N, D, h, w).
    LayerNorm over channels (not BatchNorm) so a batch of one behaves as in training."""

    def __init__(self, dim: int, stride: int):
        super().__init__()
        self.stride = stride
        self.depthwise = nn.Conv2d(dim, dim, 3, stride, padding=1, groups=dim, bias=False)
        self.norm1 = nn.LayerNorm(dim)
        self.pointwise = nn.Conv2d(dim, dim, 1, bias=False)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(self.depthwise(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # norm over D
        y = F.hardswish(y)
        y = self.norm2(self.pointwise(y).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + y if self.stride == 1 else y  # residual where the grid keeps its size


class LDPConnector(nn.Module):
    def __init__(self, vision_hidden: int, text_hidden: int):
        super().__init__()
        self.mlp = MLPConnector(vision_hidden, text_hidden)
        self.keep = DepthwiseSeparable(text_hidden, stride=1)
        self.down = DepthwiseSeparable(text_hidden, stride=2)

    def forward(self, image_hidden: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        n, p, _ = image_hidden.shape
        h, w = grid
        if h * w != p:
            raise SmolVLMError(f"the LDP connector got {p} patches for a {h}x{w} grid")
        x = self.mlp(image_hidden, grid)  # (N, P, Dt)
        x = x.transpose(1, 2).reshape(n, -1, h, w)  # (N, Dt, h, w)
        x = self.down(self.keep(x))  # (N, Dt, ceil(h/2), ceil(w/2))
        return x.flatten(2).transpose(1, 2)  # (N, ceil(h/2) * ceil(w/2), Dt)


def make_connector(kind: str, vision_hidden: int, text_hidden: int, scale_factor: int,
                   position_side: int = 0) -> nn.Module:
    """position_side: tokens per tile side of a learned position table (pixel-shuffle only, as VLMConfig.check
    demands; 0 = none)."""
    if kind in ("pixel-shuffle", "cross-attention"):
        return PixelShuffleConnector(vision_hidden, text_hidden, scale_factor, position_side)
    if kind == "mlp":
        return MLPConnector(vision_hidden, text_hidden)
    if kind == "ldp":
        return LDPConnector(vision_hidden, text_hidden)
    raise SmolVLMError(f"unknown connector {kind!r}; choose one of {', '.join(CONNECTORS)}")


def tokens_per_tile(kind: str, patches_per_side: int, scale_factor: int) -> int:
    """Connector tokens for one square tile of patches_per_side^2 patches."""
    if kind in ("pixel-shuffle", "cross-attention"):
        return patches_per_side**2 // scale_factor**2
    if kind == "mlp":
        return patches_per_side**2
    return ((patches_per_side + 1) // 2) ** 2  # ldp: stride 2, padding 1
