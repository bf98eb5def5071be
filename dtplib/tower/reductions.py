"""The field's token reductions as arms of the same tower: EViT, TokenLearner, k-means grouping, learned pruning
(and ToMe, `dtplib.tower.tome`, which merges inside the shortened layers instead of before them).

Each maps the pre-layers' output to the shortened layers' input at DTP's budget, CLS + K tokens with
K = ceil(N / compression) (the tower's `topk_segments`), one count for every image: static shapes, no value read to
the host, one graph under torch.compile. A reducer is an nn.Module called as

    reducer(x, tokens, grid, block_input, block) -> (short, groups, scores)

- x: B x (1+N) x D, the pre-layers' output (CLS first, patches in raster order); tokens: K; grid: (rows, cols);
  block_input / block: the last pre-layer's input and the block itself (EViT reads that layer's CLS attention);
- short: B x (1+K) x D, CLS first, what the shortened layers run on densely (no mask);
- groups: B x N long, for each patch the index 0..K-1 of the token it ends in, or -1 when it is dropped
  (the trace's `segment_ids`);
- scores: B x N in [0, 1], the method's score or attention per patch, scaled to its image's largest (the trace's
  `probs`; ones where the method has none).

Every reducer also states its cost, so that the tower and the analytic FLOP model (`dtplib.measure.flops`, matrix
products only) treat all methods alike: `macs(num_patches, tokens, block)` is its own multiply-accumulates per image,
`layer_tokens(tokens, layers)` the tokens (CLS included) each shortened layer's attention sees, and
`short_macs(blocks, tokens)` the shortened layers' (linear, attention) MACs per image. The one-shot reducers here
share the last two (`OneShotReducer`: every layer at CLS + K).

ToMe's reducer (`ToMeReduction`, `runs_blocks = True`) is handed the shortened layers and runs them itself,
merging as it goes; the tower then sees its last layer's tokens.

Read top to bottom: the shared helpers, then one class per method, then `build_reducer`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cost import block_macs
from .tome import ToMeReduction

# ----------------------------------------------------------------------------------------------------------
# Shared helpers


def scaled(scores: torch.Tensor) -> torch.Tensor:
    """B x N non-negative scores divided by each image's largest: the trace's `probs` in [0, 1]."""
    scores = scores.detach()
    return scores / scores.amax(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)  # B x N


def kept_groups(keep: torch.Tensor, num_patches: int) -> torch.Tensor:
    """B x N groups of patches kept at `keep` (B x K indices, in token order): rank in `keep`, -1 elsewhere."""
    ranks = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)  # B x K
    return torch.full((keep.shape[0], num_patches), -1, dtype=torch.long, device=keep.device).scatter(1, keep, ranks)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """B x N x D, B x K indices -> B x K x D."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def trace_fields(groups: torch.Tensor, scores: torch.Tensor, tokens: int) -> dict[str, torch.Tensor]:
    """A reduction's `TraceRecord` fields: each patch's token as its segment (B x N, -1: dropped), a boundary where
    the next patch in raster order is in another group (and on the last patch: DTP's "closes a run"), the scores
    as `probs`, K tokens per image and N / K as the compression."""
    groups = groups.detach()  # B x N
    closes = F.pad(groups[:, 1:] != groups[:, :-1], (0, 1), value=True)  # B x N
    counts = groups.new_full(groups.shape[:1], tokens)  # B
    return {"boundaries": closes, "segment_ids": groups, "probs": scores.detach(), "tokens": counts,
            "compression": groups.shape[1] / counts.float()}


class OneShotReducer(nn.Module):
    """A reducer that maps the pre-layers' output to CLS + K tokens once, before the shortened layers, which the
    tower then runs densely: every shortened layer sees 1 + K tokens."""

    runs_blocks = False

    def layer_tokens(self, tokens: int, layers: int) -> list[int]:
        return [1 + tokens] * layers

    def short_macs(self, blocks, tokens: int) -> tuple[int, int]:
        return block_macs(blocks, 1 + tokens)


# ----------------------------------------------------------------------------------------------------------
# EViT


