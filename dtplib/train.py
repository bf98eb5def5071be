"""Contrastive (CLIP) pretraining of DTP-ViT and peers: `python -m dtplib.train`, on one device or under torchrun.

The command line only: nothing in the package imports this module. Read top to bottom:
1. `parse_args`: the flags of `dtplib.training.config.TrainConfig`; `TrainConfig.check` refuses every bad flag,
   path or model name before any long work.
2. The model is `dtplib.training.checkpoint.build_from_config(config)`: a DTP-ViT CLIP (`--model ViT-B-32
   --compression 4`, or a registered name such as `DTP-ViT-B-32-4x`), or any open_clip model as the peer
   (`--model ViT-B-32`).
3. `_train_one_epoch`: `dtplib.training.optim.train_step` (ClipLoss + the tower's weight x boundary prior, AdamW,
   cosine schedule with warm-up, autocast, gradient clipping) over the loader; one row per step in steps.csv.
   Every --log-every-n-steps steps, open_clip_train's `Train Epoch: ...` line on the console and in out.log, and a
   progress bar in notebooks and terminals (`dtplib.common.progress`).
4. `_restore` and `_run_epochs`, with the run folder's `Checkpoints` and logs (`dtplib.training.runfolder`):
   `epoch_<n>.pt` every --save-frequency epochs (`epoch_latest.pt` too with --save-most-recent), written atomically
   and only when every tensor is finite, holding model, optimizer, scaler, schedule position, per-rank RNG states,
   the TrainConfig and the run's id; `--resume latest` continues a killed run exactly (from the newest checkpoint
   that reads whole), and a stop at --max-steps inside an epoch is saved as `epoch_latest.pt` marked `mid_epoch`,
   resumed at the same batch. `_run` refuses before the folder is made or written: a folder of another run, a
   resume with other flags (`changed_flags`; --allow-changed-flags records them in params.json's history), a
   checkpoint of another model; then it locks the folder (`lock_folder`: one writing process at a time).
5. `train(config)` (Python, notebooks) and `main(argv)` (the command line): the run, per-epoch means in epochs.csv
   (the first epoch and the timing warm-up steps apart), the evaluations of `dtplib.measure.evaluate`, TensorBoard
   events and wandb (`--report-to tensorboard,wandb`).

Several processes: `torchrun --nproc_per_node N -m dtplib.train ...` (NCCL on GPUs, gloo on CPU);
`run(config, num_gpus=N)` does that from Python (the 03 notebook) with `config.to_argv()`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from open_clip.loss import ClipLoss
from torch.nn.parallel import DistributedDataParallel
from tqdm.contrib.logging import logging_redirect_tqdm

from .common.cli import CLI_ERRORS, run_cli
from .common.files import atomic_write_text, lock_folder
from .common.paths import child_environment, repo_path
from .common.progress import progress
from .common.provenance import run_info
from .common.runtime import default_device, process_memory_mb, seed_everything, unwrap
from .data import loader as dtp_loader
from .measure import evaluate as dtp_eval
from .tower.clip import read_checkpoint
from .tower.config import DTPConfig
from .tower.control import dtp_towers
from .training.checkpoint import build_from_config, load_pretrained, load_state_dict, state_mismatch
from .training.config import TrainConfig, changed_flags, run_flags
from .training.optim import NonFiniteLoss, lr_at, make_optimizer, train_step, use_adamw_impl
from .training.runfolder import (
    Checkpoints,
    NonFiniteState,
    RunLog,
    format_value,
    remove_partial_files,
    restore_row,
    rng_state,
    set_rng_state,
    train_line,
    truncate_csv,
)

log = logging.getLogger("dtplib.train")
ESTIMATES = ("lost_samples_estimate",)  # loader skip counts that estimate, not count: left out of skipped_samples

COMPILE_BACKEND = "inductor"  # torch.compile's default; the tests trace with "eager" (same graphs, no codegen)
STEP_COLUMNS = ("epoch", "step", "loss", "contrastive_loss", "boundary_loss", "compression", "capacity_dropped", "lr",
                "logit_scale", "step_time_s", "data_time_s", "samples_per_s", "peak_memory_mb")


# ----------------------------------------------------------------------------------------------------------
# 1. Flags


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """The flags of `TrainConfig` (open_clip_train's names where the meaning is the same)."""
    return TrainConfig.parse(argv, description=__doc__.split("\n")[0])


def _default_name(args: TrainConfig) -> str:
    """`DATE-TIME-MODEL[-DTP][-pxSIZE]-bBATCH-sSEED`: the model's name (`ViT-Ti-8-64-4x`), then for a pooling DTP
    tower its boundary mode (`threshold`, `topk`, `batch-topk`; `uniform` for --forced-boundaries) and each other
    tower setting that differs from its default as `flag=value` (`execution=packed`, `capacity=1.5`), then
    --force-image-size (`px32`)."""
    dtp = args.dtp
    model = args.model_name.removeprefix("DTP-")
    if dtp is not None and dtp.compresses:
        model += "-" + "-".join(_dtp_tags(dtp))
    if args.force_image_size:
        model += f"-px{args.force_image_size}"
    return f"{datetime.now():%Y_%m_%d-%H_%M_%S}-{model}-b{args.batch_size}-s{args.seed}"


def _dtp_tags(dtp: DTPConfig) -> list[str]:
    tags = ["uniform" if dtp.forced_boundaries else dtp.boundaries]
    for setting in DTPConfig.settings():
        value = getattr(dtp, setting.name)
        if setting.name in ("compression", "upsample", "boundaries", "forced_boundaries") or value == setting.default:
            continue  # in the model's name, or the boundary mode above
        tags.append(f"{setting.name.replace('_', '-')}={value:g}" if isinstance(value, float) else
                    f"{setting.name.replace('_', '-')}={value}")
    return tags


# ----------------------------------------------------------------------------------------------------------
# 2. Processes, model, optimiser


@dataclass
class Dist:
    """Where this process runs: rank, world size and its device (torchrun's environment, or one process)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(args: TrainConfig) -> Dist:
    """Join torchrun's process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU); else one process."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = default_device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(args.dist_backend or ("nccl" if device.type == "cuda" else "gloo"))
    return Dist(rank, local_rank, world_size, device)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated since the last reset, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return process_memory_mb("VmHWM")


# ----------------------------------------------------------------------------------------------------------
# 3. Training


@dataclass
class PendingStep:
    """A step whose values are still on the device: read with the others of its log window, in one transfer."""

    epoch: int
    step: int
    lr: float
    data_time: float
    host_time: float  # the step's own host time; the last step of a window also waits for the device
    images: int
    values: torch.Tensor  # len(STEP_VALUES), float32, on the device


STEP_VALUES = ("loss", "contrastive_loss", "boundary_loss", "logit_scale", "finite", "segments_mean",
               "capacity_dropped")


def _step_values(result, num_patches: int | None) -> torch.Tensor:
    """The device values of one `train_step` to log, stacked (no host read)."""
    zero = result.loss.new_zeros((), dtype=torch.float32)
    return torch.stack([result.loss.float(), result.task_loss.float(),
                        result.boundary_loss.float() if result.boundary_loss is not None else zero,
                        result.outputs.detach().float().reshape(()), result.finite.float(),
                        result.segments.float().mean() if result.segments is not None else zero + (num_patches or 1),
                        result.dropped.float() if result.dropped is not None else zero])


def _read_steps(pending: list[PendingStep], device: torch.device, world_size: int,
               num_patches: int | None) -> tuple[list[dict], str | None]:
    """The rows of the pending steps, read to the host in one transfer (the loop's only synchronisation), up to
    the first step whose loss was not finite (its update was skipped on the device), and then what that was."""
    if not pending:
        return [], None
    wait = time.perf_counter()
    values = torch.stack([p.values for p in pending]).tolist()  # steps x len(STEP_VALUES): one host read
    pending[-1].host_time += time.perf_counter() - wait
    memory = peak_memory_mb(device)
    rows = []
    for item, read in zip(pending, values, strict=True):
        value = dict(zip(STEP_VALUES, read, strict=True))
        if not value["finite"]:
            pending.clear()
            return rows, f"loss is {value['loss']} at step {item.step}"
        rows.append({
            "epoch": item.epoch, "step": item.step, "loss": value["loss"],
            "contrastive_loss": value["contrastive_loss"], "boundary_loss": value["boundary_loss"],
            "compression": (num_patches / value["segments_mean"]) if num_patches else 1.0,
            "capacity_dropped": value["capacity_dropped"],
            "lr": item.lr, "logit_scale": value["logit_scale"], "step_time_s": item.host_time,
            "data_time_s": item.data_time, "samples_per_s": item.images * world_size / item.host_time,
            "peak_memory_mb": memory,
        })
    pending.clear()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return rows, None


def _train_one_epoch(model, loader, loss_fn, optimizer, scaler, args: TrainConfig, dist_env: Dist, epoch: int,
                    step: int, total_steps: int, run_log: RunLog, kept: str,
                    skip_batches: int = 0, read_every_step: int = 0) -> tuple[int, list[dict], bool]:
    """One pass over the loader with `optim.train_step`, the first `skip_batches` (done before a mid-epoch
    checkpoint) read and passed over; returns the global step after it, the per-step records, and whether the
    epoch ran to its end (False when --max-steps stopped it).

    No step waits for the device: the logged values stay device tensors until the window's end (every
    --log-every-n-steps steps, the end of the epoch or a --max-steps stop; every step for the first
    `read_every_step` steps, which time the warm-up exactly). Then they are read in one transfer and written
    to steps.csv, with open_clip_train's `Train Epoch: ...` line (`runfolder.train_line`) on the console and in
    out.log. On CUDA a step's `step_time_s` is its host time and the window's last step also waits for the device:
    sums and means over a window are exact, single steps are not."""
    model.train()
    device = dist_env.device
    tower = next(iter(dtp_towers(unwrap(model))), None)
    num_patches = tower.num_patches if tower is not None and tower.pools else None
    hint = f"epoch {epoch}; {kept}. Try a lower --lr, --grad-clip-norm, or fp32."
    records, pending = [], []
    bar = progress(total=len(loader), desc=f"epoch {epoch}", disable=not dist_env.main or None, mininterval=2,
                   initial=skip_batches)

    def flush() -> None:
        rows, not_finite = _read_steps(pending, device, dist_env.world_size, num_patches)
        for row in rows:
            records.append(row)
            run_log.csv_row("steps.csv", row, STEP_COLUMNS)
            if row["step"] % args.log_every_n_steps == 0 or row is rows[-1]:
                run_log.scalars("train", row, row["step"])
        if rows and dist_env.main:
            bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}", comp=f"{rows[-1]['compression']:.2f}")
            log.info(train_line(epoch, len(records) + skip_batches, len(loader), loader.num_samples,
                                args.batch_size * dist_env.world_size, dist_env.world_size, rows, records,
                                pooled=num_patches is not None))
        if not_finite:
            raise NonFiniteLoss(f"{not_finite}: stopping; {hint}")

    end = time.perf_counter()
    for index, (images, texts) in enumerate(loader):
        if index < skip_batches:
            continue
        if args.max_steps is not None and step >= args.max_steps:
            flush()
            bar.close()
            return step, records, False
        data_time = time.perf_counter() - end
        lr = lr_at(step, lr=args.lr, warmup=args.warmup, total_steps=total_steps, scheduler=args.lr_scheduler)
        images = images.to(device, non_blocking=True)
        texts = texts.to(device, non_blocking=True)
        start = time.perf_counter()

        def contrastive_loss(images=images, texts=texts):
            image_features, text_features, logit_scale = model(images, texts)[:3]
            return loss_fn(image_features, text_features, logit_scale), logit_scale

        result = train_step(model, optimizer, contrastive_loss, lr=lr, step=step, device=device,
                            precision=args.precision, scaler=scaler, grad_clip_norm=args.grad_clip_norm, hint=hint)
        with torch.no_grad():  # open_clip clamps the temperature to 100
            unwrap(model).logit_scale.clamp_(0, math.log(100))
        pending.append(PendingStep(epoch, step, lr, data_time, time.perf_counter() - start, len(images),
                                   _step_values(result, num_patches)))
        step += 1
        if len(records) + len(pending) <= read_every_step or step % args.log_every_n_steps == 0:
            flush()
        bar.update()
        end = time.perf_counter()
    flush()
    bar.close()
    return step, records, True


