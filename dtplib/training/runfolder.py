"""A training run's folder: checkpoints (open_clip_train's policy; written to a temporary file and renamed, and only
when every tensor is finite; the newest readable one found again on resume), the RNG states they carry, the CSV,
TensorBoard and wandb logs, the per-step log line, and the rows a resume drops. `dtplib.train` runs the epochs
around them.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..common.files import append_csv, atomic_write_bytes, atomic_write_text
from ..tower.clip import read_checkpoint

log = logging.getLogger("dtplib.train")


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


class NonFiniteState(FloatingPointError):
    """The weights or optimizer state are NaN or infinite: they are not written as a checkpoint."""


def _non_finite_tensors(state: dict) -> list[str]:
    """Names of the floating-point tensors of a training state (model and optimizer) that hold a NaN or an inf."""
    found = [k for k, v in state["state_dict"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    for index, values in state["optimizer"].get("state", {}).items():
        found += [f"optimizer state {index}.{k}" for k, v in values.items()
                  if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]
    return found


class Checkpoints:
    """`<run>/checkpoints/`, with open_clip_train's policy: `epoch_<n>.pt` every --save-frequency epochs and after
    the last; `epoch_latest.pt` after every epoch with --save-most-recent; with --delete-previous-checkpoint only the
    newest `epoch_<n>.pt` is kept. A --max-steps stop inside an epoch always writes `epoch_latest.pt` (marked
    `mid_epoch`: the only file that resumes there), and a later `epoch_<n>.pt` written without --save-most-recent
    removes it, so `epoch_latest.pt`, where present, is always the newest state. Each file is written to a
    temporary file and renamed, so a kill at any moment leaves the previous checkpoint whole. A state with a
    non-finite tensor is never written."""

    def __init__(self, folder: Path, delete_previous: bool = False):
        self.folder, self.delete_previous = folder, delete_previous

    def save(self, state: dict, epoch: int, numbered: bool, latest: bool) -> Path | None:
        """Write `epoch_<epoch>.pt` (numbered) and/or `epoch_latest.pt` (latest); returns the path of the one that
        `--resume latest` would read (None when neither was asked)."""
        bad = _non_finite_tensors(state)
        if bad:
            raise NonFiniteState(f"{len(bad)} tensors are not finite ({', '.join(bad[:3])}, ...) at step "
                                 f"{state['step']}: no checkpoint written; {self.kept()}")
        if not (numbered or latest):
            return None
        buffer = io.BytesIO()
        torch.save(state, buffer)
        payload = buffer.getvalue()
        path = self.folder / "epoch_latest.pt"
        if numbered:
            path = self.folder / f"epoch_{epoch}.pt"
            atomic_write_bytes(path, payload)
            stale = [p for p in self.numbered() if p != path] if self.delete_previous else []
            if not latest:
                stale.append(self.folder / "epoch_latest.pt")  # older than the file just written
            for old in stale:
                old.unlink(missing_ok=True)
        if latest:
            path = self.folder / "epoch_latest.pt"
            atomic_write_bytes(path, payload)
        return path

    def numbered(self) -> list[Path]:
        """The `epoch_<n>.pt` files, newest first."""
        return sorted(self.folder.glob("epoch_[0-9]*.pt"), key=lambda p: int(p.stem.split("_")[1]), reverse=True)

    def candidates(self) -> list[Path]:
        """Checkpoints to resume from, best first: epoch_latest.pt, then epoch_<n>.pt from the newest."""
        latest = self.folder / "epoch_latest.pt"
        return ([latest] if latest.is_file() else []) + self.numbered()

    def latest(self) -> Path | None:
        found = self.candidates()
        return found[0] if found else None

    def load_latest(self) -> tuple[Path, dict] | None:
        """The newest checkpoint that reads whole, with its state; a corrupt one is passed over and said so."""
        for path in self.candidates():
            try:
                return path, read_checkpoint(path)
            except (ValueError, OSError) as exn:  # read_checkpoint names a torn or foreign file
                log.warning("checkpoint %s cannot be read (%s): trying an older one", path, str(exn)[:200] or
                            type(exn).__name__)
        return None

    def kept(self) -> str:
        latest = self.latest()
        return f"the last good checkpoint is kept: {latest}" if latest else "there is no checkpoint of this run"


def newest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint a `dtplib.train` run folder holds its newest state in (epoch_latest.pt, else the highest
    epoch_<n>.pt), or None: the one to evaluate, benchmark or finetune from."""
    return Checkpoints(Path(run_dir) / "checkpoints").latest()


