"""Optional dependencies: the pip extras of pyproject.toml, imported where they are used.

`import dtplib` needs the core dependencies only; a module that needs an extra imports it through `optional_import`,
so a missing extra fails with one line that names it (`pip install 'dtp-vit[flops]'`) instead of a bare
ModuleNotFoundError deep in a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS = {  # top-level module -> the extra of pyproject.toml that installs it
    "fvcore": "flops",
    "img2dataset": "data",
    "pyarrow": "data",
    "papermill": "notebooks",
    "nbformat": "notebooks",
    "ipykernel": "notebooks",
}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def optional_import(name: str) -> ModuleType:
    """Import module `name` (e.g. "fvcore.nn") of an extra, or raise MissingExtra naming that extra."""
    top = name.split(".")[0]
    extra = EXTRAS[top]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] != top:  # the extra is there but broken: its own error says more
            raise
        raise MissingExtra(f"{top} is not installed: it comes with the `{extra}` extra, "
                           f"pip install 'dtp-vit[{extra}]'") from None
