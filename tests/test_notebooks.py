"""Every notebook under notebooks/ is numbered and committed clean, with one parameters cell; the small parameters
each one runs with in the suite (new notebooks join here). tests/test_demo.py runs them, once, under papermill through
`make demo`'s own code (dtplib.demo.run_notebooks) and checks the files each one must write (OUTPUTS)."""

import re
from pathlib import Path

import nbformat
import pytest

from dtplib.common.paths import REPO_ROOT

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))

# Small parameters per notebook (out_dir is always <the test's folder>/<notebook name>), and the files each one
# must write there.
SMOKE = {
    "01_data_prep": {},
    "02_model": {"compressions": [1, 4], "num_images": 8, "prior_steps": 30},
    "03_train": {"epochs": 1, "batch_size": 16, "zeroshot_max_per_class": 2},
    "04_boundaries": {"num_images": 16, "num_shown": 2, "prior_steps": 20, "num_coco": 8},
    "05_efficiency": {"flops_model": "DTP-ViT-Ti-8-64-4x", "num_images": 8, "bench_batch_size": 4, "bench_steps": 2,
                      "bench_models": "DTP-ViT-Ti-8-64-1x,DTP-ViT-Ti-8-64-4x,ViT-Ti-8-64+pd0.5"},
    "06_zeroshot_finetune": {"zeroshot_max_per_class": 1, "per_class_train": 4, "per_class_test": 2, "vit_epochs": 1,
                             "prior_steps": 20, "finetune_epochs": 1, "batch_size": 16},
}
OUTPUTS = {
    "01_data_prep": ["samples.png", "caption_lengths.png", "url_shards/summary.json"],
    "02_model": ["variants.csv", "prior_fit.csv"],
    "03_train": ["training_curves.png", "epochs.csv"],
    "04_boundaries": ["overlays.png", "token_grid.png", "tokens_hist.png", "methods.png", "alignment.csv"],
    "05_efficiency": ["flops_components.csv", "efficiency_live.csv", "summary_table.csv",
                      "speedup_nvidia_h100_80gb_hbm3.png",
                      "accuracy_vs_gflops.png", "accuracy_vs_cost.png"],
    "06_zeroshot_finetune": ["pretrained_zeroshot.csv", "results.csv", "finetune_history.csv", "accuracy.png"],
}


def test_every_notebook_opens_in_the_project_kernel():
    """The kernelspec `make install` adds to .venv (the Makefile's KERNEL): JupyterLab opens each notebook with the
    project's environment, not whatever "python3" means on the machine. (make demo and the tests pass their own.)"""
    kernel = re.search(r"^KERNEL := (\S+)$", (REPO_ROOT / "Makefile").read_text(), re.M).group(1)
    assert kernel == "dtp-vit"
    for notebook in NOTEBOOKS:
        spec = nbformat.read(notebook, as_version=4).metadata.kernelspec
        assert (spec.name, spec.display_name, spec.language) == (kernel, f"Python ({kernel})", "python"), notebook.name


def test_all_numbered_notebooks_are_found():
    assert [p.stem[:2] for p in NOTEBOOKS] == [f"{i:02d}" for i in range(1, len(NOTEBOOKS) + 1)]
    assert {"01_data_prep", "02_model"} <= {p.stem for p in NOTEBOOKS}


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_clean_with_one_parameters_cell(notebook: Path):
    source = nbformat.read(notebook, as_version=4)
    code = [cell for cell in source.cells if cell.cell_type == "code"]
    tagged = [cell for cell in source.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is code[0], "exactly one parameters cell, the first code cell"
    assert "out_dir" in tagged[0].source
    comments = [line.partition("#")[2] for line in tagged[0].source.splitlines()]
    assert not any("=" in c for c in comments), "papermill cannot read a parameter whose comment holds '='"
    assert not any(cell.get("outputs") or cell.get("execution_count") for cell in code), "commit without outputs"
    assert not any("def " in cell.source or "sys.path" in cell.source for cell in code), "helpers belong in dtplib"

