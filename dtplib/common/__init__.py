"""Helpers every folder uses, each module named by what it holds.

- `paths`: the repository root, the shared data folder (`$DTPLIB_DATA`), repository-relative paths;
- `files`: atomic writes, CSV appends, markdown tables;
- `images`: photos from disk as batches;
- `runtime`: devices, precision, timers, seeding, eval mode, memory;
- `provenance`: commit and hardware of every results row;
- `cli`: one-line command-line errors, flags from keyword arguments, child processes;
- `progress`: progress bars (`tqdm.auto`), off under `--quiet`, `DTPLIB_QUIET=1` or `CI`.
"""

__all__ = ["cli", "files", "images", "paths", "progress", "provenance", "runtime"]
