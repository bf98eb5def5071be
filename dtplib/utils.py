"""Small shared helpers: provenance for results rows, atomic writes, seeding."""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_ENV = "DTPLIB_DATA"  # names the folder of real photos for tests and demos (default: ../shared/data)


def data_root() -> Path:
    """The shared data folder (flickr8k/, coco-mini/, cifar10-test/): $DTPLIB_DATA, read at each call, else
    ../shared/data beside the repository. A relative DTPLIB_DATA is taken from the repository root."""
    value = os.environ.get(DATA_ENV)
    return repo_path(Path(value).expanduser()) if value else REPO_ROOT.parent / "shared" / "data"


def data_path(path: str | Path) -> Path:
    """A path parameter (notebooks, command lines): a leading `$DTPLIB_DATA` is data_root(), e.g.
    "$DTPLIB_DATA/flickr8k/images"; any other relative path is taken from the repository root."""
    text = str(path)
    for prefix in (f"${DATA_ENV}", f"${{{DATA_ENV}}}"):
        if text == prefix or text.startswith(prefix + "/"):
            return data_root() / text[len(prefix):].lstrip("/")
    return repo_path(path)


class _OpenClipRandomInit(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded for model '...'. Model initialized randomly." (a root-logger
    warning from open_clip/factory.py, nothing else): dtplib builds models without `pretrained` on purpose, then loads
    its own checkpoint or says itself that the weights are random. A failed `pretrained=` load still logs its error."""

    def filter(self, record: logging.LogRecord) -> bool:
        from_open_clip = Path(record.pathname).parent.name == "open_clip"
        return not (from_open_clip and str(record.msg).startswith("No pretrained weights loaded for model "))


def quiet_open_clip_random_init() -> None:
    """Install the filter above on the root logger (open_clip logs through it) once; importing dtplib does it."""
    root = logging.getLogger()
    if not any(isinstance(f, _OpenClipRandomInit) for f in root.filters):
        root.addFilter(_OpenClipRandomInit())


quiet_open_clip_random_init()


# what a command line reports as bad input (one line, exit 2) instead of a traceback; a UnicodeDecodeError or a
# json.JSONDecodeError is a ValueError, a missing, unreadable or undecodable file an OSError
CLI_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)
T = TypeVar("T")


def run_cli(main: Callable[[list[str]], T], argv: Sequence[str] | None = None, *,
            errors: tuple[type[BaseException], ...] = CLI_ERRORS, prog: str | None = None) -> T:
    """Run a command line's `main(argv)` (default argv: sys.argv[1:]); bad input ends it with one line on stderr,
    "<prog>: error: <message>", and exit status 2, as argparse does for a bad flag. `--debug` anywhere in argv is
    taken out before `main` sees it and lets the error through with its traceback. `errors`: the exception types
    that are bad input (CLI_ERRORS: ValueError, OSError; add your own, e.g. (*CLI_ERRORS, NonFiniteLoss)).
    Returns what `main` returns. Use: `if __name__ == "__main__": run_cli(main)`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        return main(argv)
    except errors as error:
        if debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        name = prog or Path(sys.argv[0]).stem
        sys.stderr.write(f"{name}: error: {message} (--debug for the traceback)\n")
        sys.exit(2)


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


def append_csv(path: str | Path, rows: dict | Sequence[dict], columns: Sequence[str] | None = None) -> None:
    """Append rows to a CSV file, creating it. A row with columns the file lacks widens the file (rewritten
    atomically, the old rows left empty there); `columns` fixes the order of a new file's columns (default: the
    rows' keys in order of appearance)."""
    path = Path(path)
    rows = [{k: "" if v is None or (isinstance(v, float) and math.isnan(v)) else v for k, v in row.items()}
            for row in ([rows] if isinstance(rows, dict) else rows)]
    wanted = list(columns or dict.fromkeys(k for row in rows for k in row))
    header = []
    if path.is_file():
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
    merged = header + [c for c in wanted if c not in header]
    if header and merged == header:
        with path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=merged, extrasaction="ignore", restval="").writerows(rows)
        return
    old = []
    if header:
        with path.open(newline="") as f:
            old = list(csv.DictReader(f))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=merged, extrasaction="ignore", restval="")
    writer.writeheader()
    writer.writerows([*old, *rows])
    atomic_write_text(path, buffer.getvalue())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table's lines: the header, its separator, one line per row (cells already formatted)."""
    return ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head),
            *("| " + " | ".join(row) + " |" for row in rows)]


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


def stop_process(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate a child process and wait for it; kill it if it has not ended within `timeout` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def repo_path(path: str | Path) -> Path:
    """Resolve a path given relative to the repository root (notebooks run from notebooks/ or from the root)."""
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path


# flags whose values are paths: a relative one is taken from the repository root (dtplib.train, dtplib.bench)
PATH_FLAGS = ("train_data", "val_data", "zeroshot_data", "imagenet_val", "logs", "resume", "checkpoint_dir", "out")


def flags(**options) -> list[str]:
    """Keyword arguments to command-line flags, for calling a `main(argv)` from a notebook: train_data="x" ->
    --train-data x; True -> --flag; None, False and "" dropped; a list or tuple -> comma-separated. Relative paths
    of the PATH_FLAGS are taken from the repository root, as everywhere in the notebooks."""
    argv = []
    for key, value in options.items():
        if value is None or value is False or value == "":
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        if key in PATH_FLAGS and value != "latest" and "://" not in str(value):
            value = repo_path(value)
        argv += [flag, str(value)]
    return argv


def open_rgb(path: str | Path | BinaryIO):
    """An image file (or file-like object) as an RGB PIL image, read whole: the file is closed when this returns.
    PIL's errors on bad bytes pass through (OSError, SyntaxError, ValueError, DecompressionBombError)."""
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def load_images(paths: Sequence[str | Path], preprocess) -> torch.Tensor:
    """Image files through a preprocess (open_clip's eval transform): B x 3 x H x W."""
    return torch.stack([preprocess(open_rgb(path)) for path in paths])


def load_photos(folder: str | Path, count: int, preprocess) -> tuple[torch.Tensor, list[Path]]:
    """The first `count` photos of a folder (sorted names), preprocessed: B x 3 x H x W, and their paths."""
    folder = repo_path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[:count]
    if not files:
        raise FileNotFoundError(f"no .jpg/.jpeg/.png images in {folder}")
    return load_images(files, preprocess), files


def process_memory_mb(field: str = "VmHWM") -> float:
    """This process's resident memory in MiB from /proc: VmRSS (now) or VmHWM (peak). Not getrusage's ru_maxrss:
    Linux carries that across exec, so a process started from a large parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")