def remove_partial_files(*folders: Path) -> None:
    """Remove the hidden temporary files of atomic writes that a killed process left behind."""
    for folder in folders:
        for partial in folder.glob(".*.tmp"):
            partial.unlink(missing_ok=True)
            log.info("removed %s, a partial write of a killed run", partial)


class RunLog:
    """steps.csv, epochs.csv, TensorBoard and wandb in the run folder; only the main process writes. `wandb`:
    `wandb.init`'s keyword arguments (project, name, id, config), its files under `<run>/wandb/` (`WANDB_MODE=offline`
    keeps them there; `wandb sync` uploads them later)."""

    def __init__(self, folder: Path, enabled: bool, tensorboard: bool, wandb: dict | None = None):
        self.folder, self.enabled = folder, enabled
        self.writer = self.wandb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(folder / "tensorboard"))
        if enabled and wandb is not None:
            import wandb as wandb_module

            self.wandb = wandb_module.init(dir=str(folder), resume="allow", **wandb)

    def csv_row(self, file: str, row: dict, columns: Sequence[str] | None = None) -> None:
        """Append a row; a row with columns the file lacks (an evaluation every n epochs) widens the file."""
        if self.enabled:
            append_csv(self.folder / file, {k: format_value(v) for k, v in row.items()}, columns)

    def scalars(self, prefix: str, values: dict, step: int, wandb_step: int | None = None) -> None:
        """The finite numbers of `values` as `<prefix>/<key>`: to TensorBoard at `step`, to wandb at `wandb_step`
        (default `step`; wandb's steps must not go back, so per-epoch values go at the run's global step)."""
        numbers = {f"{prefix}/{key}": value for key, value in values.items()
                   if isinstance(value, (int, float)) and math.isfinite(value)}
        if self.writer is not None:
            for key, value in numbers.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step if wandb_step is None else wandb_step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def train_line(epoch: int, batches: int, num_batches: int, samples_per_epoch: int, global_batch: int,
               world_size: int, window: Sequence[dict], epoch_rows: Sequence[dict], pooled: bool) -> str:
    """open_clip_train's per-step line for the steps.csv rows of one log window: samples seen in the epoch, data and
    batch (data + step) time as means over the window, throughput over the window, the lr and logit scale of its
    last step, then each loss as `Name: last step (epoch mean)`. A pooling tower adds Boundary_loss and Compression
    (patches per token). Times are the window's means because only the window's last step waits for the device."""
    last = window[-1]
    data_time = float(np.mean([r["data_time_s"] for r in window]))
    batch_time = float(np.mean([r["data_time_s"] + r["step_time_s"] for r in window]))
    digits = math.ceil(math.log(samples_per_epoch + 1, 10))
    names = ("contrastive_loss", "boundary_loss", "loss") if pooled else ("contrastive_loss", "loss")
    losses = " ".join(f"{name.capitalize()}: {last[name]:#.5g} ({np.mean([r[name] for r in epoch_rows]):#.5g})"
                      for name in names)
    compression = np.mean([r["compression"] for r in epoch_rows])
    return (f"Train Epoch: {epoch} [{batches * global_batch:>{digits}}/{samples_per_epoch} "
            f"({100.0 * batches / num_batches:.0f}%)] Data (t): {data_time:.3f} Batch (t): {batch_time:.3f}, "
            f"{global_batch / batch_time:#g}/s, {global_batch / world_size / batch_time:#g}/s/gpu "
            f"LR: {last['lr']:5f} Logit Scale: {last['logit_scale']:.3f} {losses}"
            + (f" Compression: {last['compression']:.3f} ({compression:.3f})" if pooled else ""))


def format_value(value):
    return f"{value:.6g}" if isinstance(value, float) else ("" if value is None else value)


def restore_row(path: Path, row: dict, key: str) -> None:
    """Append `row` to a CSV unless a row with its `key` is there: the epochs.csv row a checkpoint carries, when the
    process was killed after writing the checkpoint and before the row."""
    if path.is_file():
        with path.open(newline="") as f:
            if any(r.get(key) == str(format_value(row[key])) for r in csv.DictReader(f)):
                return
    append_csv(path, {k: format_value(v) for k, v in row.items()})
    log.info("%s: restored the row of %s %s from its checkpoint", path, key, row[key])


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