def _epoch_summary(epoch: int, records: list[dict], timing_warmup: int, first_epoch: bool) -> dict:
    """Per-epoch means; step-time statistics exclude the process's first `timing_warmup` steps (reported apart).
    The first epoch of a process (a fresh or a resumed run) is marked: its first steps are slower."""
    def mean(key, rows):
        return float(np.mean([r[key] for r in rows])) if rows else float("nan")

    timed = records[timing_warmup:] if first_epoch else records
    warm = records[:timing_warmup] if first_epoch else []
    return {
        "epoch": epoch, "first_epoch": first_epoch, "steps": len(records),
        "loss": mean("loss", records), "contrastive_loss": mean("contrastive_loss", records),
        "boundary_loss": mean("boundary_loss", records), "compression": mean("compression", records),
        "capacity_bound_steps": mean("capacity_bound", [{"capacity_bound": float(r["capacity_dropped"] > 0)}
                                                         for r in records]),
        "capacity_dropped": mean("capacity_dropped", records),
        "lr_end": records[-1]["lr"] if records else float("nan"),
        "step_time_s": mean("step_time_s", timed),
        "step_time_median_s": float(np.median([r["step_time_s"] for r in timed])) if timed else float("nan"),
        "data_time_s": mean("data_time_s", timed), "samples_per_s": mean("samples_per_s", timed),
        "warmup_step_time_s": mean("step_time_s", warm) if warm else float("nan"),
        "peak_memory_mb": max((r["peak_memory_mb"] for r in records), default=float("nan")),
    }


