"""`DTPConfig`: the tower's hyper-parameters, their choice lists and their checks, defined once.

A field made with `setting` is a training run's flag: `python -m dtplib.train --<name>`, its default, choices and help
come from here (`dtplib.training.config`), so adding a setting is one line. The other fields (the layer split,
temperature, predictor width, pool) belong to the arch (`dtplib.tower.clip.ARCHS`). `validate` names the first
inconsistent value in one line; the tower calls it when it is built and the training run before it makes a folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from .order import PATCH_ORDERS

EXECUTIONS = ("static", "packed", "padded")  # DTPConfig.execution
BOUNDARY_MODES = ("threshold", "topk", "batch-topk")  # DTPConfig.boundaries
UPSAMPLE_WEIGHTS = ("straight-through", "normalised")  # DTPConfig.upsample_weights
# DTPConfig fields that shape the tower's parameters; the others are read at run time and may change on a model
STRUCTURAL_FIELDS = ("compression", "pre_layers", "short_layers", "post_layers", "upsample", "predictor_hidden",
                     "forced_boundaries", "reduction")
PRIOR_SCOPES = ("batch", "image")  # DTPConfig.prior_scope
POOLS = ("tok", "avg")  # DTPConfig.pool
# DTPConfig.reduction: DTP's learned runs, or a method of the field at the same budget (`dtplib.tower.reductions`)
REDUCTIONS = ("dtp", "tome", "evit", "tokenlearner", "kmeans", "prune")


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
    reduction: str = setting("dtp", "how the shortened layers get their CLS + ceil(N / compression) tokens: DTP's "
                             "learned runs, or a method of the field at the same budget (ToMe at equal MACs, EViT, "
                             "TokenLearner, k-means grouping, learned pruning; docs/reductions.md)", choices=REDUCTIONS)

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
        self.validate_reduction()
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

    def validate_reduction(self) -> None:
        """A reduction other than DTP's: no upsampling, forced boundaries or patch order (DTP's own settings)."""
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.reduction == "dtp":
            return
        for name, value, ok in (("upsample", self.upsample, not self.upsample),
                                ("forced_boundaries", self.forced_boundaries, self.forced_boundaries is None),
                                ("patch_order", self.patch_order, self.patch_order == "raster")):
            if not ok:
                raise ValueError(f"{name}={value!r} is DTP's; reduction {self.reduction!r} takes none (no upsampling, "
                                 "no forced boundaries, raster order)")
        if self.reduction == "evit" and self.compresses and self.pre_layers < 1:
            raise ValueError("reduction 'evit' ranks patches by the CLS attention of the last pre-layer: it needs "
                             "pre_layers >= 1")
