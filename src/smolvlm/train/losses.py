"""The losses of one micro-batch: next-token cross-entropy on the answer tokens, optional distillation from a
teacher, optional SigLIP contrastive loss.

Normalization: every step's loss is (sum of token losses over the whole global batch) / (number of label tokens
in the global batch), whatever the split into micro-batches and processes, so one process with accumulation and
several processes give the same gradients and the same loss curve.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from smolvlm.data.conversations import IGNORE
from smolvlm.models.contrastive import sigmoid_loss
from smolvlm.models.vlm import VLM
from smolvlm.train.config import DistillConfig, TrainConfig


def branch_attention_mask(branch_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) branch ids (0 shared prefix, k turn k, -1 padding) -> (B, 1, T, T) bool: causal, and a token
    sees the prefix and its own branch only (packed independent turns, data/conversations.py)."""
    t = branch_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=branch_ids.device).tril()
    key, query = branch_ids[:, None, :], branch_ids[:, :, None]
    return (causal & ((key == 0) | (key == query)))[:, None]


def token_losses(model: VLM, batch: dict, teacher: VLM | None, distill: DistillConfig,
                 bf16: bool, image_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(summed training loss, summed cross-entropy, label tokens) of one micro-batch. Logits are only
    computed where a label is (the vocabulary projection is the largest matmul of a small model).
    image_embeds: the batch's images already through the vision encoder and connector (N, L, D)."""
    labels = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at position t
    where = labels != IGNORE
    n = int(where.sum())
    # right padding + causal attention: real tokens never see the padding, so no mask is needed, unless
    # the batch packs independent turns
    attn = branch_attention_mask(batch["branch_ids"]) if "branch_ids" in batch else None
    positions = batch.get("position_ids")
    # the padding skips the decoder's projections and MLP (a quarter of a shapes batch's tokens)
    real = batch["attention_mask"].bool() if "attention_mask" in batch else None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        h = model.hidden_states(batch["input_ids"], image_embeds=image_embeds, position_ids=positions,
                                attn_mask=attn, real_tokens=real)
        h = h[:, :-1][where]  # (N, D)
        logits = model.lm_head(h).float()
    ce = F.cross_entropy(logits, labels[where], reduction="sum")
    if teacher is None:
        return ce, ce.detach(), n
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        th = teacher.hidden_states(batch["input_ids"], batch.get("pixel_values"), batch.get("pixel_attention_mask"),
                                   position_ids=positions, attn_mask=attn)[:, :-1][where]
        t_logits = teacher.lm_head(th).float()
    temp = distill.temperature
    kd = F.kl_div(F.log_softmax(logits / temp, -1), F.log_softmax(t_logits / temp, -1), log_target=True,
                  reduction="sum") * temp**2
    loss = (1 - distill.alpha) * ce + distill.alpha * kd
    if distill.hidden_weight > 0:
        loss = loss + distill.hidden_weight * F.mse_loss(h.float(), th.float(), reduction="none").mean(-1).sum()
    return loss, ce.detach(), n


def contrastive_loss(model: VLM, batch: dict, image_embeds: torch.Tensor, bf16: bool) -> torch.Tensor:
    """SigLIP's sigmoid loss between each example's images and its caption, over the micro-batch."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        images = model.image_embedding(batch["input_ids"], image_embeds)  # (B, D)
        texts = model.text_embedding(batch["caption_ids"], batch["caption_mask"])  # (B, D)
    return sigmoid_loss(model.contrastive.logits(images, texts))


def batch_loss(model: VLM, batch: dict, teacher: VLM | None, cfg: TrainConfig, objective: str, n_tokens: float,
               n_batches: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(what backward() takes, summed cross-entropy, contrastive loss) of one micro-batch. The token loss is
    divided by the global batch's label tokens, the contrastive loss (a mean over the micro-batch) by the
    global number of micro-batches, so the step's gradient is the same however the batch is split."""
    # under bf16 autocast SDPA's math backend beats its flash kernel on CPU for short sequences, backward included;
    # in float32 the flash kernel is the faster one at every length (benchmarks/train_attention.py measures both)
    short = batch["input_ids"].shape[1] <= 512
    backend = SDPBackend.MATH if cfg.use_bf16 and short else SDPBackend.FLASH_ATTENTION
    with sdpa_kernel(backend):
        return _batch_loss(model, batch, teacher, cfg, objective, n_tokens, n_batches)


def _batch_loss(model: VLM, batch: dict, teacher: VLM | None, cfg: TrainConfig, objective: str, n_tokens: float,
                n_batches: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    image_embeds = None
    if "pixel_values" in batch:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.use_bf16):
            image_embeds = model.encode_images(batch["pixel_values"], batch.get("pixel_attention_mask"))
    loss = ce = con = torch.zeros(())
    if objective == "lm":
        token_loss, ce, _ = token_losses(model, batch, teacher, cfg.distill, cfg.use_bf16, image_embeds)
        loss = token_loss / n_tokens
    weight = 1.0 if objective == "contrastive" else cfg.contrastive_weight
    if weight > 0:
        con = contrastive_loss(model, batch, image_embeds, cfg.use_bf16)
        loss = loss + weight * con / n_batches
    return loss, ce, con.detach()