def _due(epoch_done: int, frequency: int, epochs: int) -> bool:
    """Evaluate after epoch n (1-based) when n is a multiple of frequency, and always after the last."""
    return frequency > 0 and (epoch_done % frequency == 0 or epoch_done == epochs)


def run_evaluations(model, preprocess_val, tokenizer, args, device, epoch_done: int) -> dict:
    zeroshot = _due(epoch_done, args.zeroshot_frequency, args.epochs)
    retrieval = _due(epoch_done, args.val_frequency, args.epochs) and args.val_data
    if not (zeroshot and (args.zeroshot_data or args.imagenet_val)) and not retrieval:
        return {}
    return dtp_eval.evaluate(
        unwrap(model), preprocess_val, tokenizer, device=device, batch_size=max(args.batch_size, 64),
        zeroshot_data=args.zeroshot_data if zeroshot else None, imagenet_val=args.imagenet_val if zeroshot else None,
        val_data=args.val_data if retrieval else None, max_per_class=args.zeroshot_max_per_class,
        max_images=args.val_max_images)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run training from command-line flags; returns {"run_dir", "epochs" (per-epoch rows), "checkpoint"}."""
    return train(parse_args(argv))


def train(args: TrainConfig) -> dict:
    """Run training in this process (under torchrun: this rank's part); returns {"run_dir", "epochs",
    "checkpoint"}. The config is checked first, before any run folder exists."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    args.check(world_size)
    dist_env = _init_distributed(args)
    try:
        return _run(args, dist_env)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(args: TrainConfig, dist_env: Dist) -> dict:
    """Everything that can refuse the run before its folder is made or written: the folder's state and flags
    (`_check_folder`), the model, a --resume or --pretrained checkpoint that does not fit it; then the folder's lock
    (one writer at a time; `dtplib.common.files.lock_folder`) and the run."""
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.name or _default_name(args)
    if dist_env.world_size > 1 and args.name is None:  # every rank must agree on the folder: take rank 0's
        names = [name]
        dist.broadcast_object_list(names, src=0)
        name = names[0]
    run_dir = repo_path(args.logs) / name
    checkpoints = Checkpoints(run_dir / "checkpoints", delete_previous=args.delete_previous_checkpoint)
    given = None
    if args.resume and args.resume != "latest":
        given = Path(args.resume), read_checkpoint(args.resume)
    _check_folder(args, run_dir, given)
    seed_everything(args.seed + dist_env.rank)
    built = build_from_config(args)
    if given is not None:
        mismatch = state_mismatch(built[0], _model_state(given[1], given[0]))
        if mismatch:
            raise ValueError(f"--resume {args.resume}: a checkpoint of another model than {args.model_name} "
                             f"({mismatch})")
    elif args.pretrained:  # a foreign file is refused here; a --resume latest that finds a checkpoint overwrites it
        load_pretrained(built[0], args.pretrained)
    lock = lock_folder(run_dir) if dist_env.main else None
    handler = None
    try:
        if dist_env.main:
            _check_folder(args, run_dir, given)  # again under the lock: a run may have ended here meanwhile
            checkpoints.folder.mkdir(parents=True, exist_ok=True)
            handler = _setup_file_logging(run_dir)
            remove_partial_files(run_dir, checkpoints.folder)
        return _train(args, dist_env, name, run_dir, checkpoints, given, built)
    except Exception as error:
        if handler is not None:  # the one line goes to the console from __main__; out.log gets the traceback too
            handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "stopped: %s", (error,),
                                          sys.exc_info()))
        raise
    finally:
        if handler is not None:  # a notebook or test may train again in this process: log there, not here
            logging.getLogger("dtplib").removeHandler(handler)
            handler.close()
        if lock is not None:
            lock.release()


