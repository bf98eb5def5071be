"""Third-party packages: the pip extras of pyproject.toml, imported where they are used, and their opt-outs.

`import dtplib` needs the core dependencies only; a module that needs an extra imports it through `optional_import`,
so a missing extra fails with one line that names it (`pip install 'dtp-vit[flops]'`) instead of a bare
ModuleNotFoundError deep in a traceback. `set_opt_outs` turns off the update checks and telemetry of the packages
dtplib imports; importing any part of dtplib calls it first (`dtplib/common/__init__.py`), before any of them is
imported, since some read their variable once, at import.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

OPT_OUTS = {  # environment variable -> value: no third-party update check or telemetry from a dtplib command
    "NO_ALBUMENTATIONS_UPDATE": "1",  # albumentations (imported by img2dataset) asks PyPI for a newer version
    "HF_HUB_DISABLE_TELEMETRY": "1",  # huggingface_hub (open_clip, timm) sends usage data with each download
    "WANDB_ERROR_REPORTING": "false",  # wandb (imported by img2dataset, --report-to wandb) reports its errors to Sentry
}

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


def set_opt_outs() -> dict[str, str]:
    """Set each variable of OPT_OUTS that is not set already (a value the user set is kept, "0" included), for this
    process and the ones it starts; returns the values now in force."""
    return {name: os.environ.setdefault(name, value) for name, value in OPT_OUTS.items()}
