"""Files that are never half-written: atomic writes, CSV appends with a fixed header, markdown tables."""

from __future__ import annotations

import csv
import io
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path


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
