"""Files that are never half-written: atomic writes, CSV appends with a fixed header, markdown tables; and a
folder's lock (one writer at a time)."""

from __future__ import annotations

import csv
import fcntl
import io
import math
import os
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path

LOCK_FILE = "run.lock"  # in a locked folder: the holder's PID and host


class FolderInUse(BlockingIOError):
    """Another process holds the lock of a folder (`lock_folder`)."""


class FolderLock:
    """An exclusive `fcntl.flock` on `<folder>/run.lock`, held from `lock_folder` until `release()` or the end of
    the process: the kernel drops the lock when the holder exits in any way (SIGKILL included), so a lock file
    left by a dead process blocks nothing. The file itself stays (removing it would let two processes lock two
    different files of the same name); it records the holder's PID and host, for the refusal's message."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = -1

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_folder(folder: str | Path, purpose: str = "run folder") -> FolderLock:
    """Take `folder`'s lock (creating the folder), or raise FolderInUse naming the process that holds it: one line,
    "<purpose> <folder> is in use by process <pid> on <host> (...)". Nothing in the folder is written before the
    lock is held."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
        os.close(fd)
        info = dict(item.partition("=")[::2] for item in holder)
        raise FolderInUse(f"{purpose} {folder} is in use by process {info.get('pid', '?')} on "
                          f"{info.get('host', '?')} ({path} is locked): wait for it to end, or give another "
                          "--name") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()}\n".encode(), 0)
    return FolderLock(path, fd)


def _named(error: OSError, path: Path) -> OSError:
    """`error` again with `path` as its file name (a failed write, "[Errno 28] No space left on device", names no
    file of its own)."""
    return type(error)(error.errno, error.strerror or str(error), str(path))


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
    except OSError as error:  # a full disk, a quota: the error names the file it was writing
        Path(tmp).unlink(missing_ok=True)
        if error.filename is None:
            raise _named(error, path) from error
        raise
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
        try:
            with path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=merged, extrasaction="ignore", restval="").writerows(rows)
        except OSError as error:
            if error.filename is None:
                raise _named(error, path) from error
            raise
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
