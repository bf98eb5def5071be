"""Contrastive (CLIP) pretraining of DTP-ViT and peers: `python -m dtplib.train`, on one device or under torchrun.

Read top to bottom:
1. `parse_args` / `check_args`: open_clip_train's flag names, plus --compression, --upsample and
   --boundary-loss-weight; every bad flag, path or model name fails here, before any long work.
2. `build_model`: a DTP-ViT CLIP (`--model ViT-B-32 --compression 4`, or a registered name such as
   `DTP-ViT-B-32-4x`), or any open_clip model as the peer (`--model ViT-B-32`).
3. `train_one_epoch`: ClipLoss + weight x boundary prior, AdamW, cosine schedule with warm-up, autocast,
   gradient clipping; one row per step in steps.csv.
4. `Checkpoints`: `epoch_<n>.pt` and `epoch_latest.pt`, written atomically, holding model, optimizer, scaler,
   schedule position, per-rank RNG states and args; `--resume latest` continues a killed run exactly.
5. `main`: the run, per-epoch means in epochs.csv (the first epoch and the timing warm-up steps apart), the
   evaluations of dtplib.evaluate, TensorBoard events.

Several processes: `torchrun --nproc_per_node N -m dtplib.train ...` (NCCL on GPUs, gloo on CPU);
`launch(argv, nproc_per_node)` does that from Python (the 03 notebook).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import difflib
import io
import json
import logging
import math
import os
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.distributed as dist
from open_clip.loss import ClipLoss
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from dtplib import data as dtp_data
from dtplib import evaluate as dtp_eval
from dtplib.clip import ARCHS, create_model_and_transforms, parse_dtp_name, read_checkpoint
from dtplib.model import dtp_towers, last_boundary_loss, trace
from dtplib.utils import (
    REPO_ROOT,
    atomic_write_bytes,
    atomic_write_text,
    autocast,
    process_memory_mb,
    repo_path,
    run_info,
    seed_everything,
    synchronize,
    unwrap,
)

log = logging.getLogger("dtplib.train")

PRECISIONS = ("fp32", "amp", "bf16", "amp_bf16", "amp_bfloat16")  # bf16 = bf16 autocast, as open_clip's amp_bf16
STEP_COLUMNS = ("epoch", "step", "loss", "contrastive_loss", "boundary_loss", "compression", "lr", "logit_scale",
                "step_time_s", "data_time_s", "samples_per_s", "peak_memory_mb")


# ----------------------------------------------------------------------------------------------------------
# 1. Flags


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """open_clip_train's flags where the meaning is the same; DTP's own flags in their own group."""
    p = argparse.ArgumentParser(prog="python -m dtplib.train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--train-data", required=True, help="webdataset shards, brace notation: dir/{000000..000009}.tar")
    d.add_argument("--train-num-samples", type=int, default=None, help="epoch size; default: sizes.json by the shards")
    d.add_argument("--dataset-resampled", action="store_true", help="draw shards with replacement (open_clip)")
    d.add_argument("--val-data", default=None, help="caption shards for image-text retrieval R@1/5/10")
    d.add_argument("--zeroshot-data", default=None, help="ImageFolder for zero-shot top-1/5 (e.g. CIFAR-10 layout)")
    d.add_argument("--imagenet-val", default=None, help="ImageNet validation folder (wnid sub-folders)")
    d.add_argument("--zeroshot-max-per-class", type=int, default=None, help="first n images per class (CPU runs)")
    d.add_argument("--val-max-images", type=int, default=None, help="first n images of --val-data")
    d.add_argument("--workers", type=int, default=1, help="dataloader workers per process")

    m = p.add_argument_group("model")
    m.add_argument("--model", default="ViT-B-32",
                   help="with --compression: an arch of dtplib.ARCHS; a registered DTP-ViT-* name; or any open_clip "
                        "model (the peer, trained by the same loop)")
    m.add_argument("--compression", type=float, default=None, help="DTP target compression (1 = no pooling)")
    m.add_argument("--upsample", action="store_true", help="DTP: upsample to full length before the post-layers")
    m.add_argument("--boundary-loss-weight", type=float, default=1.0, help="weight of the binomial boundary prior")
    m.add_argument("--prior-scope", choices=("batch", "image"), default="batch",
                   help="DTP: boundary prior on the batch's count (hits the budget) or on each image's (Nawrot)")
    m.add_argument("--boundaries", choices=("threshold", "topk"), default="threshold",
                   help="DTP: Gumbel-Sigmoid threshold (a count per image) or exactly ceil(N / compression) per image")
    m.add_argument("--execution", choices=("packed", "padded"), default="packed",
                   help="DTP: shortened layers on the batch's real tokens only, or padded to its largest image")
    m.add_argument("--force-patch-dropout", type=float, default=None, help="open_clip patch dropout (FLIP peer)")
    m.add_argument("--grad-checkpointing", action="store_true")
    m.add_argument("--torchcompile", action="store_true", help="torch.compile the model (dynamic shapes for DTP)")

    o = p.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=int, default=64, help="per process")
    o.add_argument("--epochs", type=int, default=32)
    o.add_argument("--lr", type=float, default=5.0e-4)
    o.add_argument("--wd", type=float, default=0.2)
    o.add_argument("--beta1", type=float, default=0.9)
    o.add_argument("--beta2", type=float, default=0.98)
    o.add_argument("--eps", type=float, default=1.0e-6)
    o.add_argument("--warmup", type=int, default=10000, help="linear lr warm-up steps")
    o.add_argument("--lr-scheduler", choices=("cosine", "const"), default="cosine")
    o.add_argument("--grad-clip-norm", type=float, default=None)
    o.add_argument("--precision", choices=PRECISIONS, default="fp32", help="amp = fp16 autocast + GradScaler")
    o.add_argument("--local-loss", action="store_true", help="ClipLoss: logits of local features vs all (DDP)")
    o.add_argument("--gather-with-grad", action="store_true", help="ClipLoss: all-gather with gradient (DDP)")
    o.add_argument("--seed", type=int, default=0)

    r = p.add_argument_group("run")
    r.add_argument("--logs", default=str(REPO_ROOT / "logs"), help="runs go to <logs>/<name>/")
    r.add_argument("--name", default=None, help="default: date-model-compression-batch-seed")
    r.add_argument("--resume", default=None, help="'latest' (of this --name; starts fresh if none) or a checkpoint")
    r.add_argument("--save-frequency", type=int, default=1, help="write epoch_<n>.pt every n epochs")
    r.add_argument("--zeroshot-frequency", type=int, default=1, help="evaluate every n epochs (0: never)")
    r.add_argument("--val-frequency", type=int, default=1, help="retrieval on --val-data every n epochs (0: never)")
    r.add_argument("--log-every-n-steps", type=int, default=20, help="TensorBoard and progress-bar interval")
    r.add_argument("--timing-warmup", type=int, default=5, help="first steps of the run timed apart")
    r.add_argument("--report-to", default="tensorboard", choices=("tensorboard", "none"))
    r.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    r.add_argument("--dist-backend", default=None, help="default: nccl on cuda, gloo on cpu")
    r.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (torch.set_num_threads)")
    r.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in total (smoke runs)")
    return p.parse_args(argv)


def resolve_model(args: argparse.Namespace) -> tuple[str, float | None, bool]:
    """(arch or open_clip name, compression or None for a plain open_clip model, upsample) from the flags."""
    name = args.model
    if name.startswith("DTP-ViT-"):
        parsed = parse_dtp_name(name)
        if parsed is None:
            raise ValueError(f"unknown DTP model {name!r}; registered: {_close_names(name)}")
        stem, compression, upsample = parsed
        if args.compression is not None and args.compression != compression:
            raise ValueError(f"--model {name} means compression {compression:g}, but --compression "
                             f"{args.compression:g} was given; pass one of them")
        if args.upsample and not upsample:
            raise ValueError(f"--upsample contradicts --model {name} (use {name}-up)")
        return stem, compression, upsample
    if args.compression is not None:
        if name not in ARCHS:
            raise ValueError(f"--compression needs --model to be one of {sorted(ARCHS)}, got {name!r}")
        return name, args.compression, args.upsample
    if args.upsample:
        raise ValueError("--upsample needs a DTP model: give --compression or a DTP-ViT-* name")
    if name not in open_clip.list_models():
        raise ValueError(f"unknown model {name!r}; close names: {_close_names(name)}")
    return name, None, False


def _close_names(name: str) -> list[str]:
    return difflib.get_close_matches(name, open_clip.list_models(), n=5, cutoff=0.4)


def check_args(args: argparse.Namespace, world_size: int = 1) -> None:
    """Every inconsistency a user can make, as a ValueError or FileNotFoundError, before any model is built."""
    resolve_model(args)
    for flag in ("batch_size", "epochs", "save_frequency", "log_every_n_steps"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.batch_size * world_size < 2:
        raise ValueError("the contrastive loss needs at least 2 pairs per global batch (--batch-size)")
    if args.lr <= 0 or args.wd < 0 or args.warmup < 0 or args.workers < 0:
        raise ValueError(f"need --lr > 0, --wd >= 0, --warmup >= 0, --workers >= 0; got {args.lr}, {args.wd}, "
                         f"{args.warmup}, {args.workers}")
    if args.boundary_loss_weight < 0:
        raise ValueError(f"--boundary-loss-weight must be >= 0, got {args.boundary_loss_weight}")
    if args.force_patch_dropout is not None and not 0 <= args.force_patch_dropout < 1:
        raise ValueError(f"--force-patch-dropout must be in [0, 1), got {args.force_patch_dropout}")
    if args.local_loss and world_size == 1:
        log.info("--local-loss has no effect in a single process")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} but CUDA is not available")
    if args.precision == "amp" and device.type == "cpu":
        raise ValueError("--precision amp (fp16 autocast) on CPU is about 17x slower than fp32; use fp32 or bf16")
    shards = dtp_data.expand_shards(args.train_data)  # missing shards fail here
    available = dtp_data.dataset_size(shards)
    if not args.train_num_samples and not available:
        raise ValueError(f"epoch size unknown: no sizes.json next to {shards[0]}; pass --train-num-samples")
    if available is not None and available < args.batch_size * world_size and not args.dataset_resampled:
        raise ValueError(f"--train-data holds {available} samples, fewer than one global batch of "
                         f"{args.batch_size} x {world_size} processes; lower --batch-size")
    if args.val_data:
        dtp_data.expand_shards(args.val_data)
    for flag in ("zeroshot_data", "imagenet_val"):
        if getattr(args, flag):
            dtp_eval.zeroshot_classes(getattr(args, flag))  # missing or empty folders fail here
    if args.resume and args.resume != "latest" and not Path(args.resume).is_file():
        raise FileNotFoundError(f"--resume {args.resume}: no such checkpoint file")


def default_name(args: argparse.Namespace) -> str:
    arch, compression, upsample = resolve_model(args)
    model = f"{arch}-{compression:g}x{'-up' if upsample else ''}" if compression is not None else arch
    return f"{datetime.now():%Y_%m_%d-%H_%M_%S}-{model}-b{args.batch_size}-s{args.seed}"


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


def init_distributed(args: argparse.Namespace) -> Dist:
    """Join torchrun's process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU); else one process."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(args.dist_backend or ("nccl" if device.type == "cuda" else "gloo"))
    return Dist(rank, local_rank, world_size, device)


