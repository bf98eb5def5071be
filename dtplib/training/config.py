"""`TrainConfig`: every flag of `python -m dtplib.train`, its default and its meaning, in one dataclass.

The command line is generated from it (`TrainConfig.parser()`), checkpoints and params.json store it as a plain
dict (`to_dict()`), and every reader rebuilds it with `TrainConfig.from_dict`, which gives the fields an older
checkpoint lacks what that run used (their defaults, or `LEGACY_DEFAULTS` where a default changed) and ignores
keys that are not flags (params.json's provenance columns). Flag names follow open_clip_train where the meaning is
the same; DTP's own flags are in the "model" group.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import open_clip

from ..common.images import open_rgb
from ..common.runtime import check_precision, default_device
from ..data.imagefolder import zeroshot_classes
from ..data.loader import DECODE_ERRORS, IMAGE_KEYS, dataset_size, expand_shards
from ..tower.clip import ARCHS, dtp_name, parse_dtp_name, resolve_model, tower_config
from ..tower.config import DTPConfig

log = logging.getLogger("dtplib.train")

PRECISIONS = ("fp32", "amp", "bf16", "amp_bf16", "amp_bfloat16")  # bf16 = bf16 autocast, as open_clip's amp_bf16
ADAMW_IMPLS = ("fused", "torch")
REPORTERS = ("tensorboard", "wandb")  # --report-to's backends (open_clip_train's names)
# what a stored config (params.json, a checkpoint's) that lacks a field was trained with, where that is not the
# field's default: runs before --adamw-impl existed used torch's own AdamW; runs before the static execution and
# its capacity cap ran packed, with no cap (stored configs before `dtp` was nested keep the tower's flags flat)
LEGACY_DEFAULTS = {"adamw_impl": "torch", "execution": "packed", "capacity": 0.0}
FLOAT_FLAGS = ("force_patch_dropout", "lr", "wd", "beta1", "beta2", "eps", "grad_clip_norm")  # must be finite
DTP_FLAGS = tuple(f.name for f in DTPConfig.settings())  # the tower's flags, from DTPConfig's settings
# the range of each number flag (the tower's own: DTPConfig.validate): (lowest, highest, whether the lowest itself is
# allowed); None where a side has no bound. Checked all together, one line per bad flag, before the run folder exists
RANGES = {
    "train_num_samples": (1, None, True), "zeroshot_max_per_class": (1, None, True),
    "val_max_images": (1, None, True), "workers": (0, None, True),  # --force-image-size: check_image_size
    "batch_size": (1, None, True), "epochs": (1, None, True), "lr": (0, None, False), "wd": (0, None, True),
    "beta1": (0, 1, True), "beta2": (0, 1, True), "eps": (0, None, False), "warmup": (0, None, True),
    "grad_clip_norm": (0, None, False), "seed": (0, 2**32 - 1, True),  # numpy's seeds: 0 .. 2**32 - 1
    "force_patch_dropout": (0, 1, True), "save_frequency": (1, None, True), "zeroshot_frequency": (0, None, True),
    "val_frequency": (0, None, True), "log_every_n_steps": (1, None, True), "timing_warmup": (0, None, True),
    "threads": (1, None, True), "max_steps": (1, None, True),
}
RANGE_UPPER_OPEN = ("beta1", "beta2", "force_patch_dropout")  # below 1, not 1 itself
# flags a resumed run may change (`--resume latest`, or `--resume PATH` into its own folder): they change where and
# how fast a run trains, where it logs and which checkpoints stay, not the weights it trains towards or its
# schedule. Every other flag given differently is refused (`changed_flags`) unless --allow-changed-flags, which
# records the change in params.json's history. --precision and the data and evaluation paths are not here: they
# change the arithmetic, the samples, or what epochs.csv measures.
RESUME_RUNTIME_FLAGS = {
    "workers": "loader processes on this machine", "threads": "CPU threads on this machine",
    "device": "the run may move to another machine", "dist_backend": "the run may move to another machine",
    "logs": "where the run folder is found", "name": "where the run folder is found",
    "resume": "what to continue from", "allow_changed_flags": "this process's consent, not the run's",
    "report_to": "where scalars go besides the CSV files", "wandb_project_name": "where scalars go",
    "log_every_n_steps": "how often values are read and logged", "timing_warmup": "which steps are timed apart",
    "max_steps": "where this process stops; the schedule follows --epochs",
    "save_frequency": "which checkpoints are kept", "save_most_recent": "which checkpoints are kept",
    "delete_previous_checkpoint": "which checkpoints are kept",
    "pretrained": "the weights a run starts from: a resume continues from its own checkpoint instead",
}


class FlagErrors(ValueError):
    """Several bad flags at once: `messages` holds one line per flag (the command line prints each)."""

    def __init__(self, messages: Sequence[str]):
        super().__init__("; ".join(messages))
        self.messages = list(messages)


def _tower_for(model: str, settings: Mapping) -> DTPConfig | None:
    """The DTP tower that --model and the tower's flags (`settings`, the given ones only) describe: the arch's layer
    split with the settings over it, or None for a plain open_clip model. --forced-boundaries C implies
    --compression C. Contradictions (a DTP-ViT-*-4x name with --compression 2) and DTP flags that need a DTP tower
    raise ValueError naming the flags."""
    settings = dict(settings)
    for name, value in settings.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    forced = settings.get("forced_boundaries")
    compression = settings.pop("compression", None)
    if forced is not None:
        if isinstance(forced, bool) or not isinstance(forced, int) or forced < 2:
            raise ValueError(f"--forced-boundaries C needs C >= 2, an integer (a boundary every C patches), got "
                             f"{forced}")
        if compression is not None and compression != forced:
            raise ValueError(f"--forced-boundaries {forced} means compression {forced}, but --compression "
                             f"{compression:g} was given")
        named = parse_dtp_name(model)
        if named is not None and named[1] != forced:
            raise ValueError(f"--model {model} means compression {named[1]:g}, not --forced-boundaries {forced}")
        compression = forced
    if compression is not None and not compression >= 1:
        raise ValueError(f"--compression must be >= 1 (1 = no pooling), got {compression:g}")
    arch, compression, upsample = resolve_model(model, compression, settings.pop("upsample", False))
    if compression is None:
        if forced is not None or settings.get("patch_order", "raster") != "raster":
            raise ValueError("--forced-boundaries and --patch-order need a DTP model (an arch with --compression, or "
                             "a DTP-ViT-* name)")
        return None  # the other tower flags describe a DTP tower that a plain model does not have
    return replace(tower_config(ARCHS[arch], compression, upsample), **settings)


def patch_size_of(model: str) -> int | None:
    """The patch size of --model (an arch of ARCHS, a DTP-ViT-* name or an open_clip ViT); None when its config does
    not say (a timm or hf-hub tower)."""
    arch = parse_dtp_name(model)
    arch = arch[0] if arch is not None else model
    if arch in ARCHS:
        return ARCHS[arch].patch_size
    vision = (open_clip.get_model_config(model) or {}).get("vision_cfg", {})
    size = vision.get("patch_size")
    return size if isinstance(size, int) else None


def check_image_size(size: int, model: str) -> None:
    """--force-image-size: a whole number of pixels > 0 that the patch size divides (every patch whole)."""
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"--force-image-size must be a whole number of pixels > 0, got {size!r}")
    patch = patch_size_of(model)
    if patch is not None and size % patch:
        lower, upper = size // patch * patch, (size // patch + 1) * patch
        raise ValueError(f"--force-image-size {size} is not a multiple of {model}'s patch size {patch} (try "
                         f"{' or '.join(str(s) for s in (lower, upper) if s > 0)})")


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
    # the DTP tower: its flags are DTPConfig's settings (--compression, --boundaries, ...); None: a plain open_clip
    # model, or a DTP tower given by name (DTP-ViT-*) is resolved into one (`_tower_for`)
    dtp: DTPConfig | None = field(default=None, metadata={"group": "model", "nested": DTPConfig})
    force_patch_dropout: float | None = flag(None, "open_clip patch dropout (FLIP peer)", "model", type=float)
    force_image_size: int | None = flag(None, "input size in pixels instead of the model's own (open_clip's; CLIPA's "
                                        "low resolution: 32 on Ti, a quarter of the patches): the position embedding "
                                        "is resampled and the loader and evaluations resize to it", "model", type=int)
    pretrained: str | None = flag(None, "a checkpoint (python -m dtplib.train's, or an open_clip state dict) whose "
                                  "weights start this run, with a new optimizer and schedule (FLIP's and CLIPA's "
                                  "final fine-tune); a position embedding of another grid is resampled; --resume "
                                  "wins over it", "model", type=str)
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
    logs: str = flag("logs", "runs go to <logs>/<name>/ (relative: from the working checkout's root)", "run")
    name: str | None = flag(None, "default: date-model-compression-batch-seed", "run", type=str)
    resume: str | None = flag(None, "'latest' (of this --name; starts fresh if none) or a checkpoint", "run",
                              type=str)
    save_frequency: int = flag(1, "write epoch_<n>.pt every n epochs (and after the last)", "run")
    save_most_recent: bool = flag(False, "also write epoch_latest.pt after every epoch (open_clip_train)", "run")
    delete_previous_checkpoint: bool = flag(False, "delete the older epoch_<n>.pt once a new one is written", "run")
    zeroshot_frequency: int = flag(1, "evaluate every n epochs (0: never)", "run")
    val_frequency: int = flag(1, "retrieval on --val-data every n epochs (0: never)", "run")
    log_every_n_steps: int = flag(100, "steps between reads of the logged values from the device (the loop's only "
                                  "synchronisation): steps.csv rows, 'Train Epoch' lines, TensorBoard, wandb", "run")
    timing_warmup: int = flag(5, "first steps of the run timed apart", "run")
    report_to: str = flag("tensorboard", "where scalars go besides the CSV files: a comma list of tensorboard and "
                          "wandb, 'all' (both) or 'none'", "run")
    wandb_project_name: str = flag("dtp-vit", "wandb project, with --report-to wandb", "run")
    device: str | None = flag(None, "default: cuda if available, else cpu", "run", type=str)
    dist_backend: str | None = flag(None, "default: nccl on cuda, gloo on cpu", "run", type=str)
    threads: int | None = flag(None, "CPU intra-op threads (torch.set_num_threads)", "run", type=int)
    max_steps: int | None = flag(None, "stop after this many steps in total (smoke runs)", "run", type=int)
    allow_changed_flags: bool = flag(False, "with --resume into an existing run: accept flags other than the run's "
                                     "(beyond the runtime ones: --workers, --threads, --device, ...), recorded in its "
                                     "params.json history with the step; without it such a resume is refused",
                                     "run")

    @classmethod
    def parser(cls, prog: str = "python -m dtplib.train", description: str = "") -> argparse.ArgumentParser:
        """The argparse parser of these fields: `--train-data` for `train_data`, store_true for booleans; the
        nested `dtp` field gives one flag per DTPConfig setting, absent from the result unless given."""
        parser = argparse.ArgumentParser(prog=prog, description=description,
                                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        groups: dict[str, argparse._ArgumentGroup] = {}
        for f in fields(cls):
            meta = f.metadata
            group = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(
                meta["group"]))
            if "nested" in meta:
                for setting in meta["nested"].settings():
                    _add_flag(group, setting.name, setting.default, setting.metadata, argparse.SUPPRESS)
                continue
            _add_flag(group, f.name, f.default, meta, f.default)
        groups["run"].add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                   help="on an error, the traceback (and torch's full message) instead of one line")
        return parser

    @classmethod
    def flag_fields(cls) -> dict:
        """{flag's field name: dataclass Field}: the top-level fields and the tower's settings, as flags."""
        top = {f.name: f for f in fields(cls) if f.name != "dtp"}
        return top | {f.name: f for f in DTPConfig.settings()}

    @classmethod
    def parse(cls, argv: Sequence[str] | None = None, **parser_options) -> TrainConfig:
        """A config from command-line flags (bad flags: argparse's usage error; contradictions: ValueError)."""
        options = vars(cls.parser(**parser_options).parse_args(argv))
        options.pop("debug", None)  # the command line's (`run_cli`), not the run's
        return cls.from_options(**options)

    @classmethod
    def from_options(cls, **options) -> TrainConfig:
        """A config from the flags' values by field name, as Python objects: `TrainConfig.from_options(
        train_data="shards/{000000..000009}.tar", model="ViT-Ti-8-64", compression=4, epochs=3)`. The tower's flags
        (DTPConfig's settings) build `dtp` through `_tower_for`; unknown names raise ValueError."""
        settings = {name: options.pop(name) for name in DTP_FLAGS if name in options}
        names = {f.name for f in fields(cls)} - {"dtp"}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(f"not TrainConfig fields or flags: {unknown}")
        config = cls(**options)
        return replace(config, dtp=_tower_for(config.model, settings))

    @classmethod
    def from_dict(cls, values: Mapping) -> TrainConfig:
        """A config from a stored dict (`to_dict`, params.json, a checkpoint's): missing fields (an older
        checkpoint) take what such a run used, their defaults or `LEGACY_DEFAULTS`; other keys (params.json's name,
        world size, provenance) are ignored. Configs stored before `dtp` was nested hold the tower's flags flat."""
        names = {f.name for f in fields(cls)}
        if "dtp" in values:
            kept = {k: v for k, v in values.items() if k in names and k != "dtp"}
            kept = {k: v for k, v in LEGACY_DEFAULTS.items() if k in names} | kept
            dtp = None if values["dtp"] is None else DTPConfig(**values["dtp"])
            return cls(**kept, dtp=dtp)
        flat = {**LEGACY_DEFAULTS, **values}  # flat: the tower's flags as top-level keys, None where not given
        options = {k: v for k, v in flat.items() if k in names and k != "dtp"}
        settings = {k: flat[k] for k in DTP_FLAGS if k in flat and flat[k] is not None}
        return cls.from_options(**options, **settings)

    @property
    def reporters(self) -> tuple[str, ...]:
        """The backends of --report-to (open_clip_train's comma list: "tensorboard,wandb"; "all": both; "none" or
        "": neither), in REPORTERS order; an unknown name is a ValueError."""
        names = {name.strip() for name in self.report_to.split(",")} - {"", "none"}
        unknown = sorted(names - {*REPORTERS, "all"})
        if unknown:
            raise ValueError(f"--report-to {self.report_to}: unknown {unknown[0]!r}; give a comma list of "
                             f"{', '.join(REPORTERS)}, or all, or none")
        return tuple(name for name in REPORTERS if name in names or "all" in names)

    @property
    def target_compression(self) -> float | None:
        """The DTP tower's target compression (None: a plain open_clip model)."""
        return None if self.dtp is None else self.dtp.compression

    @property
    def model_name(self) -> str:
        """The open_clip name of what this config trains (`DTP-ViT-Ti-8-64-4x`, or the plain model's own)."""
        if self.dtp is None:
            return self.model
        arch = resolve_model(self.model, self.dtp.compression, self.dtp.upsample)[0]
        return dtp_name(arch, self.dtp.compression, self.dtp.upsample)

    def to_argv(self) -> list[str]:
        """The command-line flags that give this config back (`TrainConfig.parse(config.to_argv()) == config`): for
        a new process (torchrun, the grid driver's children). Fields at their default are left out."""
        argv: list[str] = []
        for f in fields(self):
            if f.name == "dtp":
                argv += [] if self.dtp is None else _dtp_argv(self.model, self.dtp)
                continue
            argv += _flag_argv(f.name, getattr(self, f.name), f.default)
        return argv

    def check(self, world_size: int = 1) -> None:
        """Every inconsistency a user can make, as a ValueError or FileNotFoundError naming the flag, before any
        model is built or run folder made: the training entry point, `launch` and the grid driver call it."""
        not_finite = [name for name in FLOAT_FLAGS if getattr(self, name) is not None
                      and not math.isfinite(getattr(self, name))]
        if not_finite:
            raise ValueError(f"--{not_finite[0].replace('_', '-')} must be a finite number, got "
                             f"{getattr(self, not_finite[0])}")
        if self.dtp is not None:
            arch = resolve_model(self.model, self.dtp.compression, self.dtp.upsample)[0]
            try:
                self.dtp.validate(ARCHS[arch].depth)
            except ValueError as error:  # the tower's field names are its flags' names
                raise ValueError(f"--{str(error).replace('_', '-')}") from None
        _ = self.reporters  # an unknown --report-to name is a ValueError here
        self.check_ranges()
        if self.batch_size * world_size < 2:
            raise ValueError("the contrastive loss needs at least 2 pairs per global batch (--batch-size)")
        if self.force_image_size is not None:
            check_image_size(self.force_image_size, self.model)
        if self.pretrained and not Path(self.pretrained).is_file():
            raise FileNotFoundError(f"--pretrained {self.pretrained}: no such checkpoint file")
        if self.local_loss and world_size == 1:
            log.info("--local-loss has no effect in a single process")
        check_precision(self.precision, default_device(self.device))
        self.check_data(world_size)
        if self.resume and self.resume != "latest" and not Path(self.resume).is_file():
            raise FileNotFoundError(f"--resume {self.resume}: no such checkpoint file")

    def check_ranges(self) -> None:
        """Every number flag inside its range (RANGES), all of them at once: a FlagErrors with one line per bad
        flag, e.g. "--train-num-samples must be >= 1, got -5"."""
        errors = []
        for name, (low, high, low_allowed) in RANGES.items():
            value = getattr(self, name)
            if value is None:
                continue
            below = value < low if low_allowed else value <= low
            above = high is not None and (value >= high if name in RANGE_UPPER_OPEN else value > high)
            if below or above:
                wanted = (f"in [{low}, {high})" if name in RANGE_UPPER_OPEN else f"in [{low}, {high}]" if high
                          else f">= {low}" if low_allowed else f"> {low}")
                errors.append(f"--{name.replace('_', '-')} must be {wanted}, got {value}")
        if errors:
            raise FlagErrors(errors)

    def check_data(self, world_size: int) -> None:
        """The data flags point at data: shards that exist, an epoch size, one global batch, enough shards for the
        loader workers, a first shard with a usable sample (`first_look`), class folders. A --train-num-samples
        beyond the shards' declared size is a warning (an epoch then passes over the data more than once)."""
        shards = expand_shards(self.train_data)  # missing shards fail here
        available = dataset_size(shards)
        if not self.train_num_samples and not available:
            raise ValueError(f"epoch size unknown: no sizes.json next to {shards[0]}; pass --train-num-samples")
        if available is not None and available < self.batch_size * world_size and not self.dataset_resampled:
            raise ValueError(f"--train-data holds {available} samples, fewer than one global batch of "
                             f"{self.batch_size} x {world_size} processes; lower --batch-size")
        if not self.dataset_resampled and len(shards) < max(1, self.workers) * world_size:
            raise ValueError(f"--train-data has {len(shards)} shards, too few to feed {max(1, self.workers)} loader "
                             f"workers x {world_size} processes (each reads whole shards): lower --workers, use "
                             "smaller shards, or --dataset-resampled")
        if available and self.train_num_samples and self.train_num_samples > available:
            log.warning("--train-num-samples %d exceeds the %d samples the shards' sizes.json declares: an epoch "
                        "passes over the data %.1f times", self.train_num_samples, available,
                        self.train_num_samples / available)
        first_look(shards[0], dataset_size(shards[:1]))
        if self.val_data:
            expand_shards(self.val_data)
        for name in ("zeroshot_data", "imagenet_val"):
            if getattr(self, name):
                zeroshot_classes(getattr(self, name))  # missing or empty folders fail here

    def to_dict(self) -> dict:
        """Every field, `dtp` as a nested dict (None for a plain model): what params.json and checkpoints store."""
        return asdict(self)

    def flag_values(self) -> dict:
        """{flag name: value}: the top-level fields and the tower's settings (None each for a plain model), as the
        command line names them; the tower's other fields follow from --model."""
        values = {k: v for k, v in self.to_dict().items() if k != "dtp"}
        return values | {name: None if self.dtp is None else getattr(self.dtp, name) for name in DTP_FLAGS}

    def replace(self, **changes) -> TrainConfig:
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"not TrainConfig fields: {sorted(unknown)}")
        return replace(self, **changes)


def first_look(shard: str, declared: int | None = None) -> None:
    """A local training shard holds at least one usable sample (an image that decodes and a caption, as the loader
    needs), read from its start; else a ValueError naming the file and the reason: empty (0 bytes, though sizes.json
    declares `declared`), not a tar, or N samples none of them usable (no caption, no image, undecodable). Remote
    shards (`://`, `pipe:`) are not opened here."""
    if "://" in shard or shard.startswith("pipe:"):
        return
    said = f" (its sizes.json declares {declared} samples)" if declared else ""
    if os.path.getsize(shard) == 0:
        raise ValueError(f"training shard {shard} is empty (0 bytes){said}")
    counts = {"no caption": 0, "no image": 0, "undecodable image": 0}
    try:
        with tarfile.open(shard) as tar:
            samples = _tar_samples(tar)
            for sample in samples:
                image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
                if image is None:
                    counts["no image"] += 1
                elif not _caption(sample):
                    counts["no caption"] += 1
                elif not _decodes(image):
                    counts["undecodable image"] += 1
                else:
                    return
    except (tarfile.TarError, OSError) as exn:
        raise ValueError(f"training shard {shard} cannot be read as a tar ({exn}){said}") from exn
    found = sum(counts.values())
    reasons = ", ".join(f"{count} with {reason}" for reason, count in counts.items() if count)
    raise ValueError(f"training shard {shard} has no usable sample (an image and a caption): "
                     + (f"{found} samples, {reasons}" if found else f"it holds no samples{said}"))


def _tar_samples(tar: tarfile.TarFile):
    """The samples of a webdataset tar in order, as {extension: bytes}, grouped by key (webdataset's rule: the path
    up to the first dot of the file name)."""
    key, sample = None, {}
    for member in tar:
        if not member.isfile():
            continue
        folder, _, name = member.name.rpartition("/")
        stem, _, extension = name.partition(".")
        if f"{folder}/{stem}" != key:
            if sample:
                yield sample
            key, sample = f"{folder}/{stem}", {}
        sample[extension.lower()] = tar.extractfile(member).read()
    if sample:
        yield sample


def _caption(sample: dict) -> str:
    """The sample's caption as the loader picks it: the json's captions, else txt ("" when neither)."""
    try:
        captions = json.loads(sample["json"]).get("captions") if "json" in sample else None
    except (ValueError, AttributeError):
        captions = None
    if captions and isinstance(captions, list) and any(str(c).strip() for c in captions):
        return str(captions[0])
    return sample.get("txt", b"").decode("utf-8", "replace").strip()


def _decodes(data: bytes) -> bool:
    try:
        open_rgb(io.BytesIO(data))
    except DECODE_ERRORS:
        return False
    return True


def run_flags(params: Mapping) -> dict:
    """{flag: value} a run trains with now, from its params.json: the flags it started with, then each change of its
    `history` (what --allow-changed-flags accepted on a resume) in order."""
    values = TrainConfig.from_dict(params).flag_values()
    for entry in params.get("history", []):
        values |= {name: change["new"] for name, change in entry.get("changed", {}).items()}
    return values


def changed_flags(stored: Mapping, given: TrainConfig) -> dict[str, tuple]:
    """{flag: (stored value, given value)} for each flag whose value differs between a run's flags (`run_flags`)
    and the config a resume gives, RESUME_RUNTIME_FLAGS left out; values compared as params.json stores them."""
    def plain(value):
        return json.loads(json.dumps(value, default=str))

    new = given.flag_values()
    return {name: (stored.get(name), new[name]) for name in new
            if name not in RESUME_RUNTIME_FLAGS and plain(stored.get(name)) != plain(new[name])}


def _add_flag(group, name: str, default, meta: Mapping, parsed_default) -> None:
    """One flag of a field: `--name` (store_true for a boolean), its type, choices and help."""
    flag_name = "--" + name.replace("_", "-")
    if isinstance(default, bool):
        group.add_argument(flag_name, action="store_true", default=parsed_default, help=meta["help"])
        return
    help = meta["help"] + (f" (default: {default})" if parsed_default is argparse.SUPPRESS else "")
    group.add_argument(flag_name, type=meta.get("type") or type(default), default=parsed_default,
                       choices=meta.get("choices"), required=meta.get("required", False), help=help)


def _flag_argv(name: str, value, default) -> list[str]:
    """`--name value` for a value other than the default (a boolean: `--name` when True)."""
    if value == default:
        return []
    if isinstance(value, bool):
        return [f"--{name.replace('_', '-')}"] if value else []
    return [f"--{name.replace('_', '-')}", str(value)]


def _dtp_argv(model: str, dtp: DTPConfig) -> list[str]:
    """The tower's flags for `dtp` on --model: --compression and --upsample unless the DTP-ViT-* name says them,
    then every other setting that differs from its default."""
    argv = []
    if parse_dtp_name(model) is None:
        argv += ["--compression", f"{dtp.compression:g}"] + (["--upsample"] if dtp.upsample else [])
    for setting in DTPConfig.settings():
        if setting.name not in ("compression", "upsample"):
            argv += _flag_argv(setting.name, getattr(dtp, setting.name), setting.default)
    return argv
