"""ToMe: token merging by bipartite soft matching in the shortened layers (the `tome` reduction).

Bolya et al. 2023, "Token Merging: Your ViT But Faster" (ICLR; arXiv:2210.09461). In each shortened layer, between
attention and MLP, the tokens are split into two alternating sets A and B, each token of A is joined to its most
similar token of B (cosine similarity of the attention keys, averaged over heads), and the r joins with the highest
similarity are merged: their features averaged, weighted by how many patches each token already holds (its
`size`). Attention then adds log(size) to its logits (proportional attention), so a token that holds k patches
weighs as much as the k patches would. The CLS token is never merged. Parameter-free.

Read top to bottom: matching (`bipartite_soft_matching`, a `Merge`), the block (`tome_block`), the run
(`run_tome`), then the cost (`tome_stage_macs`) and the schedule that meets a MAC budget (`merge_schedule`).

Where this departs from the paper, and why:
- Only the shortened layers merge; the pre- and post-layers stay dense, as for every reduction of this tower, so
  the arms differ only in how tokens are reduced.
- An entrance merge. DTP's budget holds from the first shortened layer on (1 + ceil(N / c) tokens in every one),
  while ToMe's first merge happens after the first layer's attention on all 1 + N tokens and can at most halve
  them. With few shortened layers or a high compression (Ti's 4 layers at 4x, any split at 10x) merging at the
  bipartite limit in every layer still costs more than DTP. `schedule[0]` therefore merges before the first
  shortened layer, in as many bipartite rounds as it needs (each at most halving). Its metric is the tokens
  as that layer reads them (its `norm1`), not ToMe's keys: keys there would need a projection of every token,
  which is the cost being saved. The solver uses the entrance only when merging inside the layers cannot meet
  the budget.
- Static shapes. r is fixed per layer, so every image leaves a layer with the same count and a compiled forward is
  one graph with no value read to the host. ToMe clips an r over the bipartite limit silently; here it is an error
  (`check_schedule`), and the solver never proposes one.
- A schedule that meets a budget in MACs. ToMe takes an integer r per layer, constant or in a linear ramp. Here
  the mean r is real (`shaped_schedule`: the cumulative merges are rounded), so the cost can fall between two
  integer r and meet DTP's within 1%; `merge_schedule` states the rule.
- Merging by one scatter-add. The matching gives each token its slot in the merged sequence (`Merge.slot`); merging
  sums into the slots. The same index moves the source map, kept as one slot per original token (B x (1 + N)) rather
  than ToMe's (1 + N) x (1 + N) one-hot matrix per image. Unmerged tokens keep their original order.
- Proportional attention is on by default (`prop_attn`). ToMe's repository turns it off for training and for MAE
  models; `prop_attn=False` reproduces that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cost import attention_width, block_macs, linear_macs_per_token

# ----------------------------------------------------------------------------------------------------------
# Matching


@dataclass(frozen=True)
class Merge:
    """One bipartite merge: `slot` (B x T long) is the position in the merged sequence of T - r tokens that each
    input token goes to; tokens that share a slot are merged."""

    slot: torch.Tensor  # B x T long, values in [0, tokens)
    tokens: int  # T - r

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """B x T x C -> B x (T - r) x C: the sum of the tokens that share a slot."""
        index = self.slot.unsqueeze(-1).expand(-1, -1, x.shape[-1])  # B x T x C
        return x.new_zeros(x.shape[0], self.tokens, x.shape[-1]).scatter_add(1, index, x)  # B x (T-r) x C

    def weighted_mean(self, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ToMe's merge_wavg: tokens (B x T x D) averaged by their sizes (B x T x 1, patches per token)."""
        size_out = self.sum(size)  # B x (T-r) x 1
        return self.sum(x * size) / size_out, size_out  # B x (T-r) x D, B x (T-r) x 1

    def move(self, source: torch.Tensor) -> torch.Tensor:
        """Source map (B x (1 + N) long: the token each original token is in) after this merge."""
        return self.slot.gather(1, source)  # B x (1+N)


