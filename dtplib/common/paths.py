"""Where things are: the repository root, the shared data folder (`$DTPLIB_DATA`), paths given relative to the
repository."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
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


def repo_path(path: str | Path) -> Path:
    """Resolve a path given relative to the repository root (notebooks run from notebooks/ or from the root)."""
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path
