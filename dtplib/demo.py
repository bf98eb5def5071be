"""`make demo`: run every numbered notebook headless with papermill on the embedded sample, CPU-sized.

Executed notebooks and their tables and figures land in results/demo/ (ignored by git) of the working checkout: the
notebooks and the outputs are those of the clone the command runs in (dtplib.common.paths).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .common.extras import optional_import
from .common.paths import child_environment, repo_path, work_root

# CurveZMQ keys for the kernel's sockets (the python3 kernelspec declares support): ipykernel otherwise warns at every
# start that it "is running over TCP without encryption"
KERNEL_CONFIG = {"KernelManager": {"transport_encryption": "auto"}}
# what `make` exports, for `python -m dtplib.demo` run by hand (an explicit value in the environment wins)
ENVIRONMENT = {"NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}


@contextmanager
def kernel_environment():
    """os.environ as the kernels start with it: they import this process's dtplib (paths.child_environment)."""
    saved = dict(os.environ)
    os.environ.update(child_environment())
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run_notebook(notebook: Path, executed: Path, parameters: dict, verbose: bool = False) -> None:
    """Execute one notebook headless as a user would open it: from its notebooks/ folder, with the running Python's
    own kernel ("python3": ipykernel's kernel of sys.executable, present wherever dtplib is installed with the
    `notebooks` extra; the notebooks' "dtp-vit" kernelspec is what `make install` adds for JupyterLab).

    `verbose`: stream the cells' printed output (training's per-step lines, progress) to this console as they
    come, and a bar over the cells."""
    papermill = optional_import("papermill")  # the `notebooks` extra
    from traitlets.config import Config  # jupyter's configuration objects, installed with papermill

    with kernel_environment():
        papermill.execute_notebook(str(notebook), str(executed), parameters=parameters, cwd=str(notebook.parent),
                                   kernel_name="python3", progress_bar=verbose,
                                   stdout_file=sys.stdout if verbose else None,
                                   stderr_file=sys.stderr if verbose else None, config=Config(KERNEL_CONFIG))


def _outputs(folder: Path) -> str:
    """What a notebook wrote: the file count and the figures' names."""
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
    figures = [p.name for p in files if p.suffix == ".png"]
    return f"{len(files)} files" + (f", figures: {', '.join(figures)}" if figures else "")


def run_notebooks(out: str = "results/demo", only: list[str] | None = None,
                  parameters: dict[str, dict] | None = None, verbose: bool = False) -> list[tuple[str, float]]:
    """Execute notebooks/NN_*.ipynb in order; each writes its outputs to <out>/<notebook name>/. Before each one a
    line names it and its output folder; after it, its time and what it wrote.

    `parameters`: notebook name (e.g. "02_model") -> parameters that replace that notebook's defaults (the tests pass
    small ones); out_dir is always <out>/<notebook name>. `verbose`: stream each notebook's own output."""
    notebooks = sorted((work_root() / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if not notebooks:
        raise FileNotFoundError(f"no notebooks in {work_root() / 'notebooks'}: run the demo from a checkout")
    unknown = sorted(set(parameters or {}) - {notebook.stem for notebook in notebooks})
    if unknown:
        raise ValueError(f"parameters for notebooks that do not exist: {', '.join(unknown)}")
    out_root = repo_path(out)
    out_root.mkdir(parents=True, exist_ok=True)
    chosen = [notebook for notebook in notebooks if not only or notebook.stem in only]
    timings = []
    for number, notebook in enumerate(chosen, 1):
        start = time.perf_counter()
        print(f"[{number}/{len(chosen)}] running {notebook.relative_to(work_root())} -> {out_root / notebook.stem}/",
              flush=True)
        run_notebook(notebook, out_root / notebook.name,
                     {**(parameters or {}).get(notebook.stem, {}), "out_dir": str(out_root / notebook.stem)}, verbose)
        timings.append((notebook.stem, time.perf_counter() - start))
        print(f"[{number}/{len(chosen)}] {notebook.stem} done in {timings[-1][1]:.0f} s: "
              f"{_outputs(out_root / notebook.stem)}", flush=True)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="results/demo", help="where executed notebooks and outputs go")
    parser.add_argument("--only", nargs="*", help="notebook names (e.g. 02_model) to run instead of all")
    parser.add_argument("--quiet", action="store_true", help="only a line before and after each notebook")
    args = parser.parse_args()
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    start = time.perf_counter()
    timings = run_notebooks(args.out, args.only, verbose=not args.quiet)
    out_root = repo_path(args.out)
    print(f"\nDemo finished in {time.perf_counter() - start:.0f} s. Executed notebooks (open them in JupyterLab) "
          "and their outputs:")
    for name, seconds in timings:
        executed, folder = out_root / f"{name}.ipynb", out_root / name
        print(f"  {seconds:5.0f} s  {executed}  -> {folder}/ ({_outputs(folder)})")


if __name__ == "__main__":
    main()
