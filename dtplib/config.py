"""`TrainConfig`: every flag of `python -m dtplib.train`, its default and its meaning, in one dataclass.

The command line is generated from it (`TrainConfig.parser()`), checkpoints and params.json store it as a plain
dict (`to_dict()`), and every reader rebuilds it with `TrainConfig.from_dict`, which gives the fields an older
checkpoint lacks what that run used (their defaults, or `LEGACY_DEFAULTS` where a default changed) and ignores
keys that are not flags (params.json's provenance columns). Flag names follow open_clip_train where the meaning is
the same; DTP's own flags are in the "model" group.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields

from .utils import REPO_ROOT

PRECISIONS = ("fp32", "amp", "bf16", "amp_bf16", "amp_bfloat16")  # bf16 = bf16 autocast, as open_clip's amp_bf16
ADAMW_IMPLS = ("fused", "torch")
# what a stored config (params.json, a checkpoint's) that lacks a field was trained with, where that is not the
# field's default: runs before --adamw-impl existed used torch's own AdamW
# used torch's own AdamW; runs before the static execution and its capacity cap ran packed, with no cap
LEGACY_DEFAULTS = {"adamw_impl": "torch", "execution": "packed", "capacity": 0.0}


def flag(default, help: str, group: str, *, type=None, choices: Sequence | None = None, required: bool = False):
    """A TrainConfig field: its default, one line of meaning, its argparse group; `type` when the default is None."""
    return field(default=default, metadata={"help": help, "group": group, "type": type, "choices": choices,
                                            "required": required})


@dataclass
class TrainConfig:
    """The training run's settings; `python -m dtplib.train --help` lists the same fields as flags."""

    # data
    train_data: str | None = flag(None, "webdataset shards, brace notation: dir/{000000..000009}.tar", "data",
                                  type=str, required=True)
    train_num_samples: int | None = flag(None, "epoch size; default: sizes.json by the shards", "data", type=int)
    dataset_resampled: bool = flag(False, "draw shards with replacement (open_clip)", "data")
    val_data: str | None = flag(None, "caption shards for image-text retrieval R@1/5/10", "data", type=str)
    zeroshot_data: str | None = flag(None, "ImageFolder for zero-shot top-1/5 (e.g. CIFAR-10 layout)", "data",
                                     type=str)
    imagenet_val: str | None = flag(None, "ImageNet validation folder (wnid sub-folders)", "data", type=str)
    zeroshot_max_per_class: int | None = flag(None, "first n images per class (CPU runs)", "data", type=int)
    val_max_images: int | None = flag(None, "first n images of --val-data", "data", type=int)
    workers: int = flag(1, "dataloader workers per process", "data")

    # model
    model: str = flag("ViT-B-32", "with --compression: an arch of dtplib.ARCHS; a registered DTP-ViT-* name; or "
                      "any open_clip model (the peer, trained by the same loop)", "model")
    compression: float | None = flag(None, "DTP target compression (1 = no pooling)", "model", type=float)
    upsample: bool = flag(False, "DTP: upsample to full length before the post-layers", "model")
    boundary_loss_weight: float = flag(1.0, "weight of the binomial boundary prior (stored in the tower's "
                                       "DTPConfig, which the training step reads)", "model")
    prior_scope: str = flag("batch", "DTP: boundary prior on the batch's count (hits the budget) or on each "
                            "image's (Nawrot)", "model", choices=("batch", "image"))
    boundaries: str = flag("threshold", "DTP: Gumbel-Sigmoid threshold (a count per image), exactly "
                           "ceil(N / compression) per image (topk), or B * ceil(N / compression) over the batch, "
                           "shared by content (batch-topk)", "model", choices=("threshold", "topk", "batch-topk"))
    execution: str = flag("static", "DTP: shortened layers on the batch's real tokens in a buffer of fixed capacity "
                          "(no host sync; compiles to one graph), on the real tokens planned on the host once per "
                          "forward (packed), or padded to the batch's largest image (padded, the reference)",
                          "model", choices=("static", "packed", "padded"))
    capacity: float = flag(1.25, "DTP, threshold boundaries in training: at most this many times the budget "
                           "B * ceil(N / compression) segments per batch (the highest-logit boundaries are kept); "
                           "0 = no cap", "model")
    forced_boundaries: int | None = flag(None, "DTP: a boundary every C patches, always (uniform pooling: no "
                                         "predictor, no prior); implies --compression C", "model", type=int)
    patch_order: str = flag("raster", "DTP: the order patches are read into runs: row by row, or along a Hilbert "
                            "curve (compact segments; with --forced-boundaries 4 on a 2^k grid: 2x2 pooling)",
                            "model", choices=("raster", "hilbert"))
    upsample_weights: str = flag("straight-through", "DTP with --upsample: the boundaries get a gradient through "
                                 "upsampling (straight-through) or not (normalised, Nawrot)", "model",
                                 choices=("straight-through", "normalised"))
    force_patch_dropout: float | None = flag(None, "open_clip patch dropout (FLIP peer)", "model", type=float)
    grad_checkpointing: bool = flag(False, "recompute the blocks' activations in the backward pass", "model")
    torchcompile: bool = flag(False, "torch.compile the model: static shapes, one graph (fullgraph) where the "
                              "model allows it; the first steps compile", "model")

    # optimisation
    batch_size: int = flag(64, "per process", "optimisation")
    epochs: int = flag(32, "passes over --train-num-samples", "optimisation")
    lr: float = flag(5.0e-4, "peak learning rate (AdamW)", "optimisation")
    wd: float = flag(0.2, "weight decay (not on gains, biases and logit_scale)", "optimisation")
    beta1: float = flag(0.9, "AdamW beta1", "optimisation")
    beta2: float = flag(0.98, "AdamW beta2", "optimisation")
    eps: float = flag(1.0e-6, "AdamW epsilon", "optimisation")
    adamw_impl: str = flag("fused", "AdamW kernel: one fused kernel over all parameters (CPU and CUDA), or torch's "
                           "own choice (foreach on CUDA, a loop over the parameters on a CPU)", "optimisation",
                           choices=ADAMW_IMPLS)
    warmup: int = flag(10000, "linear lr warm-up steps", "optimisation")
    lr_scheduler: str = flag("cosine", "after warm-up: cosine decay to 0, or constant", "optimisation",
                             choices=("cosine", "const"))
    grad_clip_norm: float | None = flag(None, "clip the gradients' global norm to this", "optimisation", type=float)
    precision: str = flag("fp32", "amp = fp16 autocast + GradScaler", "optimisation", choices=PRECISIONS)
    local_loss: bool = flag(False, "ClipLoss: logits of local features vs all (DDP)", "optimisation")
    gather_with_grad: bool = flag(False, "ClipLoss: all-gather with gradient (DDP)", "optimisation")
    seed: int = flag(0, "seeds torch, numpy and random (plus the process's rank)", "optimisation")

    # run
    logs: str = flag(str(REPO_ROOT / "logs"), "runs go to <logs>/<name>/", "run")
    name: str | None = flag(None, "default: date-model-compression-batch-seed", "run", type=str)
    resume: str | None = flag(None, "'latest' (of this --name; starts fresh if none) or a checkpoint", "run",
                              type=str)
    save_frequency: int = flag(1, "write epoch_<n>.pt every n epochs", "run")
    zeroshot_frequency: int = flag(1, "evaluate every n epochs (0: never)", "run")
    val_frequency: int = flag(1, "retrieval on --val-data every n epochs (0: never)", "run")
    log_every_n_steps: int = flag(100, "steps between reads of the logged values from the device (the loop's only "
                                  "synchronisation): steps.csv rows, out.log lines, TensorBoard", "run")
    timing_warmup: int = flag(5, "first steps of the run timed apart", "run")
    report_to: str = flag("tensorboard", "where scalars go besides the CSV files", "run",
                          choices=("tensorboard", "none"))
    device: str | None = flag(None, "default: cuda if available, else cpu", "run", type=str)
    dist_backend: str | None = flag(None, "default: nccl on cuda, gloo on cpu", "run", type=str)
    threads: int | None = flag(None, "CPU intra-op threads (torch.set_num_threads)", "run", type=int)
    max_steps: int | None = flag(None, "stop after this many steps in total (smoke runs)", "run", type=int)

    @classmethod
    def parser(cls, prog: str = "python -m dtplib.train", description: str = "") -> argparse.ArgumentParser:
        """The argparse parser of these fields: `--train-data` for `train_data`, store_true for booleans."""
        parser = argparse.ArgumentParser(prog=prog, description=description,
                                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        groups: dict[str, argparse._ArgumentGroup] = {}
        for f in fields(cls):
            meta = f.metadata
            group = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(
                meta["group"]))
            name = "--" + f.name.replace("_", "-")
            if isinstance(f.default, bool):
                group.add_argument(name, action="store_true", help=meta["help"])
                continue
            group.add_argument(name, type=meta["type"] or type(f.default), default=f.default,
                               choices=meta["choices"], required=meta["required"], help=meta["help"])
        return parser

    @classmethod
    def parse(cls, argv: Sequence[str] | None = None, **parser_options) -> TrainConfig:
        return cls(**vars(cls.parser(**parser_options).parse_args(argv)))

    @classmethod
    def from_dict(cls, values: Mapping) -> TrainConfig:
        """A config from a stored dict: missing fields (an older checkpoint) take what such a run used, their
        defaults or `LEGACY_DEFAULTS`; other keys (params.json's name, world size, provenance) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{**LEGACY_DEFAULTS, **{k: v for k, v in values.items() if k in names}})

    @property
    def target_compression(self) -> float | None:
        """--compression, or C of --forced-boundaries C (None: no DTP flag given; a DTP-ViT-* name has its own)."""
        return self.compression if self.compression is not None else self.forced_boundaries

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes) -> TrainConfig:
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"not TrainConfig fields: {sorted(unknown)}")
        return TrainConfig(**{**self.to_dict(), **changes})