def build_model(args: argparse.Namespace):
    """(model, preprocess_train, preprocess_val, tokenizer); DTP through dtplib, peers through open_clip."""
    arch, compression, upsample = resolve_model(args)
    options = {}
    if args.force_patch_dropout is not None:
        options["force_patch_dropout"] = args.force_patch_dropout
    if compression is None:
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(arch, **options)
        tokenizer = open_clip.get_tokenizer(arch)
    else:
        model, preprocess_train, preprocess_val = create_model_and_transforms(
            arch, compression, upsample, boundary_loss_weight=args.boundary_loss_weight,
            prior_scope=getattr(args, "prior_scope", "batch"), boundaries=getattr(args, "boundaries", "threshold"),
            execution=getattr(args, "execution", "packed"), **options)
        tokenizer = open_clip.get_tokenizer(ARCHS[arch].name)  # the DTP variants share the peer's text tower
    return model, preprocess_train, preprocess_val, tokenizer


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW; as open_clip, no weight decay on gains, biases, norms, embeddings' 1-d params and logit_scale."""
    def no_decay(name: str, param: torch.Tensor) -> bool:
        return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
              {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": args.wd}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps)


def lr_at(step: int, args: argparse.Namespace, total_steps: int) -> float:
    """Linear warm-up to --lr, then cosine to 0 (or constant): open_clip's schedules as a pure function."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.lr_scheduler == "const":
        return args.lr
    progress = (step - args.warmup) / max(1, total_steps - args.warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * args.lr


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated since the last reset, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return process_memory_mb("VmHWM")


# ----------------------------------------------------------------------------------------------------------
# 3. Checkpoints


def rng_state() -> dict:
    """This process's RNG states as tensors and plain values (loadable with weights_only=True)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(_as_tuples(state["python"]))


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


class Checkpoints:
    """`<run>/checkpoints/epoch_<n>.pt` every --save-frequency epochs and `epoch_latest.pt` every epoch, each
    written to a temporary file and renamed, so a kill at any moment leaves the previous checkpoint whole."""

    def __init__(self, folder: Path):
        self.folder = folder

    def save(self, state: dict, epoch: int, keep_numbered: bool) -> Path:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        payload = buffer.getvalue()
        if keep_numbered:
            atomic_write_bytes(self.folder / f"epoch_{epoch}.pt", payload)
        latest = self.folder / "epoch_latest.pt"
        atomic_write_bytes(latest, payload)
        return latest

    def latest(self) -> Path | None:
        if (self.folder / "epoch_latest.pt").is_file():
            return self.folder / "epoch_latest.pt"
        numbered = sorted(self.folder.glob("epoch_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
        return numbered[-1] if numbered else None


# ----------------------------------------------------------------------------------------------------------
# 4. Logging


class RunLog:
    """steps.csv, epochs.csv, TensorBoard and out.log in the run folder; only the main process writes."""

    def __init__(self, folder: Path, enabled: bool, tensorboard: bool):
        self.folder, self.enabled = folder, enabled
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(folder / "tensorboard"))

    def csv_row(self, file: str, row: dict, columns: Sequence[str] | None = None) -> None:
        """Append a row; a row with columns the file lacks (an evaluation every n epochs) widens the file."""
        if not self.enabled:
            return
        path = self.folder / file
        columns = list(columns or row)
        new = not path.is_file()
        if not new:
            with path.open(newline="") as f:
                header = next(csv.reader(f), [])
            if set(columns) - set(header):
                _widen_csv(path, header + [c for c in columns if c not in header])
            columns = header + [c for c in columns if c not in header]
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({k: _fmt(row.get(k)) for k in columns})

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _fmt(value):
    return f"{value:.6g}" if isinstance(value, float) else ("" if value is None else value)


def _widen_csv(path: Path, columns: list[str]) -> None:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, out.getvalue())


def truncate_csv(path: Path, keep) -> None:
    """Drop rows a resumed run will write again (steps after the checkpoint), so the CSV has no duplicates."""
    if not path.is_file():
        return
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
        columns = list(rows[0]) if rows else None
    if columns is None:
        return
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    writer.writerows(r for r in rows if keep(r))
    atomic_write_text(path, out.getvalue())


# ----------------------------------------------------------------------------------------------------------
# 5. Training


class NonFiniteLoss(RuntimeError):
    pass


def train_one_epoch(model, loader, loss_fn, optimizer, scaler, args, dist_env: Dist, epoch: int, step: int,
                    total_steps: int, run_log: RunLog, boundary_weight: float) -> tuple[int, list[dict]]:
    """One pass over the loader; returns the global step after it and the per-step records."""
    model.train()
    device = dist_env.device
    records = []
    has_dtp = bool(dtp_towers(unwrap(model)))
    bar = tqdm(total=len(loader), desc=f"epoch {epoch}", disable=not dist_env.main or None, mininterval=2,
               leave=False)
    end = time.perf_counter()
    for images, texts in loader:
        if args.max_steps is not None and step >= args.max_steps:
            break
        data_time = time.perf_counter() - end
        lr = lr_at(step, args, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images = images.to(device, non_blocking=True)
        texts = texts.to(device, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        synchronize(device)
        start = time.perf_counter()
        traced_run = trace(unwrap(model)) if has_dtp else contextlib.nullcontext()
        with autocast(args.precision, device), traced_run as traced:
            image_features, text_features, logit_scale = model(images, texts)[:3]
            contrastive = loss_fn(image_features, text_features, logit_scale)
            boundary = last_boundary_loss(unwrap(model))
            loss = contrastive + boundary_weight * boundary if boundary is not None else contrastive
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss is {loss.item()} at step {step} (epoch {epoch}): stopping; the last good "
                                "checkpoint is kept. Try a lower --lr, --grad-clip-norm, or fp32.")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if args.grad_clip_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if args.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip_norm)
            optimizer.step()
        with torch.no_grad():  # open_clip clamps the temperature to 100
            unwrap(model).logit_scale.clamp_(0, math.log(100))
        synchronize(device)
        step_time = time.perf_counter() - start
        record = {
            "epoch": epoch, "step": step, "loss": loss.item(), "contrastive_loss": contrastive.item(),
            "boundary_loss": boundary.item() if boundary is not None else 0.0,
            "compression": _budget(traced) if has_dtp else 1.0,
            "lr": lr, "logit_scale": logit_scale.item(), "step_time_s": step_time, "data_time_s": data_time,
            "samples_per_s": len(images) * dist_env.world_size / step_time,
            "peak_memory_mb": peak_memory_mb(device),
        }
        records.append(record)
        run_log.csv_row("steps.csv", record, STEP_COLUMNS)
        if step % args.log_every_n_steps == 0:
            run_log.scalars("train", record, step)
            bar.set_postfix(loss=f"{record['loss']:.3f}", comp=f"{record['compression']:.2f}")
        bar.update()
        step += 1
        end = time.perf_counter()
    bar.close()
    return step, records


def _budget(traced) -> float:
    """Realised compression of a batch as a token budget: patches / mean segments (not the mean of the ratios,
    which a few one-segment images would dominate)."""
    return traced.boundaries.shape[1] / traced.tokens.float().mean().item()


def epoch_summary(epoch: int, records: list[dict], timing_warmup: int, first_epoch: bool) -> dict:
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
        "lr_end": records[-1]["lr"] if records else float("nan"),
        "step_time_s": mean("step_time_s", timed),
        "step_time_median_s": float(np.median([r["step_time_s"] for r in timed])) if timed else float("nan"),
        "data_time_s": mean("data_time_s", timed), "samples_per_s": mean("samples_per_s", timed),
        "warmup_step_time_s": mean("step_time_s", warm) if warm else float("nan"),
        "peak_memory_mb": max((r["peak_memory_mb"] for r in records), default=float("nan")),
    }


