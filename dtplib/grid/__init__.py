"""The experiment driver behind `python -m dtplib.experiment`: grids of training runs from experiments/*.toml.

- `spec`: the grid file (schema, checks, the flags of each run) and the run-folder layout;
- `runs`: training each (arm, seed) in a child process, resumably, and the jobs on finished runs ([final],
  [timing], [alignment]);
- `report`: runs.csv, the contrasts, summary.md and the curves figures.
"""

__all__ = ["report", "runs", "spec"]
