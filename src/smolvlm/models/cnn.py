"""MobileNet-style convolutional vision encoder (depthwise-separable inverted residuals, as in MobileNetV2).

pixels (N, 3, H, W) -> stem conv s2 -> stages of inverted residual blocks (each stage halves H, W)
    -> 1x1 conv to hidden_size -> + learned grid positions -> LayerNorm -> (N, h*w, D)

It returns a grid of visual tokens like the ViT (not a pooled vector), so it drops into the same
connectors; `patch_size` is its total stride. Convolutions see local colour and shape at once, which a
ViT trained from scratch learns slowly; the learned positions keep "left of" / "above" explicit.
"""

from dataclasses import dataclass

import torch
from torch import nn

from smolvlm.models.vision import grid_position_ids


@dataclass
class CNNConfig:
    hidden_size: int = 192  # width of the output tokens
    stem_width: int = 32
    widths: tuple = (48, 96)  # one stage per entry; each starts with a stride-2 block
    blocks_per_stage: int = 2  # the first strided, the rest stride 1 with a residual connection
    expand_ratio: int = 4  # inverted residual: 1x1 expand -> depthwise 3x3 -> 1x1 project
    num_channels: int = 3
    image_size: int = 64  # the tile size the learned positions cover
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        self.widths = tuple(int(w) for w in self.widths)  # YAML / JSON give lists

    @property
    def patch_size(self) -> int:
        """Total stride: one output token per patch_size x patch_size pixels."""
        return 2 ** (1 + len(self.widths))

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


class ConvNormAct(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True):
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU6() if act else nn.Identity(),
        )


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise (stride) -> 1x1 linear projection; residual when shapes allow."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: int):
        super().__init__()
        mid = c_in * expand_ratio
        self.residual = stride == 1 and c_in == c_out
        self.block = nn.Sequential(
            ConvNormAct(c_in, mid, 1),
            ConvNormAct(mid, mid, 3, stride, groups=mid),  # depthwise
            ConvNormAct(mid, c_out, 1, act=False),  # linear bottleneck
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


class CNNEncoder(nn.Module):
    def __init__(self, cfg: CNNConfig):
        super().__init__()
        self.cfg = cfg
        self.stem = ConvNormAct(cfg.num_channels, cfg.stem_width, 3, stride=2)
        blocks, c = [], cfg.stem_width
        for width in cfg.widths:
            for k in range(cfg.blocks_per_stage):
                blocks.append(InvertedResidual(c, width, 2 if k == 0 else 1, cfg.expand_ratio))
                c = width
        self.blocks = nn.Sequential(*blocks)
        self.proj = nn.Conv2d(c, cfg.hidden_size, 1)
        self.position_embedding = nn.Embedding(cfg.patches_per_side**2, cfg.hidden_size)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values (N, 3, H, W), H and W multiples of patch_size; patch_mask (N, H/ps, W/ps) bool, True
        on real (unpadded) patches. Returns (N, P, D) with P = (H/ps) * (W/ps)."""
        n, _, h, w = pixel_values.shape
        ps = self.cfg.patch_size
        if h % ps or w % ps:
            raise ValueError(f"the CNN encoder needs image sides divisible by {ps}, got {h}x{w}")
        # channels_last: oneDNN's CPU convolutions (forward and backward) run NHWC natively; NCHW costs reorders
        x = pixel_values.contiguous(memory_format=torch.channels_last)
        x = self.proj(self.blocks(self.stem(x)))  # (N, D, H/ps, W/ps)
        x = x.flatten(2).transpose(1, 2)  # (N, P, D)
        if patch_mask is None:
            patch_mask = torch.ones(n, h // ps, w // ps, dtype=torch.bool, device=pixel_values.device)
        x = x + self.position_embedding(grid_position_ids(patch_mask, self.cfg.patches_per_side))
        return self.post_layernorm(x)


def init_cnn(model: CNNEncoder) -> None:
    """Kaiming init for the convolutions (the GPT-style normal(0.02) init used for transformers starves a
    ReLU network of signal); BatchNorm starts as identity."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    with torch.no_grad():
        model.position_embedding.weight.copy_(sincos_grid(model.cfg.patches_per_side, model.cfg.hidden_size))


def sincos_grid(side: int, dim: int) -> torch.Tensor:
    """2D sine-cosine positions (as in MAE), side*side rows of dim values with unit mean square: half the
    channels encode the column, half the row, at geometric frequencies. The learned table starts here,
    not at normal(0.02): a position as loud as the features it is added to lets "left of" / "in the left
    half" be read off from the first steps (measured: see docs/training.md)."""
    quarter = dim // 4
    freqs = 1.0 / 100.0 ** (torch.arange(quarter, dtype=torch.float32) / max(quarter - 1, 1))  # (dim/4,)
    pos = torch.arange(side, dtype=torch.float32) / max(side - 1, 1) * torch.pi  # 0..pi over the grid
    angles = pos[:, None] * freqs[None, :]  # (side, dim/4)
    axis = torch.cat([angles.sin(), angles.cos()], dim=1)  # (side, dim/2): one axis
    rows = axis[:, None, :].expand(side, side, -1)  # row index -> code
    cols = axis[None, :, :].expand(side, side, -1)  # column index -> code
    grid = torch.cat([cols, rows], dim=-1).reshape(side * side, -1)  # (side*side, 4*quarter), row-major
    out = torch.zeros(side * side, dim)
    out[:, : grid.shape[1]] = grid
    return out / out.pow(2).mean().sqrt()