def bipartite_limit(tokens: int, protect_cls: bool = True) -> int:
    """The most tokens one bipartite round can merge away: half of the tokens that may merge."""
    return (tokens - int(protect_cls)) // 2


def bipartite_soft_matching(metric: torch.Tensor, r: int, protect_cls: bool = True) -> Merge:
    """ToMe's matching on `metric` (B x T x C): A = tokens 0, 2, 4, ..., B = tokens 1, 3, 5, ...; each token of A
    points to its most similar token of B (cosine), and the r pointers with the highest similarity merge. With
    `protect_cls` token 0 (the CLS token, in A) never merges. No gradient flows through the matching."""
    batch, tokens, _ = metric.shape
    if not 0 <= r <= bipartite_limit(tokens, protect_cls):
        raise ValueError(f"one bipartite round merges 0..{bipartite_limit(tokens, protect_cls)} of {tokens} tokens, "
                         f"got r={r}")
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)  # B x T x C
        side_a, side_b = metric[:, 0::2], metric[:, 1::2]  # B x Ta x C, B x Tb x C
        scores = side_a @ side_b.transpose(1, 2)  # B x Ta x Tb
        best, partner = scores.max(dim=-1)  # B x Ta, B x Ta
        if protect_cls:
            best[:, 0] = -math.inf  # the CLS token sorts last: never among the r merged
        order = best.argsort(dim=-1, descending=True, stable=True)  # B x Ta
        merged, kept = order[:, :r], order[:, r:].sort(dim=-1).values  # B x r, B x (Ta-r) in original order
        kept_count, count_b = kept.shape[1], side_b.shape[1]
        steps = torch.arange(kept_count, device=metric.device).expand(batch, -1)  # B x (Ta-r)
        slot_a = torch.empty_like(order).scatter_(1, kept, steps)  # B x Ta: kept tokens first, in order
        slot_a = slot_a.scatter_(1, merged, kept_count + partner.gather(1, merged))  # merged: their partner's slot
        slot_b = (kept_count + torch.arange(count_b, device=metric.device)).expand(batch, -1)  # B x Tb
        slot = torch.empty(batch, tokens, dtype=torch.long, device=metric.device)  # B x T
        slot[:, 0::2], slot[:, 1::2] = slot_a, slot_b
    return Merge(slot, tokens - r)


# ----------------------------------------------------------------------------------------------------------
# The block


def _timm_block_parts(block: nn.Module) -> nn.Module:
    """The block's attention, checked to be timm's layout (norm1, attn.qkv, ls1, drop_path1, norm2, mlp, ...)."""
    needed = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
    attn = getattr(block, "attn", None)
    if any(not hasattr(block, name) for name in needed) or not isinstance(getattr(attn, "qkv", None), nn.Linear):
        raise ValueError(f"{type(block).__name__}: ToMe runs timm's vision_transformer.Block (norm1, attn with qkv, "
                         "ls1, drop_path1, norm2, mlp, ls2, drop_path2)")
    return attn


def tome_attention(attn: nn.Module, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's Attention on normed tokens x (B x T x D) with log(size) added to the logits (proportional attention;
    `size` B x T x 1, None for none), and ToMe's metric: the keys averaged over heads (B x T x head_dim)."""
    batch, tokens, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x).reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)  # 3 x B x H x T x hd
    q, k, v = qkv.unbind(0)  # B x H x T x hd each
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = None if size is None else size.log().to(q.dtype).view(batch, 1, 1, tokens)  # B x 1 x 1 x T
    if getattr(attn, "fused_attn", True):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                             dropout_p=attn.attn_drop.p if attn.training else 0.0)  # B x H x T x hd
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)  # B x H x T x T
        weights = attn.attn_drop((logits if bias is None else logits + bias).softmax(dim=-1))  # B x H x T x T
        out = weights @ v  # B x H x T x hd
    out = attn.norm(out.transpose(1, 2).reshape(batch, tokens, heads * head_dim))  # B x T x Da
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()  # B x T x Da
    return attn.proj_drop(attn.proj(out)), k.mean(dim=1)  # B x T x D, B x T x hd


