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

Boundary modes (`DTPConfig.boundaries`): "threshold" (Gumbel-Sigmoid > 0.5: a count per image; in training at most
`capacity` x B * ceil(N/c) segments per batch, the highest logits kept), "topk" (exactly ceil(N/c) per image) and
"batch-topk" (exactly B * ceil(N/c) over the batch in training, shared by content; in eval a per-image threshold,
the running quantile of the training logits that batch-topk cut at, as BatchNorm tracks its statistics: so an
embedding never depends on its batch-mates, and the eval count matches the training budget on the training
distribution).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
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
from .order import PATCH_ORDERS, patch_order
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

EXECUTIONS = ("static", "packed", "padded")  # DTPConfig.execution
BOUNDARY_MODES = ("threshold", "topk", "batch-topk")  # DTPConfig.boundaries
THRESHOLD_MOMENTUM = 0.1  # batch-topk: the running eval threshold moves this far to each batch's (BatchNorm's 0.1)
UPSAMPLE_WEIGHTS = ("straight-through", "normalised")  # DTPConfig.upsample_weights
# DTPConfig fields that shape the tower's parameters; the others are read at run time and may change on a model
STRUCTURAL_FIELDS = ("compression", "pre_layers", "short_layers", "post_layers", "upsample", "predictor_hidden",
                     "forced_boundaries")
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


PRIOR_SCOPES = ("batch", "image")  # DTPConfig.prior_scope
POOLS = ("tok", "avg")  # DTPConfig.pool


def setting(default, help: str, *, choices: tuple | None = None, type=None):
    """A DTPConfig field that a training run sets: `python -m dtplib.train --<name>` and `TrainConfig.dtp` are made
    from it (one line here adds the flag, its default, its choices and its help). `type`: when the default is None."""
    return field(default=default, metadata={"help": help, "choices": choices, "type": type})