def _check_folder(args: TrainConfig, run_dir: Path, given: tuple[Path, dict] | None) -> None:
    """A folder that holds a run is written only to continue that run: with --resume latest, or --resume PATH of a
    checkpoint of that run, and with the run's flags (`changed_flags`: runtime flags aside), unless
    --allow-changed-flags. Raises FileExistsError or ValueError in one line; nothing is written."""
    params_file = run_dir / "params.json"
    if not params_file.is_file():
        return
    params = json.loads(params_file.read_text())
    if given is not None:  # a folder records its run; a checkpoint records the run it belongs to
        held, incoming = _run_identity(params), _run_identity(given[1])
        if held != incoming:
            raise FileExistsError(f"run folder {run_dir} holds run {held}, but --resume {args.resume} belongs "
                                  f"to run {incoming}: give a new --name to continue from it")
    elif args.resume != "latest":
        raise FileExistsError(f"run folder {run_dir} already holds a run: pass --resume latest to continue it, or a "
                              "new --name")
    changes = changed_flags(run_flags(params), args)
    if changes and not args.allow_changed_flags:
        listed = ", ".join(f"--{key.replace('_', '-')}: {old} -> {new}" for key, (old, new) in changes.items())
        raise ValueError(f"run folder {run_dir} was trained with other flags ({listed}): resume with the run's own "
                         "flags, or pass --allow-changed-flags to go on with these (recorded in its params.json)")


