"""The device side of a run: devices, precision and autocast, timers, seeding, eval mode, process memory."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside torch.compile (`_orig_mod`) and/or DistributedDataParallel (`module`) wrappers, in either
    order (training compiles the DDP wrapper: DDP first, then compile)."""
    model = getattr(model, "_orig_mod", model)
    model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    return getattr(model, "_orig_mod", model)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside; every submodule's own training flag is restored afterwards."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes.items():
            module.training = training


def autocast(precision: str, device: torch.device):
    """Autocast for a precision name: fp32 (none), amp / fp16 (float16), bf16 / amp_bf16 / amp_bfloat16."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision in ("amp", "fp16") else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def default_device(device: str | torch.device | None = None) -> torch.device:
    """`device` as a torch.device; None means cuda when a GPU is visible, else cpu. Asking for CUDA without one
    is a ValueError."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for, but CUDA is not available")
    return device


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse fp16 autocast on a CPU: it runs, but about 17x slower than fp32 (bf16 is the CPU's half type)."""
    if precision in ("amp", "fp16") and device.type == "cpu":
        raise ValueError(f"precision {precision} (fp16 autocast) on CPU is about 17x slower than fp32; use fp32 or "
                         "bf16")


def synchronize(device: torch.device) -> None:
    """Wait for the device, so that a wall-clock time covers the work queued on it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def start_timer(device: torch.device) -> float:
    """The start of a timed step: CUDA's peak-memory counter reset, queued work finished, then the clock."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    return time.perf_counter()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def process_memory_mb(field: str = "VmHWM") -> float:
    """This process's resident memory in MiB from /proc: VmRSS (now) or VmHWM (peak). Not getrusage's ru_maxrss:
    Linux carries that across exec, so a process started from a large parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")
