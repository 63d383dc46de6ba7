"""SmolVLM's connector: pixel shuffle (space-to-depth) then a bias-free linear projection.

(N, P, Dv) -> pixel shuffle by s -> (N, P/s^2, Dv*s^2) -> linear -> (N, P/s^2, Dt)

Pixel shuffle trades sequence length for width: with s=4 a 32x32 patch grid becomes 64 tokens.
"""

import torch
from torch import nn


def pixel_shuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """(N, P, D) -> (N, P / scale^2, D * scale^2) on a square patch grid, in SmolVLM's element order."""
    n, p, d = x.shape
    side = int(p**0.5)
    if side * side != p or side % scale:
        raise ValueError(f"pixel shuffle needs a square grid divisible by {scale}, got {p} patches")
    x = x.view(n, side, side // scale, d * scale)  # merge `scale` neighbouring columns
    x = x.permute(0, 2, 1, 3)  # (N, side/s, side, D*s)
    x = x.reshape(n, side // scale, side // scale, d * scale * scale)  # merge `scale` neighbouring rows
    x = x.permute(0, 2, 1, 3)  # back to row-major
    return x.reshape(n, p // (scale * scale), d * scale * scale)


class Connector(nn.Module):
    def __init__(self, vision_hidden: int, text_hidden: int, scale_factor: int):
        super().__init__()
        self.scale_factor = scale_factor
        # a ModuleDict only so that the weight is named `modality_projection.proj.weight` as in SmolVLM
        self.modality_projection = nn.ModuleDict(
            {"proj": nn.Linear(vision_hidden * scale_factor**2, text_hidden, bias=False)}
        )

    def forward(self, image_hidden: torch.Tensor) -> torch.Tensor:
        return self.modality_projection["proj"](pixel_shuffle(image_hidden, self.scale_factor))