def _model_state(state: dict, source: Path) -> dict:
    """The weights of a `dtplib.train` checkpoint, without DDP's `module.` prefixes."""
    weights = state.get("state_dict") if isinstance(state, dict) else None
    if not isinstance(weights, dict) or not {"optimizer", "epoch", "step"} <= state.keys():
        raise ValueError(f"{source}: not a checkpoint of python -m dtplib.train (no state_dict, optimizer, epoch "
                         "and step to resume from); --pretrained starts a new run from any model's weights")
    return {k.removeprefix("module."): v for k, v in weights.items()}


def _run_params(args: TrainConfig, dist_env: Dist, name: str, run_dir: Path, position: Position, resumed: bool,
                loader, model: torch.nn.Module) -> dict:
    """params.json: the flags, the run's id, its schedule and provenance. A resume of the folder's own run keeps
    the flags the run started with and appends what --allow-changed-flags changed to `history` (the step, old and
    new values), so the first flags are never lost; the schedule and provenance are this process's."""
    params = {**args.to_dict(), "name": name, "run_id": position.run_id, "world_size": dist_env.world_size,
              "steps_per_epoch": loader.num_batches, "total_steps": loader.num_batches * args.epochs,
              "samples_per_epoch": loader.num_samples, "parameters": sum(p.numel() for p in model.parameters()),
              **run_info(dist_env.device, args.precision, args.batch_size)}
    params_file = run_dir / "params.json"
    if not (resumed and params_file.is_file()):
        return params
    stored = json.loads(params_file.read_text())
    history = list(stored.get("history", []))
    changes = changed_flags(run_flags(stored), args)
    if changes:
        history.append({"step": position.step, "epoch": position.epoch,
                        "changed": {key: {"old": old, "new": new} for key, (old, new) in changes.items()}})
        log.warning("flags changed at step %d (recorded in params.json): %s", position.step,
                    ", ".join(f"--{k.replace('_', '-')}: {o} -> {n}" for k, (o, n) in changes.items()))
    first = {key: stored[key] for key in args.to_dict() if key in stored}
    return {**params, **first, "history": history}


