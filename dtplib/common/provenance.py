"""Provenance of every results row: the commit, the hardware, dtype and batch size."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from importlib.metadata import version
from pathlib import Path

import torch

from .paths import SOURCE_ROOT


def git_commit() -> str:
    """Short commit of the checkout whose code runs (paths.SOURCE_ROOT), with '+dirty' when it has uncommitted
    changes, as it was when this module was imported: the code a process loaded is the checkout's at its start, so
    a kernel or a training run that lives across commits keeps recording the commit it runs. DTPLIB_COMMIT overrides
    it for a copy of a clean checkout that has no .git (a machine that receives the files alone); an installed wheel
    reads as its version, e.g. "dtp-vit==0.1.0"."""
    if os.environ.get("DTPLIB_COMMIT"):
        return os.environ["DTPLIB_COMMIT"]
    return _checkout_commit()


@functools.cache
def _checkout_commit() -> str:
    """git_commit's reading of the checkout, once per process: at import (the end of this module)."""
    if os.environ.get("DTPLIB_COMMIT"):
        return os.environ["DTPLIB_COMMIT"]
    if SOURCE_ROOT is None:
        return f"dtp-vit=={version('dtp-vit')}"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=SOURCE_ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=SOURCE_ROOT,
                               capture_output=True, text=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


_checkout_commit()  # the commit of the code this process loaded, read now (two git calls, ~20 ms)


def hardware(device: str | torch.device = "cpu") -> str:
    """Human-readable name of the device that produced a number (GPU name, or CPU model and core count)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} x{len(os.sched_getaffinity(0))} cores"


def run_info(device: str | torch.device = "cpu", dtype: str = "fp32", batch_size: int | None = None) -> dict:
    """Provenance columns that every row written to results/ carries."""
    return {
        "hardware": hardware(device),
        "dtype": dtype,
        "batch_size": batch_size,
        "torch": torch.__version__,
        "commit": git_commit(),
    }