def tome_block(block: nn.Module, x: torch.Tensor, size: torch.Tensor | None, r: int,
               source: torch.Tensor | None = None, prop_attn: bool = True):
    """A timm Block with ToMe between attention and MLP: (x B x T x D, size B x T x 1 or None for all ones, source
    B x (1 + N) long or None) -> (x B x (T - r) x D, size, source). With r = 0 and no merged token it equals
    `block(x)`."""
    attn = _timm_block_parts(block)
    out, metric = tome_attention(attn, block.norm1(x), size if prop_attn else None)  # B x T x D, B x T x hd
    x = x + block.drop_path1(block.ls1(out))  # B x T x D
    if r > 0:
        merge = bipartite_soft_matching(metric, r)
        x, size = merge.weighted_mean(x, x.new_ones(*x.shape[:2], 1) if size is None else size)  # B x (T-r) x D
        source = None if source is None else merge.move(source)  # B x (1+N)
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))  # B x (T-r) x D
    return x, size, source


# ----------------------------------------------------------------------------------------------------------
# The run


class ToMeResult(NamedTuple):
    tokens: torch.Tensor  # B x (1 + N - sum(schedule)) x D, CLS first
    size: torch.Tensor | None  # B x T_out x 1: patches (and the CLS token) per token; None when nothing merged
    groups: torch.Tensor | None  # B x N long: the final non-CLS token each patch ends in (with source=True)


def entrance_rounds(tokens: int, merges: int) -> list[int]:
    """The bipartite rounds of the entrance merge: `merges` tokens away from `tokens`, each round at its limit
    until the last."""
    rounds = []
    while merges > 0:
        rounds.append(min(merges, bipartite_limit(tokens)))
        if rounds[-1] == 0:
            raise ValueError("the entrance merge would leave no patch token beside the CLS token")
        tokens, merges = tokens - rounds[-1], merges - rounds[-1]
    return rounds


def check_schedule(num_patches: int, schedule: Sequence[int], layers: int) -> None:
    """One line of error unless `schedule` is [entrance merges, r of layer 1, ..., r of layer `layers`] within the
    bipartite limits (the entrance may use several rounds, but must leave a patch token beside the CLS token)."""
    if len(schedule) != layers + 1 or any(not isinstance(r, int) or r < 0 for r in schedule):
        raise ValueError(f"a ToMe schedule is {layers + 1} counts >= 0 (the entrance merge, then r per shortened "
                         f"layer), got {list(schedule)}")
    tokens = 1 + num_patches - schedule[0]
    if tokens < 2:
        raise ValueError(f"the entrance merge leaves {tokens} tokens of {1 + num_patches}; at least 2 (CLS + one)")
    for layer, r in enumerate(schedule[1:], start=1):
        if r > bipartite_limit(tokens):
            raise ValueError(f"shortened layer {layer} sees {tokens} tokens and can merge at most "
                             f"{bipartite_limit(tokens)} (one bipartite round), got r={r}")
        tokens -= r


def run_tome(blocks: Sequence[nn.Module], x: torch.Tensor, schedule: Sequence[int], source: bool = False,
             record: list | None = None, prop_attn: bool = True) -> ToMeResult:
    """The shortened layers with ToMe: x (B x (1 + N) x D, CLS first, the pre-layers' output) through `blocks`.

    `schedule` = [entrance merges, r of blocks[0], ..., r of blocks[-1]] (`merge_schedule`). `source`: also return
    each patch's final group (B x N). `record`: a list that receives (tokens, groups) after each block (B x T_i x D,
    and B x N or None), for intermediates.
    """
    num_patches = x.shape[1] - 1
    check_schedule(num_patches, schedule, len(blocks))
    slots = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1) if source else None  # B x (1+N)
    size = None
    for r in entrance_rounds(x.shape[1], schedule[0]):
        merge = bipartite_soft_matching(blocks[0].norm1(x), r)  # metric: the tokens as blocks[0] reads them
        x, size = merge.weighted_mean(x, x.new_ones(*x.shape[:2], 1) if size is None else size)  # B x T' x D
        slots = None if slots is None else merge.move(slots)  # B x (1+N)
    for block, r in zip(blocks, schedule[1:], strict=True):
        x, size, slots = tome_block(block, x, size, r, slots, prop_attn)  # B x (T-r) x D
        if record is not None:
            record.append((x, None if slots is None else slots[:, 1:] - 1))
    return ToMeResult(x, size, None if slots is None else slots[:, 1:] - 1)  # groups: B x N, CLS (slot 0) dropped