def _latest_or_fresh(run_dir: Path, checkpoints: Checkpoints, main: bool) -> tuple[Path, dict] | None:
    """--resume latest: the newest readable checkpoint of the run, or None (a fresh start; a run killed before
    its first checkpoint leaves CSV rows that are dropped)."""
    resume = checkpoints.load_latest()
    if resume is None and checkpoints.candidates():
        raise ValueError(f"no checkpoint of {run_dir} can be read: {[p.name for p in checkpoints.candidates()]}")
    if resume is not None and resume[0] != checkpoints.candidates()[0]:
        log.warning("resuming from %s: the newer checkpoints cannot be read", resume[0])
    if resume is None and main:
        for stale in ("steps.csv", "epochs.csv"):
            (run_dir / stale).unlink(missing_ok=True)
    return resume


def _run_identity(record: dict) -> str:
    """The run a params.json or a checkpoint belongs to: its run_id (older runs: their name)."""
    return record.get("run_id") or record.get("name") or "unknown"


@dataclass
class Position:
    """Where a run stands: the epoch it starts at, the global step, batches of that epoch already done (a stop at
    --max-steps), and the run's id (kept across resumes)."""

    epoch: int = 0
    step: int = 0
    skip_batches: int = 0
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class Training:
    """The objects one run trains with (`train_model`: the model under DDP and torch.compile, when asked)."""

    model: torch.nn.Module
    train_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    loss_fn: ClipLoss
    loader: object
    preprocess_val: object
    tokenizer: object


def _train(args: TrainConfig, dist_env: Dist, name: str, run_dir: Path, checkpoints: Checkpoints,
           resume: tuple[Path, dict] | None, built: tuple) -> dict:
    model, preprocess_train, preprocess_val, tokenizer = built  # `build_from_config(args)`, seeded
    model.to(dist_env.device)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    optimizer = make_optimizer(model, args.lr, args.wd, (args.beta1, args.beta2), args.eps, args.adamw_impl)
    scaler = torch.amp.GradScaler(dist_env.device.type) if args.precision == "amp" else None
    loader = dtp_loader.make_loader(args.train_data, preprocess_train, tokenizer, args.batch_size, args.workers,
                                    resampled=args.dataset_resampled, seed=args.seed, is_train=True,
                                    num_samples=args.train_num_samples, pin_memory=dist_env.device.type == "cuda")
    total_steps = loader.num_batches * args.epochs
    if args.warmup >= total_steps and args.lr_scheduler == "cosine":
        log.warning("--warmup %d >= total steps %d: the learning rate never reaches --lr nor decays",
                    args.warmup, total_steps)
    if args.resume == "latest":
        resume = _latest_or_fresh(run_dir, checkpoints, dist_env.main)
    if resume is None and args.pretrained:  # a new run from trained weights (loaded by `_run`): its own schedule
        log.info("weights from --pretrained %s", args.pretrained)
    position = Position() if resume is None else _restore(args, dist_env, run_dir, resume, model, optimizer, scaler)
    params = {}
    if dist_env.main:
        params = _run_params(args, dist_env, name, run_dir, position, resume is not None, loader, model)
        atomic_write_text(run_dir / "params.json", json.dumps(params, indent=2, default=str))
    train_model = model
    if dist_env.world_size > 1:
        train_model = DistributedDataParallel(
            train_model, device_ids=[dist_env.device.index] if dist_env.device.type == "cuda" else None)
    if args.torchcompile:
        train_model = compile_for_training(train_model, model, dist_env.world_size)
    loss_fn = ClipLoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad, cache_labels=True,
                       rank=dist_env.rank, world_size=dist_env.world_size)
    training = Training(model, train_model, optimizer, scaler, loss_fn, loader, preprocess_val, tokenizer)
    wandb = None
    if "wandb" in args.reporters:  # open_clip_train's init; the run's id, kept across resumes, continues its run
        wandb = {"project": args.wandb_project_name, "name": name, "id": position.run_id, "config": params}
    run_log = RunLog(run_dir, dist_env.main, "tensorboard" in args.reporters, wandb)
    try:
        with logging_redirect_tqdm():  # console log lines above a terminal's progress bar, not through it
            summaries = _run_epochs(args, dist_env, name, training, position, total_steps, checkpoints, run_log)
    finally:
        run_log.close()
    return {"run_dir": run_dir, "epochs": summaries, "checkpoint": checkpoints.latest()}


