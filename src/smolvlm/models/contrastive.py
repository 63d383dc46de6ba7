"""A SigLIP-style contrastive head: one embedding per image and per caption, matched by a sigmoid loss.

    image: mean of its connector tokens (B, M, D) -> linear -> unit vector (B, D)
    text:  mean of the decoder's final hidden states over the caption (B, T, D) -> linear -> unit vector
    logits[i, j] = exp(t') * <img_i, txt_j> + b;  loss = -sum_ij log sigmoid(z_ij * logits[i, j]) / B
    with z_ij = 1 on matching pairs and -1 elsewhere; t' = log 10 and b = -10 at init, as in SigLIP.

Used as an auxiliary or alignment-stage loss (train/losses.py) and for retrieval (eval/predict.py).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class ContrastiveHead(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.image_proj = nn.Linear(dim, dim, bias=False)
        self.text_proj = nn.Linear(dim, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))  # t'; the temperature is exp(t')
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))  # starts the many negatives near probability 0

    @staticmethod
    def mean_pool(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, L, D), mask (B, L) -> mean over the masked-in positions (B, D), in float32."""
        m = mask.to(torch.float32)[..., None]
        return (x.float() * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)

    def embed_images(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens (B, M, D) the connector's tokens of each example's images, mask (B, M) -> (B, D) unit."""
        return F.normalize(self.image_proj(self.mean_pool(tokens, mask).to(self.image_proj.weight.dtype)), dim=-1)

    def embed_texts(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, D) the decoder's final states over the caption, mask (B, T) -> (B, D) unit."""
        return F.normalize(self.text_proj(self.mean_pool(hidden, mask).to(self.text_proj.weight.dtype)), dim=-1)

    def logits(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """(B, D), (C, D) unit vectors -> (B, C)."""
        return images.float() @ texts.float().T * self.logit_scale.exp() + self.logit_bias


def sigmoid_loss(logits: torch.Tensor) -> torch.Tensor:
    """SigLIP's loss for a (B, B) logit matrix whose diagonal holds the matching pairs."""
    b = logits.shape[0]
    signs = 2 * torch.eye(b, device=logits.device) - 1  # +1 on matches, -1 elsewhere
    return -F.logsigmoid(signs * logits).sum() / b
