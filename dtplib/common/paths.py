"""Where things are: the working checkout (outputs and relative paths), the shared data folder (`$DTPLIB_DATA`), and
the checkout the code itself was imported from.

Relative paths (notebook parameters, command-line flags) are taken from the working checkout: the folder above the
current directory that holds this project's pyproject.toml (a notebook runs with its cwd in notebooks/, a command line
from the root), or the current directory itself outside any checkout. They never follow the installed package, so two
clones sharing one environment each write into their own tree. Only data that ships inside the package is read
relative to it (the open_clip configs in `dtplib/tower/model_configs/`).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the dtplib folder: package data only
PROJECT_NAME = "dtp-vit"  # [project] name in pyproject.toml: what marks a folder as a checkout of this repository
DATA_ENV = "DTPLIB_DATA"  # names the folder of real photos for tests and demos (default: ../shared/data)


def find_checkout(start: str | Path) -> Path | None:
    """The nearest folder at or above `start` whose pyproject.toml names this project, else None."""
    start = Path(start).resolve()
    for folder in (start, *start.parents):
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file() and re.search(rf'^name\s*=\s*"{PROJECT_NAME}"', pyproject.read_text(), re.M):
            return folder
    return None


# the checkout whose dtplib/ is running (an editable install or PYTHONPATH), None for an installed wheel: tests find
# the repository's files through it and provenance asks its git for the commit; outputs never go here
SOURCE_ROOT = find_checkout(PACKAGE_DIR)
REPO_ROOT = SOURCE_ROOT or PACKAGE_DIR.parent


def work_root() -> Path:
    """The working checkout (found from the current directory at each call), else the current directory."""
    return find_checkout(Path.cwd()) or Path.cwd()


def repo_path(path: str | Path) -> Path:
    """A path given relative to the working checkout's root (notebooks run from notebooks/ or from the root)."""
    path = Path(path)
    return path if path.is_absolute() else work_root() / path


def data_root() -> Path:
    """The shared data folder (flickr8k/, coco-mini/, cifar10-test/): $DTPLIB_DATA, read at each call, else
    ../shared/data beside the working checkout. A relative DTPLIB_DATA is taken from the working checkout's root."""
    value = os.environ.get(DATA_ENV)
    return repo_path(Path(value).expanduser()) if value else work_root().parent / "shared" / "data"


def data_path(path: str | Path) -> Path:
    """A path parameter (notebooks, command lines): a leading `$DTPLIB_DATA` is data_root(), e.g.
    "$DTPLIB_DATA/flickr8k/images"; any other relative path is taken from the working checkout's root."""
    text = str(path)
    for prefix in (f"${DATA_ENV}", f"${{{DATA_ENV}}}"):
        if text == prefix or text.startswith(prefix + "/"):
            return data_root() / text[len(prefix):].lstrip("/")
    return repo_path(path)


def other_checkout_message() -> str | None:
    """One line when the running dtplib comes from another checkout than the working one, else None."""
    working = find_checkout(Path.cwd())
    if SOURCE_ROOT is None or working is None or working == SOURCE_ROOT:
        return None
    return (f"dtplib is imported from {SOURCE_ROOT}, but the working checkout is {working}: outputs and relative "
            f"paths go to {working}, the code that runs is {SOURCE_ROOT}'s")


def warn_if_other_checkout() -> None:
    """Warn once, at import, that the code and the outputs belong to different clones (one environment, two clones)."""
    message = other_checkout_message()
    if message:
        warnings.warn(message, stacklevel=2)


def child_environment() -> dict[str, str]:
    """The environment for a `python -m dtplib...` child, so that it runs this process's dtplib whatever its cwd:
    the source checkout first on PYTHONPATH, and PYTHONSAFEPATH so that `-m` does not put the cwd (perhaps another
    clone's root) ahead of it. An installed wheel needs neither: the child finds it where this process did."""
    env = dict(os.environ)
    if SOURCE_ROOT is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(SOURCE_ROOT), *filter(None, [env.get("PYTHONPATH")])])
        env["PYTHONSAFEPATH"] = "1"
    return env
