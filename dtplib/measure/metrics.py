"""Metrics on score matrices: top-k accuracy and image-text retrieval recall, and the per-item scores behind them
(`ItemScores`), the items that a bootstrap over test images resamples (`dtplib.measure.stats`).

Ties and NaN count against the model: an item is a hit at k when fewer than k wrong candidates score at least as
high as its best right one (a NaN score is taken as the best wrong one and the worst right one). So the numbers are
deterministic, and a collapsed model (all scores equal, or NaN) scores 0 instead of a perfect top-1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .stats import Interval, bootstrap_ci

RANK_CHUNK = 1024  # score rows ranked at once: bounds memory to a few copies of 1024 x candidates


def item_ranks(scores: Tensor, positives: Tensor) -> Tensor:
    """Rank of each row's best positive: how many negatives of that row score at least as high (ties, NaN lose).

    scores N x M, positives N x M boolean -> N ranks; a row is a hit at k when its rank < k.
    """
    inf, ranks = float("inf"), []
    for start in range(0, len(scores), RANK_CHUNK):
        rows, is_positive = scores[start:start + RANK_CHUNK].float(), positives[start:start + RANK_CHUNK]  # n x M
        as_positive = rows.nan_to_num(nan=-inf, posinf=inf, neginf=-inf)  # a NaN positive is the worst
        as_negative = rows.nan_to_num(nan=inf, posinf=inf, neginf=-inf)  # a NaN negative is the best
        best = as_positive.masked_fill(~is_positive, -inf).amax(dim=1, keepdim=True)  # n x 1
        at_least_best = as_negative >= best  # n x M
        ranks.append((at_least_best & ~is_positive).sum(dim=1))  # n
    return torch.cat(ranks) if ranks else scores.new_zeros(0, dtype=torch.long)


def hit_rates(ranks: Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Fraction of ranks below each k (an exact ratio of counts, so 2/20 prints as 0.1)."""
    return {k: (ranks < k).sum().item() / len(ranks) for k in ks}


def topk_accuracy(logits: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose target class is among the k highest logits, for each k (a k above C counts as C)."""
    if logits.ndim != 2 or targets.shape != logits.shape[:1] or len(logits) == 0:
        raise ValueError(f"need logits B x C and targets B with B > 0, got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    num_classes = logits.shape[1]
    if targets.min() < 0 or targets.max() >= num_classes:
        raise ValueError(f"targets must lie in [0, {num_classes}), got {targets.min()}..{targets.max()}")
    is_target = F.one_hot(targets.long(), num_classes).bool()  # B x C
    return hit_rates(item_ranks(logits, is_target), ks)


def retrieval_recall(similarity: Tensor, text_image: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Image-to-text and text-to-image recall@k from an images x texts similarity matrix.

    text_image[t] is the image that text t describes. Image-to-text: a hit when any caption of the image is among
    its k best texts; text-to-image: a hit when the text's image is among its k best images.
    """
    image_ranks, text_ranks = _retrieval_ranks(similarity, text_image)
    image_to_text = hit_rates(image_ranks, ks)  # over the I images
    text_to_image = hit_rates(text_ranks, ks)  # over the T texts
    return ({f"image_to_text_R@{k}": v for k, v in image_to_text.items()}
            | {f"text_to_image_R@{k}": v for k, v in text_to_image.items()})


def _retrieval_ranks(similarity: Tensor, text_image: Tensor) -> tuple[Tensor, Tensor]:
    """(rank of each image's best caption among the texts: I, rank of each text's image among the images: T)."""
    num_images, num_texts = similarity.shape
    if text_image.shape != (num_texts,) or num_images == 0:
        raise ValueError(f"need similarity I x T and text_image T with I > 0, got {tuple(similarity.shape)} and "
                         f"{tuple(text_image.shape)}")
    image_ids = torch.arange(num_images, device=similarity.device)
    describes = text_image.to(similarity.device)[None, :] == image_ids[:, None]  # I x T
    without_text = (~describes.any(dim=1)).nonzero().flatten().tolist()
    if without_text or text_image.min() < 0 or text_image.max() >= num_images:
        raise ValueError(f"every text needs an image in [0, {num_images}) and every image a text "
                         f"(images without one: {without_text[:5]})")
    return item_ranks(similarity, describes), item_ranks(similarity.T, describes.T)


@dataclass(frozen=True)
class ItemScores:
    """One metric's per-item scores: the items that a bootstrap resamples. The metric is their mean, or with
    `weights` their weighted mean sum(w s) / sum(w)."""

    scores: np.ndarray  # items
    weights: np.ndarray | None = None  # items, positive; None: equal weights

    @property
    def value(self) -> float:
        if self.weights is None:
            return float(self.scores.mean())
        return float((self.scores * self.weights).sum() / self.weights.sum())

    def interval(self, resamples: int = 1000, level: float = 0.95, seed: int = 0) -> Interval:
        """The metric with its bootstrap percentile interval (`stats.bootstrap_ci`)."""
        return bootstrap_ci(self.scores, resamples, level, seed, weights=self.weights)


def hit_items(ranks: Tensor, k: int) -> ItemScores:
    """1.0 for each item whose rank is below k, else 0.0."""
    return ItemScores((ranks < k).double().cpu().numpy())


def retrieval_items(similarity: Tensor, text_image: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, ItemScores]:
    """`retrieval_recall`'s metrics as per-image scores, so that a bootstrap resamples images (the test items).

    image_to_text_R@k: 1 when one of the image's captions is among its k best texts. text_to_image_R@k: the share of
    the image's captions that find it among their k best images, weighted by its caption count, so the weighted
    mean is the recall over texts and each resampled image brings all its captions (a cluster bootstrap).
    """
    image_ranks, text_ranks = _retrieval_ranks(similarity, text_image)
    owner = text_image.to(text_ranks.device).long()
    counts = torch.bincount(owner, minlength=len(image_ranks)).double()  # I
    items = {f"image_to_text_R@{k}": hit_items(image_ranks, k) for k in ks}
    for k in ks:
        found = torch.zeros(len(image_ranks), dtype=torch.float64, device=owner.device)
        found.index_add_(0, owner, (text_ranks < k).double())  # I: captions that find their image
        items[f"text_to_image_R@{k}"] = ItemScores((found / counts).cpu().numpy(), counts.cpu().numpy())
    return items