# ----------------------------------------------------------------------------------------------------------
# Cost and schedule


@dataclass(frozen=True)
class BlockCost:
    """Per-image MAC rates of one block, read from its modules."""

    attention_side: int  # MACs per token of the linear maps before the merge: qkv, out-projection (and gate)
    mlp_side: int  # MACs per token of the MLP, after the merge
    attn_dim: int  # heads x head width: QK^T and AV cost 2 x T^2 x attn_dim
    head_dim: int  # width of ToMe's metric (the keys averaged over heads)
    width: int  # token width (the entrance metric)

    @classmethod
    def of(cls, block: nn.Module) -> BlockCost:
        attn = _timm_block_parts(block)
        attention_side, mlp_side = linear_macs_per_token(attn), linear_macs_per_token(block.mlp)
        if attention_side + mlp_side != linear_macs_per_token(block):
            raise ValueError(f"{type(block).__name__} has linear maps outside attn and mlp; ToMe's cost model does "
                             "not place them")
        return cls(attention_side, mlp_side, attention_width(block), attn.head_dim, attn.qkv.in_features)


def matching_macs(tokens: int, width: int) -> int:
    """The similarity product of one bipartite round: ceil(T/2) x floor(T/2) x C."""
    return (tokens + 1) // 2 * (tokens // 2) * width


def tome_layer_tokens(num_patches: int, schedule: Sequence[int]) -> list[int]:
    """The tokens each shortened layer's attention sees (its MLP sees that minus its r)."""
    tokens, seen = 1 + num_patches - schedule[0], []
    for r in schedule[1:]:
        seen.append(tokens)
        tokens -= r
    return seen


def _schedule_macs(costs: Sequence[BlockCost], num_patches: int, schedule: Sequence[int]) -> dict[str, int]:
    tokens, matching = 1 + num_patches, 0
    for r in entrance_rounds(tokens, schedule[0]):
        matching += matching_macs(tokens, costs[0].width)
        tokens -= r
    linear = attention = 0
    for cost, r in zip(costs, schedule[1:], strict=True):
        linear += cost.attention_side * tokens + cost.mlp_side * (tokens - r)
        attention += 2 * cost.attn_dim * tokens * tokens
        matching += matching_macs(tokens, cost.head_dim) if r > 0 else 0
        tokens -= r
    return {"linear": linear, "attention": attention, "matching": matching}


def tome_stage_macs(blocks: Sequence[nn.Module], num_patches: int, schedule: Sequence[int]) -> dict[str, int]:
    """MACs per image of `run_tome(blocks, ..., schedule)`: linear maps, attention (QK^T and AV) and matching
    (the similarity products of the entrance rounds and of each layer with r > 0). Elementwise work (norms,
    softmax, the merge's scatter-add, sorting) is 0 MACs, as in `dtplib.measure.flops`."""
    check_schedule(num_patches, schedule, len(blocks))
    return _schedule_macs([BlockCost.of(block) for block in blocks], num_patches, schedule)


def tome_macs(blocks: Sequence[nn.Module], num_patches: int, schedule: Sequence[int]) -> int:
    """Total of `tome_stage_macs`."""
    return sum(tome_stage_macs(blocks, num_patches, schedule).values())


def dense_macs(blocks: Sequence[nn.Module], tokens: float) -> float:
    """MACs per image of `blocks` on `tokens` tokens each: DTP's shortened layers at 1 + ceil(N / c)."""
    return sum(block_macs(blocks, tokens))


