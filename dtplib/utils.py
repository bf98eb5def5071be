"""Small shared helpers: provenance for results rows, atomic writes, seeding."""

from __future__ import annotations

import contextlib
import os
import platform
import random
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"  # real photos for tests and demos (../shared/data)


def git_commit() -> str:
    """Short commit of the working tree, with '+dirty' when it has uncommitted changes. DTPLIB_COMMIT overrides it
    for a copy of a clean checkout that has no .git (a machine that receives the files alone)."""
    if os.environ.get("DTPLIB_COMMIT"):
        return os.environ["DTPLIB_COMMIT"]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: a killed process never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel (`module`) and/or torch.compile (`_orig_mod`) wrapper."""
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


def synchronize(device: torch.device) -> None:
    """Wait for the device, so that a wall-clock time covers the work queued on it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def repo_path(path: str | Path) -> Path:
    """Resolve a path given relative to the repository root (notebooks run from notebooks/ or from the root)."""
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path


def load_photos(folder: str | Path, count: int, preprocess) -> tuple[torch.Tensor, list[Path]]:
    """The first `count` photos of a folder (sorted names), preprocessed: B x 3 x H x W, and their paths."""
    from PIL import Image

    folder = repo_path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[:count]
    if not files:
        raise FileNotFoundError(f"no .jpg/.jpeg/.png images in {folder}")
    return torch.stack([preprocess(Image.open(f).convert("RGB")) for f in files]), files


def process_memory_mb(field: str = "VmHWM") -> float:
    """This process's resident memory in MiB from /proc: VmRSS (now) or VmHWM (peak). Not getrusage's ru_maxrss:
    Linux carries that across exec, so a process started from a large parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")
