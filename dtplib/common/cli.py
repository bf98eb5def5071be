"""Command-line plumbing: one-line errors and `--quiet` (`run_cli`), keyword arguments to flags, stopping child
processes, and the filter that keeps open_clip's random-init warning out of the logs."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from .paths import repo_path
from .progress import QUIET_ENV


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



# what a command line reports as bad input (one line, exit 2) instead of a traceback; a UnicodeDecodeError or a
# json.JSONDecodeError is a ValueError, a missing, unreadable or undecodable file an OSError
CLI_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


T = TypeVar("T")


def run_cli(main: Callable[[list[str]], T], argv: Sequence[str] | None = None, *,
            errors: tuple[type[BaseException], ...] = CLI_ERRORS, prog: str | None = None) -> T:
    """Run a command line's `main(argv)` (default argv: sys.argv[1:]); bad input ends it with one line on stderr,
    "<prog>: error: <message>", and exit status 2, as argparse does for a bad flag. `--debug` anywhere in argv is
    taken out before `main` sees it and lets the error through with its traceback. `errors`: the exception types
    that are bad input (CLI_ERRORS: ValueError, OSError; add your own, e.g. (*CLI_ERRORS, NonFiniteLoss)); an error
    with a `messages` list (several bad flags at once) gives one such line per message.
    `--quiet` anywhere in argv is taken out too and turns the progress bars off (`dtplib.common.progress`).
    Returns what `main` returns. Use: `if __name__ == "__main__": run_cli(main)`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    quiet = "--quiet" in argv
    argv = [arg for arg in argv if arg not in ("--debug", "--quiet")]
    before = os.environ.get(QUIET_ENV)
    if quiet:  # for this process and the ones it starts (torchrun's ranks, a grid's runs)
        os.environ[QUIET_ENV] = "1"
    try:
        return main(argv)
    except errors as error:
        if debug:
            raise
        name = prog or Path(sys.argv[0]).stem
        for line in getattr(error, "messages", None) or [str(error)]:  # several bad flags: one line each
            message = " ".join(str(line).split()) or type(error).__name__
            sys.stderr.write(f"{name}: error: {message} (--debug for the traceback)\n")
        sys.exit(2)
    finally:
        if quiet and before is None:  # a notebook or test calls run_cli again in this process
            os.environ.pop(QUIET_ENV, None)
        elif quiet:
            os.environ[QUIET_ENV] = before


def stop_process(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate a child process and wait for it; kill it if it has not ended within `timeout` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


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
