"""DTP-ViT: a CLIP image tower that learns where to merge patch tokens.

Dynamic token pooling (Nawrot et al. 2023, "Efficient Transformers with Dynamic Token Pooling",
arXiv:2211.09761) applied to a Vision Transformer:

    patches -> pre-layers (full length) -> boundary predictor -> mean-pool each segment
            -> shortened layers on CLS + segments -> [upsample + residual + post-layers]
            -> pool (CLS or masked mean) -> norm -> projection (the projection lives in open_clip's head)

The tower subclasses timm's VisionTransformer and keeps its parameter names (`blocks.i`, `norm_pre`, `norm`,
`pos_embed`, ...), so CLIP ViT weights map onto the pre-, shortened and post-layers by timm's own converter.

Images in one batch get different numbers of segments. Three executions of the shortened layers give the same
result (`DTPConfig.execution`, `dtplib.tower.packed`): "static" (the default) runs them on the concatenated real tokens
of the batch in a buffer whose size is fixed by the batch's shape, with no value read to the host, so a compiled
forward is one graph; "packed" does the same on exactly the real tokens, planned on the host once per forward;
"padded", the reference, pads every image to the batch's largest count and masks the padding in attention and
pooling. In all three an image's embedding does not depend on its batch-mates in eval.

timm's model contract holds along the merged path: `forward_features` returns the tokens (their validity mask is
`last_keep`, which `forward_head` reads), `forward_intermediates` gives full-length layers at full length and
shortened ones as segment tokens (or, on the patch grid, each patch with its segment's token), and what cannot
follow a per-image token count (TorchScript, torch.fx) raises an error that says so.

Boundary modes (`DTPConfig.boundaries`): "threshold" (Gumbel-Sigmoid > 0.5: a count per image; in training at most
`capacity` x B * ceil(N/c) segments per batch, the highest logits kept), "topk" (exactly ceil(N/c) per image) and
"batch-topk" (exactly B * ceil(N/c) over the batch in training, shared by content; in eval a per-image threshold,
the running quantile of the training logits that batch-topk cut at, as BatchNorm tracks its statistics: so an
embedding never depends on its batch-mates, and the eval count matches the training budget on the training
distribution).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import to_2tuple
from timm.models.vision_transformer import VisionTransformer
from torch.utils.checkpoint import checkpoint

from .boundaries import (
    batch_topk_boundaries,
    boundary_loss,
    cap_boundaries,
    close_last_segment,
    downsample,
    expand_forced,
    membership,
    relaxed,
    sample_boundaries,
    topk_boundaries,
    upsample,
)
from .config import DTPConfig
from .cost import linear_macs_per_token
from .intermediates import Tap, TimmIntermediates
from .order import patch_order
from .packed import (
    Packing,
    StaticPacking,
    block_forward,
    check_block,
    gather_segments,
    pack_static,
    pack_tokens,
    segment_ids,
    segment_index,
    segment_means,
)
from .reductions import build_reducer, trace_fields

THRESHOLD_MOMENTUM = 0.1  # batch-topk: the running eval threshold moves this far to each batch's (BatchNorm's 0.1)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
GLOBAL_POOLS = {"token": "tok", "avg": "avg", "": None}  # timm's global_pool -> DTPConfig.pool ("": no pooling)


def clip_pretrained_cfg(img_size: int | tuple[int, int], num_classes: int = 0) -> dict:
    """timm's pretrained_cfg of a DTP-ViT tower: OpenAI CLIP's preprocessing (bicubic resize of the short side, centre
    crop, CLIP's mean and std) at a fixed input size (the position embedding and the patch grid that the boundary
    predictor learnt on are the built size's), no timm weights (CLIP weights load with `dtplib.load_vit_weights`)."""
    height, width = to_2tuple(img_size)
    return {"input_size": (3, height, width), "fixed_input_size": True, "interpolation": "bicubic", "crop_pct": 1.0,
            "crop_mode": "center", "mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD, "num_classes": num_classes,
            "first_conv": "patch_embed.proj", "classifier": "head", "paper_ids": "arXiv:2211.09761",
            "paper_name": "Efficient Transformers with Dynamic Token Pooling"}


class BoundaryPredictor(nn.Module):
    """MLP giving one boundary logit per patch token (Nawrot: Linear -> GELU -> Linear).

    Two departures from Nawrot, both for a predictor whose eval-time threshold agrees with training:
    a LayerNorm on the input (the residual stream's scale grows with width and depth; normalised, the same
    learning rate works for Ti and B), and an output layer initialised with logits spread over several units
    across patches (std ~3), so decisions start confident instead of all near 0.5.
    """

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, 1)
        nn.init.zeros_(self.fc1.bias)
        nn.init.normal_(self.fc2.weight, std=3.0 / hidden ** 0.5)
        nn.init.zeros_(self.fc2.bias)
        # batch-topk's eval rule: a boundary where the logit exceeds this running quantile of the training logits
        self.register_buffer("threshold", torch.zeros(()))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(tokens)))).squeeze(-1)  # B x N x D -> B x N

    @classmethod
    def macs_per_token(cls, width: int, hidden: int) -> int:
        """MACs per patch of a predictor of these sizes, read from one built on the meta device (no memory)."""
        with torch.device("meta"):
            return linear_macs_per_token(cls(width, hidden))

    def track_threshold(self, logits: torch.Tensor, segments: int) -> None:
        """Move `threshold` towards the batch's clean-logit quantile that batch-topk cuts at: midway between the
        B * (segments - 1) largest logits of the first N - 1 patches and the rest (as BatchNorm tracks its mean)."""
        with torch.no_grad():
            clean = logits.detach()[:, :-1].flatten().float()  # B*(N-1)
            chosen = logits.shape[0] * (segments - 1)
            if chosen == 0:  # nothing chosen: above the largest
                batch_threshold = clean.max() + 1
            elif chosen >= clean.numel():  # everything chosen: below the smallest
                batch_threshold = clean.min() - 1
            else:
                top = clean.topk(chosen + 1).values  # descending
                batch_threshold = (top[-2] + top[-1]) / 2
            self.threshold.lerp_(batch_threshold.to(self.threshold.dtype), THRESHOLD_MOMENTUM)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Checkpoints from before batch-topk have no threshold: theirs is 0, the threshold rule's."""
        if prefix + "fc2.weight" in state_dict:
            state_dict.setdefault(prefix + "threshold", torch.zeros(()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@dataclass
class TraceRecord:
    """What one forward of a DTP tower decided, detached (see `trace`)."""

    boundaries: torch.Tensor  # B x N bool
    segment_ids: torch.Tensor  # B x N long
    probs: torch.Tensor  # B x N
    tokens: torch.Tensor  # B, segments per image
    compression: torch.Tensor  # B, patches / segments
    boundary_loss: torch.Tensor  # scalar
    grid: tuple[int, int] = field(default=(0, 0))  # patch grid (rows, cols)
    patch_order: str = "raster"  # the order the tower read patches in; every field above is at grid positions

    @property
    def budget(self) -> float:
        """The batch's realised compression as a token budget (`token_budget`)."""
        return token_budget(self.boundaries.shape[1], self.tokens)


def token_budget(num_patches: int, segments: torch.Tensor) -> float:
    """Realised compression of a batch: patches / mean segments per image. A token budget, not the mean of the
    per-image ratios (which a few one-segment images would dominate)."""
    return num_patches / segments.double().mean().item()


class DTPVisionTransformer(TimmIntermediates, VisionTransformer):
    """timm VisionTransformer whose blocks are split into pre-, shortened and post-layers.

    `blocks[:pre]` run on all tokens, `blocks[pre:pre+short]` on CLS + segments, `blocks[pre+short:]` on all
    tokens again after upsampling. With compression=1 no predictor is built and the tower is a plain ViT.
    timm's interface (forward_features / forward_head, forward_intermediates, prune_intermediate_layers,
    reset_classifier, set_grad_checkpointing, set_input_size) follows the merged path; see each method.
    """

    def __init__(self, dtp: DTPConfig | dict | None = None, img_size: int | tuple[int, int] = 224,
                 patch_size: int = 16, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 num_classes: int = 0, global_pool: str | None = None, act_layer: str = "gelu", **kwargs):
        dtp = DTPConfig(**dtp) if isinstance(dtp, dict) else (dtp or DTPConfig())
        dtp.validate(depth)
        if any(side % patch_size for side in to_2tuple(img_size)):
            raise ValueError(f"image size {img_size} is not divisible by the patch size {patch_size}")
        if kwargs.get("patch_drop_rate") and dtp.compresses:
            raise ValueError("patch dropout removes patches before the boundary predictor; use compression=1 "
                             "for FLIP-style patch dropout")
        kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-5))  # CLIP's LayerNorm eps, not timm's 1e-6
        super().__init__(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, num_classes=num_classes, global_pool="token", class_token=True,
                         pre_norm=True, act_layer=act_layer, **kwargs)
        self.dtp = dtp
        self.set_pool({"tok": "token", "avg": "avg"}[dtp.pool] if global_pool is None else global_pool)
        hidden = dtp.predictor_hidden or embed_dim
        self.predictor = (BoundaryPredictor(embed_dim, hidden)
                          if dtp.compresses and dtp.forced_boundaries is None and dtp.reduction == "dtp" else None)
        self.default_cfg = self.pretrained_cfg = clip_pretrained_cfg(img_size, num_classes)  # as timm's builder
        self.set_grid()
        predictor_macs = self.num_patches * BoundaryPredictor.macs_per_token(embed_dim, hidden)  # ToMe matches it
        self.reducer = (build_reducer(dtp.reduction, embed_dim, self.topk_segments, self.grid,  # `.reductions`
                                      self.stages[1], predictor_macs)
                        if dtp.compresses and dtp.reduction != "dtp" else None)
        self.forced: torch.Tensor | str | int | None = None  # set by `forced_boundaries`
        self.tracers: list[list[TraceRecord]] = []  # set by `trace`
        self.last_boundary_loss: torch.Tensor | None = None  # read by the training loop
        self.last_segments: torch.Tensor | None = None  # B, segments per image in the last forward (device)
        self.last_dropped: torch.Tensor | None = None  # boundaries the capacity cap dropped in the last forward
        self.last_keep: torch.Tensor | None = None  # B x T validity of the last forward's tokens; None: all real

    def set_grid(self) -> None:
        """The patch grid and what depends on it, from `patch_embed` (at build and after `set_input_size`)."""
        self.grid = tuple(self.patch_embed.grid_size)  # (rows, cols)
        self.num_patches = self.grid[0] * self.grid[1]
        self.topk_segments = math.ceil(self.num_patches / self.dtp.compression)  # the fixed count of `topk`
        self.orders: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}  # (order, inverse)

    def set_input_size(self, img_size: int | tuple[int, int] | None = None, patch_size: int | None = None) -> None:
        """timm's: a new input size (the position embedding resampled); the patch grid, the topk count and the
        patch order follow, and `pretrained_cfg`'s input size. The boundary predictor learnt on the old grid."""
        super().set_input_size(img_size=img_size, patch_size=patch_size)
        self.set_grid()
        self.pretrained_cfg = self.default_cfg = {**self.pretrained_cfg,
                                                  "input_size": (3, *self.patch_embed.img_size)}

    def set_pool(self, global_pool: str) -> None:
        """timm's `global_pool` on DTP's pools: "token" (the CLS token, `DTPConfig.pool` "tok"), "avg" (the masked
        mean over the segments, or the patches when upsampled) or "" (none: `forward` returns the tokens). The pool
        itself is `DTPConfig.pool`, which this sets; `global_pool` "" turns pooling off."""
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {sorted(GLOBAL_POOLS)} (DTP-ViT pools by the CLS token or "
                             f"a masked mean over its segments), got {global_pool!r}")
        if GLOBAL_POOLS[global_pool] is not None:
            self.dtp = replace(self.dtp, pool=GLOBAL_POOLS[global_pool])
        self.global_pool = global_pool

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """timm's: a new head of `num_classes` outputs (0: none) and optionally a new pool (`set_pool`)."""
        if global_pool is not None:
            self.set_pool(global_pool)
        super().reset_classifier(num_classes)

    def __prepare_scriptable__(self):
        """torch.jit.script calls this first: TorchScript cannot compile the merged path."""
        raise TypeError("DTP-ViT cannot be compiled by TorchScript: the segment count, the packing and the boundary "
                        "modes are Python-level decisions per batch; use torch.compile (the static execution "
                        "compiles to one graph)")

    @property
    def pools(self) -> bool:
        """Whether the shortened layers run on segments (compression > 1, learned or forced boundaries)."""
        return self.dtp.compresses

    def reading_order(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(order, inverse) for `dtp.patch_order` on `device`: order[t] is the grid index (raster) of the t-th patch
        read, inverse[p] the reading position of grid patch p; None for raster order (nothing to permute)."""
        if self.dtp.patch_order == "raster":
            return None
        key = (self.dtp.patch_order, device)
        if key not in self.orders:
            order = patch_order(self.dtp.patch_order, *self.grid)
            self.orders[key] = order.to(device), torch.argsort(order).to(device)
        return self.orders[key]

    @property
    def stages(self) -> tuple[nn.Sequential, nn.Sequential, nn.Sequential]:
        pre, short = self.dtp.pre_layers, self.dtp.short_layers
        return self.blocks[:pre], self.blocks[pre:pre + short], self.blocks[pre + short:]

    def run_blocks(self, blocks: nn.Sequential, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                   tap: Tap | None = None, first: int = 0) -> torch.Tensor:
        """`blocks` (numbered from `first` in `self.blocks`) on B x T x D tokens; a `tap` records their outputs and
        stops after its last block."""
        for index, block in enumerate(blocks, first):
            if tap is not None and index > tap.last:
                break
            x = self.call_block(block, x, attn_mask=attn_mask)
            if tap is not None:
                tap.record(index, x)
        return x

    def call_block(self, function, *args, **kwargs):
        """`function(*args, **kwargs)`, recomputed in the backward pass under grad checkpointing."""
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(function, *args, use_reentrant=False, **kwargs)
        return function(*args, **kwargs)

    def check_input(self, x: torch.Tensor) -> None:
        if isinstance(x, torch.fx.Proxy):
            raise TypeError("DTP-ViT cannot be traced by torch.fx (nor by timm's fx feature extraction): how many "
                            "tokens the shortened layers see depends on the image; use forward_intermediates "
                            "(timm's features_only=True does)")
        expected = (3, *self.patch_embed.img_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected images of shape B x {' x '.join(map(str, expected))}, "
                             f"got {tuple(x.shape)}")

    def boundaries_for(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Boundaries (B x N, straight-through), probabilities and the prior loss, from logits or `forced`.

        Two prior terms in training: the binomial prior is applied to the sampled boundaries (Nawrot) *and* to
        the deterministic eval-time boundaries (sigmoid(logit) > 0.5).
        The sampled rate is mean(sigmoid(logit)) while the eval rate is the share of logits > 0; with the first
        term alone a prior-only fit of Ti-4x gave 4.4x in training but 20x in eval. The second term makes the
        token budget that FLOPs are reported at the one that was trained for.

        `topk` and `batch-topk`: the count is exact by construction, so the prior on it would be a constant. The
        prior acts on the deterministic threshold boundaries alone: it keeps about N/c logits above zero, so the
        logits stay centred on the top-k margin, where sigmoid (and with it the straight-through gradient) is not
        saturated.

        The capacity policy (threshold mode, training): where the sampled boundaries would give the batch more
        than `segment_capacity` segments, only the highest noisy logits keep theirs (`cap_boundaries`; the count
        dropped is `last_dropped`). The prior sees the boundaries before the cap, so it still pulls an
        over-budget rate down.
        """
        per_image = self.dtp.prior_scope == "image"
        deterministic, probs = sample_boundaries(logits, self.dtp.temperature, training=False)
        deterministic = close_last_segment(deterministic)
        self.last_dropped = logits.new_zeros(())
        if self.forced is not None:
            boundaries = self.fixed_boundaries(logits.shape, logits.device, logits.dtype)
            return boundaries, probs, boundary_loss(boundaries, self.dtp.prior, per_image)
        if self.dtp.boundaries in ("topk", "batch-topk"):
            if self.dtp.boundaries == "topk":
                boundaries, _ = topk_boundaries(logits, self.topk_segments, self.dtp.temperature, self.training)
            elif self.training:
                boundaries = batch_topk_boundaries(logits, self.topk_segments, self.dtp.temperature)
                self.predictor.track_threshold(logits, self.topk_segments)
            else:  # per image: the running threshold, so an embedding never depends on its batch-mates
                boundaries, _ = sample_boundaries(logits - self.predictor.threshold, self.dtp.temperature, False)
            return close_last_segment(boundaries), probs, boundary_loss(deterministic, self.dtp.prior, per_image)
        if not self.training:
            return deterministic, probs, boundary_loss(deterministic, self.dtp.prior, per_image)
        noisy, soft = relaxed(logits, self.dtp.temperature, training=True)
        sampled = close_last_segment((soft > 0.5).to(logits.dtype) + (soft - soft.detach()))  # B x N
        loss = boundary_loss(sampled, self.dtp.prior, per_image) + boundary_loss(deterministic, self.dtp.prior,
                                                                                 per_image)
        boundaries, self.last_dropped = cap_boundaries(sampled, noisy, self.segment_capacity(logits.shape[0]))
        return boundaries, probs, loss

    def segment_capacity(self, batch: int) -> int:
        """The most segments a batch of `batch` images can hold in this mode (a Python int: it sizes the static
        buffer). Training with predicted boundaries: the threshold rule's cap, `capacity` x B * ceil(N/c), or
        exactly B * ceil(N/c) for batch-topk. Eval and forced boundaries: every patch (B * N), so the cap never
        binds and an image's embedding does not depend on its batch-mates."""
        every_patch = batch * self.num_patches
        if not self.training or self.forced is not None or self.predictor is None:
            return every_patch
        if self.dtp.boundaries != "threshold":
            return batch * self.topk_segments
        if not self.dtp.capacity:
            return every_patch
        return min(every_patch, max(batch, math.ceil(self.dtp.capacity * batch * self.topk_segments)))

    def fixed_boundaries(self, shape: torch.Size, device, dtype) -> torch.Tensor:
        """B x N boundaries in reading order from `forced` (a B x N tensor is given at grid positions) or, without
        it, from `dtp.forced_boundaries`; the last patch closes a segment."""
        forced = self.forced if self.forced is not None else self.dtp.forced_boundaries
        boundaries = expand_forced(forced, shape, device, dtype)
        order = self.reading_order(device)
        if isinstance(forced, torch.Tensor) and order is not None:
            boundaries = boundaries.index_select(1, order[0])  # grid positions -> reading order
        return close_last_segment(boundaries)

    def static_segments(self) -> int | None:
        """The segment count when every image has the same one (topk, forced "all" or every c patches), else None."""
        forced = self.forced if self.forced is not None else self.dtp.forced_boundaries
        if isinstance(forced, str):
            return self.num_patches
        if isinstance(forced, int):
            return math.ceil(self.num_patches / forced)
        if self.forced is None and self.dtp.boundaries == "topk":
            return self.topk_segments
        return None

    def plans_on_host(self) -> bool:
        """Whether a forward reads the segment counts to the host: a tower that pools with varying counts in the
        host-planned executions (packed reads every count, padded the largest). torch.compile breaks its graph
        there, so it cannot compile with fullgraph; the static execution and equal counts (topk, forced) never do."""
        return (self.pools and self.reducer is None and self.dtp.execution in ("packed", "padded")
                and self.static_segments() is None)

    def forward_pre(self, x: torch.Tensor, tap: Tap | None = None, with_input: bool = False):
        """Images to CLS + patch tokens after the full-length pre-layers: B x 3 x H x W -> B x (1+N) x D;
        `with_input`: and the last pre-layer's input (B x (1+N) x D), whose attention EViT reads."""
        self.check_input(x)
        x = self.patch_embed(x)  # B x N x D
        x = self._pos_embed(x)  # B x (1+N) x D
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        pre = self.stages[0]
        block_input = self.run_blocks(pre[:-1], x, tap=tap)  # B x (1+N) x D
        x = self.run_blocks(pre[-1:], block_input, tap=tap, first=len(pre) - 1)
        return (x, block_input) if with_input else x

    def forward_tokens(self, x: torch.Tensor, tap: Tap | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The tower before its final norm: tokens after the last layer (B x T x D: CLS + segments in reading order,
        or CLS + patches at grid positions when the tower upsamples or does not pool) and, when some are padding,
        their validity mask (B x T; also kept as `last_keep`). `forward` pools these; a `tap` records block outputs
        (`forward_intermediates`)."""
        if self.reducer is not None:
            return self.forward_reduced(x, tap)
        x = self.forward_pre(x, tap)  # B x (1+N) x D
        if not self.pools:
            x = self.run_blocks(self.stages[1], x, tap=tap, first=self.dtp.pre_layers)
            self.record_plain(x)
            self.last_keep = None
            return x, None
        if tap is not None and tap.stops_before(self.dtp.pre_layers):
            self.last_keep = None
            return x, None
        order = self.reading_order(x.device)
        if order is not None:  # read the patches along the curve; later layers are permutation-equivariant
            x = torch.cat([x[:, :1], x[:, 1:].index_select(1, order[0])], dim=1)  # B x (1+N) x D, reading order

        patches = x[:, 1:]  # B x N x D
        if self.predictor is None:  # forced_boundaries: uniform pooling, no predictor and no prior
            boundaries = self.fixed_boundaries(patches.shape[:2], patches.device, patches.dtype)
            probs, self.last_boundary_loss = boundaries, patches.new_zeros(())
        else:
            boundaries, probs, self.last_boundary_loss = self.boundaries_for(self.predictor(patches))  # B x N
        self.last_segments = boundaries.detach().sum(-1)  # B, read by the training loop every few steps
        self.record(boundaries, probs)
        if tap is not None:
            tap.segment_of = segment_ids(boundaries.detach().nan_to_num(1.0)).long()  # B x N, reading order
        x, self.last_keep = self.forward_merged(x, boundaries, tap)
        return x, self.last_keep

    def forward_reduced(self, x: torch.Tensor, tap: Tap | None = None) -> tuple[torch.Tensor, None]:
        """A reduction of the field (`DTPConfig.reduction`, `dtplib.tower.reductions`): images -> pre-layers ->
        the reducer's CLS + K tokens (K = `topk_segments`, every image) -> the shortened layers, dense, no mask."""
        x, block_input = self.forward_pre(x, tap, with_input=True)  # B x (1+N) x D each
        self.last_keep, self.last_dropped = None, x.new_zeros(())
        if tap is not None and tap.stops_before(self.dtp.pre_layers):
            return x, None
        self.last_boundary_loss = x.new_zeros(())
        self.last_segments = x.new_full((x.shape[0],), float(self.topk_segments))  # B: the budget (ToMe: its MACs')
        if self.reducer.runs_blocks:
            return self.forward_tome(x, tap), None
        last = self.stages[0][-1] if self.dtp.pre_layers else None
        short, groups, scores = self.reducer(x, self.topk_segments, self.grid, block_input, last)  # B x (1+K) x D
        self.record_groups(groups, scores)
        if tap is not None:  # a dropped patch (-1) reads the zero row after the tokens
            tap.segment_of = groups.where(groups >= 0, self.topk_segments)  # B x N
        return self.run_blocks(self.stages[1], short, tap=tap, first=self.dtp.pre_layers), None

    def forward_tome(self, x: torch.Tensor, tap: Tap | None = None) -> torch.Tensor:
        """ToMe (`dtplib.tower.tome`): the shortened layers merge tokens as they run; x: B x (1+N) x D after the
        pre-layers -> B x T_out x D. A tap records each layer's tokens and each patch's token in that layer."""
        layers = [] if tap is not None else None
        result = self.reducer(self.stages[1], x, source=bool(self.tracers) or tap is not None, record=layers)
        if self.tracers:
            self.record_groups(result.groups, torch.ones_like(result.groups, dtype=x.dtype), result.tokens.shape[1] - 1)
        for index, (tokens, groups) in enumerate(layers or [], self.dtp.pre_layers):
            tap.record(index, tokens)
            tap.segment_of_layer[index] = groups  # B x N
        return result.tokens

    def short_layer_tokens(self) -> list[int] | None:
        """Tokens (CLS included) per shortened layer, every image, with a reducer (for `dtplib.measure.flops`; ToMe:
        what each layer's attention sees); None for DTP, whose count is per image."""
        return None if self.reducer is None else self.reducer.layer_tokens(self.topk_segments, len(self.stages[1]))

    def reduction_macs(self) -> int:
        """The reducer's own multiply-accumulates per image (0 without one)."""
        last = self.stages[0][-1] if self.dtp.pre_layers else None
        return 0 if self.reducer is None else self.reducer.macs(self.num_patches, self.topk_segments, last)

    def forward_merged(self, x: torch.Tensor, boundaries: torch.Tensor,
                       tap: Tap | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The shortened (and post-) layers in the execution that fits (`DTPConfig.execution`); x: B x (1+N) x D
        after the pre-layers, in reading order; boundaries B x N."""
        static = self.static_segments()
        if static is not None:
            return self.forward_equal_counts(x, boundaries, static, tap)
        if self.dtp.execution == "static" and (self.training or torch.compiler.is_compiling()):
            return self.forward_static(x, boundaries, tap)
        if self.dtp.execution in ("static", "packed"):  # eager eval: exactly the real tokens (see forward_static)
            return self.forward_packed(x, boundaries, tap)
        return self.forward_padded(x, boundaries, tap)

    def upsampled_input(self, cls_token: torch.Tensor, upsampled: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The post-layers' input: CLS + each patch's segment token (B x N x D, reading order) + the pre-layers'
        output x (the residual), put back at grid positions (the blocks are permutation-equivariant)."""
        full = torch.cat([cls_token, upsampled], dim=1) + x  # B x (1+N) x D, reading order
        order = self.reading_order(x.device)
        if order is None:
            return full
        return torch.cat([full[:, :1], full[:, 1:].index_select(1, order[1])], dim=1)  # grid positions

    def forward_padded(self, x: torch.Tensor, boundaries: torch.Tensor,
                       tap: Tap | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The reference execution: every image padded to the batch's largest segment count, the padding masked in
        attention (and in pooling, by the returned mask). x: B x (1+N) x D after the pre-layers; boundaries B x N."""
        _, short_blocks, post_blocks = self.stages
        pre, post = self.dtp.pre_layers, self.dtp.pre_layers + self.dtp.short_layers
        cls_token, patches = x[:, :1], x[:, 1:]  # B x 1 x D, B x N x D
        num_segments = int(boundaries.detach().nan_to_num(1.0).sum(-1).max())  # NaN weights: a NaN loss, no crash
        weights = membership(boundaries, num_segments)  # B x N x S
        segments, valid = downsample(patches, weights)  # B x S x D, B x S
        keep = torch.cat([valid.new_ones(valid.shape[0], 1), valid], dim=1)  # B x (1+S)
        short = torch.cat([cls_token, segments], dim=1)  # B x (1+S) x D
        if tap is not None:
            tap.keep = keep
        short = self.run_blocks(short_blocks, short, attn_mask=keep[:, None, None, :], tap=tap, first=pre)  # mask
        if not self.dtp.upsample or (tap is not None and tap.stops_before(post)):  # padded keys above
            return short, keep
        upsampled = upsample(short[:, 1:], self.upsampling_weights(weights))  # B x N x D
        return self.run_blocks(post_blocks, self.upsampled_input(short[:, :1], upsampled, x), tap=tap,
                               first=post), None

    def upsampling_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """The membership weights that copy segments back to their patches (B x N x S, or B x N straight-through
        ids on the packed and equal-count paths). Their values are exactly 1 on members either way; the setting
        decides their gradient.

        - "straight-through" (ours so far): d(weight)/d(segment id) = 1, as in downsampling. The loss on every
          upsampled patch n reaches every boundary before n (the segment id is a cumulative sum): a non-local
          gradient that grows with the patch's position in the reading order.
        - "normalised" (Nawrot): each patch gets its segment's output, the weights are constants, and the
          boundaries learn from the downsampling path alone.
        A prior-only fit cannot tell the two apart (the prior never sees the upsampling). The default is
        straight-through, by a measurement: DTP-ViT-Ti-8-64-4x-up on Flickr8k, 3 epochs, 2 seeds
        (experiments/upsampling.toml, results/upsampling/) gave the same held-out loss (normalised minus
        straight-through: +0.001, 95% interval [-0.011, 0.014]) and a realised compression 0.10 further below its
        target of 4 when normalised (3.73 against 3.83, [-0.20, 0.005]). The upsampling path is not small: on three
        of those checkpoints (one batch of 128 Flickr8k photos, three Gumbel draws each) it carried 0.97 to 1.59
        times the norm of the predictor's contrastive gradient from pooling, nearly orthogonal to it (cosine -0.09
        to 0.22 in 7 of 9 draws, +-0.63 in the other two). With no loss to gain from cutting it, the default stays
        the one every existing run used; the question is open again at GPU scale.
        """
        return weights.detach() if self.dtp.upsample_weights == "normalised" else weights

    def forward_equal_counts(self, x: torch.Tensor, boundaries: torch.Tensor, num_segments: int,
                             tap: Tap | None = None) -> tuple[torch.Tensor, None]:
        """Every image has `num_segments` segments (topk, uniform): dense B x (1+S) x D, no padding, no mask, no
        host synchronisation; pooling by the packed path's scatter and gather, whatever the execution."""
        _, short_blocks, post_blocks = self.stages
        batch = x.shape[0]
        offsets = torch.arange(batch, device=x.device) * num_segments  # B
        index, through_ids = segment_index(boundaries, offsets)  # B x N
        segments = segment_means(x[:, 1:], index, through_ids, batch * num_segments)  # B*S x D
        short = torch.cat([x[:, :1], segments.view(batch, num_segments, -1)], dim=1)  # B x (1+S) x D
        pre, post = self.dtp.pre_layers, self.dtp.pre_layers + self.dtp.short_layers
        short = self.run_blocks(short_blocks, short, tap=tap, first=pre)
        if not self.dtp.upsample or (tap is not None and tap.stops_before(post)):
            return short, None
        upsampled = gather_segments(short[:, 1:].flatten(0, 1), index, self.upsampling_weights(through_ids))
        return self.run_blocks(post_blocks, self.upsampled_input(short[:, :1], upsampled, x), tap=tap,
                               first=post), None

    def forward_static(self, x: torch.Tensor, boundaries: torch.Tensor,
                       tap: Tap | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The shortened layers on the packed real tokens in a buffer of B + `segment_capacity(B)` rows
        (`dtplib.tower.packed.StaticPacking`): no host read, shapes fixed by the batch's shape alone.

        Training, and eval inside torch.compile. In eval nothing caps the count (an embedding must not depend on its
        batch-mates), so a static buffer would have to hold B * (N + 1) rows and the shortened layers would cost
        what the plain ViT's do; eager eval therefore takes the host-planned packed path, exactly the real tokens
        (the same values), and only a compiled eval keeps the full buffer, to stay one graph."""
        batch = x.shape[0]
        closing_only = F.pad(boundaries.new_zeros(batch, self.num_patches - 1), (0, 1), value=1.0)  # B x N
        boundaries = torch.where(boundaries.isfinite(), boundaries, closing_only)  # NaN: a NaN loss, no overflow
        lengths = boundaries.detach().sum(-1).long() + 1  # B: CLS + segments, on the device
        packing = StaticPacking.plan(lengths, batch + self.segment_capacity(batch), self.num_patches + 1)
        tokens, index, through_ids = pack_static(x[:, :1], x[:, 1:], boundaries, packing)  # T_cap x D
        return self.run_packed(x, tokens, index, through_ids, packing, tap)

    def forward_packed(self, x: torch.Tensor, boundaries: torch.Tensor,
                       tap: Tap | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The shortened layers on the packed real tokens (`dtplib.tower.packed`); the output as
        `forward_tokens`'s."""
        counts = boundaries.detach().nan_to_num(1.0).sum(-1)  # B
        packing = Packing.plan(counts.long().tolist(), x.device)  # the forward's one host-device synchronisation
        tokens, index, through_ids = pack_tokens(x[:, :1], x[:, 1:], boundaries, packing)  # T x D
        return self.run_packed(x, tokens, index, through_ids, packing, tap)

    def run_packed(self, x: torch.Tensor, tokens: torch.Tensor, index: torch.Tensor, through_ids: torch.Tensor,
                   packing: Packing | StaticPacking,
                   tap: Tap | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The shortened layers on packed rows (either execution's packing), then the output as
        `forward_tokens`'s: without upsampling, B x (1+S) x D and its validity mask for forward_head; with it,
        each patch gathers its segment's row and the full-length post blocks run with the residual."""
        _, short_blocks, post_blocks = self.stages
        pre, post = self.dtp.pre_layers, self.dtp.pre_layers + self.dtp.short_layers
        for block_index, block in enumerate(short_blocks, pre):
            if tap is not None and block_index > tap.last:
                break
            check_block(block)
            tokens = self.call_block(block_forward, block, tokens, packing)
            if tap is not None and block_index in tap.take:
                unpacked, tap.keep = packing.unpack(tokens)  # B x L x D (the padding zero), B x L
                tap.record(block_index, unpacked)
        if not self.dtp.upsample or (tap is not None and tap.stops_before(post)):
            return packing.unpack(tokens)
        upsampled = gather_segments(packing.segment_tokens(tokens), index,
                                    self.upsampling_weights(through_ids))  # B x N x D
        cls_out = tokens.index_select(0, packing.starts).unsqueeze(1)  # B x 1 x D
        return self.run_blocks(post_blocks, self.upsampled_input(cls_out, upsampled, x), tap=tap, first=post), None

    def final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        """The final norm where timm puts it for the pool: on every token for "tok" (timm's `norm`; the same CLS
        token as norming after pooling), after pooling for "avg" (timm's `fc_norm`: `forward_head` applies it)."""
        return self.norm(tokens) if self.dtp.pool == "tok" else tokens

    def pool_tokens(self, tokens: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """B x T x D -> B x D: the CLS token, or the mean over the real non-CLS tokens (`keep`: B x T, None = all)."""
        if self.dtp.pool == "tok":
            return tokens[:, 0]  # B x D
        rest = tokens[:, 1:]  # B x (T-1) x D
        mask = keep[:, 1:] if keep is not None else rest.new_ones(rest.shape[:2], dtype=torch.bool)
        mask = mask.unsqueeze(-1).to(rest.dtype)  # B x (T-1) x 1
        return (rest * mask).sum(1) / mask.sum(1).clamp(min=1)  # B x D

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """timm's: images to unpooled tokens after the final norm (`final_norm`), B x T x D: CLS + segments in
        reading order (T = 1 + the batch's largest count, or N + 1 in the static execution, padding included), or
        CLS + patches at grid positions when the tower upsamples or does not pool. `last_keep` (B x T, or None when
        every token is real) marks the real ones; `forward_head` reads it."""
        tokens, _ = self.forward_tokens(x)
        return self.final_norm(tokens)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, keep: torch.Tensor | None = None):
        """timm's: `forward_features`' tokens to the output: pool (CLS or the masked mean; none when `global_pool`
        is ""), the norm for "avg", then the head (Identity inside open_clip). The mask of padded tokens is `keep`
        or else `last_keep`, the last forward's."""
        keep = self.last_keep if keep is None else keep
        if self.global_pool and self.dtp.pool == "avg" and keep is not None and keep.shape != x.shape[:2]:
            raise ValueError(f"forward_head got {tuple(x.shape[:2])} tokens, but the validity mask of the last "
                             f"forward is {tuple(keep.shape)}: pass the tokens of the last forward_features call, "
                             "or their mask as keep=")
        if self.global_pool:
            x = self.pool_tokens(x, keep)
        x = x if self.dtp.pool == "tok" else self.norm(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool, then norm (for "tok" the same as timm's norm-then-pool, on one token), then the head."""
        tokens, keep = self.forward_tokens(x)
        if not self.global_pool:
            return self.forward_head(self.final_norm(tokens), keep=keep)
        x = self.norm(self.pool_tokens(tokens, keep))
        x = self.head_drop(x)
        return self.head(x)

    def record(self, boundaries: torch.Tensor, probs: torch.Tensor) -> None:
        if not self.tracers:
            return
        hard = boundaries.detach() > 0.5  # B x N, reading order
        tokens = hard.sum(-1)  # B
        ids, probs = segment_ids(hard.long()), probs.detach()
        order = self.reading_order(hard.device)
        if order is not None:  # report every patch at its grid position (raster index)
            hard, ids, probs = (t.index_select(1, order[1]) for t in (hard, ids, probs))
        rec = TraceRecord(boundaries=hard, segment_ids=ids, probs=probs, tokens=tokens,
                          compression=self.num_patches / tokens.float(),
                          boundary_loss=self.last_boundary_loss.detach(), grid=self.grid,
                          patch_order=self.dtp.patch_order)
        for records in self.tracers:
            records.append(rec)

    def record_groups(self, groups: torch.Tensor, scores: torch.Tensor, tokens: int | None = None) -> None:
        """Trace of a reduction (`dtplib.tower.reductions.trace_fields`): `tokens` per image (default K)."""
        for records in self.tracers:
            records.append(TraceRecord(**trace_fields(groups, scores, tokens or self.topk_segments), grid=self.grid,
                                       boundary_loss=self.last_boundary_loss.detach()))

    def record_plain(self, x: torch.Tensor) -> None:
        """Trace of a tower that does not pool: every patch is its own segment."""
        if not self.tracers:
            return
        ones = torch.ones(x.shape[0], self.num_patches, device=x.device)
        self.last_boundary_loss = ones.new_zeros(())
        self.record(ones, ones)


