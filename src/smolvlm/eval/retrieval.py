"""Recall@K for image-text retrieval from a similarity matrix.

``sim[i, j]`` is the similarity of image ``i`` and caption ``j``; ``caption_to_image[j]`` is the
index of the image caption ``j`` describes (each image usually has several captions).

* image -> text: image ``i`` is a hit at K if **any** of its own captions is among its K most similar
  captions;
* text -> image: caption ``j`` is a hit at K if its own image is among its K most similar images.

Ties are broken deterministically by index: candidates are ranked by decreasing similarity, and
among equal similarities the lower index comes first (a stable sort). So the rank of candidate ``c``
is ``#{similarity > s_c} + #{similarity == s_c and index < c}`` (0-based) and it is within the top K
iff that rank is < K. A constant matrix therefore ranks candidates in index order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from smolvlm.errors import SmolVLMError

__all__ = ["retrieval_recall", "ranks"]


def ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based rank, in each row of `scores`, of the column ``targets[row]`` under the tie rule above."""
    rows = np.arange(scores.shape[0])
    target_scores = scores[rows, targets][:, None]
    cols = np.arange(scores.shape[1])[None, :]
    better = (scores > target_scores) | ((scores == target_scores) & (cols < targets[:, None]))
    return better.sum(axis=1)


_CHUNK = 512  # rows per step, to bound the temporary (rows x columns) arrays


def retrieval_recall(sim, caption_to_image: Sequence[int], ks: Sequence[int] = (1, 5, 10)) -> dict:
    """``{"i2t": {K: recall}, "t2i": {K: recall}}`` with recalls in 0..1 (see the module docstring)."""
    sim = np.asarray(sim)
    if not np.issubdtype(sim.dtype, np.number) or np.issubdtype(sim.dtype, np.complexfloating):
        raise SmolVLMError("the similarity matrix must hold real numbers")
    if sim.ndim != 2 or sim.shape[0] == 0 or sim.shape[1] == 0:
        raise SmolVLMError(f"the similarity matrix must be 2-D (images x captions) and non-empty, "
                           f"got shape {sim.shape}")
    if not np.isfinite(sim).all():
        raise SmolVLMError("the similarity matrix contains NaN or infinite values; fix the model outputs first")
    owners = np.asarray(caption_to_image)
    n_img, n_cap = sim.shape
    if owners.shape != (n_cap,):
        raise SmolVLMError(f"caption_to_image must give one image index per caption ({n_cap}), got {owners.shape}")
    if not np.issubdtype(owners.dtype, np.integer) or owners.min() < 0 or owners.max() >= n_img:
        raise SmolVLMError(f"caption_to_image must hold integer image indices in 0..{n_img - 1}")
    counts = np.bincount(owners, minlength=n_img)
    if (counts == 0).any():
        raise SmolVLMError(f"image {int(np.argmin(counts))} has no caption, so image->text recall is undefined; "
                           "drop it or add its captions")
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise SmolVLMError("every K must be at least 1")
    # text -> image: rank of each caption's own image among all images
    t2i_rank = np.empty(n_cap, dtype=np.int64)
    for start in range(0, n_cap, _CHUNK):
        block = sim[:, start:start + _CHUNK].T
        t2i_rank[start:start + _CHUNK] = ranks(block, owners[start:start + _CHUNK])
    # image -> text: rank of the image's best own caption (highest similarity, then lowest index),
    # which is the lowest rank any of its captions has
    i2t_rank = np.empty(n_img, dtype=np.int64)
    for start in range(0, n_img, _CHUNK):
        block = sim[start:start + _CHUNK]
        own = owners[None, :] == np.arange(start, start + block.shape[0])[:, None]
        best = np.argmax(np.where(own, block, -np.inf), axis=1)  # argmax takes the first (lowest index)
        i2t_rank[start:start + block.shape[0]] = ranks(block, best)
    return {
        "i2t": {k: float((i2t_rank < k).mean()) for k in ks},
        "t2i": {k: float((t2i_rank < k).mean()) for k in ks},
    }
