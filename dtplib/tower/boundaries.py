"""Boundaries over the patches of each image, as B x N tensors: drawing them (the Gumbel-Sigmoid threshold, exactly
ceil(N/c) per image, or B * ceil(N/c) over the batch), the capacity cap on a batch's segments, segments and their
members, mean pooling into segments and upsampling back, and the binomial prior on how many there are. Pure
functions of tensors: `dtplib.tower.model` calls them in the tower's forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .packed import (
    segment_ids,
)


def relaxed(logits: torch.Tensor, temperature: float, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy logits, soft boundaries). Training: logistic noise (Gumbel-Sigmoid), soft = sigmoid(noisy / t).
    Eval: no noise, soft = sigmoid(logit)."""
    if not training:
        return logits, torch.sigmoid(logits)
    uniform = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    noisy = logits + torch.log(uniform) - torch.log1p(-uniform)
    return noisy, torch.sigmoid(noisy / temperature)


def sample_boundaries(logits: torch.Tensor, temperature: float, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard 0/1 boundaries with a straight-through gradient, and the boundary probabilities.

    Training: relaxed Bernoulli (Gumbel-Sigmoid) sample, hard = soft > 0.5. Eval: sigmoid(logit) > 0.5,
    no noise. The returned boundaries equal the hard values exactly (hard + (soft - soft.detach())).
    """
    _, soft = relaxed(logits, temperature, training)
    hard = (soft > 0.5).to(logits.dtype)
    return hard + (soft - soft.detach()), torch.sigmoid(logits)  # B x N, B x N


def topk_boundaries(logits: torch.Tensor, segments: int, temperature: float,
                    training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly `segments` segments per image: boundaries on the `segments - 1` largest (noisy) logits among the
    first N - 1 patches, plus the last patch (which `close_last_segment` sets). Straight-through as in
    `sample_boundaries`: the gradient flows through the same soft values. B x N, B x N."""
    noisy, soft = relaxed(logits, temperature, training)
    chosen = noisy[:, :-1].topk(segments - 1, dim=-1).indices  # B x (segments - 1)
    hard = torch.zeros_like(logits).scatter(-1, chosen, 1.0)
    hard[:, -1] = 1
    return hard + (soft - soft.detach()), torch.sigmoid(logits)


def batch_topk_boundaries(logits: torch.Tensor, segments: int, temperature: float) -> torch.Tensor:
    """Training: exactly B * `segments` boundaries over the batch, each image's last patch and the
    B * (segments - 1) largest noisy logits among all images' other patches, so images share one budget by their
    content. Straight-through as `topk_boundaries`. B x N."""
    noisy, soft = relaxed(logits, temperature, training=True)
    batch, num_patches = logits.shape
    chosen = noisy[:, :-1].flatten().topk(batch * (segments - 1)).indices  # B*(segments - 1)
    hard = torch.zeros_like(logits[:, :-1]).flatten().scatter(0, chosen, 1.0).view(batch, num_patches - 1)
    hard = F.pad(hard, (0, 1), value=1.0)  # B x N, the last patch closes the last segment
    return hard + (soft - soft.detach())


def cap_boundaries(boundaries: torch.Tensor, scores: torch.Tensor,
                   max_segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """At most `max_segments` boundaries in the batch, on the device: every image keeps its closing boundary, and
    of the others only the `max_segments - B` with the highest scores stay. Returns the boundaries (B x N, the
    dropped ones 0 with their straight-through gradient kept) and how many were dropped (a 0-d tensor)."""
    batch, num_patches = boundaries.shape
    hard = boundaries.detach()
    inner = hard[:, :-1] > 0.5  # B x (N-1): boundaries that are not an image's closing one
    budget = max_segments - batch
    if budget >= inner.numel():
        return boundaries, hard.new_zeros(())
    ranked = scores[:, :-1].detach().float().masked_fill(~inner, float("-inf")).flatten()  # B*(N-1)
    kept = torch.zeros_like(ranked, dtype=torch.bool).scatter(0, ranked.topk(budget).indices, True)
    dropped = F.pad(inner & ~kept.view_as(inner), (0, 1))  # B x N
    return boundaries - dropped.to(boundaries.dtype), dropped.sum().to(hard.dtype)


def close_last_segment(boundaries: torch.Tensor) -> torch.Tensor:
    """Force a boundary on the last patch so that every patch belongs to a closed segment."""
    forced = torch.zeros_like(boundaries)
    forced[:, -1] = 1
    return boundaries * (1 - forced) + forced  # B x N, keeps the gradient of all other positions


def membership(boundaries: torch.Tensor, num_segments: int) -> torch.Tensor:
    """B x N x S matrix, 1 where patch n is in segment s, with a gradient path to the boundaries.

    As in Nawrot's `1 - (s - id)`, the value is exactly 1 on members while d/d(id) = 1, so the contrastive
    loss reaches the predictor through the segment ids. Casting ids to long would cut that path.
    """
    ids = segment_ids(boundaries)  # B x N, float, exact integers
    slots = torch.arange(num_segments, device=ids.device, dtype=ids.dtype)  # S
    is_member = ids.detach().unsqueeze(-1) == slots  # B x N x S
    through_ids = 1 + ids - ids.detach()  # B x N, value 1, gradient 1
    return is_member.to(ids.dtype) * through_ids.unsqueeze(-1)  # B x N x S


def downsample(tokens: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the patch tokens in each segment. Returns B x S x D segments and a B x S validity mask."""
    counts = weights.sum(1)  # B x S
    pooled = torch.einsum("bns,bnd->bsd", weights, tokens)  # B x S x D
    return pooled / counts.clamp(min=1).unsqueeze(-1), counts.detach() > 0


def upsample(segments: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Copy each segment back to the positions of its patches. B x S x D -> B x N x D."""
    return torch.einsum("bns,bsd->bnd", weights, segments)


def boundary_loss(boundaries: torch.Tensor, prior: float, per_image: bool = False) -> torch.Tensor:
    """Binomial prior on the number of boundaries in the batch: -log Binomial(K; B*N, p) / (B*N), K = all of them.

    Nawrot's prior (every patch a boundary with probability p, independently), applied to the batch total rather
    than to each image's count k (Nawrot: -log Binomial(k; N, p).mean() / N; the two agree for B = 1). The
    gradient per boundary keeps its scale, g(K) / (B*N) against g(k_b) / (B*N), with g(k) = d(-log Binomial)/dk
    = digamma(k+1) - digamma(N-k+1) - logit(p). The per-image form has two biases, both towards fewer boundaries,
    measured on a prior-only fit of Ti-10x (N = 64, p = 0.1), which settled at 5.3 boundaries per image (12.1x):
    - its minimum is the mode, k = (N+1)p - 1/2 = 6.0 (10.7x), not Np = 6.4; for the batch total the offset per
      image is (p - 1/2)/B;
    - the straight-through gradient reaches an image only through patches whose logits are near the threshold.
      Images with few boundaries end with all logits saturated and get no push, so the fit stops where
      sum_b g(k_b) D_b = 0 (D_b = sum_n sigmoid'(logit_bn)), not where mean_b g(k_b) = 0: at its end the plain
      mean was -0.20 (the prior still asked for more boundaries), the D-weighted one 0.003. Correcting only the
      mode still left Ti-10x at 10.8x to 12.3x over four seeds.
    With one count per batch g is the same for every image, and the fit stops where g(K) = 0, K = B*N*p up to that
    offset, whatever the D_b. This is the quantity the token budget is: realised compression is N / mean(k).
    The price: nothing holds one image's count near Np any more. After that fit the counts per image spread with
    std 5.5 (1 to 28 boundaries), against 2.0 with the per-image form and 2.4 for Binomial(N, p); padding to the
    batch maximum wastes more, the packed path does not. Under DDP, the batch is each device's.
    `per_image=True` is Nawrot's form (DTPConfig.prior_scope="image"), for runs that want the tighter spread.
    """
    if per_image:
        num_patches = boundaries.shape[-1]
        return _binomial_nll(boundaries.float().sum(-1), num_patches, prior).mean() / num_patches  # counts: B
    num_boundaries = boundaries.numel()
    k = boundaries.float().sum()  # float32: exact counts up to 2**24; a bf16/fp16 sum would round
    return _binomial_nll(k, num_boundaries, prior) / num_boundaries


def _binomial_nll(k: torch.Tensor, n: int, p: float) -> torch.Tensor:
    """-log Binomial(k; n, p), with n and p as Python numbers: no tensor is made on the host and copied over."""
    log_choose = math.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
    return -(log_choose + k * math.log(p) + (n - k) * math.log1p(-p))


def expand_forced(forced: torch.Tensor | str | int, shape: torch.Size, device, dtype) -> torch.Tensor:
    """Turn a `forced_boundaries` spec ("all", every c patches, or a B x N tensor) into B x N 0/1 boundaries."""
    if isinstance(forced, str):
        return torch.ones(shape, device=device, dtype=dtype)
    if isinstance(forced, int):
        boundaries = torch.zeros(shape, device=device, dtype=dtype)
        boundaries[:, forced - 1::forced] = 1
        return boundaries
    if tuple(forced.shape) != tuple(shape):
        raise ValueError(f"forced boundaries have shape {tuple(forced.shape)}, the batch needs {tuple(shape)}")
    return forced.to(device=device, dtype=dtype)