def cls_attention(block: nn.Module, block_input: torch.Tensor) -> torch.Tensor:
    """The CLS token's attention over the patches in `block` (a timm Block) on its input, averaged over heads:
    B x (1+N) x D -> B x N. timm's Attention runs fused SDPA and never forms the probabilities, so the CLS query
    and every key are recomputed from its qkv weights on the normed input (the CLS row only: N + 1 scores)."""
    attn = block.attn
    batch, length, _ = block_input.shape
    heads, head_dim, width = attn.num_heads, attn.head_dim, attn.attn_dim
    normed = block.norm1(block_input)  # B x (1+N) x D
    bias = attn.qkv.bias
    query = F.linear(normed[:, :1], attn.qkv.weight[:width], None if bias is None else bias[:width])  # B x 1 x A
    keys = F.linear(normed, attn.qkv.weight[width:2 * width],
                    None if bias is None else bias[width:2 * width])  # B x (1+N) x A
    query = attn.q_norm(query.view(batch, 1, heads, head_dim).transpose(1, 2))  # B x H x 1 x d
    keys = attn.k_norm(keys.view(batch, length, heads, head_dim).transpose(1, 2))  # B x H x (1+N) x d
    logits = (query * attn.scale) @ keys.transpose(-2, -1)  # B x H x 1 x (1+N)
    return logits.softmax(-1)[:, :, 0, 1:].mean(1)  # B x N