SHAPES = ("constant", "decreasing")  # ToMe's schedules: constant r, and r falling linearly to 0 (its inflect -1)


def shape_weights(shape: str, layers: int) -> list[float]:
    """Relative r per layer, mean 1: all ones ("constant"), or 2 falling linearly to 0 ("decreasing")."""
    if shape == "constant" or layers == 1:
        return [1.0] * layers
    if shape == "decreasing":
        return [2.0 * (layers - 1 - i) / (layers - 1) for i in range(layers)]
    raise ValueError(f"schedule shape must be one of {SHAPES}, got {shape!r}")


def shaped_schedule(rbar: float, weights: Sequence[float]) -> list[int]:
    """r per layer for a mean of `rbar` in the shape `weights`: round(rbar x (w_1 + ... + w_i)) merges after layer
    i, so that a real rbar gives integer counts and the cost can fall between two integer r."""
    done = [math.floor(rbar * cumulative + 0.5) for cumulative in accumulate(weights)]
    return [b - a for a, b in zip([0, *done[:-1]], done, strict=True)]


def _closest(costs: Sequence[BlockCost], num_patches: int, entrance: int, weights: Sequence[float],
             target: float) -> tuple[float, list[int]] | None:
    """(relative error, schedule) of the feasible schedule `[entrance, *shaped_schedule(rbar, weights)]` whose MACs
    come closest to `target`, over every rbar at which a count changes; None if none is feasible. Vectorised over
    those rbar (K of them) in float64, exact for these integer sizes."""
    tokens0, cumulative = 1 + num_patches - entrance, torch.tensor(list(accumulate(weights)), dtype=torch.float64)  # L
    steps = sorted({0.0} | {(k + 0.5) / w for w in cumulative.tolist() if w > 0 for k in range(tokens0)})
    rbar = torch.tensor(steps, dtype=torch.float64)  # K
    done = (rbar[:, None] * cumulative + 0.5).long()  # K x L merges after each layer (floor: all >= 0)
    before = torch.cat([torch.zeros_like(done[:, :1]), done[:, :-1]], dim=1)  # K x L merges before each layer
    tokens, r = tokens0 - before, done - before  # K x L, K x L
    feasible = (r <= (tokens - 1) // 2).all(dim=1) & (tokens0 - done[:, -1] >= 2)  # K
    rate = {name: torch.tensor([getattr(c, name) for c in costs], dtype=torch.float64)
            for name in ("attention_side", "mlp_side", "attn_dim", "head_dim")}  # L each
    tokens, r, pairs = tokens.double(), r.double(), ((tokens + 1) // 2 * (tokens // 2)).double()  # K x L
    macs = (rate["attention_side"] * tokens + rate["mlp_side"] * (tokens - r) + 2 * rate["attn_dim"] * tokens ** 2
            + (r > 0) * pairs * rate["head_dim"]).sum(dim=1)  # K
    macs = macs + _schedule_macs(costs, num_patches, [entrance] + [0] * len(costs))["matching"]
    error = torch.where(feasible, macs / target - 1, torch.inf)  # K
    best = int(error.abs().argmin())
    if not feasible[best]:
        return None
    return float(error[best]), [entrance, *shaped_schedule(steps[best], weights)]


ELEMENTWISE_OPS = (  # ops ToMe adds that do no matrix product (0 MACs, for dtplib.measure.flops' NO_MAC_OPS)
    "aten::linalg_vector_norm", "aten::argsort", "aten::sort", "aten::empty_like", "aten::scatter_",
    "aten::scatter_add",
)
MAX_MAC_ERROR = 0.03  # a ToMe schedule must meet its MAC target this closely


def merge_schedule(blocks: Sequence[nn.Module], num_patches: int, target_macs: float,
                   tolerance: float = 0.01) -> list[int]:
    """The ToMe schedule [entrance, r_1, ..., r_L] whose MACs per image (`tome_macs`) meet `target_macs`.

    Rule: the fewest entrance merges (0 first) for which a schedule comes within `tolerance` of the target,
    trying at each entrance ToMe's constant r before its decreasing schedule (`SHAPES`); within a shape, the mean
    r (real, `shaped_schedule`) that comes closest, every layer within its bipartite limit. So ToMe merges
    gradually through the layers whenever that reaches the budget and merges at the entrance only what it must.
    Raises unless the schedule is within MAX_MAC_ERROR. The target for DTP's budget at compression c is
    `dense_macs(blocks, 1 + ceil(N / c))`.
    """
    costs = [BlockCost.of(block) for block in blocks]
    if target_macs <= 0 or not costs:
        raise ValueError(f"merge_schedule needs shortened blocks and a target > 0, got {len(costs)} blocks, "
                         f"target {target_macs}")
    best = None
    for entrance in range(num_patches):
        for shape in SHAPES:
            found = _closest(costs, num_patches, entrance, shape_weights(shape, len(costs)), target_macs)
            if found is not None and (best is None or abs(found[0]) < abs(best[0])):
                best = found
            if best is not None and abs(best[0]) <= tolerance:
                return best[1]
    if best is None or abs(best[0]) > MAX_MAC_ERROR:
        raise ValueError(f"no ToMe schedule of {len(costs)} layers on {num_patches} patches comes within "
                         f"{MAX_MAC_ERROR:.0%} of {target_macs:.4g} MACs"
                         + ("" if best is None else f" (closest {best[1]}: {best[0]:+.1%})"))
    return best[1]


# ----------------------------------------------------------------------------------------------------------
# The tower's `tome` reduction


class ToMeReduction(nn.Module):
    """`DTPConfig.reduction = "tome"`: the shortened layers merge as they run (`run_tome`), on a schedule fixed when
    the tower is built. Parameter-free (a module only so that it sits where the other reductions' reducers do, with
    their interface: `dtplib.tower.reductions`).

    The schedule meets the MACs of DTP's tower at the same compression: its shortened layers at 1 + ceil(N / c)
    tokens plus `extra_macs`, the MACs of DTP's boundary predictor, which ToMe does not have; so the two towers'
    forward MACs agree, matching included (`merge_schedule`'s rule, within 1%)."""

    runs_blocks = True  # the tower hands it the shortened layers instead of running them itself

    def __init__(self, blocks: Sequence[nn.Module], num_patches: int, tokens: int, extra_macs: int = 0):
        super().__init__()
        self.num_patches = num_patches
        self.schedule = merge_schedule(blocks, num_patches, dense_macs(blocks, 1 + tokens) + extra_macs)
        self.stage_macs = tome_stage_macs(blocks, num_patches, self.schedule)  # linear, attention, matching

    def forward(self, blocks: Sequence[nn.Module], x: torch.Tensor, source: bool = False,
                record: list | None = None) -> ToMeResult:
        """`run_tome` on x (B x (1+N) x D, the pre-layers' output) with this tower's schedule."""
        if x.shape[1] - 1 != self.num_patches:
            raise ValueError(f"the ToMe schedule was fixed for {self.num_patches} patches, got {x.shape[1] - 1} "
                             "(a new input size needs a new tower)")
        return run_tome(blocks, x, self.schedule, source=source, record=record)

    def layer_tokens(self, tokens: int, layers: int) -> list[int]:
        """Tokens (CLS included) each shortened layer's attention sees, from the schedule (the budget `tokens` is
        what the schedule was fixed for)."""
        return tome_layer_tokens(self.num_patches, self.schedule)

    def short_macs(self, blocks: Sequence[nn.Module], tokens: int) -> tuple[int, int]:
        """(linear, attention) MACs per image of the shortened layers as they merge: attention before each merge,
        the MLP after it."""
        return self.stage_macs["linear"], self.stage_macs["attention"]

    def macs(self, num_patches: int, tokens: int, block: nn.Module | None = None) -> int:
        """The reduction's own MACs per image: the matching."""
        return self.stage_macs["matching"]
