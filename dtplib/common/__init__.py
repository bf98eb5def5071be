"""Helpers every folder uses, each module named by what it holds.

- `paths`: the working checkout (where outputs and relative paths go), the shared data folder (`$DTPLIB_DATA`);
- `files`: atomic writes, CSV appends, markdown tables;
- `images`: photos from disk as batches;
- `runtime`: devices, precision, timers, seeding, eval mode, memory;
- `provenance`: commit and hardware of every results row;
- `cli`: one-line command-line errors, flags from keyword arguments, child processes;
- `extras`: optional dependencies (pip extras) imported where used, with a one-line error naming the extra, and the
  third-party opt-outs (update checks, telemetry), set here, before any module of dtplib imports a third party;
- `progress`: progress bars (`tqdm.auto`), off under `--quiet`, `DTPLIB_QUIET=1` or `CI`.
"""

from .extras import set_opt_outs

set_opt_outs()

__all__ = ["cli", "extras", "files", "images", "paths", "progress", "provenance", "runtime"]