@dataclass
class DTPConfig:
    """Hyper-parameters of dynamic token pooling; the ViT sizes are timm's usual arguments. The fields made with
    `setting` are a training run's flags; the others (the layer split, temperature, predictor width, pool) are the
    arch's (`dtplib.tower.clip.ARCHS`)."""

    compression: float = setting(4.0, "DTP target compression: patches per segment (1 = no pooling); the prior's "
                                 "p is 1/compression", type=float)
    pre_layers: int = 2  # full-length layers before the boundary predictor sees the tokens
    short_layers: int = 10  # layers on CLS + segments: where the savings come from
    post_layers: int = 0  # full-length layers after upsampling; only with upsample=True
    upsample: bool = setting(False, "DTP: upsample to full length (+ a residual from the pre-layers) before the "
                             "post-layers")
    temperature: float = 0.5  # Gumbel-Sigmoid relaxation temperature (Nawrot's default)
    boundary_loss_weight: float = setting(1.0, "weight of the binomial boundary prior in the loss (read by the "
                                          "training step)")
    predictor_hidden: int | None = None  # hidden width of the predictor MLP; None = model width
    pool: str = "tok"  # "tok": CLS token; "avg": masked mean over segments (or patches when upsampled)
    prior_scope: str = setting("batch", "DTP: boundary prior on the batch's count (hits the budget) or on each "
                               "image's (Nawrot)", choices=PRIOR_SCOPES)
    boundaries: str = setting("threshold", "DTP: Gumbel-Sigmoid threshold (a count per image), exactly "
                              "ceil(N / compression) per image (topk), or B * ceil(N / compression) over the batch, "
                              "shared by content (batch-topk; eval: a running logit threshold, per image)",
                              choices=BOUNDARY_MODES)
    execution: str = setting("static", "DTP: shortened layers on the batch's real tokens in a buffer of fixed "
                             "capacity (no host sync; compiles to one graph), on the real tokens planned on the host "
                             "once per forward (packed), or padded to the batch's largest image (padded, the "
                             "reference)", choices=EXECUTIONS)
    capacity: float = setting(1.25, "DTP, threshold boundaries in training: at most this many times the budget "
                              "B * ceil(N / compression) segments per batch (the highest-logit boundaries are kept; "
                              "0 = no cap); sizes the static buffer, and every execution applies it")
    patch_order: str = setting("raster", "DTP: the order patches are read into runs: row by row, or along a Hilbert "
                               "curve (compact segments; with --forced-boundaries 4 on a 2^k grid: 2x2 pooling)",
                               choices=PATCH_ORDERS)
    forced_boundaries: int | None = setting(None, "DTP: a boundary every C patches, always (uniform pooling: no "
                                            "predictor, no prior); implies --compression C", type=int)
    upsample_weights: str = setting("straight-through", "DTP with --upsample: the boundaries get a gradient through "
                                    "upsampling (straight-through, ours) or not (normalised, Nawrot)",
                                    choices=UPSAMPLE_WEIGHTS)

    @classmethod
    def settings(cls) -> list:
        """The fields a training run sets (made with `setting`), in declaration order."""
        return [f for f in fields(cls) if "help" in f.metadata]

    @property
    def compresses(self) -> bool:
        return self.compression > 1

    @property
    def prior(self) -> float:
        return 1.0 / self.compression

    def validate(self, depth: int) -> None:
        """Raise a ValueError that names the first inconsistent hyper-parameter."""
        if not isinstance(self.compression, (int, float)) or not math.isfinite(self.compression) \
                or self.compression < 1:
            raise ValueError(f"compression must be a number >= 1 (1 = no pooling), got {self.compression!r}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.prior_scope not in PRIOR_SCOPES:
            raise ValueError(f"prior_scope must be one of {PRIOR_SCOPES}, got {self.prior_scope!r}")
        if self.boundaries not in BOUNDARY_MODES:
            raise ValueError(f"boundaries must be one of {BOUNDARY_MODES}, got {self.boundaries!r}")
        if self.execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {self.execution!r}")
        if isinstance(self.capacity, bool) or not isinstance(self.capacity, (int, float)) \
                or not math.isfinite(self.capacity) or not (self.capacity == 0 or self.capacity >= 1):
            raise ValueError(f"capacity must be 0 (no cap) or a number >= 1 (the segments a training batch may hold, "
                             f"as a multiple of its budget B * ceil(N / compression)), got {self.capacity!r}")
        if self.upsample_weights not in UPSAMPLE_WEIGHTS:
            raise ValueError(f"upsample_weights must be one of {UPSAMPLE_WEIGHTS}, got {self.upsample_weights!r}")
        if self.patch_order not in PATCH_ORDERS:
            raise ValueError(f"patch_order must be one of {PATCH_ORDERS}, got {self.patch_order!r}")
        forced = self.forced_boundaries
        if forced is not None and (isinstance(forced, bool) or not isinstance(forced, int) or forced < 2
                                   or forced != self.compression):
            raise ValueError(f"forced_boundaries (a boundary every c patches) must be an int c >= 2 equal to the "
                             f"compression, got {self.forced_boundaries!r} with compression {self.compression:g}")
        if not math.isfinite(self.boundary_loss_weight) or self.boundary_loss_weight < 0:
            raise ValueError(f"boundary_loss_weight must be a finite number >= 0, got {self.boundary_loss_weight}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if min(self.pre_layers, self.short_layers, self.post_layers) < 0:
            raise ValueError("pre_layers, short_layers and post_layers must be >= 0, got "
                             f"{self.pre_layers}, {self.short_layers}, {self.post_layers}")
        if self.post_layers and not self.upsample:
            raise ValueError(f"post_layers={self.post_layers} needs upsample=True (post-layers run at full length)")
        if self.pre_layers + self.short_layers + self.post_layers != depth:
            raise ValueError(f"layer split pre_layers + short_layers + post_layers = {self.pre_layers} + "
                             f"{self.short_layers} + {self.post_layers} does not add up to depth={depth}")


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


class DTPVisionTransformer(VisionTransformer):
    """timm VisionTransformer whose blocks are split into pre-, shortened and post-layers.

    `blocks[:pre]` run on all tokens, `blocks[pre:pre+short]` on CLS + segments, `blocks[pre+short:]` on all
    tokens again after upsampling. With compression=1 no predictor is built and the tower is a plain ViT.
    """

    def __init__(self, dtp: DTPConfig | dict | None = None, img_size: int = 224, patch_size: int = 16,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, num_classes: int = 0,
                 act_layer: str = "gelu", **kwargs):
        dtp = DTPConfig(**dtp) if isinstance(dtp, dict) else (dtp or DTPConfig())
        dtp.validate(depth)
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not divisible by the patch size {patch_size}")
        if kwargs.get("patch_drop_rate") and dtp.compresses:
            raise ValueError("patch dropout removes patches before the boundary predictor; use compression=1 "
                             "for FLIP-style patch dropout")
        kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-5))  # CLIP's LayerNorm eps, not timm's 1e-6
        super().__init__(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, num_classes=num_classes, global_pool="token", class_token=True,
                         pre_norm=True, act_layer=act_layer, **kwargs)
        self.dtp = dtp
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.predictor = (BoundaryPredictor(embed_dim, dtp.predictor_hidden or embed_dim)
                          if dtp.compresses and dtp.forced_boundaries is None else None)
        self.default_cfg = self.pretrained_cfg = {  # what timm's builder would attach; open_clip reads it
            "input_size": (3, img_size, img_size), "mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD,
            "num_classes": num_classes, "dtp": asdict(dtp)}
        self.topk_segments = math.ceil(self.num_patches / dtp.compression)  # the fixed count of `topk`
        self.forced: torch.Tensor | str | int | None = None  # set by `forced_boundaries`
        self.tracers: list[list[TraceRecord]] = []  # set by `trace`
        self.last_boundary_loss: torch.Tensor | None = None  # read by the training loop
        self.last_segments: torch.Tensor | None = None  # B, segments per image in the last forward (device)
        self.last_dropped: torch.Tensor | None = None  # boundaries the capacity cap dropped in the last forward
        self.orders: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}  # (order, inverse)

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

    def run_blocks(self, blocks: nn.Sequential, x: torch.Tensor, attn_mask: torch.Tensor | None = None):
        for block in blocks:
            x = self.call_block(block, x, attn_mask=attn_mask)
        return x

    def call_block(self, function, *args, **kwargs):
        """`function(*args, **kwargs)`, recomputed in the backward pass under grad checkpointing."""
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(function, *args, use_reentrant=False, **kwargs)
        return function(*args, **kwargs)

    def check_input(self, x: torch.Tensor) -> None:
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
        return self.pools and self.dtp.execution in ("packed", "padded") and self.static_segments() is None

    def forward_pre(self, x: torch.Tensor) -> torch.Tensor:
        """Images to CLS + patch tokens after the full-length pre-layers: B x 3 x H x W -> B x (1+N) x D."""
        self.check_input(x)
        x = self.patch_embed(x)  # B x N x D
        x = self._pos_embed(x)  # B x (1+N) x D
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        return self.run_blocks(self.stages[0], x)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens after the last layer (B x T x D) and, when they are segments, their validity mask (B x T)."""
        x = self.forward_pre(x)  # B x (1+N) x D
        if not self.pools:
            x = self.run_blocks(self.stages[1], x)
            self.record_plain(x)
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
        static = self.static_segments()
        if static is not None:
            return self.forward_equal_counts(x, boundaries, static)
        if self.dtp.execution == "static" and (self.training or torch.compiler.is_compiling()):
            return self.forward_static(x, boundaries)
        if self.dtp.execution in ("static", "packed"):  # eager eval: exactly the real tokens (see forward_static)
            return self.forward_packed(x, boundaries)
        return self.forward_padded(x, boundaries)

    def forward_padded(self, x: torch.Tensor, boundaries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The reference execution: every image padded to the batch's largest segment count, the padding masked in
        attention (and in pooling, by the returned mask). x: B x (1+N) x D after the pre-layers; boundaries B x N."""
        _, short_blocks, post_blocks = self.stages
        cls_token, patches = x[:, :1], x[:, 1:]  # B x 1 x D, B x N x D
        num_segments = int(boundaries.detach().nan_to_num(1.0).sum(-1).max())  # NaN weights: a NaN loss, no crash
        weights = membership(boundaries, num_segments)  # B x N x S
        segments, valid = downsample(patches, weights)  # B x S x D, B x S
        keep = torch.cat([valid.new_ones(valid.shape[0], 1), valid], dim=1)  # B x (1+S)
        short = torch.cat([cls_token, segments], dim=1)  # B x (1+S) x D
        short = self.run_blocks(short_blocks, short, attn_mask=keep[:, None, None, :])  # mask padded keys
        if not self.dtp.upsample:
            return short, keep
        upsampled = upsample(short[:, 1:], self.upsampling_weights(weights))  # B x N x D
        full = torch.cat([short[:, :1], upsampled], dim=1) + x  # B x (1+N) x D, residual
        return self.run_blocks(post_blocks, full), None

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

    def forward_equal_counts(self, x: torch.Tensor, boundaries: torch.Tensor,
                             num_segments: int) -> tuple[torch.Tensor, None]:
        """Every image has `num_segments` segments (topk, uniform): dense B x (1+S) x D, no padding, no mask, no
        host synchronisation; pooling by the packed path's scatter and gather, whatever the execution."""
        _, short_blocks, post_blocks = self.stages
        batch = x.shape[0]
        offsets = torch.arange(batch, device=x.device) * num_segments  # B
        index, through_ids = segment_index(boundaries, offsets)  # B x N
        segments = segment_means(x[:, 1:], index, through_ids, batch * num_segments)  # B*S x D
        short = torch.cat([x[:, :1], segments.view(batch, num_segments, -1)], dim=1)  # B x (1+S) x D
        short = self.run_blocks(short_blocks, short)
        if not self.dtp.upsample:
            return short, None
        upsampled = gather_segments(short[:, 1:].flatten(0, 1), index, self.upsampling_weights(through_ids))
        return self.run_blocks(post_blocks, torch.cat([short[:, :1], upsampled], dim=1) + x), None

    def forward_static(self, x: torch.Tensor, boundaries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
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
        return self.run_packed(x, tokens, index, through_ids, packing)

    def forward_packed(self, x: torch.Tensor, boundaries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The shortened layers on the packed real tokens (`dtplib.tower.packed`); the output as
        `forward_features`'s."""
        counts = boundaries.detach().nan_to_num(1.0).sum(-1)  # B
        packing = Packing.plan(counts.long().tolist(), x.device)  # the forward's one host-device synchronisation
        tokens, index, through_ids = pack_tokens(x[:, :1], x[:, 1:], boundaries, packing)  # T x D
        return self.run_packed(x, tokens, index, through_ids, packing)

    def run_packed(self, x: torch.Tensor, tokens: torch.Tensor, index: torch.Tensor, through_ids: torch.Tensor,
                   packing: Packing | StaticPacking) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The shortened layers on packed rows (either execution's packing), then the output as
        `forward_features`'s: without upsampling, B x (1+S) x D and its validity mask for forward_head; with it,
        each patch gathers its segment's row and the full-length post blocks run with the residual."""
        _, short_blocks, post_blocks = self.stages
        for block in short_blocks:
            check_block(block)
            tokens = self.call_block(block_forward, block, tokens, packing)
        if not self.dtp.upsample:
            return packing.unpack(tokens)
        upsampled = gather_segments(packing.segment_tokens(tokens), index,
                                    self.upsampling_weights(through_ids))  # B x N x D
        cls_out = tokens.index_select(0, packing.starts).unsqueeze(1)  # B x 1 x D
        full = torch.cat([cls_out, upsampled], dim=1) + x  # B x (1+N) x D, residual
        return self.run_blocks(post_blocks, full), None

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, keep: torch.Tensor | None = None):
        """Pool (CLS or masked mean over real tokens), then norm, then the head (Identity inside open_clip)."""
        if self.dtp.pool == "tok":
            x = x[:, 0]  # B x D
        else:
            tokens = x[:, 1:]  # B x T x D
            mask = (keep[:, 1:] if keep is not None else x.new_ones(tokens.shape[:2], dtype=torch.bool))
            mask = mask.unsqueeze(-1).to(tokens.dtype)  # B x T x 1
            x = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1)  # B x D
        x = self.norm(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, keep = self.forward_features(x)
        return self.forward_head(x, keep=keep)

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

    def record_plain(self, x: torch.Tensor) -> None:
        """Trace of a tower that does not pool: every patch is its own segment."""
        if not self.tracers:
            return
        ones = torch.ones(x.shape[0], self.num_patches, device=x.device)
        self.last_boundary_loss = ones.new_zeros(())
        self.record(ones, ones)


