"""A training run's folder: checkpoints (written to a temporary file and renamed, and only when every tensor is
finite; the newest readable one found again on resume), the RNG states they carry, the CSV and TensorBoard logs,
and the rows a resume drops. `dtplib.train` runs the epochs around them.
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
    """`<run>/checkpoints/epoch_<n>.pt` every --save-frequency epochs and `epoch_latest.pt` every epoch (or where
    --max-steps stops mid-epoch, marked `mid_epoch`), each written to a temporary file and renamed, so a kill at
    any moment leaves the previous checkpoint whole. A state with a non-finite tensor is never written."""

    def __init__(self, folder: Path):
        self.folder = folder

    def save(self, state: dict, epoch: int, keep_numbered: bool) -> Path:
        bad = _non_finite_tensors(state)
        if bad:
            raise NonFiniteState(f"{len(bad)} tensors are not finite ({', '.join(bad[:3])}, ...) at step "
                                 f"{state['step']}: no checkpoint written; {self.kept()}")
        buffer = io.BytesIO()
        torch.save(state, buffer)
        payload = buffer.getvalue()
        if keep_numbered:
            atomic_write_bytes(self.folder / f"epoch_{epoch}.pt", payload)
        latest = self.folder / "epoch_latest.pt"
        atomic_write_bytes(latest, payload)
        return latest

    def candidates(self) -> list[Path]:
        """Checkpoints to resume from, best first: epoch_latest.pt, then epoch_<n>.pt from the newest."""
        numbered = sorted(self.folder.glob("epoch_[0-9]*.pt"), key=lambda p: int(p.stem.split("_")[1]), reverse=True)
        latest = self.folder / "epoch_latest.pt"
        return ([latest] if latest.is_file() else []) + numbered

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


def remove_partial_files(*folders: Path) -> None:
    """Remove the hidden temporary files of atomic writes that a killed process left behind."""
    for folder in folders:
        for partial in folder.glob(".*.tmp"):
            partial.unlink(missing_ok=True)
            log.info("removed %s, a partial write of a killed run", partial)


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
        if self.enabled:
            append_csv(self.folder / file, {k: format_value(v) for k, v in row.items()}, columns)

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def format_value(value):
    return f"{value:.6g}" if isinstance(value, float) else ("" if value is None else value)


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
