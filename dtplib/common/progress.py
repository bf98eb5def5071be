"""Progress bars for the long loops (training, evaluation, the prior fit, alignment, benchmarks), quiet on request.

`progress(iterable, desc=..., total=...)` is a `tqdm.auto` bar: a widget in a notebook (Jupyter, papermill), a
text bar in a terminal. Where stderr is not a terminal (nohup, Slurm, a pipe) tqdm shows nothing: a training run
writes its per-step log lines there instead. Every bar is off when the process is quiet: the command-line flag
`--quiet` (any `python -m dtplib.*` command; `dtplib.common.cli.run_cli` sets the variable below for the process and
its children), `DTPLIB_QUIET=1`, or `CI` set (GitHub Actions and most CI services set `CI=true`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from tqdm.auto import tqdm

QUIET_ENV = "DTPLIB_QUIET"  # 1: no progress bars in this process and the processes it starts
OFF = ("", "0", "false", "no")  # values of DTPLIB_QUIET or CI that do not silence


def is_quiet() -> bool:
    """True when progress bars are off: DTPLIB_QUIET or CI set to anything but "", 0, false or no."""
    return any(os.environ.get(name, "").strip().lower() not in OFF for name in (QUIET_ENV, "CI"))


def progress(iterable: Iterable | None = None, desc: str | None = None, total: int | None = None, **options) -> tqdm:
    """A `tqdm.auto` bar over `iterable` (or a manual one: `progress(total=n)` then `.update()`), off when quiet
    (`is_quiet`) and, outside notebooks, when stderr is not a terminal. It goes when done (`leave=False`: the
    results are in the outputs and logs; a bar inside a training run does not stay under it). `options` go to tqdm
    (`initial`, `leave=True`, `disable=True` to turn one bar off, e.g. on the other ranks of a DDP run)."""
    disable = True if is_quiet() else options.pop("disable", None)  # None: tqdm's own test for a terminal
    options.pop("disable", None)
    options.setdefault("leave", False)
    return tqdm(iterable, desc=desc, total=total, disable=disable, dynamic_ncols=True, **options)
