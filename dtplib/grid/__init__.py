"""The experiment driver behind `python -m dtplib.experiment`: grids of training runs from experiments/*.toml.

- `spec`: the grid file (schema, checks, the flags of each run) and the run-folder layout;
- `runs`: training each (arm, seed) in a child process, resumably, and the jobs on finished runs ([final],
  [timing], [alignment]);
- `contrasts`: the paired contrasts, the tests of the [protocol]'s primary family and the costs they are read at;
- `report`: runs.csv, summary.md and the curves figures.
"""

__all__ = ["contrasts", "report", "runs", "spec"]