def due(epoch_done: int, frequency: int, epochs: int) -> bool:
    """Evaluate after epoch n (1-based) when n is a multiple of frequency, and always after the last."""
    return frequency > 0 and (epoch_done % frequency == 0 or epoch_done == epochs)


def run_evaluations(model, preprocess_val, tokenizer, args, device, epoch_done: int) -> dict:
    zeroshot = due(epoch_done, args.zeroshot_frequency, args.epochs)
    retrieval = due(epoch_done, args.val_frequency, args.epochs) and args.val_data
    if not (zeroshot and (args.zeroshot_data or args.imagenet_val)) and not retrieval:
        return {}
    return dtp_eval.evaluate(
        unwrap(model), preprocess_val, tokenizer, device=device, batch_size=max(args.batch_size, 64),
        zeroshot_data=args.zeroshot_data if zeroshot else None, imagenet_val=args.imagenet_val if zeroshot else None,
        val_data=args.val_data if retrieval else None, max_per_class=args.zeroshot_max_per_class,
        max_images=args.val_max_images)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run training; returns {"run_dir", "epochs" (per-epoch rows), "checkpoint"}."""
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    check_args(args, world_size)
    dist_env = init_distributed(args)
    try:
        return _run(args, dist_env)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(args: argparse.Namespace, dist_env: Dist) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.name or default_name(args)
    if dist_env.world_size > 1 and args.name is None:  # every rank must agree on the folder: take rank 0's
        names = [name]
        dist.broadcast_object_list(names, src=0)
        name = names[0]
    run_dir = Path(args.logs) / name
    checkpoints = Checkpoints(run_dir / "checkpoints")
    resume_from = None
    if args.resume == "latest":
        resume_from = checkpoints.latest()
    elif args.resume:
        resume_from = Path(args.resume)
    if resume_from is None and (run_dir / "params.json").exists():
        if args.resume != "latest":
            raise FileExistsError(f"run folder {run_dir} already holds a run: pass --resume latest to continue "
                                  "it, or a new --name")
        for stale in ("steps.csv", "epochs.csv"):  # killed before its first checkpoint: start again
            (run_dir / stale).unlink(missing_ok=True)
    handler = None
    if dist_env.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        handler = _setup_file_logging(run_dir)
    try:
        return _train(args, dist_env, name, run_dir, checkpoints, resume_from)
    finally:
        if handler is not None:  # a notebook or test may train again in this process: log there, not here
            logging.getLogger("dtplib").removeHandler(handler)
            handler.close()


def _train(args: argparse.Namespace, dist_env: Dist, name: str, run_dir: Path, checkpoints: Checkpoints,
           resume_from: Path | None) -> dict:
    seed_everything(args.seed + dist_env.rank)

    model, preprocess_train, preprocess_val, tokenizer = build_model(args)
    model.to(dist_env.device)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    boundary_weight = args.boundary_loss_weight
    optimizer = make_optimizer(model, args)
    scaler = torch.amp.GradScaler(dist_env.device.type) if args.precision == "amp" else None

    loader = dtp_data.make_loader(args.train_data, preprocess_train, tokenizer, args.batch_size, args.workers,
                                  resampled=args.dataset_resampled, seed=args.seed, is_train=True,
                                  num_samples=args.train_num_samples, pin_memory=dist_env.device.type == "cuda")
    steps_per_epoch = loader.num_batches
    total_steps = steps_per_epoch * args.epochs
    if args.warmup >= total_steps and args.lr_scheduler == "cosine":
        log.warning("--warmup %d >= total steps %d: the learning rate never reaches --lr nor decays",
                    args.warmup, total_steps)

    start_epoch, step = 0, 0
    if resume_from is not None:
        state = read_checkpoint(resume_from)
        model.load_state_dict({k.removeprefix("module."): v for k, v in state["state_dict"].items()})
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, step = state["epoch"], state["step"]
        rng = state.get("rng", [])
        if len(rng) == dist_env.world_size:
            set_rng_state(rng[dist_env.rank])
        else:
            log.warning("checkpoint has RNG states of %d processes, this run has %d: reseeding", len(rng),
                        dist_env.world_size)
            seed_everything(args.seed + start_epoch + dist_env.rank)
        if dist_env.main:
            truncate_csv(run_dir / "steps.csv", lambda r: int(r["step"]) < step)
            truncate_csv(run_dir / "epochs.csv", lambda r: int(r["epoch"]) < start_epoch)
        log.info("resumed from %s at epoch %d, step %d", resume_from, start_epoch, step)

    if dist_env.main:
        params = {**vars(args), "name": name, "world_size": dist_env.world_size, "steps_per_epoch": steps_per_epoch,
                  "total_steps": total_steps, "samples_per_epoch": loader.num_samples,
                  "parameters": sum(p.numel() for p in model.parameters()),
                  **run_info(dist_env.device, args.precision, args.batch_size)}
        atomic_write_text(run_dir / "params.json", json.dumps(params, indent=2, default=str))

    train_model = model
    if args.torchcompile:
        train_model = torch.compile(train_model, dynamic=True)
    if dist_env.world_size > 1:
        train_model = DistributedDataParallel(
            train_model, device_ids=[dist_env.device.index] if dist_env.device.type == "cuda" else None)
    loss_fn = ClipLoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad, cache_labels=True,
                       rank=dist_env.rank, world_size=dist_env.world_size)
    run_log = RunLog(run_dir, dist_env.main, args.report_to == "tensorboard")
    summaries = []
    try:
        for epoch in range(start_epoch, args.epochs):
            if args.max_steps is not None and step >= args.max_steps:
                break
            loader.set_epoch(epoch)
            step, records = train_one_epoch(train_model, loader, loss_fn, optimizer, scaler, args, dist_env, epoch,
                                            step, total_steps, run_log, boundary_weight)
            summary = epoch_summary(epoch, records, args.timing_warmup, first_epoch=epoch == start_epoch)
            summary["skipped_samples"] = sum(loader.skipped.values())
            if dist_env.main:
                summary.update(run_evaluations(model, preprocess_val, tokenizer, args, dist_env.device, epoch + 1))
            if dist_env.world_size > 1:
                dist.barrier()
            state = {"epoch": epoch + 1, "step": step, "name": name, "state_dict": model.state_dict(),
                     "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else {},
                     "schedule": {"kind": args.lr_scheduler, "step": step, "total_steps": total_steps,
                                  "warmup": args.warmup, "lr": args.lr},
                     "rng": _gather_rng(dist_env), "args": {k: v for k, v in vars(args).items()}}
            if dist_env.main:
                path = checkpoints.save(state, epoch + 1, keep_numbered=(epoch + 1) % args.save_frequency == 0
                                        or epoch + 1 == args.epochs)
                summary["checkpoint"] = path.name
                run_log.csv_row("epochs.csv", summary)
                run_log.scalars("epoch", summary, epoch + 1)
                log.info("epoch %d: %s", epoch, {k: _fmt(v) for k, v in summary.items()})
            summaries.append(summary)
    finally:
        run_log.close()
    return {"run_dir": run_dir, "epochs": summaries, "checkpoint": checkpoints.latest()}


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


def launch(argv: Sequence[str], nproc_per_node: int, extra_torchrun: Sequence[str] = ()) -> Path:
    """Run `torchrun --nproc_per_node N -m dtplib.train argv` and wait; returns the run folder."""
    args = parse_args(argv)
    check_args(args, nproc_per_node)
    if args.name is None:  # fix the name here so that the caller knows where the run lands
        argv = [*argv, "--name", default_name(args)]
        args = parse_args(argv)
    # "--" ends torchrun's own flags: without it torchrun reads our --logs as an abbreviation of its --logs-specs
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}",
               *extra_torchrun, "-m", "dtplib.train", "--", *argv]
    subprocess.run(command, check=True)
    return Path(args.logs) / args.name


PATH_FLAGS = ("train_data", "val_data", "zeroshot_data", "imagenet_val", "logs", "resume")


def flags(**options) -> list[str]:
    """Keyword arguments to command-line flags (train_data="x" -> --train-data x; True -> --flag; None/False/""
    dropped). Relative data paths are taken from the repository root, as everywhere in the notebooks."""
    argv = []
    for key, value in options.items():
        if value is None or value is False or value == "":
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
            continue
        if key in PATH_FLAGS and value != "latest" and "://" not in str(value):
            value = repo_path(value)
        argv += [flag, str(value)]
    return argv


def run(argv: Sequence[str], num_gpus: int = 1) -> Path:
    """Train in this process (one device) or through torchrun (num_gpus > 1); returns the run folder."""
    if num_gpus > 1:
        if torch.cuda.device_count() < num_gpus:
            raise ValueError(f"num_gpus={num_gpus} but {torch.cuda.device_count()} CUDA devices are visible")
        return launch(argv, num_gpus)
    return Path(main(argv)["run_dir"])


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = main()
    except (ValueError, FileNotFoundError, FileExistsError, NonFiniteLoss) as error:
        log.error("%s", error)
        sys.exit(2)
    print(f"run folder: {result['run_dir']}")
