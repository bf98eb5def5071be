"""Experiment grids: every (arm, seed) a `dtplib.train` run, one table of every epoch, a summary with intervals.

`python -m dtplib.experiment --grid experiments/smallrun.toml --out results/smallrun` reads a grid file (TOML, or
JSON with the same structure) and trains each (arm, seed) in `<out>/runs/<arm>-seed<seed>` as
`python -m dtplib.train ... --logs <out>/runs --name <arm>-seed<seed> --resume latest`, in a process of its own.
A run whose epochs.csv has --epochs rows is finished and skipped; a killed one resumes from its newest checkpoint,
so the command can be repeated, and a grid can be run in pieces (`--arms`, `--seeds`, `--max-runs`). With a [finish]
table each run then trains on from its last weights in `<run>/finish` (a final fine-tune, e.g. at full resolution).

The grid file's format: `dtplib.grid.spec`; how runs are trained: `dtplib.grid.runs`; the outputs:
`dtplib.grid.report`.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence

from .common.cli import flags, run_cli
from .common.paths import repo_path
from .grid.report import write_report
from .grid.runs import (
    RunFailed,
    align_runs,
    check_alignment_checkpoints,
    check_alignment_data,
    child_command,
    run_grid,
    time_runs,
)
from .grid.spec import FINISH_DIR, check_final_data, last_checkpoint, load_grid, resolved, run_label, shown_path


def main(argv: Sequence[str] | None = None) -> dict:
    """Returns {"trained": labels of the runs trained by this call, "runs": runs.csv as a frame, "out": folder}."""
    parser = argparse.ArgumentParser(prog="python -m dtplib.experiment", description=__doc__.split("\n")[0])
    parser.add_argument("--grid", required=True, help="grid file (TOML or JSON), e.g. experiments/smallrun.toml")
    parser.add_argument("--out", required=True, help="results folder: runs/, runs.csv, summary.md, figures")
    parser.add_argument("--arms", nargs="+", help="train only these arms (the report covers the whole grid)")
    parser.add_argument("--seeds", nargs="+", type=int, help="train only these seeds")
    parser.add_argument("--max-runs", type=int, help="train at most this many unfinished runs, then report")
    parser.add_argument("--report-only", action="store_true", help="train nothing: rewrite the report")
    parser.add_argument("--dry-run", action="store_true", help="print the training command of every selected run "
                        "and stop (nothing is checked against the data, nothing is written)")
    args = parser.parse_args(argv)
    grid = load_grid(args.grid)
    for arm in args.arms or []:
        if arm not in grid.arms:
            raise ValueError(f"--arms: {arm!r} is not an arm of {grid.path.name} ({', '.join(grid.arms)})")
    for seed in args.seeds or []:
        if not any(seed == s for _, s in grid.runs()):
            raise ValueError(f"--seeds: {seed} is not a seed of {grid.path.name} "
                             f"({sorted({s for _, s in grid.runs()})})")
    if args.max_runs is not None and args.max_runs < 0:
        raise ValueError(f"--max-runs must be >= 0, got {args.max_runs}")
    out = repo_path(args.out)
    if args.dry_run:  # as a user would type them: paths as the grid writes them, torchrun for torch.distributed.run
        commands = []
        for arm, seed in grid.runs(args.arms, args.seeds):
            label = run_label(arm, seed)
            argvs = [flags(**resolved(grid.options(arm, seed)), logs=f"{args.out}/runs", name=label, resume="latest")]
            if grid.finish_options(arm, seed) is not None:  # then its [finish], from the run's last weights
                argvs.append(flags(**resolved(grid.finish_options(arm, seed)), logs=f"{args.out}/runs/{label}",
                                   name=FINISH_DIR, resume="latest", pretrained=shown_path(
                                       last_checkpoint(out / "runs" / label))))
            for argv in argvs:
                command = child_command("dtplib.train", argv, grid.nproc_per_node)[1:]
                command = ["torchrun", *command[2:]] if command[1] == "torch.distributed.run" else ["python", *command]
                commands.append(shlex.join(command))
        print("\n".join(commands))
        return {"commands": commands}
    trained, evaluated, timed, aligned = [], [], False, []
    if not args.report_only:
        check_final_data(grid)
        check_alignment_data(grid)
        check_alignment_checkpoints(grid, out)
        trained, evaluated = run_grid(grid, out, args.arms, args.seeds, args.max_runs)
        timed = time_runs(grid, out)
        aligned = align_runs(grid, out)
    runs = write_report(grid, out, f"python -m dtplib.experiment --grid {shown_path(grid.path)} --out {args.out}")
    print(f"trained {len(trained)} runs and evaluated {len(evaluated)} this call; {out / 'runs.csv'}, "
          f"{out / 'summary.md'}")
    return {"trained": trained, "evaluated": evaluated, "timed": timed, "aligned": aligned, "runs": runs, "out": out}


if __name__ == "__main__":
    run_cli(main, errors=(ValueError, OSError, RunFailed), prog="python -m dtplib.experiment")