class EViT(OneShotReducer):
    """EViT (Liang et al. 2022, "Not All Patches are What You Need: Expediting Vision Transformers via Token
    Reorganizations", ICLR): keep the K - 1 patches with the highest CLS attention, fuse the rest into one token.

    Parameter-free. As EViT: the attention is the CLS row of a layer's own attention averaged over heads, the
    selection is hard (top-k), and the fused token carries the gradient to the attention through its weights.
    Departures, each for one budget at one place: the reduction happens once, after the pre-layers, from the last
    pre-layer's attention (EViT reorganises inside three blocks, between their attention and MLP, at keep rate
    0.7 each), so the shortened layers see exactly CLS + K tokens; and the fused token is the attention-weighted
    *mean* of the inattentive patches (EViT sums them weighted by their attention, a token whose scale shrinks
    as attention spreads), which keeps it on the scale of a patch token and makes K = N the plain ViT (the one
    fused patch is itself). The attention is recomputed from the block's qkv weights (see `cls_attention`).
    """

    def forward(self, x: torch.Tensor, tokens: int, grid: tuple[int, int], block_input: torch.Tensor,
                block: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        patches = x[:, 1:]  # B x N x D
        attention = cls_attention(block, block_input)  # B x N
        keep = attention.detach().topk(tokens - 1, dim=-1).indices.sort(-1).values  # B x (K-1), raster order
        groups = kept_groups(keep, patches.shape[1])  # B x N: rank, -1 for the inattentive
        fused = attention * (groups < 0).to(attention.dtype)  # B x N: the inattentive patches' weights
        weights = fused / fused.sum(-1, keepdim=True).clamp_min(torch.finfo(fused.dtype).tiny)  # B x N
        fused_token = (weights.unsqueeze(-1) * patches).sum(1, keepdim=True)  # B x 1 x D
        short = torch.cat([x[:, :1], gather_rows(patches, keep), fused_token], dim=1)  # B x (1+K) x D
        return short, groups.where(groups >= 0, tokens - 1), scaled(attention)

    def macs(self, num_patches: int, tokens: int, block: nn.Module) -> int:
        """The CLS query (A x D), the keys of CLS + N patches ((1+N) x A x D) and their scores ((1+N) x A)."""
        width, inputs = block.attn.attn_dim, block.attn.qkv.in_features
        return width * inputs + (1 + num_patches) * width * inputs + (1 + num_patches) * width


# ----------------------------------------------------------------------------------------------------------
# TokenLearner


class TokenLearner(OneShotReducer):
    """TokenLearner (Ryoo et al. 2021, "TokenLearner: What Can 8 Learned Tokens Do for Images and Videos?",
    NeurIPS), v1.1 as in google-research/scenic: LayerNorm -> MLP (GELU, bottleneck 64) -> K maps over the
    patches, softmax over the patches, each token the map-weighted sum of the patches.

    Departures: the module sits after the pre-layers at DTP's budget (the paper places it around the middle of
    the network with 8 or 16 tokens); the CLS token passes through unchanged (the paper's towers pool by global
    average and have none), so the CLIP head pools as every arm does; no dropout in the MLP. For the trace, each
    patch's group is the token whose map weighs it most (`argmax`), and its score that weight.
    """

    def __init__(self, width: int, tokens: int, hidden: int = 64):
        super().__init__()
        self.tokens = tokens
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, tokens)

    def forward(self, x: torch.Tensor, tokens: int, grid: tuple[int, int], block_input: torch.Tensor,
                block: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if tokens != self.tokens:
            raise ValueError(f"this TokenLearner was built for {self.tokens} tokens, the tower now asks for {tokens} "
                             "(its input size changed): build a new model")
        patches = x[:, 1:]  # B x N x D
        maps = self.fc2(self.act(self.fc1(self.norm(patches))))  # B x N x K
        weights = maps.transpose(1, 2).softmax(-1)  # B x K x N, each map sums to 1 over the patches
        learned = weights @ patches  # B x K x D
        strongest = weights.detach().max(1)  # B x N: each patch's heaviest map and its weight
        return torch.cat([x[:, :1], learned], dim=1), strongest.indices, scaled(strongest.values)

    def macs(self, num_patches: int, tokens: int, block: nn.Module | None) -> int:
        """The MLP on every patch and the K weighted sums (K x N x D)."""
        mlp = self.fc1.in_features * self.fc1.out_features + self.fc2.in_features * self.fc2.out_features
        return num_patches * mlp + tokens * num_patches * self.fc1.in_features


# ----------------------------------------------------------------------------------------------------------
# k-means grouping


def grid_centres(grid: tuple[int, int], tokens: int) -> torch.Tensor:
    """K x 2 (row, col) positions of K centres spread regularly over a rows x cols patch grid: about
    sqrt(K * rows / cols) rows of centres, K shared among them as evenly as possible, each row's centres evenly
    spaced (K = rows x cols puts one centre on every patch)."""
    rows, cols = grid
    centre_rows = min(tokens, rows, max(1, round(math.sqrt(tokens * rows / cols))))
    per_row = [tokens // centre_rows + (i < tokens % centre_rows) for i in range(centre_rows)]
    positions = [((i + 0.5) * rows / centre_rows - 0.5, (j + 0.5) * cols / count - 0.5)
                 for i, count in enumerate(per_row) for j in range(count)]
    return torch.tensor(positions, dtype=torch.float64)  # K x 2


class KMeansGrouping(OneShotReducer):
    """k-means grouping of patches (the NativeSegViT family of clustering tokenisers): K centres initialised on a
    regular grid of the patch grid, `iterations` soft k-means updates over the pre-layer features with their
    positions, then each patch in its nearest centre's group, each group's mean patch as its token. The 2-D
    generalisation of DTP's 1-D runs: groups are compact regions of similar patches instead of runs in raster order.

    Parameter-free. The distance is between points [LayerNorm(x) / sqrt(D), w * position / spacing] (features
    of unit norm, positions in units of the centres' spacing sqrt(N / K) times `position_weight` w), soft
    assignments softmax(-distance / `temperature`). The hard assignment is straight-through: each token is
    sum_n (hard + soft - soft.detach())_nk x_n / |group k|, so its value is the group's mean and the loss reaches
    the features through the soft assignment. An empty group is still one of the K tokens, a zero token (no NaN).

    Departures: NativeSegViT-style tokenisers cluster pixels or patch embeddings at the input and iterate to
    convergence; here the clustering runs once after the pre-layers (DTP's place), a fixed small number of
    iterations (static shapes, cost < 2% of the tower) and K fixed per image (DTP's budget).
    """

    def __init__(self, width: int, tokens: int, grid: tuple[int, int], iterations: int = 3,
                 temperature: float = 0.1, position_weight: float = 1.0):
        super().__init__()
        self.width, self.tokens, self.grid = width, tokens, tuple(grid)
        self.iterations, self.temperature, self.position_weight = iterations, temperature, position_weight
        positions, cells = self.layout()
        self.register_buffer("positions", positions, persistent=False)  # N x 2
        self.register_buffer("cells", cells, persistent=False)  # K x N

    def layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(N x 2 positions in centre spacings x position_weight, K x N initial membership: each patch in its
        positionally nearest grid centre's cell, rows normalised to means; an empty cell a zero row)."""
        (rows, cols), tokens = self.grid, self.tokens
        patches = torch.cartesian_prod(torch.arange(rows), torch.arange(cols)).double()  # N x 2, raster order
        nearest = torch.cdist(patches, grid_centres(self.grid, tokens)).argmin(-1)  # N
        cells = (nearest[None, :] == torch.arange(tokens)[:, None]).double()  # K x N
        cells = cells / cells.sum(-1, keepdim=True).clamp_min(1)  # K x N
        positions = patches * (self.position_weight / math.sqrt(rows * cols / tokens))  # N x 2
        return positions.float(), cells.float()

    def soft_assignment(self, points: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        """B x N x P points, B x K x P centres -> B x N x K softmax over the centres of -squared distance / T."""
        cross = points @ centres.transpose(1, 2)  # B x N x K
        distance = (points * points).sum(-1, keepdim=True) - 2 * cross + (centres * centres).sum(-1)[:, None, :]
        return (-distance / self.temperature).softmax(-1)  # B x N x K

    def forward(self, x: torch.Tensor, tokens: int, grid: tuple[int, int], block_input: torch.Tensor,
                block: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        patches = x[:, 1:]  # B x N x D
        batch, _, width = patches.shape
        if (tokens, tuple(grid)) != (self.tokens, self.grid):
            raise ValueError(f"this k-means grouping was built for {self.tokens} tokens on a {self.grid} grid, the "
                             f"tower asks for {tokens} on {tuple(grid)} (its input size changed): build a new model")
        positions, cells = self.positions.to(x.dtype), self.cells.to(x.dtype)  # N x 2, K x N
        features = F.layer_norm(patches, (width,)) / math.sqrt(width)  # B x N x D, unit norm
        points = torch.cat([features, positions.expand(batch, -1, -1)], dim=-1)  # B x N x (D+2)
        centres = cells.expand(batch, -1, -1) @ points  # B x K x (D+2)
        for _ in range(self.iterations):
            soft = self.soft_assignment(points, centres)  # B x N x K
            mass = soft.sum(1).unsqueeze(-1).clamp_min(torch.finfo(x.dtype).tiny)  # B x K x 1
            centres = (soft.transpose(1, 2) @ points) / mass  # B x K x (D+2)
        soft = self.soft_assignment(points, centres)  # B x N x K
        groups = soft.detach().argmax(-1)  # B x N
        hard = (groups.unsqueeze(-1) == torch.arange(tokens, device=x.device)).to(x.dtype)  # B x N x K
        members = hard.sum(1).clamp_min(1).unsqueeze(-1)  # B x K x 1 (an empty group: 1, its token 0)
        grouped = ((hard + soft - soft.detach()).transpose(1, 2) @ patches) / members  # B x K x D
        own = soft.detach().gather(-1, groups.unsqueeze(-1)).squeeze(-1)  # B x N: confidence in its group
        return torch.cat([x[:, :1], grouped], dim=1), groups, scaled(own)

    def macs(self, num_patches: int, tokens: int, block: nn.Module) -> int:
        """Per image, with P = D + 2: the initial centres (K x N x P), 1 + iterations distance products and
        iterations centre updates (N x K x P each), the tokens (K x N x D)."""
        return tokens * num_patches * ((self.width + 2) * (2 + 2 * self.iterations) + self.width)


# ----------------------------------------------------------------------------------------------------------
# Learned pruning


class LearnedPruning(OneShotReducer):
    """Learned pruning with DynamicViT's keep score (Rao et al. 2021, "DynamicViT: Efficient Vision Transformers with
    Dynamic Token Sparsification", NeurIPS): its predictor (LayerNorm -> Linear D -> GELU, a local half of the
    features beside the mean of the global half, then an MLP D -> D/2 -> D/4 -> score), exactly K patches kept
    per image, the rest dropped (group -1).

    How it differs from DynamicViT. DynamicViT trains with a Gumbel-softmax keep *mask* over all tokens (the
    dropped ones are masked out of attention, every token still computed), with a keep-ratio loss and distillation
    from the full model, so training saves no compute (its authors say so); it drops only at inference. Here the
    drop is real in training too: exactly K kept by Gumbel top-k on the score logits (deterministic top-k in eval),
    and a straight-through estimator carries the contrastive loss to the score: each kept token is multiplied by
    1 + s - s.detach() (value 1) of its keep probability s = sigmoid(logit). No ratio loss (the count is exact) and
    no distillation; one pruning stage after the pre-layers instead of DynamicViT's three (keep 0.7 each).
    A dropped patch gets no gradient through its score: the ranking learns from the patches it keeps.
    """

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.local = nn.Linear(width, width)
        self.act = nn.GELU()
        self.score = nn.Sequential(nn.Linear(width, width // 2), nn.GELU(), nn.Linear(width // 2, width // 4),
                                   nn.GELU(), nn.Linear(width // 4, 1))

    def logits(self, patches: torch.Tensor) -> torch.Tensor:
        """B x N x D -> B x N keep logits (DynamicViT's local and global features)."""
        features = self.act(self.local(self.norm(patches)))  # B x N x D
        local, rest = features.chunk(2, dim=-1)  # B x N x D/2 each
        shared = rest.mean(1, keepdim=True).expand_as(local)  # B x N x D/2: the image's global feature
        return self.score(torch.cat([local, shared], dim=-1)).squeeze(-1)  # B x N

    def forward(self, x: torch.Tensor, tokens: int, grid: tuple[int, int], block_input: torch.Tensor,
                block: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        patches = x[:, 1:]  # B x N x D
        logits = self.logits(patches)  # B x N
        ranked = logits.detach()
        if self.training:  # Gumbel top-k: K draws without replacement from softmax(logits)
            ranked = ranked - torch.log(-torch.log(torch.rand_like(ranked).clamp(1e-20, 1.0)))
        keep = ranked.topk(tokens, dim=-1).indices.sort(-1).values  # B x K, raster order
        keep_probability = logits.sigmoid()  # B x N
        through = keep_probability.gather(1, keep)  # B x K
        kept = gather_rows(patches, keep) * (1 + through - through.detach()).unsqueeze(-1)  # B x K x D, value kept
        return torch.cat([x[:, :1], kept], dim=1), kept_groups(keep, patches.shape[1]), scaled(keep_probability)

    def macs(self, num_patches: int, tokens: int, block: nn.Module | None) -> int:
        linears = [self.local, *(m for m in self.score if isinstance(m, nn.Linear))]
        return num_patches * sum(m.in_features * m.out_features for m in linears)


# ----------------------------------------------------------------------------------------------------------
# By name


def build_reducer(reduction: str, width: int, tokens: int, grid: tuple[int, int], blocks=None,
                  predictor_macs: int = 0) -> nn.Module:
    """The reducer of `DTPConfig.reduction` for a tower of width D that keeps K = `tokens` per image of a `grid` of
    patches (ToMe: its merge schedule for the shortened `blocks`, meeting the MACs of DTP's shortened layers plus
    `predictor_macs`, DTP's boundary predictor per image; `dtplib.tower.tome.ToMeReduction`)."""
    if reduction == "tome":
        return ToMeReduction(blocks, grid[0] * grid[1], tokens, predictor_macs)
    if reduction == "evit":
        return EViT()
    if reduction == "tokenlearner":
        return TokenLearner(width, tokens)
    if reduction == "kmeans":
        return KMeansGrouping(width, tokens, grid)
    if reduction == "prune":
        return LearnedPruning(width)
    raise ValueError(f"reduction {reduction!r} has no reducer (DTP's is the boundary predictor)")