def _restore(args: TrainConfig, dist_env: Dist, run_dir: Path, resume: tuple[Path, dict], model: torch.nn.Module,
            optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> Position:
    """Load a checkpoint's weights, optimizer, scaler and RNG states; drop the CSV rows past it. Returns where the
    run stands: the checkpoint's own run id when it continues its run, a new one when a new run starts from it."""
    resume_from, state = resume
    load_state_dict(model, _model_state(state, resume_from), source=resume_from, name=args.model_name)
    optimizer.load_state_dict(state["optimizer"])
    use_adamw_impl(optimizer, args.adamw_impl)  # the flag's kernel, not the checkpoint's
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    position = Position(state["epoch"], state["step"],
                        state.get("batches_done", 0) if state.get("mid_epoch") else 0)
    own = (run_dir / "params.json").exists() or args.resume == "latest"  # its own run; else a new run from it
    if own:
        position.run_id = state.get("run_id", position.run_id)
    rng = state.get("rng", [])
    if len(rng) == dist_env.world_size:
        set_rng_state(rng[dist_env.rank])
    else:
        log.warning("checkpoint has RNG states of %d processes, this run has %d: reseeding", len(rng),
                    dist_env.world_size)
        seed_everything(args.seed + position.epoch + dist_env.rank)
    if dist_env.main:
        truncate_csv(run_dir / "steps.csv", lambda r: int(r["step"]) < position.step)
        truncate_csv(run_dir / "epochs.csv", lambda r: int(r["epoch"]) < position.epoch)
        if own and state.get("epoch_row") and not state.get("mid_epoch"):  # killed between checkpoint and row
            restore_row(run_dir / "epochs.csv", state["epoch_row"], "epoch")
    log.info("resumed from %s at epoch %d, step %d%s", resume_from, position.epoch, position.step,
             f" ({position.skip_batches} batches into the epoch)" if position.skip_batches else "")
    return position


def _checkpoint_state(args: TrainConfig, training: Training, name: str, run_id: str, epoch: int, step: int,
                     total_steps: int, batches_done: int, complete: bool) -> dict:
    """What a checkpoint holds (the RNG states are added by the caller, gathered from every rank)."""
    return {"epoch": epoch + 1 if complete else epoch, "step": step, "name": name, "run_id": run_id,
            "mid_epoch": not complete, "batches_done": batches_done,
            "state_dict": training.model.state_dict(), "optimizer": training.optimizer.state_dict(),
            "scaler": training.scaler.state_dict() if training.scaler else {},
            "schedule": {"kind": args.lr_scheduler, "step": step, "total_steps": total_steps,
                         "warmup": args.warmup, "lr": args.lr}, "args": args.to_dict()}


def _run_epochs(args: TrainConfig, dist_env: Dist, name: str, training: Training, position: Position,
               total_steps: int, checkpoints: Checkpoints, run_log: RunLog) -> list[dict]:
    """The epochs from `position` on: train, summarise, evaluate, checkpoint (a --max-steps stop mid-epoch saves a
    resumable epoch_latest.pt and ends the loop). Returns the epochs' summary rows."""
    summaries, step, skip_batches = [], position.step, position.skip_batches
    for epoch in range(position.epoch, args.epochs):
        if args.max_steps is not None and step >= args.max_steps:
            break
        training.loader.set_epoch(epoch)
        epoch_start = step - skip_batches
        step, records, complete = _train_one_epoch(
            training.train_model, training.loader, training.loss_fn, training.optimizer, training.scaler, args,
            dist_env, epoch, step, total_steps, run_log, checkpoints.kept(), skip_batches,
            read_every_step=args.timing_warmup if epoch == position.epoch else 0)
        skip_batches = 0
        if dist_env.world_size > 1:
            dist.barrier()
        state = _checkpoint_state(args, training, name, position.run_id, epoch, step, total_steps,
                                 step - epoch_start, complete)
        if not complete:  # --max-steps: resumable, never labelled as a finished epoch
            state["rng"] = _gather_rng(dist_env)
            if dist_env.main:
                path = checkpoints.save(state, epoch, numbered=False, latest=True)
                log.info("stopped at --max-steps %d, %d batches into epoch %d: %s", step,
                         state["batches_done"], epoch, path)
            break
        summary = _epoch_summary(epoch, records, args.timing_warmup, first_epoch=epoch == position.epoch)
        skipped = dict(sorted(training.loader.skipped.items()))
        summary["skipped_samples"] = sum(v for k, v in skipped.items() if k not in ESTIMATES)
        summary.update({f"skipped_{reason}": count for reason, count in skipped.items()})
        if dist_env.main:
            summary.update(run_evaluations(training.model, training.preprocess_val, training.tokenizer, args,
                                           dist_env.device, epoch + 1))
        if dist_env.world_size > 1:
            dist.barrier()
        state["rng"] = _gather_rng(dist_env)
        numbered = (epoch + 1) % args.save_frequency == 0 or epoch + 1 == args.epochs
        if dist_env.main:  # the checkpoint first: no row names a file that was not written; the checkpoint holds
            summary["checkpoint"] = ("epoch_latest.pt" if args.save_most_recent  # its row, which a resume from it
                                     else f"epoch_{epoch + 1}.pt" if numbered else "")  # writes if a kill lost it
            state["epoch_row"] = summary
            checkpoints.save(state, epoch + 1, numbered=numbered, latest=args.save_most_recent)
            run_log.csv_row("epochs.csv", summary)
            run_log.scalars("epoch", summary, epoch + 1, wandb_step=step)
            log.info("epoch %d: %s", epoch, {k: format_value(v) for k, v in summary.items()})
        summaries.append(summary)
    return summaries


def compile_for_training(train_model: torch.nn.Module, model: torch.nn.Module, world_size: int) -> torch.nn.Module:
    """`torch.compile` of the (DDP-wrapped) model, as the PyTorch DDP + compile documentation has it: DDP first.

    Static shapes (`dynamic=False`: the training loader's batches are all full) and `fullgraph=True` where the
    model allows it: all but a tower that plans on the host (`plans_on_host`: the packed and padded executions
    with varying counts), in a single process. Under DDP, compile splits the graph at DDP's gradient buckets on
    purpose (its DDPOptimizer), so fullgraph is not asked. The first steps compile (minutes on a CPU, about a
    minute for a B/32 CLIP on an H100) and are timed apart."""
    host_planned = any(t.plans_on_host() for t in dtp_towers(model))
    fullgraph = world_size == 1 and not host_planned
    log.info("torch.compile: fullgraph=%s, dynamic=False%s", fullgraph,
             " (this execution plans on the host: use --execution static for one graph)" if host_planned else "")
    return torch.compile(train_model, fullgraph=fullgraph, dynamic=False, backend=COMPILE_BACKEND)


def _gather_rng(dist_env: Dist) -> list[dict]:
    if dist_env.world_size == 1:
        return [rng_state()]
    states = [None] * dist_env.world_size
    dist.all_gather_object(states, rng_state())
    return states


def _setup_file_logging(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "out.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("dtplib").addHandler(handler)
    logging.getLogger("dtplib").setLevel(logging.INFO)
    return handler


def launch(config: TrainConfig, nproc_per_node: int, extra_torchrun: Sequence[str] = ()) -> Path:
    """Run `torchrun --nproc_per_node N -m dtplib.train <config's flags>` and wait; returns the run folder."""
    config.check(nproc_per_node)
    if config.name is None:  # fix the name here so that the caller knows where the run lands
        config = config.replace(name=_default_name(config))
    # "--" ends torchrun's own flags: without it torchrun reads our --logs as an abbreviation of its --logs-specs
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}",
               *extra_torchrun, "-m", "dtplib.train", "--", *config.to_argv()]
    subprocess.run(command, check=True, env=child_environment())
    return repo_path(config.logs) / config.name


def run(config: TrainConfig | Sequence[str], num_gpus: int = 1) -> Path:
    """Train in this process (one device) or through torchrun (num_gpus > 1); returns the run folder. `config`: a
    TrainConfig (`TrainConfig.from_options(train_data=..., model=..., compression=4)`), or command-line flags."""
    if not isinstance(config, TrainConfig):
        config = parse_args(config)
    if num_gpus > 1:
        if torch.cuda.device_count() < num_gpus:
            raise ValueError(f"num_gpus={num_gpus} but {torch.cuda.device_count()} CUDA devices are visible")
        return launch(config, num_gpus)
    return Path(train(config)["run_dir"])


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run_cli(main, prog="python -m dtplib.train", errors=(*CLI_ERRORS, NonFiniteLoss, NonFiniteState))
    print(f"run folder: {result['run_dir']}")
